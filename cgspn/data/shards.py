"""Webdataset shards on local disk: write a split, index it for wids, read it back, zip it with features.

Layout of a shard directory (what the `shard` stage writes):

    <dir>/<split>-000000.tar ...   samples `<key>.png|jpg` image, `.cls` label, `.mask.png`, `.txt` caption,
                                   `.source.txt` the source file
    <dir>/<split>.json             wids descriptor: {"wids_version": 1, "shardlist": [{"url", "nsamples"}]}
    <dir>/dataset.json             splits, counts, class names, the source

Feature shards (the `cache_teacher` stage) mirror image shards file by file and key by key:
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


def split_shards(shard_dir: str | Path, split: str) -> list[Path]:
    """The shard files of `split`, from its wids index; ShardError if the index or a shard is missing."""
    shard_dir = Path(shard_dir)
    index = shard_dir / f"{split}.json"
    if not index.exists():
        known = sorted(p.stem for p in shard_dir.glob("*.json") if p.name != "dataset.json")
        raise ShardError(f"{index}: no index for split {split!r} (splits here: {known})")
    try:
        entries = json.loads(index.read_text())["shardlist"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ShardError(f"{index}: not a wids index ({e})") from None
    paths = [shard_dir / e["url"] for e in entries]
    for p in paths:
        if not p.exists():
            raise ShardError(f"{p}: listed in {index.name} but missing")
    return paths


def iter_samples(path: str | Path) -> Iterator[dict]:
    """Samples of one uncompressed tar in order: {"__key__": key, "<ext>": bytes, ...}.

    Python's tarfile takes a truncated archive for a shorter one; this reader does not: a member whose
    data is short, or an archive without its end-of-archive blocks, raises ShardError naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            sample: dict = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise ShardError(f"{path}: truncated in {member.name} ({len(data)} of {member.size} bytes)")
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                sample["__key__"] = key
                sample[ext] = data
            f.seek(tar.offset)
            end = f.read(2 * tarfile.BLOCKSIZE)
            if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
                raise ShardError(f"{path}: truncated (no end-of-archive marker after byte {tar.offset})")
            if sample:
                yield sample
    except FileNotFoundError:
        raise ShardError(f"{path}: no such shard") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ShardError(f"{path}: corrupt or truncated tar ({e})") from None


def shard_members(path: str | Path) -> list[tuple[str, tuple[str, ...]]]:
    """[(key, its entries' extensions)] of one shard in order, from the tar headers alone (no member data is
    read); ShardError naming the file if it is missing, not a tar, or truncated (a member's data or the
    end-of-archive blocks past the end of the file)."""
    path = Path(path)
    members: list[tuple[str, list[str]]] = []
    try:
        size = path.stat().st_size
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise ShardError(f"{path}: truncated in {member.name} ({size - member.offset_data} of "
                                     f"{member.size} bytes)")
                key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                if not members or members[-1][0] != key:
                    members.append((key, []))
                members[-1][1].append(ext)
            f.seek(tar.offset)
            end = f.read(2 * tarfile.BLOCKSIZE)
            if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
                raise ShardError(f"{path}: truncated (no end-of-archive marker after byte {tar.offset})")
    except FileNotFoundError:
        raise ShardError(f"{path}: no such shard") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{path}: corrupt or truncated tar ({e})") from None
    return [(k, tuple(exts)) for k, exts in members]


def shard_keys(path: str | Path) -> list[str]:
    """The sample keys of one shard in order (see `shard_members`)."""
    return [key for key, _ in shard_members(path)]


def check_shard_pair(image_shard: Path, keys: list[str], feature_shard: Path, names: tuple[str, ...] = ()) -> None:
    """The feature shard holds exactly `keys` (the image shard's, in order), each with `<name>.npy` for every
    name; ShardError naming the feature shard and the first key that differs."""
    members = shard_members(feature_shard)
    for i in range(max(len(keys), len(members))):
        key = keys[i] if i < len(keys) else None
        f_key, exts = members[i] if i < len(members) else (None, ())
        if key is None:
            raise ShardError(f"{feature_shard}: extra key {f_key!r} that {image_shard} does not have")
        if f_key is None:
            raise ShardError(f"{feature_shard}: key {key!r} of {image_shard} is missing")
        if key != f_key:
            raise ShardError(f"{feature_shard}: key {f_key!r} where {image_shard} has {key!r} (sample {i})")
        missing = [n for n in names if f"{n}.npy" not in exts]
        if missing:
            raise ShardError(f"{feature_shard}: sample {key!r} has no {', '.join(n + '.npy' for n in missing)} "
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
