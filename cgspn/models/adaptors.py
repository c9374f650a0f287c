"""RADIO-style adaptor heads: per teacher, one MLP for the summary vector, one for the spatial features, and
one for each intermediate block of the teacher that the student also learns to predict."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdaptorMLP(nn.Module):
    """[..., D_s] -> [..., D_t]: LayerNorm -> Linear(D_s, hidden) -> GELU -> Linear(hidden, D_t)."""

    def __init__(self, student_dim: int, teacher_dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(student_dim)
        self.fc1 = nn.Linear(student_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, teacher_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TeacherAdaptor(nn.Module):
    """Student features (width D_s) -> one teacher's space (width D_t): a summary head, a spatial head for
    the teacher's final patch tokens, and `blocks[str(k)]`, a spatial head for its block k's patch tokens."""

    def __init__(self, student_dim: int, teacher_dim: int, hidden: int | None = None, blocks: tuple[int, ...] = ()):
        super().__init__()
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("hidden", hidden)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"TeacherAdaptor: {name} must be a positive int, got {value!r}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in blocks):
            raise ValueError(f"TeacherAdaptor: blocks must be block indices >= 0, got {list(blocks)!r}")
        hidden = hidden or max(student_dim, teacher_dim)
        self.summary = AdaptorMLP(student_dim, teacher_dim, hidden)
        self.spatial = AdaptorMLP(student_dim, teacher_dim, hidden)
        self.blocks = nn.ModuleDict({str(k): AdaptorMLP(student_dim, teacher_dim, hidden) for k in blocks})

    def forward(self, summary: torch.Tensor, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """summary [B, D_s], patch_tokens [B, h, w, D_s] -> ([B, D_t], [B, h, w, D_t])."""
        return self.summary(summary), self.spatial(patch_tokens)


class Adaptors(nn.ModuleDict):
    """One `TeacherAdaptor` per teacher name: `Adaptors(384, {"dinov2_vits14_imgfocus": 384})`;
    `blocks={"dinov2_vits14_imgfocus": [8]}` adds a head for that teacher's block 8. `hidden`: one width for
    every teacher's heads, a dict of them per teacher, or None (each teacher's max(student, teacher width))."""

    def __init__(self, student_dim: int, teacher_dims: dict[str, int], hidden: int | dict[str, int] | None = None,
                 blocks: dict[str, list[int]] | None = None):
        if not teacher_dims:
            raise ValueError("Adaptors: teacher_dims must name at least one teacher")
        blocks = blocks or {}
        unknown = sorted(set(blocks) - set(teacher_dims))
        if unknown:
            raise ValueError(f"Adaptors: blocks names teachers {unknown} that are not in teacher_dims")
        hidden = hidden if isinstance(hidden, dict) else {name: hidden for name in teacher_dims}
        super().__init__({name: TeacherAdaptor(student_dim, dim, hidden.get(name), tuple(blocks.get(name, ())))
                          for name, dim in teacher_dims.items()})


def match_grid(target: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Resize a teacher's spatial target [B, h_t, w_t, D] to the student's grid hw -> [B, h, w, D].

    The teacher's grid differs when its patch size does (e.g. 14 vs 16 at one image size). The target,
    never the student's output, is resized: bilinear, align_corners=False, computed in float32 and returned
    in the target's dtype, with antialiasing when a side shrinks (so that a smaller grid averages the
    teacher's tokens instead of sampling a few of them). The same grid is returned unchanged.
    """
    if target.dim() != 4:
        raise ValueError(f"match_grid: target must be [B, h, w, D], got shape {tuple(target.shape)}")
    if tuple(target.shape[1:3]) == tuple(hw):
        return target
    shrink = hw[0] < target.shape[1] or hw[1] < target.shape[2]
    x = target.permute(0, 3, 1, 2).float()  # (B, D, h_t, w_t)
    x = F.interpolate(x, size=tuple(hw), mode="bilinear", align_corners=False, antialias=shrink)
    return x.permute(0, 2, 3, 1).to(target.dtype)  # (B, h, w, D)
