"""RADIO-style adaptor heads: per teacher, one MLP for the summary vector and one for the spatial features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Mlp


class TeacherAdaptor(nn.Module):
    """Student features (width D_s) -> one teacher's space (width D_t)."""

    def __init__(self, student_dim: int, teacher_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(student_dim, teacher_dim)
        self.summary = nn.Sequential(nn.LayerNorm(student_dim), Mlp(student_dim, hidden), nn.Linear(student_dim, teacher_dim))
        self.spatial = nn.Sequential(nn.LayerNorm(student_dim), Mlp(student_dim, hidden), nn.Linear(student_dim, teacher_dim))

    def forward(self, summary: torch.Tensor, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """summary [B, D_s], patch_tokens [B, h, w, D_s] -> ([B, D_t], [B, h, w, D_t])."""
        return self.summary(summary), self.spatial(patch_tokens)


class Adaptors(nn.ModuleDict):
    """One `TeacherAdaptor` per teacher name: `Adaptors(384, {"dinov2_vits14_imgfocus": 384})`."""

    def __init__(self, student_dim: int, teacher_dims: dict[str, int], hidden: int | None = None):
        super().__init__({name: TeacherAdaptor(student_dim, dim, hidden) for name, dim in teacher_dims.items()})


def match_grid(target: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Resize a teacher's spatial target [B, h_t, w_t, D] to the student's grid hw -> [B, h, w, D].

    The teacher's grid differs when its patch size does (e.g. 14 vs 16 at one image size). The target,
    never the student, is resized: bilinear, align_corners=False, with antialiasing when shrinking.
    """
    if tuple(target.shape[1:3]) == tuple(hw):
        return target
    shrink = hw[0] < target.shape[1] or hw[1] < target.shape[2]
    x = target.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=shrink)
    return x.permute(0, 2, 3, 1).to(target.dtype)
