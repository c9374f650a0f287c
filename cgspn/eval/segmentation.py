"""The linear segmentation probe on frozen patch features, and its mIoU.

Shapes: patch features [N, h, w, D]; label maps [N, H, W] (uint8 class ids).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cgspn.eval.fit import fit_fixed_steps


class LinearSegProbe(nn.Module):
    """Frozen patch features [N, h, w, D] -> BatchNorm -> 1x1 conv -> logits [N, classes, H, W] at pixels."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.classify = nn.Conv2d(dim, classes, 1)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.classify(self.norm(features.permute(0, 3, 1, 2).float()))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


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
    fit_fixed_steps(probe, lambda idx: F.cross_entropy(probe(features[idx], tuple(masks.shape[-2:])),
                                                       masks[idx].long(), ignore_index=ignore_index),
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
        if ignore is not None:
            keep = truth != ignore
            pred, truth = pred[keep], truth[keep]
        confusion += torch.bincount(truth * classes + pred, minlength=classes**2).view(classes, classes)
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    present = union > 0
    if ignore is not None:
        present[ignore] = False
    return (tp[present] / union[present]).mean().item()


