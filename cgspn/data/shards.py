"""Webdataset shards: write a split, index it for wids, read it back (streamed, or one sample at a time by
its byte range), zip it with features.

Layout of a shard directory (what the `shard` stage writes):

    <dir>/<split>-000000.tar ...   samples `<key>.png|jpg` image, `.cls` label, `.mask.png`, `.txt` caption,
                                   `.source.txt` the source file
    <dir>/<split>.json             wids descriptor: {"wids_version": 1, "shardlist": [{"url", "nsamples"}]}
    <dir>/dataset.json             splits, counts, class names, the source

The webdataset source writes no tars: it indexes the researcher's shards where they lie, and a split's
index lists, per shard, its URL, the split's keys in it and each sample's byte range (`ShardRef`).

Feature shards (the `cache_teacher` stage) mirror image shards key by key, named after the split's shards:
`<features>/<teacher>/<split>-000000.tar` with `<key>.summary.npy` [D], `<key>.spatial.npy` [h, w, D], ...
Readers raise ShardError naming the shard and the key.
"""
from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from cgspn.data.locations import is_pipe, is_remote, local_path, open_shard
from cgspn.pipeline.errors import ShardError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
TAR_MTIME = 0  # a fixed time stamp in every tar header: the same samples give byte-identical shards
MMSEG_IGNORE = 255  # mmseg's ignore value in label maps: never a class, never scored


@dataclass
class Sample:
    """One record: encoded image bytes plus what is known about it."""

    key: str  # unique within the dataset; letters, digits, '_' (no dots: webdataset splits on them)
    image: bytes  # encoded (PNG, JPEG, ...)
    ext: str = "png"
    label: int | None = None
    mask: bytes | None = None  # PNG, one channel, class index per pixel
    caption: str | None = None
    source: str | None = None  # where the image came from (a path relative to the source), kept as source.txt

    def to_webdataset(self) -> dict:
        record = {"__key__": self.key, self.ext: self.image}
        if self.label is not None:
            record["cls"] = str(int(self.label)).encode()
        if self.mask is not None:
            record["mask.png"] = self.mask
        if self.caption is not None:
            record["txt"] = self.caption.encode()
        if self.source is not None:
            record["source.txt"] = self.source.encode()
        return record


