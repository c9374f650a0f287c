"""How good the features are: kNN classification, a linear segmentation probe, fidelity to the teacher,
and PCA pictures of feature maps. Every function takes plain tensors; the evaluate stage feeds them.

Shapes: summary vectors [N, D]; patch features [N, h, w, D]; label maps [N, H, W] (uint8 class ids).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models.adaptors import match_grid
from .phis import PhiS


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN (as in DINO): L2-normalized features, the k most similar bank entries vote for their
    label with weight exp(similarity / temperature). Returns top-1 accuracy in [0, 1]."""
    bank = F.normalize(bank.float(), dim=1)
    classes = int(max(bank_labels.max(), query_labels.max())) + 1
    correct = 0
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start : start + chunk].float(), dim=1)
        sims, idx = (q @ bank.T).topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(q), classes).scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == query_labels[start : start + chunk]).sum().item()
    return correct / len(queries)


def fit_fixed_steps(model: nn.Module, batch_loss, n: int, steps: int, batch_size: int, lr: float,
                    weight_decay: float, seed: int) -> nn.Module:
    """Train `model` for `steps` optimizer steps (AdamW, cosine learning-rate decay to 0) through shuffled
    passes over n items, drawn by a generator seeded with `seed`; `batch_loss(idx)` gives the scalar loss of
    the items idx (int64 [<= batch_size]). Returns the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < steps:
        for idx in torch.randperm(n, generator=gen).split(batch_size)[: steps - step]:
            loss = batch_loss(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    return model.eval()


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


def teacher_fidelity(summary: torch.Tensor, patches: torch.Tensor, teacher_summary: torch.Tensor,
                     teacher_patches: torch.Tensor, summary_phis: PhiS) -> dict[str, float]:
    """How close a student's predictions of one teacher's features are to that teacher's, as mean cosines:
    "patch" over every patch of every image (the teacher's grid [N, h_t, w_t, D] resized to the prediction's
    [N, h, w, D] as in training, `match_grid`), "summary" over the images ([N, D]), and "summary_z", the
    summary in the teacher's PHI-S standardized space (the part that tells images apart; raw summaries share
    a large common component). Predictions are in the teacher's space (de-standardized)."""
    patch = F.cosine_similarity(patches.float(), match_grid(teacher_patches.float(), tuple(patches.shape[1:3])), dim=-1)
    z = [summary_phis.standardize(v.double()) for v in (summary, teacher_summary)]
    return {"patch": patch.mean().item(),
            "summary": F.cosine_similarity(summary.float(), teacher_summary.float(), dim=-1).mean().item(),
            "summary_z": F.cosine_similarity(*z, dim=-1).mean().item()}


def pca_rgb(features: torch.Tensor, basis: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Patch features [h, w, D] -> uint8 [h, w, 3]: projections on the first three principal components,
    each stretched to [0, 255] by its 1st and 99th percentiles. Returns (picture, basis [D, 3] used)."""
    x = features.reshape(-1, features.shape[-1]).float()
    x = x - x.mean(0)
    if basis is None:
        basis = torch.linalg.svd(x, full_matrices=False).Vh[:3].T
    p = x @ basis
    lo, hi = torch.quantile(p, 0.01, dim=0), torch.quantile(p, 0.99, dim=0)
    p = ((p - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return (p.reshape(*features.shape[:2], 3).numpy() * 255).astype(np.uint8), basis
