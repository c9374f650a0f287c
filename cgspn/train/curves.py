"""Small plots and tables the stages write: training curves as CSV (DVC plots) and PNG.

    python -m cgspn.train.curves --replot [--root .]   # redraw reports/plots/<stage>.png from the CSV and metrics files
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from cgspn.pipeline.names import TRAINING_STAGES, split_key, teachers_in
from cgspn.pipeline.outputs import atomic_write


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows with possibly different keys -> one CSV with the union of the columns, in first-seen order."""
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)


def line_style(i: int) -> dict:
    """A distinct colour and line style for the i-th line of a panel (40 before any repeats)."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    return {"color": colors[i % len(colors)], "linestyle": ("-", "--", ":", "-.")[(i // len(colors)) % 4]}


def common_prefix(keys: list[str]) -> str:
    """"teacher/" when every key starts with the same "teacher/" (the panel's title says it once), else ""."""
    teachers = {split_key(k)[0] for k in keys}  # None for a key of no teacher
    return f"{teachers.pop()}/" if len(teachers) == 1 and None not in teachers else ""


def _legend(ax, n: int) -> None:
    """The legend below the panel, outside the data."""
    ax.legend(fontsize=7, ncol=2 if n > 4 else 1, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def plot_history(history: list[dict], val: list[dict], path: Path, title: str) -> Path:
    """Left: the training loss and its parts per step (log scale). Then the validation figures: losses in one
    panel, cosines to the teacher in another (where the stage has both). With several teachers (keys
    "<teacher>/<name>"), one row of these panels per teacher, the total loss in each row's training panel.
    Every line labelled, legends below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"step", "lr", "grad_norm", "images_per_s"}
    train_keys = [k for k in dict.fromkeys(k for r in history for k in r) if k not in skip]
    val_keys = [k for k in dict.fromkeys(k for r in val for k in r) if k != "step"]
    teachers = teachers_in(train_keys + val_keys)
    groups = ([[k for k in keys if split_key(k)[0] in (None, t)] for keys in (train_keys, val_keys)]
              for t in teachers) if len(teachers) > 1 else [(train_keys, val_keys)]
    rows = []
    for train, vals in groups:
        cosines = [k for k in vals if "cosine" in k]
        losses = [k for k in vals if k not in cosines]
        rows.append([("train", train)] + [(name, keys) for name, keys in (("val loss", losses), ("val cosine", cosines))
                                          if keys])
    most = max(len(keys) for panels in rows for _, keys in panels)
    ncols = max(len(panels) for panels in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(6 * ncols, (4.2 + 0.16 * math.ceil(most / 2)) * len(rows)),
                             squeeze=False)
    for row_axes, panels in zip(axes, rows):
        for ax in row_axes[len(panels):]:
            ax.set_visible(False)
        for ax, (panel, keys) in zip(row_axes, panels):
            prefix = common_prefix([k for k in keys if k != "loss"])
            rows_of = history if panel == "train" else val
            i = 0
            for key in keys:
                points = [r for r in rows_of if key in r and r[key] is not None]  # some parts exist only on some steps
                if key == "loss":  # the total (stage 1's validation: the mean over the blocks), black in every panel
                    style = {"color": "black", "lw": 2.0}
                else:
                    style = {**line_style(i), "lw": 0.9}
                    i += 1
                ax.plot([r["step"] for r in points], [r[key] for r in points], label=key.removeprefix(prefix),
                        marker=None if panel == "train" else "o", markersize=4, **style)
            who = f" ({prefix.rstrip('/')})" if prefix else ""
            if panel == "train":
                ax.set(xlabel="step", ylabel="training loss (log)", yscale="log", title=f"{title}: training{who}")
            elif panel == "val loss":
                ax.set(xlabel="step", ylabel="validation loss (log)", yscale="log",
                       title=f"{title}: validation loss{who}")
            else:
                ax.set(xlabel="step", ylabel="cosine similarity to the teacher",
                       title=f"{title}: validation cosine{who}")
            ax.title.set_fontsize(10)
            _legend(ax, len(keys))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def read_csv(path: Path) -> list[dict]:
    """A training-curve CSV back as rows of numbers (empty cells left out)."""
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def replot(root: Path) -> list[Path]:
    """Redraw reports/plots/<stage>.png of every training stage from its CSV (the training curves) and
    reports/metrics/<stage>.json (validation at the start and the end: what a run with val_every 0, the
    default, validates; a run that validated in between has more points than the metrics keep, so it is left
    as it is)."""
    import yaml

    params_file = root / "params.yaml"
    params = (yaml.safe_load(params_file.read_text()) or {}) if params_file.exists() else {}
    drawn = []
    for stage in TRAINING_STAGES:
        curves, metrics = root / "reports/plots" / f"{stage}.csv", root / "reports/metrics" / f"{stage}.json"
        if not (curves.exists() and metrics.exists()):
            continue
        if (params.get(stage) or {}).get("val_every"):
            print(f"{stage}: validated every {params[stage]['val_every']} steps; the metrics keep only the start "
                  "and the end, so its plot is left as the stage drew it")
            continue
        m = json.loads(metrics.read_text())
        drawn.append(plot_history(read_csv(curves), [m["val_start"], m["val_end"]],
                                  root / "reports/plots" / f"{stage}.png", stage))
        print(f"wrote {drawn[-1]}")
    return drawn


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Redraw the training-curve plots from the files the stages wrote.")
    parser.add_argument("--replot", action="store_true", required=True)
    parser.add_argument("--root", type=Path, default=Path("."))
    replot(parser.parse_args().root)
