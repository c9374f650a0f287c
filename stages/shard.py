"""Stage `shard`: an image source -> webdataset shards in data/shards/, a wids index per split, metrics.

Sources (params `shard.source`, at `shard.path`, which the data_listing stage lists for DVC): `fashion_mnist`
(the embedded default: garments, mosaics with label maps, natural photos; `path` is the folder of its IDX
files), `folder` (<class>/<image>, or <split>/<class>/<image>), `table` (a CSV or parquet with `path` and
optional `label`, `caption`, `split`, `mask`), `segmentation` (images/<split>/ with annotations/<split>/,
as ADE20K and mmseg lay it out); see cgspn.data.own_data. `webdataset`: the researcher's shards (img2dataset's
layout), local or in object storage, indexed where they lie and not copied: data/shards holds only the
indexes (cgspn.data.webdataset_source). dataset.json says what each split holds (labels, masks, captions),
so later stages pick their splits from it. The new tree replaces data/shards only when whole.

reports/metrics/shard.json (a DVC output) holds only what the input decides: counts, sizes, the source, and
"notes", one sentence per kind of change made to the images (e.g. "12 16-bit images scaled to 8 bit
(value / 257)"), [] when none; times and rates go to reports/timings/ (untracked) and MLflow.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from cgspn.data.preview import sample_grid
from cgspn.data.shards import write_split
from cgspn.data.own_data import folder_data, segmentation_data, table_data
from cgspn.data.sources import fashion_mnist_splits
from cgspn.data.webdataset_source import index_webdataset
from cgspn.pipeline.errors import ParamError
from cgspn.pipeline.outputs import replace_dir, write_json, write_timings
from cgspn.data.shard_params import SCHEMA
from cgspn.pipeline.cli import run_stage

OUT = Path("data/shards")
METRICS = Path("reports/metrics/shard.json")


def load_source(p: dict, root: Path):
    for key in ("garments_per_mosaic", "garment_size"):
        lo, hi = p[key]
        if lo > hi:
            raise ParamError(f"shard.{key} must be [low, high] with low <= high, got {p[key]}")
    if not p["path"]:
        raise ParamError(f"shard.path must name the data of source {p['source']!r}")
    if not isinstance(p["path"], str):
        raise ParamError(f"shard.path must be one path for source {p['source']!r} (a list or mapping of shards "
                         f"is for the webdataset source), got {p['path']!r}")
    path = Path(p["path"])
    if p["source"] == "fashion_mnist":
        return fashion_mnist_splits(p, root / "data" / "raw" / "fashion-mnist")
    if p["source"] == "folder":
        return folder_data(path, p["val_fraction"], p["seed"])
    if p["source"] == "segmentation":
        return segmentation_data(path, p["val_fraction"], p["seed"])
    return table_data(path, p["val_fraction"], p["seed"])


def write_dataset(staging: Path, p: dict, splits: dict, classes, mask_classes, ignore_label, **extra) -> None:
    """dataset.json: the source, class names, and what each split holds, with its index file."""
    write_json(staging / "dataset.json", {
        "source": p["source"], "path": p["path"], "classes": classes, "mask_classes": mask_classes,
        "ignore_label": ignore_label, **extra, "splits": {s: {**v, "index": f"{s}.json"} for s, v in splits.items()},
    })


def index_in_place(p: dict, staging: Path) -> tuple[dict, dict]:
    """The webdataset source: an index per split of the shards where they lie; (splits, what was seen)."""
    found = index_webdataset(p["path"], p["val_fraction"], p["seed"])
    splits = {}
    for split, info in found["splits"].items():
        write_json(staging / f"{split}.json", {"wids_version": 1, "name": split, "in_place": True,
                                               "shardlist": info.pop("entries")})
        splits[split] = {**info, "masks": False}
    write_dataset(staging, p, splits, found["classes"], None, None, in_place=True)
    return splits, {"samples_seen": found["seen"], "skipped": found["skipped"], "copied": False}


def main(p: dict, root: Path, run) -> dict:
    """Write the image shards (or, for webdataset shards, index them in place)."""
    start = time.perf_counter()
    if p["source"] == "webdataset":
        with replace_dir(root / OUT) as staging:
            splits, seen = index_in_place(p, staging)
        return finish(p, root, run, splits, start, seen=seen)
    data = load_source(p, root)
    splits = {}
    with replace_dir(root / OUT) as staging:
        for split, samples in data.splits().items():
            info = write_split(staging, split, tqdm(samples, desc=f"shard {split}", unit="img", mininterval=2),
                               p["max_per_shard"])
            splits[split] = {"count": info.count, "shards": len(info.shards), "bytes": info.bytes,
                             "labels": info.labels, "masks": info.masks}
        mask_classes = data.mask_classes
        ignore = None if p["source"] == "fashion_mnist" or mask_classes is None else p["ignore_label"]
        write_dataset(staging, p, splits, data.classes, mask_classes, ignore)
    return finish(p, root, run, splits, start, notes=data.notes, changed=data.changed)


def finish(p: dict, root: Path, run, splits: dict, start: float, notes=(), changed=None, seen=None) -> dict:
    """Metrics, timings, the preview grid and the closing lines."""
    seconds = time.perf_counter() - start
    images = sum(s["count"] for s in splits.values())
    nbytes = sum(s["bytes"] for s in splits.values())
    timings = {"seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1)}
    write_timings(root, "shard", timings)
    metrics = {"images": images, "bytes": nbytes, "bytes_per_image": round(nbytes / max(images, 1)),
               "notes": list(notes), **(seen or {}), "splits": splits,
               "data": {"source": p["source"], "path": p["path"]}}
    write_json(root / METRICS, metrics)
    run.log_metrics({**metrics, **timings})
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "shard_samples.png"
        sample_grid(root / OUT, [s for s, v in splits.items() if v["count"]]).save(grid)
        run.log_artifact(grid)
    counts = ", ".join(f"{s} {v['count']}" for s, v in splits.items())
    print(f"shard: {images} images in {len(splits)} splits ({counts}), {nbytes / 1e6:.1f} MB, "
          f"{timings['images_per_s']} img/s")
    if seen:
        reasons = ", ".join(f"{n} {why}" for why, n in seen["skipped"].items())
        print(f"shard: indexed in place, nothing copied: {seen['samples_seen']} samples seen, "
              f"{sum(seen['skipped'].values())} skipped{f' ({reasons})' if reasons else ''}")
    for note in notes:
        print(f"shard: note: {note}")
    changed = [source for sources in (changed or {}).values() for source in sources]
    if changed:
        print(f"shard: the images changed: {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}")
    return metrics


if __name__ == "__main__":
    run_stage("shard", SCHEMA, main)
