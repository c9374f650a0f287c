"""The `webdataset` source: the researcher's own webdataset shards, indexed where they lie, never copied.

`shard.path` is a brace pattern (`/data/shards/{00000..00099}.tar`), a folder or prefix of .tar files, a
glob, an fsspec URL (s3://bucket/shards/{00000..00009}.tar, gs://, http(s)://), a `pipe:` command, or a
list of these; or a mapping {split: any of those} to split by lists of shards. Without a mapping, every
sample goes to train or val by a hash of its key (`shard.val_fraction`, stable when shards are added).

img2dataset's layout is read as it is written: `<key>.jpg|jpeg|png|webp` the image, `<key>.txt` its
caption, `<key>.json` its metadata; `.cls` a label where present. A sample whose metadata `status` is not
"success" is skipped and counted with its reason. A sample without an image, a duplicate key, a truncated
tar or an unreadable URL stops the stage with one line naming the shard (and the sample).

The index of a split (`<split>.json`) lists per shard its URL, the split's keys in tar order and each
sample's byte range, so readers stream a shard or fetch one sample without scanning it again.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from cgspn.data.locations import expand_shards, open_shard
from cgspn.data.own_data import split_name, stable_split
from cgspn.data.shards import IMAGE_EXTS, group_samples, scan_members
from cgspn.pipeline.errors import InputError, ShardError

SUCCESS = "success"  # img2dataset's status of a sample that downloaded and resized


@dataclass
class IndexedSample:
    key: str
    offset: int
    length: int
    label: int | None
    caption: bool


@dataclass
class IndexedShard:
    url: str
    size: int | None  # bytes (None for a pipe: stream)
    samples: list[IndexedSample]
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def index_shard(url: str) -> IndexedShard:
    """One shard's samples from its tar headers, reading only the small `.json` metadata (all of a stream)."""
    samples, skipped = [], Counter()
    with open_shard(url) as (f, size):
        for members in group_samples(scan_members(f, size, url, read_data=lambda ext: ext in ("json", "cls"))):
            key = members[0][0].key
            entries = {m.ext: (m, data) for m, data in members}
            status = metadata_status(entries, url, key)
            if status != SUCCESS:
                skipped[f"status {status}"] += 1
                continue
            if not any(ext in entries for ext in IMAGE_EXTS):
                raise ShardError(f"{url}: sample {key!r} has no image (entries: {', '.join(sorted(entries))}; "
                                 f"looked for {', '.join(IMAGE_EXTS)})")
            label = None
            if "cls" in entries:
                text = entries["cls"][1].decode(errors="replace").strip()
                if not text.isdigit():
                    raise ShardError(f"{url}: sample {key!r}: .cls is {text[:20]!r}, not a class index")
                label = int(text)
            first, last = members[0][0], members[-1][0]
            samples.append(IndexedSample(key, first.header, last.data + last.size - first.header, label,
                                         "txt" in entries))
    return IndexedShard(url, size, samples, skipped)


def metadata_status(entries: dict, url: str, key: str) -> str:
    """The sample's img2dataset status ("success" where it has no metadata, or none is recorded)."""
    if "json" not in entries:
        return SUCCESS
    try:
        meta = json.loads(entries["json"][1])
    except ValueError as e:
        raise ShardError(f"{url}: sample {key!r}: .json is not JSON ({e})") from None
    status = meta.get("status", SUCCESS) if isinstance(meta, dict) else SUCCESS
    return SUCCESS if status is None else str(status)


def shard_specs(path) -> dict[str | None, list[str]]:
    """{split: its shard URLs} for a mapping; {None: every shard URL} (split by val_fraction) otherwise."""
    if isinstance(path, dict):
        if not path:
            raise InputError("shard.path: an empty mapping names no shards")
        return {split_name(str(split), f"shard.path.{split}"): expand_shards(spec) for split, spec in path.items()}
    return {None: expand_shards(path)}


def index_webdataset(path, val_fraction: float, seed: int) -> dict:
    """Index every shard; -> {"splits": {split: {"entries": [index entries], "count", "bytes", "labels",
    "captions", "shards"}}, "skipped": {reason: n}, "seen": n, "classes": [...] or None}."""
    specs = shard_specs(path)
    urls = [u for us in specs.values() for u in us]
    indexed = {}
    for url in tqdm(urls, desc="index shards", unit="shard", mininterval=2):
        indexed[url] = index_shard(url)
    skipped = sum((s.skipped for s in indexed.values()), Counter())
    seen = sum(len(s.samples) for s in indexed.values()) + sum(skipped.values())
    placed: dict[str, list[tuple[str, list[IndexedSample]]]] = {}
    for split, split_urls in specs.items():
        for url in split_urls:
            shard = indexed[url]
            if split is not None:
                parts = {split: shard.samples}
            else:
                parts = {}
                for s in shard.samples:
                    parts.setdefault(stable_split(s.key, val_fraction, seed), []).append(s)
            for name, samples in parts.items():
                placed.setdefault(name, []).append((url, samples))
    splits, labelled = {}, []
    for split in sorted(placed):
        keys = Counter(s.key for _, samples in placed[split] for s in samples)
        twice = [k for k, n in keys.items() if n > 1]
        if twice:
            where = [url for url, samples in placed[split] if any(s.key == twice[0] for s in samples)]
            raise ShardError(f"split {split}: key {twice[0]!r} in {len(where)} shards ({', '.join(where[:2])}); "
                             f"keys must be unique ({len(twice)} repeated)")
        samples = [s for _, ss in placed[split] for s in ss]
        if not samples:
            raise InputError(f"shard.path: split {split!r} holds no usable sample (skipped: {dict(skipped)})")
        labelled.extend(s.label for s in samples if s.label is not None)
        entries = [{"url": url, "nsamples": len(ss), "filesize": indexed[url].size, "keys": [s.key for s in ss],
                    "ranges": [[s.offset, s.length] for s in ss]} for url, ss in placed[split] if ss]
        splits[split] = {"entries": entries, "count": len(samples), "shards": len(entries),
                         "bytes": sum(s.length for s in samples),
                         "labels": all(s.label is not None for s in samples),
                         "captions": all(s.caption for s in samples)}
    classes = [str(c) for c in range(max(labelled) + 1)] if labelled else None
    return {"splits": splits, "skipped": dict(sorted(skipped.items())), "seen": seen, "classes": classes}
