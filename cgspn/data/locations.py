"""Where shards live: a local path, an fsspec URL (s3://, gs://, http(s)://, file://) or a `pipe:` command,
as webdataset users write them; expanded from brace patterns, opened, range-read and listed.

    expand_shards("/data/{00000..00009}.tar")        # ['/data/00000.tar', ...]; InputError if one is missing
    expand_shards("s3://bucket/shards/")             # every .tar under the prefix
    with open_shard("s3://bucket/shards/00000.tar") as (f, size): ...   # size None for a pipe: stream

Credentials for object storage come only from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL for an S3-compatible server, ...), as fsspec and its backends read them; no message names them.
Every failure to reach a shard is an InputError (ShardError) of one line naming the URL.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import IO, Iterator

from cgspn.pipeline.errors import InputError, ShardError

REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "http://", "https://", "az://", "abfs://")


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def filesystem(url: str):
    """The fsspec filesystem of a remote URL and the path inside it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        scheme = url.split("://", 1)[0]
        raise InputError(f"{url}: no filesystem for {scheme}:// ({e}); install its fsspec backend "
                         f"(s3fs for s3://, gcsfs for gs://)") from None


def remote_error(url: str, e: Exception) -> ShardError:
    """One line for a failure to reach object storage: which URL and why, never the credentials."""
    name = type(e).__name__
    text = " ".join(str(e).split())
    if isinstance(e, FileNotFoundError):
        return ShardError(f"{url}: not found ({text or 'no such object or bucket'})")
    if isinstance(e, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text or "Forbidden" in text:
        return ShardError(f"{url}: access denied (check the credentials in the environment: {text[:200]})")
    if "connect" in text.lower() or "Connection" in name or "Endpoint" in name:
        return ShardError(f"{url}: object storage unreachable ({name}: {text[:200]})")
    return ShardError(f"{url}: cannot read ({name}: {text[:200]})")


def remote_call(url: str, fn, *args, **kwargs):
    """fn(*args) against object storage, with its failures as one-line ShardErrors naming `url`."""
    try:
        return fn(*args, **kwargs)
    except ShardError:
        raise
    except Exception as e:  # botocore, aiohttp and fsspec raise many kinds for the same few causes
        raise remote_error(url, e) from None


def expand_shards(spec: str | list) -> list[str]:
    """`shard.path` of the webdataset source -> the shard URLs in order: a brace pattern, a list of them, a
    folder (or prefix, ending in /) of .tar files, a glob, or `pipe:` commands (kept as written, braces
    expanded). InputError naming what matched no file."""
    from braceexpand import braceexpand

    specs = spec if isinstance(spec, list) else [spec]
    urls: list[str] = []
    listed: dict[str, set[str]] = {}  # remote folder -> the objects in it, listed once for many shards
    for s in specs:
        if not isinstance(s, str) or not s:
            raise InputError(f"shard.path: {s!r} is not a shard URL or pattern")
        for url in braceexpand(s):
            urls.extend([url] if is_pipe(url) else expand_one(url, listed))
    twice = sorted(u for u, n in Counter(urls).items() if n > 1)
    if twice:
        raise InputError(f"shard.path names {twice[0]} more than once ({len(twice)} shards repeated)")
    return urls


def expand_one(url: str, listed: dict[str, set[str]]) -> list[str]:
    """One URL after brace expansion: a file, a folder/prefix of .tar files, or a glob. A remote .tar is
    looked up in its folder's listing (one request per folder, not per shard)."""
    if is_remote(url):
        fs, path = filesystem(url)
        scheme = url.split("://", 1)[0]
        if url.endswith(".tar") and not any(c in path for c in "*?["):
            folder = path.rsplit("/", 1)[0]
            if folder not in listed:
                try:
                    listed[folder] = set(remote_call(url, fs.ls, folder, detail=False))
                except ShardError as e:
                    if not str(e).startswith(f"{url}: not found"):
                        raise
                    listed[folder] = set()
            if path not in listed[folder]:
                raise ShardError(f"{url}: not found (shard.path matches no object)")
            return [url]
        if any(c in path for c in "*?["):
            found = remote_call(url, fs.glob, path)
        elif url.endswith("/") or remote_call(url, fs.isdir, path):
            found = [p for p in remote_call(url, fs.find, path) if p.endswith(".tar")]
        else:
            if not remote_call(url, fs.exists, path):
                raise ShardError(f"{url}: not found (shard.path matches no object)")
            return [url]
        if not found:
            raise ShardError(f"{url}: matches no .tar object (shard.path)")
        return [f"{scheme}://{p}" for p in sorted(found)]
    path = local_path(url)
    if any(c in str(path) for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(path)) if os.path.isfile(p))
    elif path.is_dir():
        found = sorted(path.rglob("*.tar"))
    elif path.is_file():
        return [str(path)]
    else:
        raise ShardError(f"{path}: no such file (shard.path matches no shard)")
    if not found:
        raise ShardError(f"{url}: matches no .tar file (shard.path)")
    return [str(p) for p in found]


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[tuple[IO[bytes], int | None]]:
    """(a binary file, its size) for a local path or an fsspec URL (seekable); (a stream, None) for `pipe:`.
    A `pipe:` command that exits non-zero is a ShardError with its last line of stderr."""
    if is_pipe(url):
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        failure = None
        try:
            yield proc.stdout, None
            proc.stdout.read()  # drain: the command's status is only known at its end
        except BaseException as e:  # the reader's error (the command's own explains it better), or it stopped
            failure = e
        finally:
            proc.stdout.close()
            if failure is not None:
                proc.kill()
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            proc.stderr.close()
            code = proc.wait()
        stopped = isinstance(failure, GeneratorExit)  # the reader had what it wanted
        if not stopped and (code > 0 or (code != 0 and failure is None)):  # it failed by itself, not by our kill
            raise ShardError(f"{url}: the command exited with {code}" + (f" ({err[-1]})" if err else ""))
        if failure is not None:
            raise failure
        return
    if is_remote(url):
        fs, path = filesystem(url)
        f = remote_call(url, fs.open, path, "rb")
        try:
            yield f, f.size
        finally:
            f.close()
        return
    path = local_path(url)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ShardError(f"{path}: no such shard") from None
    with f:
        yield f, os.fstat(f.fileno()).st_size


