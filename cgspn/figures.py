"""Figures of the evaluate stage: metrics against resolution, and PCA maps of patch features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.shards import decode_image
from .evaluation import pca_rgb
from .outputs import atomic_write
from .teachers import preprocess


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def resolution_figure(results: dict, path: Path) -> Path:
    """Three panels: segmentation mIoU and fidelity against image side per model; kNN top-1 per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, r in results.items():
        for ax, key in zip(axes[:2], ["seg_miou", "fidelity"]):
            if r[key]:
                sides = [int(k) for k in r[key]]
                ax.plot(sides, list(r[key].values()), marker="o", label=name)
    axes[0].set(xlabel="image side (px)", ylabel="mIoU", title="linear segmentation probe", xscale="log", xticks=[])
    axes[1].set(xlabel="image side (px)", ylabel="mean cosine to the teacher", title="fidelity", xscale="log")
    for ax in axes[:2]:
        sides = sorted({int(k) for r in results.values() for k in r["seg_miou"]})
        ax.set_xticks(sides, [str(s) for s in sides])
        ax.legend(fontsize=8)
    names = list(results)
    x = np.arange(len(names))
    axes[2].bar(x - 0.2, [results[n]["knn_summary"] for n in names], 0.4, label="summary")
    axes[2].bar(x + 0.2, [results[n]["knn_mean_patch"] for n in names], 0.4, label="mean patch")
    axes[2].set_xticks(x, names, rotation=20, fontsize=8)
    axes[2].set(ylabel="top-1", title="kNN (k=20) on Fashion-MNIST", ylim=(0, 1))
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


@torch.no_grad()
def pca_figure(photo: dict, teacher, student, sizes: list[int], path: Path) -> Path:
    """Rows: the photo, the teacher's PCA map, the student's, at each size (one column per size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = decode_image(photo)
    fig, axes = plt.subplots(3, len(sizes), figsize=(3.2 * len(sizes), 9.6), squeeze=False)
    for j, size in enumerate(sizes):
        x = preprocess(image, size)
        axes[0, j].imshow(((x[0].permute(1, 2, 0) * torch.tensor([0.229, 0.224, 0.225]) +
                            torch.tensor([0.485, 0.456, 0.406])).clamp(0, 1)).numpy())
        axes[0, j].set_title(f"{size} px")
        for i, enc in [(1, teacher), (2, student)]:
            # the student through its adaptor: the features it offers the teacher's users
            teacher_space = enc(x)[2]  # [1, h, w, D_t]
            axes[i, j].imshow(pca_rgb(teacher_space[0])[0], interpolation="nearest")
            axes[i, 0].set_ylabel(enc.name)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"first three principal components of the patch features ({photo.get('txt', b'').decode()})")
    fig.tight_layout()
    return _save(fig, path)
