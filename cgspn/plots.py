"""Small plots and tables the stages write: training curves as CSV (DVC plots) and PNG."""
from __future__ import annotations

import csv
from pathlib import Path

from .outputs import atomic_write


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows with possibly different keys -> one CSV with the union of the columns, in first-seen order."""
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)


def plot_history(history: list[dict], val: list[dict], path: Path, title: str) -> Path:
    """Left: the training loss and its parts per step (log scale). Right: validation figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    skip = {"step", "lr", "grad_norm", "images_per_s"}
    for key in [k for k in dict.fromkeys(k for r in history for k in r) if k not in skip]:
        rows = [r for r in history if key in r]  # some parts exist only on some steps (one per resolution)
        ax1.plot([r["step"] for r in rows], [r[key] for r in rows], lw=2.0 if key == "loss" else 0.8,
                 label=key, color="black" if key == "loss" else None)
    ax1.set(xlabel="step", ylabel="training loss", yscale="log", title=f"{title}: training")
    ax1.legend(fontsize=6, ncol=2)
    vsteps = [r["step"] for r in val]
    for key in [k for k in val[0] if k != "step"]:
        ax2.plot(vsteps, [r[key] for r in val], marker="o", lw=1, label=key)
    ax2.set(xlabel="step", title=f"{title}: validation")
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
