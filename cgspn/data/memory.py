"""A worker's share of the training data, held in memory: decoded images and, optionally, the cached
teacher features that go with them. Shards are dealt round-robin to workers (worker r of W takes shards
r, r + W, ...), so every worker reads whole shards and no sample is read twice; a split with fewer
shards than workers is dealt sample by sample instead. Batches are drawn by a
generator seeded with (seed, rank, epoch): the same step always gives the same batch, which makes a
resumed run continue exactly where the interrupted one stopped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cgspn.data.shards import decode_image, decode_npy, iter_samples, split_shards, zip_samples


class ShardSubset:
    """images: list of uint8 [H, W, 3]; features[teacher][name]: float16 [N, ...] aligned with images.

    `feature_names`: the names to read from every teacher's feature shards, or a dict of them per teacher.
    """

    def __init__(self, shard_dir: str | Path, splits: list[str], rank: int = 0, world: int = 1,
                 feature_dirs: dict[str, Path] | None = None,
                 feature_names: tuple[str, ...] | dict[str, tuple[str, ...]] = ("summary", "spatial"),
                 limit: int | None = None):
        shards = [s for split in splits for s in split_shards(shard_dir, split)]
        # Whole shards per worker when there are enough of them; otherwise every worker reads them all
        # and keeps every world-th sample.
        by_shard = len(shards) >= world
        mine = shards[rank::world] if by_shard else shards
        seen = 0
        self.keys: list[str] = []
        self.images: list[np.ndarray] = []
        names = feature_names if isinstance(feature_names, dict) else {t: feature_names for t in feature_dirs or {}}
        feats: dict[str, dict[str, list]] = {t: {n: [] for n in names[t]} for t in (feature_dirs or {})}
        for shard in mine:
            if feature_dirs:
                streams = [zip_samples(shard, Path(d) / shard.name) for d in feature_dirs.values()]
            else:
                streams = [((s, None) for s in iter_samples(shard))]
            for pairs in zip(*streams):
                seen += 1
                if not by_shard and (seen - 1) % world != rank:
                    continue
                self.keys.append(pairs[0][0]["__key__"])
                self.images.append(decode_image(pairs[0][0], shard))
                for teacher, (_, f) in zip(feats, pairs):
                    for n in names[teacher]:
                        feats[teacher][n].append(decode_npy(f, n, shard))
                if limit and len(self.images) >= limit:
                    break
            if limit and len(self.images) >= limit:
                break
        self.features = {t: {n: torch.from_numpy(np.stack(v)) for n, v in d.items()} for t, d in feats.items()}

    def __len__(self) -> int:
        return len(self.images)

    def batch_indices(self, step: int, batch_size: int, seed: int, rank: int) -> np.ndarray:
        """The sample indices of `step`: epochs are seeded permutations, batches consecutive slices."""
        n = len(self.images)
        start = step * batch_size
        out = []
        while len(out) < batch_size:
            epoch, offset = divmod(start + len(out), n)
            order = np.random.default_rng([seed, rank, epoch]).permutation(n)
            out.extend(order[offset : offset + batch_size - len(out)].tolist())
        return np.array(out)
