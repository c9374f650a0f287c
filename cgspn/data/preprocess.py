"""The one image preprocessing every model input goes through: resize the shorter side, centre crop,
normalize; label maps framed the same way. Shapes: images uint8 [H, W, 3] in, float32 [B, 3, s, s] out."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize_crop(H: int, W: int, size: int) -> tuple[tuple[int, int], int, int]:
    """The geometry `preprocess` applies: the resized (H', W') with the shorter side `size`, and the top and
    left of the centred size x size crop."""
    scale = size / min(H, W)
    new = (max(size, round(H * scale)), max(size, round(W * scale)))
    return new, (new[0] - size) // 2, (new[1] - size) // 2


def preprocess_mask(mask, size: int) -> torch.Tensor:
    """A label map uint8 [H, W] -> uint8 [size, size] aligned with `preprocess(image, size)` of its image
    (the same resize, nearest neighbour, and the same centre crop)."""
    m = torch.as_tensor(np.array(mask))  # a copy: decoded masks are read-only
    new, top, left = _resize_crop(*m.shape, size)
    m = F.interpolate(m[None, None].float(), size=new, mode="nearest")[0, 0]
    return m[top : top + size, left : left + size].to(torch.uint8)


def preprocess(images, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Deterministic teacher/student input: resize the shorter side to `size`, center crop size x size, normalize.

    images: uint8 [B, H, W, 3] / [H, W, 3] (numpy or torch) or float [B, 3, H, W] in [0, 1].
    Returns float32 [B, 3, size, size], (x - mean) / std per channel (ImageNet's by default; a teacher's own:
    `preprocess(images, size, *teacher_normalization(teacher))`).
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype == torch.uint8:
        x = (x[None] if x.dim() == 3 else x).permute(0, 3, 1, 2).float() / 255.0
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"preprocess: expected [B, H, W, 3] uint8 or [B, 3, H, W] float images, got {tuple(x.shape)}")
    new, top, left = _resize_crop(*x.shape[-2:], size)
    shrink = size < min(x.shape[-2:])
    x = F.interpolate(x.float(), size=new, mode="bilinear", align_corners=False, antialias=shrink)
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def to_batch(images: list[np.ndarray], resolution: int, device, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 images [H, W, 3] of any sizes -> [B, 3, r, r] through the one shared `preprocess`, normalized
    with ImageNet's mean and std (the student's input) or a teacher's own."""
    return torch.cat([preprocess(img, resolution, mean, std) for img in images]).to(device)
