"""A worker's share of a split: its samples' places in the shards, read one by one when a batch asks for
them, with the cached teacher features that go with them. Nothing is decoded ahead: memory holds the index
(key and byte range per sample) and the batch, not the data set.

Shards are dealt round-robin to workers (worker r of W takes shards r, r + W, ...), so every worker reads
whole shards and no sample is read twice; a split with fewer shards than workers is dealt sample by sample
instead. Batches are drawn by a generator seeded with (seed, rank, epoch): the same step always gives the
same batch, which makes a resumed run continue exactly where the interrupted one stopped.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cgspn.data.locations import RangeReader
from cgspn.data.shards import (check_shard_pair, decode_image, decode_npy, feature_shard, parse_sample, shard_layout,
                               split_shards)

RECENT = 512  # feature samples kept parsed: a batch's names are read from one parse


class ShardSubset:
    """keys: list of str; images: a sequence of uint8 [H, W, 3] decoded on access (`images[i]`,
    `images[a:b]`); features[teacher][name][idx]: float16 [len(idx), ...] read on access, `.all()` the whole.

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
        feature_dirs = feature_dirs or {}
        names = feature_names if isinstance(feature_names, dict) else {t: feature_names for t in feature_dirs}
        self.urls: list[str] = []
        self.keys: list[str] = []
        place: list[tuple[int, int, int]] = []  # per sample: (url index, offset, length)
        feature_place: dict[str, list[tuple[int, int, int]]] = {t: [] for t in feature_dirs}
        feature_urls: dict[str, list[str]] = {t: [] for t in feature_dirs}
        seen = 0
        for shard in mine:
            if limit and len(self.keys) >= limit:
                break
            layout = (list(zip(shard.keys, shard.ranges)) if shard.ranges is not None
                      else [(key, rng) for key, _, rng in shard_layout(shard)])
            keys = [key for key, _ in layout]
            partners = {}
            for t, folder in feature_dirs.items():
                path = feature_shard(folder, shard.name)
                layout_t = shard_layout(path)
                check_shard_pair(shard, keys, path, names[t], [(k, tuple(m.ext for m in ms)) for k, ms, _ in layout_t])
                partners[t] = [rng for _, _, rng in layout_t]
                feature_urls[t].append(path)
            self.urls.append(shard.url)
            for j, (key, (offset, length)) in enumerate(layout):
                seen += 1
                if not by_shard and (seen - 1) % world != rank:
                    continue
                self.keys.append(key)
                place.append((len(self.urls) - 1, offset, length))
                for t, ranges in partners.items():
                    feature_place[t].append((len(feature_urls[t]) - 1, *ranges[j]))
                if limit and len(self.keys) >= limit:
                    break
        self._place = np.array(place, np.int64).reshape(-1, 3)
        self._feature_place = {t: np.array(v, np.int64).reshape(-1, 3) for t, v in feature_place.items()}
        self._feature_urls = feature_urls
        self._reader = RangeReader()
        self._recent: OrderedDict = OrderedDict()
        self.images = LazyImages(self)
        self.features = {t: {n: LazyRows(self, t, n) for n in names[t]} for t in feature_dirs}

    def __len__(self) -> int:
        return len(self.keys)

    def sample(self, i: int) -> dict:
        """Sample i undecoded: {"__key__", "<ext>": bytes}."""
        u, offset, length = self._place[i].tolist()
        return parse_sample(self._reader.read(self.urls[u], offset, length), self.urls[u])

    def image(self, i: int) -> np.ndarray:
        u = int(self._place[i, 0])
        return decode_image(self.sample(i), self.urls[u])

    def feature(self, teacher: str, name: str, i: int) -> np.ndarray:
        key = (teacher, i)
        if key not in self._recent:
            u, offset, length = self._feature_place[teacher][i].tolist()
            url = self._feature_urls[teacher][u]
            self._recent[key] = (parse_sample(self._reader.read(url, offset, length), url), url)
            if len(self._recent) > RECENT:
                self._recent.popitem(last=False)
        sample, url = self._recent[key]
        return decode_npy(sample, name, url)

    def batch_indices(self, step: int, batch_size: int, seed: int, rank: int) -> np.ndarray:
        """The sample indices of `step`: epochs are seeded permutations, batches consecutive slices."""
        n = len(self.keys)
        start = step * batch_size
        out = []
        while len(out) < batch_size:
            epoch, offset = divmod(start + len(out), n)
            order = np.random.default_rng([seed, rank, epoch]).permutation(n)
            out.extend(order[offset : offset + batch_size - len(out)].tolist())
        return np.array(out)


class LazyImages(Sequence):
    """A ShardSubset's images, each decoded when it is asked for (and not kept)."""

    def __init__(self, subset: ShardSubset):
        self.subset = subset

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.subset.image(j) for j in range(*i.indices(len(self)))]
        return self.subset.image(int(i))


class Chain(Sequence):
    """Several sequences as one (the images of several splits), slices included."""

    def __init__(self, parts: list[Sequence]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]


class LazyRows:
    """One cached feature of one teacher over a ShardSubset: rows[idx] -> float16 tensor [len(idx), ...]."""

    def __init__(self, subset: ShardSubset, teacher: str, name: str):
        self.subset, self.teacher, self.name = subset, teacher, name

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx).reshape(-1).tolist()
        return torch.from_numpy(np.stack([self.subset.feature(self.teacher, self.name, i) for i in idx]))

    def all(self) -> torch.Tensor:
        """Every row: [N, ...] (a split's features, for evaluation)."""
        return self[range(len(self))]
