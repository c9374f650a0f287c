"""Distillation losses. Shapes: tokens [B, N, D] or [B, h, w, D]; vectors [B, D]."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos over the last axis."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE divided by the target's mean square, so blocks of different output scale weigh alike."""
    target = target.float()
    return F.mse_loss(pred.float(), target) / target.square().mean().clamp_min(1e-12)


def block_loss(pred: torch.Tensor, target: torch.Tensor, cosine_weight: float) -> torch.Tensor:
    """Stage 1, one block: relative MSE plus `cosine_weight` x cosine distance of the mixer outputs."""
    return relative_mse(pred, target) + cosine_weight * cosine_distance(pred, target)


def spatial_loss(pred_z: torch.Tensor, target_z: torch.Tensor) -> torch.Tensor:
    """Stage 2: MSE in PHI-S standardized space (every dimension has unit variance there)."""
    return F.mse_loss(pred_z.float(), target_z.float())


def mean_cosine(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean cosine similarity over the last axis (a fidelity figure, not a loss)."""
    return F.cosine_similarity(pred.float(), target.float(), dim=-1).mean().item()