OPEN_FILES = 64  # descriptors a RangeReader keeps open (the least recently used is closed past that)


class RangeReader:
    """Byte ranges of shards, for random access to samples: local files through an open descriptor each
    (the `OPEN_FILES` most recently read),
    object storage through one ranged GET per read, `pipe:` streams through a local copy made on first use
    (in a temporary folder removed by `close`)."""

    def __init__(self):
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._spool: Path | None = None

    def read(self, url: str, offset: int, length: int) -> bytes:
        if is_remote(url):
            fs, path = filesystem(url)
            data = remote_call(url, fs.cat_file, path, start=offset, end=offset + length)
        else:
            fd = self._fds.get(url)
            if fd is None:
                fd = self._fds[url] = self._open(url)
                if len(self._fds) > OPEN_FILES:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds.move_to_end(url)
            data = os.pread(fd, length, offset)
        if len(data) != length:
            raise ShardError(f"{url}: truncated ({len(data)} of {length} bytes at offset {offset}); "
                             "the shard changed since it was indexed (rerun the shard stage)")
        return data

    def _open(self, url: str) -> int:
        if is_pipe(url):
            if self._spool is None:
                self._spool = Path(tempfile.mkdtemp(prefix="cgspn-pipe-"))
            copy = self._spool / hashlib.sha1(url.encode()).hexdigest()
            if not copy.exists():  # once per process: the command runs again only if its copy is gone
                with open_shard(url) as (stream, _), open(copy.with_suffix(".partial"), "wb") as out:
                    shutil.copyfileobj(stream, out)
                copy.with_suffix(".partial").replace(copy)
            return os.open(copy, os.O_RDONLY)
        try:
            return os.open(local_path(url), os.O_RDONLY)
        except FileNotFoundError:
            raise ShardError(f"{url}: no such shard (it was indexed; was it moved?)") from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    def __getstate__(self):  # a reader travels to Ray workers empty
        return {}

    def __setstate__(self, state):
        self.__init__()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def upload(local: Path, url: str) -> None:
    """A local file to object storage (one-line ShardError naming the URL if it fails)."""
    fs, path = filesystem(url)
    remote_call(url, fs.put_file, str(local), path)


