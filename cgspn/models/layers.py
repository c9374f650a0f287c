"""Pieces shared by the ViT and the C-GSPN student (DINOv2 names, so that weights map one to one)."""
from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches: image [B, 3, H, W] -> tokens [B, h*w, D] and the grid (h, w)."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, D, h, w)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (h, w)  # (B, h*w, D)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on [..., D]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale `gamma * x` (identity when disabled)."""

    def __init__(self, dim: int, init: float | None):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init))) if init is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gamma is None else x * self.gamma


def check_image_size(x: torch.Tensor, patch_size: int, model: str) -> None:
    """Refuse [B, 3, H, W] whose sides are not multiples of the patch size, naming the nearest valid sizes."""
    if x.dim() != 4:
        raise ValueError(f"{model}: images must be [B, C, H, W], got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    bad = [(name, s) for name, s in (("height", H), ("width", W)) if s % patch_size or s < patch_size]
    if bad:
        def near(s):
            lo = max(patch_size, s // patch_size * patch_size)
            return sorted({lo, lo + patch_size})

        hint = "; ".join(f"{name} {s} -> nearest valid {' or '.join(map(str, near(s)))}" for name, s in bad)
        raise ValueError(f"{model}: image sides must be multiples of the patch size {patch_size}: {hint}")
