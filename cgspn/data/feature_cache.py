"""Teacher features for one image shard, written as a feature shard that mirrors it key by key.

Each feature sample holds float16 arrays: `summary.npy` [D], `spatial.npy` [h, w, D] (the final patch
tokens; a CNN teacher's feature map), and `block<k>.npy` [h, w, D] for each requested intermediate block
(through the final norm; ViT teachers only). The grid (h, w) is the teacher's at its own input side.
The caller (the cache_teacher stage) runs one `cache_shard` per shard, in parallel on Ray actors, and adds
their results up `in_order`: float64 addition is not associative, so sums taken in the order the workers
happen to finish would differ in the last bits from run to run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from cgspn.pipeline.errors import ShardError
from cgspn.data.shards import TAR_MTIME, ShardRef, decode_image, encode_npy, iter_samples
from cgspn.distill.phis import Moments
from cgspn.data.preprocess import to_batch
from cgspn.teachers.registry import teacher_normalization

T = TypeVar("T")


@dataclass
class ShardResult:
    shard: str
    count: int
    seconds: float  # wall time of reading, teacher forward and writing
    bytes: int  # size of the feature shard
    moments: dict[str, Moments]  # per feature kind ("spatial", "summary", "block<k>"): float64 sums (PHI-S)


@torch.inference_mode()
def teacher_features(teacher, images: list[np.ndarray], resolution: int, layers: Sequence[int] = ()) -> dict:
    """images: uint8 [H, W, 3] each (sizes may differ) -> {"summary": [B, D], "spatial": [B, h, w, D],
    "block<k>": [B, h, w, D]} as float32 tensors, all through the same `preprocess` the training uses, at
    `resolution` (the teacher's own side) with the teacher's own normalization (`teacher_normalization`)."""
    x = to_batch(images, resolution, next(teacher.parameters()).device, *teacher_normalization(teacher))
    out = teacher(x, layers=tuple(layers))
    feats = {"summary": out.summary, "spatial": out.patch_tokens}
    feats.update({f"block{k}": t for k, t in out.layer_tokens.items()})
    return {k: v.float() for k, v in feats.items()}


def teacher_features_batched(teacher, images: list[np.ndarray], resolution: int, batch_size: int) -> dict:
    """`teacher_features` over any number of images, `batch_size` at a time -> the same dict, on the CPU."""
    parts = [teacher_features(teacher, images[i : i + batch_size], resolution) for i in range(0, len(images), batch_size)]
    return {k: torch.cat([part[k].cpu() for part in parts]) for k in parts[0]}


def cache_shard(teacher, image_shard: ShardRef, out_shard: Path, resolution: int, layers: Sequence[int] = (),
                batch_size: int = 64) -> ShardResult:
    """Run `teacher` over every image of `image_shard` (streamed: `batch_size` images in memory at a time);
    write `out_shard` (same keys, same order)."""
    import webdataset as wds

    start = time.perf_counter()
    moments, count = None, 0
    tmp = out_shard.with_name(f".{out_shard.name}.partial")
    samples = iter_samples(image_shard)
    with wds.TarWriter(str(tmp), mtime=TAR_MTIME) as sink:
        while batch := [s for _, s in zip(range(batch_size), samples)]:
            feats = teacher_features(teacher, [decode_image(s, image_shard) for s in batch], resolution, layers)
            m = {k: Moments.of(v) for k, v in feats.items()}
            moments = m if moments is None else {k: moments[k] + m[k] for k in m}
            for i, s in enumerate(batch):
                record = {"__key__": s["__key__"]}
                record.update({f"{k}.npy": encode_npy(v[i].numpy().astype(np.float16)) for k, v in feats.items()})
                sink.write(record)
            count += len(batch)
    if count == 0:
        tmp.unlink()
        raise ShardError(f"{image_shard}: the shard holds no samples")
    tmp.replace(out_shard)
    return ShardResult(image_shard.name, count, time.perf_counter() - start, out_shard.stat().st_size, moments)


def in_order(arrivals: Iterable[tuple[int, T]]) -> Iterator[T]:
    """Items that arrive as (index, item) in any order, yielded in index order 0, 1, 2, ... as soon as each
    is due; only those that arrived ahead of a missing one are held."""
    held, due = {}, 0
    for index, item in arrivals:
        held[index] = item
        while due in held:
            yield held.pop(due)
            due += 1
    if held:
        raise ValueError(f"in_order: no item {due}, but items {sorted(held)} arrived")
