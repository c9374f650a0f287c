"""The linear segmentation probe on frozen patch features, and its mIoU.

Shapes: patch features [N, h, w, D]; label maps [N, H, W] (uint8 class ids).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from cgspn.data.shards import MMSEG_IGNORE
from cgspn.eval.fit import fit_fixed_steps
from cgspn.eval.protocol import Context, Protocol, round4
from cgspn.pipeline.errors import ParamError


class LinearSegProbe(nn.Module):
    """Frozen patch features [N, h, w, D] -> BatchNorm -> 1x1 conv -> logits [N, classes, H, W] at pixels.

    The BatchNorm and the 1x1 conv are applied to the tokens as rows ([N*h*w, D]: BatchNorm1d, Linear):
    the same statistics, the same initialization and the same function as BatchNorm2d + Conv2d(D, C, 1),
    without the convolution's slow backward on a CPU (37 of 97 ms a step on a 16 x 16 grid, measured here)."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.classify = nn.Linear(dim, classes)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        n, h, w, d = features.shape
        x = self.classify(self.norm(features.reshape(n * h * w, d).float()))
        return upsample(x.reshape(n, h, w, -1).permute(0, 3, 1, 2), size)


@lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: 1-D bilinear resampling as F.interpolate does it (align_corners=False), as a matrix."""
    return F.interpolate(torch.eye(n_in)[None, None], size=(n_out, n_in), mode="bilinear", align_corners=False)[0, 0]


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x [N, C, h, w] -> [N, C, H, W], equal to F.interpolate(x, size, mode="bilinear", align_corners=False)
    up to rounding: bilinear resampling is separable, so it is two small matmuls, whose backward is fast on a
    CPU (interpolate's backward is a scatter that took ~30 ms a step of the probe on 16 x 16 labels here)."""
    rows, cols = bilinear_matrix(x.shape[-2], size[0]), bilinear_matrix(x.shape[-1], size[1])
    return torch.matmul(torch.matmul(rows, x), cols.T)


@contextmanager
def threads(n: int):
    """torch's intra-op threads set to n inside the block. The probe's ops are small: a second thread costs
    more in synchronisation than it gives, and on a loaded machine its spinning barrier stalls every op
    (4-10x slower steps measured here with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_seg_probe(features: torch.Tensor, masks: torch.Tensor, classes: int, steps: int = 600,
                    batch_size: int = 32, lr: float = 1e-2, seed: int = 0, label_scale: int = 4,
                    ignore: int | None = None) -> LinearSegProbe:
    """Fit the probe with cross-entropy (AdamW, cosine learning rate) for `steps` optimizer steps, through
    shuffled passes over the images, against the label maps sampled at `label_scale` x the patch grid
    (nearest): as sharp as a bilinear upsampling of the grid can resolve, and far cheaper than full pixels on
    large images. Scoring (`mean_iou`) is at full pixels. A budget of steps, not of epochs, trains the probe
    as far on a few large mosaics as on many small ones: 30 epochs were 570 steps on 600 mosaics at 1x but
    60 on 64 mosaics at 4x, where an unconverged probe measures how fast a feature set is learned rather
    than what it holds. Pixels labelled `ignore` (ADE20K's 0, "other") do not count."""
    h, w = features.shape[1:3]
    size = (min(masks.shape[-2], h * label_scale), min(masks.shape[-1], w * label_scale))
    masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0]
    torch.manual_seed(seed)
    probe = LinearSegProbe(features.shape[-1], classes)
    ignore_index = -100 if ignore is None else ignore
    masks = masks.long().masked_fill(masks.long() == MMSEG_IGNORE, ignore_index)  # mmseg's 255: not scored
    fit_fixed_steps(probe, lambda idx: F.cross_entropy(probe(features[idx], tuple(masks.shape[-2:])),
                                                       masks[idx], ignore_index=ignore_index),
                    len(features), steps, batch_size, lr=lr, weight_decay=1e-4, seed=seed)
    return probe