def write_text(url: str, text: str) -> None:
    """`text` into a file at a local path (its folders made) or a URL (one-line ShardError if it fails)."""
    if not is_remote(url):
        local_path(url).parent.mkdir(parents=True, exist_ok=True)
        local_path(url).write_text(text)
        return
    fs, path = filesystem(url)
    remote_call(url, fs.pipe_file, path, text.encode())


def read_texts(folder: str, suffix: str) -> dict[str, str]:
    """{file name: text} of the files ending in `suffix` directly in a local folder or under a URL prefix
    ({} where there is none)."""
    if not is_remote(folder):
        found = sorted(local_path(folder).glob(f"*{suffix}")) if local_path(folder).is_dir() else []
        return {f.name: f.read_text() for f in found}
    fs, path = filesystem(folder)
    if not remote_call(folder, fs.exists, path):
        return {}
    names = [n for n in remote_call(folder, fs.ls, path, detail=False, refresh=True) if n.endswith(suffix)]
    return {n.rsplit("/", 1)[-1]: remote_call(folder, fs.cat_file, n).decode() for n in sorted(names)}


def remove_tree(url: str) -> None:
    """A local folder or everything under a URL prefix, gone (nothing there: nothing to do)."""
    if not is_remote(url):
        shutil.rmtree(local_path(url), ignore_errors=True)
        return
    fs, path = filesystem(url)
    if remote_call(url, fs.exists, path):
        remote_call(url, fs.rm, path, recursive=True)


def remote_listing(prefix: str) -> dict[str, dict]:
    """{file name: {"size", "etag"}} of the objects directly under a prefix."""
    fs, path = filesystem(prefix)
    found = remote_call(prefix, fs.ls, path, detail=True, refresh=True)
    return {info["name"].rsplit("/", 1)[-1]: {"size": info.get("size"), "etag": etag(info)}
            for info in sorted(found, key=lambda i: i["name"]) if info.get("type") != "directory"}


def etag(info: dict) -> str | None:
    """The content tag fsspec reports for an object (S3's ETag, GCS's md5Hash), quotes removed."""
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return str(tag).strip('"') if tag else None


def describe(url: str, md5_cache: dict | None = None) -> dict:
    """What identifies a shard's content without reading it where we can: object storage's size and ETag;
    a local file's size and MD5 (taken once per (size, mtime, inode) when `md5_cache` is given); a `pipe:`
    command only by its text."""
    if is_pipe(url):
        return {"url": url}
    if is_remote(url):
        fs, path = filesystem(url)
        info = remote_call(url, fs.info, path)
        return {"url": url, "size": info.get("size"), "etag": etag(info)}
    path = local_path(url)
    return {"url": url, **file_digest(path, md5_cache)}


def file_digest(path: Path, md5_cache: dict | None = None) -> dict:
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    key = str(path.resolve())
    if md5_cache is not None and md5_cache.get(key, {}).get("stamp") == stamp:
        md5 = md5_cache[key]["md5"]
    else:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        md5 = h.hexdigest()
        if md5_cache is not None:
            md5_cache[key] = {"stamp": stamp, "md5": md5}
    return {"size": st.st_size, "md5": md5}


def load_md5_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
