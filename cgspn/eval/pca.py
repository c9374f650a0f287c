"""PCA pictures of patch feature maps."""
from __future__ import annotations

import numpy as np
import torch


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
