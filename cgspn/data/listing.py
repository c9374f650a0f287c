"""What the data at `shard.path` is, as a listing DVC can compare between runs: every file with its size
and MD5 (local), or its size and ETag (object storage). The data_listing stage writes it on every
`dvc repro`; the shard stage depends on it, so shards that changed, appeared or went rerun the pipeline,
and unchanged ones leave it alone. A local file's MD5 is taken once per (size, mtime, inode), as DVC does.
"""
from __future__ import annotations

from pathlib import Path

from cgspn.data.locations import describe, expand_shards, file_digest, is_pipe, is_remote, remote_listing
from cgspn.pipeline.errors import InputError


def list_files(path: Path, md5_cache: dict) -> list[dict]:
    """A local file, or every file under a folder (hidden ones too: a folder's content is what DVC hashed)."""
    if path.is_file():
        return [{"path": path.name, **file_digest(path, md5_cache)}]
    if not path.is_dir():
        raise InputError(f"shard.path: {path} does not exist")
    return [{"path": f.relative_to(path).as_posix(), **file_digest(f, md5_cache)}
            for f in sorted(path.rglob("*")) if f.is_file()]


def list_shards(spec, md5_cache: dict) -> list[dict]:
    """The webdataset source's shards (every split's, in order); object storage listed one folder at a time."""
    specs = spec.values() if isinstance(spec, dict) else [spec]
    urls = [u for s in specs for u in expand_shards(s)]
    remote: dict[str, dict] = {}  # one listing per folder, not one request per shard
    for parent in sorted({u.rsplit("/", 1)[0] for u in urls if is_remote(u)}):
        remote.update({f"{parent}/{name}": info for name, info in remote_listing(parent).items()})
    return [{"url": url, **remote[url]} if url in remote else describe(url, md5_cache) for url in urls]


def listing(source: str, path, md5_cache: dict) -> dict:
    """{"source", "path", "files": [...]} (and "note" where a pipe: command's output cannot be listed)."""
    if source == "webdataset":
        files = list_shards(path, md5_cache)
        out = {"source": source, "path": path, "files": files}
        if any(is_pipe(f["url"]) for f in files):
            out["note"] = ("pipe: shards are listed by their command only: a change behind the command is not "
                           "seen (rerun with `dvc repro -f shard`)")
        return out
    if not isinstance(path, str):
        raise InputError(f"shard.path must be one path for source {source!r}, got {path!r}")
    return {"source": source, "path": path, "files": list_files(Path(path), md5_cache)}