def encode_png(array: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class SplitInfo:
    count: int
    shards: list[str]
    bytes: int
    labels: bool = False  # every sample has a label
    masks: bool = False  # every sample has a label map


def write_split(out_dir: Path, split: str, samples: Iterable[Sample], max_per_shard: int) -> SplitInfo:
    """Write `samples` to `out_dir/<split>-NNNNNN.tar` (webdataset ShardWriter) and the wids index beside."""
    import webdataset as wds

    pattern = str(out_dir / f"{split}-%06d.tar")
    count = labels = masks = 0
    with wds.ShardWriter(pattern, maxcount=max_per_shard, verbose=0, mtime=TAR_MTIME) as sink:
        for sample in samples:
            sink.write(sample.to_webdataset())
            count += 1
            labels += sample.label is not None
            masks += sample.mask is not None
    shards = sorted(out_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if count == 0:
        for s in shards:
            s.unlink()
        shards = []
    lengths = [sum(1 for _ in iter_samples(s)) for s in shards]
    index = {
        "wids_version": 1,
        "name": split,
        "shardlist": [{"url": s.name, "nsamples": n, "filesize": s.stat().st_size} for s, n in zip(shards, lengths)],
    }
    (out_dir / f"{split}.json").write_text(json.dumps(index, indent=1) + "\n")
    return SplitInfo(count, [s.name for s in shards], sum(s.stat().st_size for s in shards),
                     count > 0 and labels == count, count > 0 and masks == count)


@dataclass(frozen=True)
class ShardRef:
    """One image shard of a split. `url`: where it is (a local path, an fsspec URL or a `pipe:` command);
    `name`: what its feature shards are called (`<split>-NNNNNN.tar`); for a shard indexed in place (the
    webdataset source), `keys`: the split's samples in it in tar order and `ranges`: each one's (offset,
    length) in bytes, from its first header to the end of its last member's data. Prints as its URL."""

    url: str
    name: str
    keys: tuple[str, ...] | None = None  # None: every sample of the tar, in order
    ranges: tuple[tuple[int, int], ...] | None = None

    def __str__(self) -> str:
        return self.url


def split_shards(shard_dir: str | Path, split: str) -> list[ShardRef]:
    """The shards of `split`, from its index; ShardError if the index or a local shard is missing."""
    shard_dir = Path(shard_dir)
    index = shard_dir / f"{split}.json"
    if not index.exists():
        known = sorted(p.stem for p in shard_dir.glob("*.json") if p.name != "dataset.json")
        raise ShardError(f"{index}: no index for split {split!r} (splits here: {known})")
    try:
        entries = json.loads(index.read_text())["shardlist"]
        refs = [shard_ref(shard_dir, split, i, e) for i, e in enumerate(entries)]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ShardError(f"{index}: not a wids index ({e})") from None
    for ref in refs:
        if not (is_remote(ref.url) or is_pipe(ref.url)) and not local_path(ref.url).exists():
            raise ShardError(f"{ref.url}: listed in {index} but missing")
    return refs


def shard_ref(shard_dir: Path, split: str, i: int, entry: dict) -> ShardRef:
    """An index entry: a shard the stage wrote (a name beside the index) or one indexed in place."""
    if "keys" not in entry:
        return ShardRef(str(shard_dir / entry["url"]), entry["url"])
    return ShardRef(entry["url"], f"{split}-{i:06d}.tar", tuple(entry["keys"]), tuple(map(tuple, entry["ranges"])))


@dataclass
class Member:
    """A tar member as a sample entry: its sample's key, its extension, where its header and data start."""

    key: str
    ext: str
    header: int
    data: int
    size: int


def scan_members(f, size: int | None, where: str, read_data=False) -> Iterator[tuple[Member, bytes | None]]:
    """The file members of an uncompressed tar with their data where `read_data` (True, or a function of the
    member's extension) asks for it, or for a stream; else None.

    Python's tarfile takes a truncated archive for a shorter one; this reader does not: a member whose
    data lies past the end, or an archive without its end-of-archive blocks, raises ShardError naming
    `where`. `size` None: `f` is a stream (a `pipe:`), read through once, whose data is always read so a
    short member is seen."""
    stream = size is None
    try:
        with tarfile.open(fileobj=f, mode="r|" if stream else "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if not stream and info.offset_data + info.size > size:
                    raise ShardError(f"{where}: truncated in {info.name} ({size - info.offset_data} of "
                                     f"{info.size} bytes)")
                key, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
                data = None
                if stream or (read_data(ext) if callable(read_data) else read_data):
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise ShardError(f"{where}: truncated in {info.name} ({len(data)} of {info.size} bytes)")
                yield Member(key, ext, info.offset, info.offset_data, info.size), data
            if not stream:
                f.seek(tar.offset)
                end = f.read(2 * tarfile.BLOCKSIZE)
                if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
                    raise ShardError(f"{where}: truncated (no end-of-archive marker after byte {tar.offset})")
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ShardError(f"{where}: corrupt or truncated tar ({e})") from None
    except OSError as e:
        raise ShardError(f"{where}: cannot read ({e})") from None


def group_samples(members: Iterable[tuple[Member, bytes | None]]) -> Iterator[list[tuple[Member, bytes | None]]]:
    """Consecutive members with the same key, as one sample's list."""
    sample: list = []
    for member, data in members:
        if sample and member.key != sample[0][0].key:
            yield sample
            sample = []
        sample.append((member, data))
    if sample:
        yield sample


def iter_samples(shard: ShardRef | str | Path) -> Iterator[dict]:
    """Samples of one shard in order: {"__key__": key, "<ext>": bytes, ...}; for a shard indexed in place,
    only its split's samples (`ShardRef.keys`), streamed from wherever it lies."""
    url = shard.url if isinstance(shard, ShardRef) else str(shard)
    keep = set(shard.keys) if isinstance(shard, ShardRef) and shard.keys is not None else None
    with open_shard(url) as (f, size):
        for members in group_samples(scan_members(f, size, url, read_data=True)):
            key = members[0][0].key
            if keep is None or key in keep:
                yield {"__key__": key, **{m.ext: data for m, data in members}}


def shard_members(shard: ShardRef | str | Path) -> list[tuple[str, tuple[str, ...]]]:
    """[(key, its entries' extensions)] of one shard in order, from the tar headers alone (no member data is
    read from a file); ShardError naming the file if it is missing, not a tar, or truncated."""
    return [(key, tuple(m.ext for m in ms)) for key, ms, _ in shard_layout(shard)]


def shard_layout(shard: ShardRef | str | Path) -> list[tuple[str, list[Member], tuple[int, int]]]:
    """[(key, its members, its (offset, length) in bytes)] of one shard in order (a ShardRef indexed in
    place: its split's samples only)."""
    url = shard.url if isinstance(shard, ShardRef) else str(shard)
    keep = set(shard.keys) if isinstance(shard, ShardRef) and shard.keys is not None else None
    out = []
    with open_shard(url) as (f, size):
        for members in group_samples(scan_members(f, size, url)):
            ms = [m for m, _ in members]
            if keep is None or ms[0].key in keep:
                out.append((ms[0].key, ms, (ms[0].header, ms[-1].data + ms[-1].size - ms[0].header)))
    return out


def shard_keys(shard: ShardRef | str | Path) -> list[str]:
    """The sample keys of one shard in order (see `shard_members`); a shard indexed in place: its index's."""
    if isinstance(shard, ShardRef) and shard.keys is not None:
        return list(shard.keys)
    return [key for key, _ in shard_members(shard)]


def parse_sample(data: bytes, where: str) -> dict:
    """One sample's bytes (`ShardRef.ranges`: its members' headers and data) -> {"__key__", "<ext>": bytes}."""
    padded = data + b"\0" * (-len(data) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)
    sample: dict = {}
    with io.BytesIO(padded) as f:
        for member, value in scan_members(f, len(padded), where, read_data=True):
            sample["__key__"] = member.key
            sample[member.ext] = value
    if not sample:
        raise ShardError(f"{where}: no sample at the indexed offset (the shard changed; rerun the shard stage)")
    return sample


FEATURE_STORE = "shards.json"  # in a feature folder whose shards lie in object storage: {"store": URL prefix}


def feature_shard(folder: str | Path, name: str) -> str:
    """Where the feature shard `name` of a teacher's feature folder is: beside its meta.json, or under the
    object-storage prefix its shards.json names (cache_teacher.store)."""
    index = Path(folder) / FEATURE_STORE
    if index.exists():
        return f"{json.loads(index.read_text())['store']}/{name}"
    return str(Path(folder) / name)


def check_shard_pair(image_shard: ShardRef | Path, keys: list[str], partner: str | Path, names: tuple[str, ...] = (),
                     members: list | None = None) -> None:
    """The feature shard holds exactly `keys` (the image shard's, in order), each with `<name>.npy` for every
    name; ShardError naming the feature shard and the first key that differs. `members`: the feature shard's
    `shard_members`, where the caller has them."""
    members = shard_members(partner) if members is None else members
    for i in range(max(len(keys), len(members))):
        key = keys[i] if i < len(keys) else None
        f_key, exts = members[i] if i < len(members) else (None, ())
        if key is None:
            raise ShardError(f"{partner}: extra key {f_key!r} that {image_shard} does not have")
        if f_key is None:
            raise ShardError(f"{partner}: key {key!r} of {image_shard} is missing")
        if key != f_key:
            raise ShardError(f"{partner}: key {f_key!r} where {image_shard} has {key!r} (sample {i})")
        missing = [n for n in names if f"{n}.npy" not in exts]
        if missing:
            raise ShardError(f"{partner}: sample {key!r} has no {', '.join(n + '.npy' for n in missing)} "
                             f"(has: {sorted(e[:-4] for e in exts if e.endswith('.npy'))})")


def image_ext(sample: dict) -> str:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    raise ShardError(f"sample {sample.get('__key__')!r}: no image entry (looked for {', '.join(IMAGE_EXTS)})")


def pil_reason(error: Exception) -> str:
    """PIL's message for a file it cannot read, without the in-memory file object it names
    (`<_io.BytesIO object at 0x...>`, a different address every run): the caller names the file."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(error)).strip() or type(error).__name__


def decode_image(sample: dict, shard: str | Path = "?") -> np.ndarray:
    """The sample's image as uint8 [H, W, 3]."""
    data = sample[image_ext(sample)]
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im.convert("RGB"))
    except Exception as e:  # PIL raises several types for a bad file
        raise ShardError(f"{shard}: sample {sample['__key__']!r}: image does not decode ({pil_reason(e)})") from None


def decode_mask(sample: dict, shard: str | Path = "?") -> np.ndarray:
    """The sample's label map as uint8 [H, W]."""
    if "mask.png" not in sample:
        raise ShardError(f"{shard}: sample {sample['__key__']!r} has no mask.png")
    try:
        with Image.open(io.BytesIO(sample["mask.png"])) as im:
            return np.asarray(im)
    except Exception as e:  # PIL raises several types for a bad file
        raise ShardError(f"{shard}: sample {sample['__key__']!r}: mask does not decode ({pil_reason(e)})") from None


def decode_npy(sample: dict, name: str, shard: str | Path = "?") -> np.ndarray:
    entry = f"{name}.npy"
    if entry not in sample:
        have = sorted(k[:-4] for k in sample if k.endswith(".npy"))
        raise ShardError(f"{shard}: sample {sample['__key__']!r} has no {entry} (has: {have})")
    return np.load(io.BytesIO(sample[entry]), allow_pickle=False)


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def zip_samples(image_shard: Path, feature_shard: Path) -> Iterator[tuple[dict, dict]]:
    """Pairs (image sample, feature sample) of two shards that must hold the same keys in the same order."""
    pairs = itertools.zip_longest(iter_samples(image_shard), iter_samples(feature_shard))
    for image, feature in pairs:
        if image is None:
            raise ShardError(f"{feature_shard}: extra key {feature['__key__']!r} that {image_shard} does not have")
        if feature is None:
            raise ShardError(f"{feature_shard}: key {image['__key__']!r} of {image_shard} is missing")
        if image["__key__"] != feature["__key__"]:
            raise ShardError(
                f"{feature_shard}: key {feature['__key__']!r} where {image_shard} has {image['__key__']!r}"
            )
        yield image, feature
