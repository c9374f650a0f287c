"""Figures of the evaluate stage: metrics against resolution, and PCA maps of patch features.

    python -m cgspn.eval.figures --replot [--root .]   # redraw evaluate_resolution.png from reports/metrics/evaluate.json
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cgspn.data.shards import decode_image
from cgspn.eval.pca import pca_rgb
from cgspn.pipeline.outputs import atomic_write
from cgspn.data.preprocess import preprocess


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def replot(root: Path) -> Path | None:
    """Redraw reports/figures/evaluate_resolution.png from reports/metrics/evaluate.json (no model runs)."""
    ev_path = root / "reports/metrics/evaluate.json"
    if not ev_path.exists():
        return None
    import json

    ev = json.loads(ev_path.read_text())
    return resolution_figure(ev["models"], root / "reports/figures/evaluate_resolution.png", ev["knn_k"])


def resolution_figure(results: dict, path: Path, knn_k: int) -> Path:
    """Panels for what was measured: segmentation mIoU and fidelity against image side per model, and kNN
    top-1 per model (where the data has labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_seg = any(r.get("seg_miou") for r in results.values())
    has_knn = any(r.get("knn_summary") is not None for r in results.values())
    panels = (["seg_miou"] if has_seg else []) + ["fidelity"] + (["knn"] if has_knn else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    titles = {"seg_miou": ("mIoU (%)", "linear segmentation probe"),
              "fidelity": ("mean cosine to the teacher's patch features", "fidelity: own tokens (solid), adapted (dashed)")}
    for key in [k for k in panels if k != "knn"]:
        ax, scale = axes[key], 100 if key == "seg_miou" else 1
        for i, (name, r) in enumerate(results.items()):
            color = f"C{i}"
            if r.get(key):
                ax.plot([int(k) for k in r[key]], [scale * v for v in r[key].values()], marker="o", label=name, color=color)
            if key == "fidelity" and r.get("fidelity_adapted"):
                adapted = r["fidelity_adapted"]
                ax.plot([int(k) for k in adapted], list(adapted.values()), marker="s", ls="--", color=color)
        sides = sorted({int(k) for r in results.values() for k in r.get(key, {})})
        ax.set(xlabel="image side (px)", ylabel=titles[key][0], title=titles[key][1], xscale="log")
        ax.minorticks_off()  # only the measured sides as ticks: no overlapping log-scale labels
        ax.set_xticks(sides, [str(s) for s in sides])
    if has_knn:
        ax, names = axes["knn"], [n for n, r in results.items() if r.get("knn_summary") is not None]
        x = np.arange(len(names))
        summary = [100 * results[n]["knn_summary"] for n in names]
        patch = [100 * results[n]["knn_mean_patch"] for n in names]
        for dx, values, label, color in ((-0.2, summary, "kNN: summary vector", "#4c72b0"),
                                         (0.2, patch, "kNN: mean patch feature", "#dd8452")):
            bars = ax.bar(x + dx, values, 0.4, label=label, color=color)
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)  # the axis starts above 0: the values say it
        low, high = min(summary + patch), max(summary + patch)
        ax.set_ylim(max(0.0, low - 10), min(100.0, high + 5))
        ax.set_xticks(x, names, rotation=20, fontsize=8)
        ax.set(ylabel="top-1 (%)", title=f"kNN (k={knn_k}) on the validation split")
    # one legend below the panels, for the curves and the bars: none over the data
    handles, labels = axes["fidelity"].get_legend_handles_labels()
    if has_knn:
        more = axes["knn"].get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if len(labels) <= 7 else 0.14, 1, 1))
    return _save(fig, path)


@torch.no_grad()
def pca_figure(photo: dict, teacher, student, sizes: list[int], path: Path, teacher_max_side: int | None = None) -> Path:
    """Rows: the photo, the teacher's PCA map, the student's, at each size (one column per size). The teacher
    runs only up to `teacher_max_side` (attention's cost grows with the square of the tokens: 64 s for the
    ViT-S/14 at 1792 px on a 2-core CPU, against 11 s for the student); above it its panel says so."""
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
            axes[i, 0].set_ylabel(enc.name)
            if enc is teacher and teacher_max_side and size > teacher_max_side:
                axes[i, j].text(0.5, 0.5, f"not run above {teacher_max_side} px\n(evaluate.pca_teacher_max_side)",
                                ha="center", va="center", fontsize=8, transform=axes[i, j].transAxes)
                continue
            # the student through its adaptor: the features it offers the teacher's users
            teacher_space = enc.forward(x).teacher_space  # [1, h, w, D_t]
            axes[i, j].imshow(pca_rgb(teacher_space[0])[0], interpolation="nearest")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"first three principal components of the patch features ({photo.get('txt', b'').decode()})")
    fig.tight_layout()
    return _save(fig, path)


def pca_sample(p: dict, splits, store, val_split: str, say=print) -> dict:
    """The sample the PCA figure shows: evaluate.pca_photo of the photos split, else the first image of
    `val_split` (named by its source file)."""
    from cgspn.pipeline.errors import ParamError

    if splits.has("photos"):
        photo = next((s for s, _ in store.samples("photos") if s.get("txt", b"").decode() == p["pca_photo"]), None)
        if photo is None:
            raise ParamError(f"evaluate.pca_photo={p['pca_photo']!r}: no such photo in the photos split")
        return photo
    sample = next(store.samples(val_split))[0]
    say(f"no photos split: the PCA figure shows {val_split}'s first image "
        f"({sample.get('source.txt', sample['__key__'].encode()).decode()})")
    return {**sample, "txt": sample.get("source.txt", sample["__key__"].encode())}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Redraw the evaluate stage's resolution figure from its metrics.")
    parser.add_argument("--replot", action="store_true", required=True)
    parser.add_argument("--root", type=Path, default=Path("."))
    print(f"wrote {replot(parser.parse_args().root)}")
