"""The one feature extractor every evaluation protocol reads: each model's outputs on a split at a side,
computed once (or, for the teacher at the cache's side, read from its feature cache) and shared.

Shapes (N images, D the model's width, D_t the teacher's, K probed blocks): summary [N, D_t], own summary
[N, D], patch tokens [N, h, w, D], teacher space [N, h, w, D_t], blocks [N, K, h, w, D]; all float32 on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from cgspn.data.subset import ShardSubset
from cgspn.data.preprocess import preprocess_mask, to_batch
from cgspn.data.shards import decode_mask, iter_samples, split_shards
from cgspn.distill.phis import PhiS


class Encoder:
    """One model under evaluation, on its device. Students with adaptors map into the teacher's space through
    them (PHI-S de-standardized); the others are compared as they are. `blocks`: the teacher's intermediate
    blocks to return too; `others` {teacher: (its adaptor, its PHI-S statistics)}: the other teachers a
    student's adaptors hold, whose predictions `forward(x, others=True)` adds."""

    def __init__(self, name: str, model, adaptor=None, phis: dict[str, PhiS] | None = None,
                 blocks: list[int] = (), others: dict | None = None):
        self.name, self.model, self.adaptor, self.phis, self.blocks = name, model.eval(), adaptor, phis, list(blocks)
        self.others = others or {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, others: bool = False) -> "Outputs":
        """x [B, 3, r, r] (ImageNet-normalized) -> the model's Outputs on those images (CPU, float32)."""
        x = x.to(self.device)
        out = self.model(x, layers=self.blocks) if self.blocks else self.model(x)
        summary, teacher_space = out.summary, out.patch_tokens
        if self.adaptor is not None:
            summary_z, spatial_z = self.adaptor(out.summary, out.patch_tokens)
            summary = self.phis["summary"].from_direction(summary_z)
            teacher_space = self.phis["spatial"].destandardize(spatial_z)
        blocks = (torch.stack([out.layer_tokens[k] for k in self.blocks], 1) if self.blocks
                  else out.patch_tokens.new_zeros(x.shape[0], 0))
        adapted = {}
        for t, (adaptor, phis) in (self.others.items() if others else ()):
            summary_z, spatial_z = adaptor(out.summary, out.patch_tokens)
            adapted[t] = (phis["summary"].from_direction(summary_z).float().cpu(),
                          phis["spatial"].destandardize(spatial_z).float().cpu())
        cpu = lambda t: t.float().cpu()  # noqa: E731
        return Outputs(cpu(summary), cpu(out.summary), cpu(out.patch_tokens), cpu(teacher_space), cpu(blocks), adapted)


@dataclass
class Outputs:
    """A model's outputs on N images: `summary` (the adaptor's prediction of the teacher's summary where
    there is an adaptor, else the model's own), `own_summary`, `patches` (its own patch tokens),
    `teacher_space` (the adaptor's prediction of the teacher's patch features, else its own tokens),
    `blocks` (the probed teacher blocks), `others` {teacher: (summary, patches)} of its other teachers."""

    summary: torch.Tensor
    own_summary: torch.Tensor
    patches: torch.Tensor
    teacher_space: torch.Tensor
    blocks: torch.Tensor
    others: dict = field(default_factory=dict)

    @staticmethod
    def cat(parts: list["Outputs"]) -> "Outputs":
        first = parts[0]
        return Outputs(*(torch.cat([getattr(o, f) for o in parts]) for f in
                         ("summary", "own_summary", "patches", "teacher_space", "blocks")),
                       {t: tuple(torch.cat(x) for x in zip(*(o.others[t] for o in parts))) for t in first.others})


class FeatureStore:
    """Images, label maps and labels of the splits (read when asked for), and every model's Outputs per (split, side),
    computed once and kept until `release(model)`. `cached(split, side, blocks)` may return the teacher's
    Outputs from its feature cache instead (float16 there), or None."""

    def __init__(self, root: Path, shards: Path, encoders: dict[str, Encoder], batch_size: int,
                 limit: int | None, cached=None, say=print):
        self.root, self.shards, self.encoders, self.batch_size, self.limit = root, shards, encoders, batch_size, limit
        self.cached, self.say = cached, say
        self._images, self._masks, self._outputs, self._summaries = {}, {}, {}, {}

    def samples(self, split: str) -> Iterator[tuple[dict, str]]:
        """The first `limit` samples of a split, undecoded, with their shard's URL, streamed."""
        count = 0
        for shard in split_shards(self.shards, split):
            for sample in iter_samples(shard):
                if self.limit and count >= self.limit:
                    return
                count += 1
                yield sample, shard.url

    def images(self, split: str) -> Sequence[np.ndarray]:
        """uint8 [H, W, 3] images of the split, each decoded when it is asked for (cgspn.data.subset)."""
        if split not in self._images:
            self._images[split] = ShardSubset(self.shards, [split], limit=self.limit).images
        return self._images[split]

    def labels(self, split: str) -> torch.Tensor:
        """int64 [N] class ids of the split."""
        return torch.tensor([int(s["cls"]) for s, _ in self.samples(split)])

    def masks(self, split: str, px: int) -> torch.Tensor:
        """uint8 [N, px, px]: the split's label maps as `preprocess` frames their images at px (kept: small)."""
        if (split, px) not in self._masks:
            self._masks[split, px] = torch.stack([preprocess_mask(decode_mask(s, sh), px)
                                                  for s, sh in self.samples(split)])
        return self._masks[split, px]

    def outputs(self, model: str, split: str, px: int, others: bool = False) -> Outputs:
        """The model's Outputs on the split's images at px (with `others`: its other teachers' predictions too)."""
        key = (model, split, px)
        have = self._outputs.get(key)
        if have is not None and (have.others or not others or not self.encoders[model].others):
            return have
        enc = self.encoders[model]
        found = self.cached(split, px, enc.blocks) if (model == "teacher" and self.cached) else None
        if found is None:
            images = self.images(split)
            parts = [enc.forward(to_batch(images[i : i + self.batch_size], px, "cpu"), others)
                     for i in range(0, len(images), self.batch_size)]
            found = Outputs.cat(parts)
        self._outputs[key] = found
        return found

    def own_summary(self, model: str, split: str, px: int) -> torch.Tensor:
        """The model's own summary vectors [N, D] on the split at px: kept after `release` (they are small)."""
        key = (model, split, px)
        if key not in self._summaries:
            self._summaries[key] = self.outputs(model, split, px).own_summary
        return self._summaries[key]

    def release(self, model: str) -> None:
        """Forget a model's outputs but its own summaries (memory): after its last protocol."""
        for key, out in list(self._outputs.items()):
            if key[0] == model:
                self._summaries[key] = out.own_summary
                del self._outputs[key]


@dataclass
class OtherTeacher:
    """A teacher of the students' adaptors besides evaluate.teacher: its module (on the device), the side it
    sees the images at as a multiple of the student's (its cache's meta.json `scale`), its feature cache."""

    model: torch.nn.Module
    scale: float
    folder: Path