@torch.no_grad()
def mean_iou(probe: LinearSegProbe, features: torch.Tensor, masks: torch.Tensor, classes: int,
             batch_size: int = 32, ignore: int | None = None) -> float:
    """mIoU over the classes that occur in the masks or the predictions (pixels of all images pooled);
    pixels labelled `ignore` are not scored, and `ignore` is no class."""
    confusion = torch.zeros(classes, classes, dtype=torch.int64)
    for start in range(0, len(features), batch_size):
        pred = probe(features[start : start + batch_size], tuple(masks.shape[-2:])).argmax(1).reshape(-1)
        truth = masks[start : start + batch_size].long().reshape(-1)
        keep = (truth != MMSEG_IGNORE) & (truth != (MMSEG_IGNORE if ignore is None else ignore))
        pred, truth = pred[keep], truth[keep]
        confusion += torch.bincount(truth * classes + pred, minlength=classes**2).view(classes, classes)
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    present = union > 0
    if ignore is not None:
        present[ignore] = False
    return (tp[present] / union[present]).mean().item()




class SegmentationProbe(Protocol):
    """The linear probe where the data has label maps, trained on the train split and scored (mIoU) on the
    val split at each of `seg_scales` x the training resolution (the bigger `<split>_x<s>` images where the
    data has them, else the same images bigger). Probes the model's own patch tokens (`seg_miou`), a
    student's adaptor output (`seg_miou_adapted`) and the teacher's `teacher_blocks` (`seg_miou_blocks`).
    Params: seg_train_split, seg_val_split, seg_scales, seg_steps, seed."""

    name = "seg"
    title = "segmentation"

    def prepare(self, ctx: Context) -> str | None:
        p, splits = ctx.p, ctx.splits
        seg = [p["seg_train_split"], p["seg_val_split"]]
        auto = [splits.with_masks("train"), splits.with_masks("val")]
        seg = [a if v == "auto" else v for v, a in zip(seg, auto)]
        if None in seg:
            ctx.used[self.name] = None
            return "the data has no masks (the segmentation probe needs label maps)"
        for param, split in zip(("seg_train_split", "seg_val_split"), seg):
            if not splits.has(split, "masks"):
                raise ParamError(f"evaluate.{param}={split!r}: no such split with masks (splits: {splits.names})")
        ctx.used[self.name] = tuple(seg)
        info = splits.info
        self.classes, self.ignore = len(info["mask_classes"] or []), info.get("ignore_label")
        return None

    def empty(self) -> dict:
        return {"seg_miou": {}, "seg_miou_adapted": {}}

    def measure(self, ctx: Context, model: str) -> dict:
        enc, store = ctx.encoders[model], ctx.store
        r = {"seg_miou": {}, "seg_miou_adapted": {}}
        for s in ctx.p["seg_scales"]:
            px = ctx.base * s
            tr, va = (ctx.splits.at_scale(x, s) for x in ctx.used[self.name])
            train, val = store.outputs(model, tr, px), store.outputs(model, va, px)
            masks = store.masks(tr, px), store.masks(va, px)
            # the model's own patch tokens (what every model has); a student's adaptor output; teacher blocks
            probes = [("seg_miou", train.patches, val.patches)]
            if enc.adaptor is not None:
                probes.append(("seg_miou_adapted", train.teacher_space, val.teacher_space))
            probes += [(("seg_miou_blocks", str(k)), train.blocks[:, j], val.blocks[:, j]) for j, k in enumerate(enc.blocks)]
            for i, (key, train_f, val_f) in enumerate(probes, 1):
                ctx.say(f"{model} at {px} px: segmentation probe {i}/{len(probes)} "
                        f"({key if isinstance(key, str) else 'block ' + key[1]}, {ctx.p['seg_steps']} steps)")
                probe = train_seg_probe(train_f, masks[0], self.classes, ctx.p["seg_steps"], seed=ctx.p["seed"],
                                        ignore=self.ignore)
                score = round4(mean_iou(probe, val_f, masks[1], self.classes, ignore=self.ignore))
                target = r[key] if isinstance(key, str) else r.setdefault(key[0], {}).setdefault(key[1], {})
                target[str(px)] = score
        return r

    def line(self, r: dict) -> list[str]:
        parts = []
        if r.get("seg_miou"):
            parts.append("seg mIoU " + ", ".join(f"{k}px {v:.3f}" for k, v in r["seg_miou"].items()))
        for k, seg_k in r.get("seg_miou_blocks", {}).items():
            parts.append(f"block {k} seg mIoU " + ", ".join(f"{s}px {v:.3f}" for s, v in seg_k.items()))
        return parts
