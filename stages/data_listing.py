"""Stage `data_listing`: what is at `shard.path` now, as data/listing.json (cgspn.data.listing).

dvc.yaml runs it on every `dvc repro` (`always_changed`): the data may be a brace pattern, a folder of
shards or object storage, none of which DVC can hash as a dependency. The shard stage depends on the
listing instead, so it reruns only when a file or object changed, appeared or went. It reads the shard
section of params.yaml and logs no MLflow run (it would leave one per repro).
"""
from __future__ import annotations

import time
from pathlib import Path

from cgspn.data.listing import listing
from cgspn.data.locations import load_md5_cache
from cgspn.data.shard_params import SCHEMA
from cgspn.pipeline.cli import run_stage
from cgspn.pipeline.outputs import write_json

OUT = Path("data/listing.json")
MD5_CACHE = Path("data/.listing-md5.json")  # untracked: MD5s of local files by (size, mtime, inode)


def main(p: dict, root: Path, run) -> dict:
    """List the data at shard.path."""
    start = time.perf_counter()
    cache = load_md5_cache(root / MD5_CACHE)
    found = listing(p["source"], p["path"], cache)
    write_json(root / MD5_CACHE, cache)
    write_json(root / OUT, found)
    size = sum(f.get("size") or 0 for f in found["files"])
    print(f"data_listing: {len(found['files'])} files, {size / 1e6:.1f} MB at {p['path']} "
          f"({time.perf_counter() - start:.1f} s)")
    if "note" in found:
        print(f"data_listing: note: {found['note']}")
    return found


if __name__ == "__main__":
    run_stage("data_listing", SCHEMA, main, section="shard", tracked=False)
