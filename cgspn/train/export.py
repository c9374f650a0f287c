"""What a training stage writes once training is done: the model into models/<stage>/ (replaced whole),
reports/metrics/<stage>.json (a DVC output) and the curves reports/plots/<stage>.{csv,png} (git), written at the
precision that means something (4 significant digits: another machine differs further down); the wall
time and images/s into reports/timings/<stage>.json (untracked) and MLflow, with the figures and the model.
"""
from __future__ import annotations

from pathlib import Path

from cgspn.pipeline.outputs import replace_dir, write_json, write_timings
from cgspn.train.curves import plot_history, write_csv


def figure(value, digits: int = 4):
    """A float at `digits` significant digits (what a loss or a cosine means; a rerun elsewhere differs
    further down); anything else as it is."""
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def figures(row: dict) -> dict:
    """Every float of a row (or a nested dict of rows) at 4 significant digits."""
    return {k: figures(v) if isinstance(v, dict) else figure(v) for k, v in row.items()}


def mean_rows(rows: list[dict]) -> dict:
    """Per key, the mean over the rows that have it (parts can exist on some steps only)."""
    keys = dict.fromkeys(k for r in rows for k in r if k != "step")
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}



def write_outputs(stage: str, p: dict, root: Path, run, model, state: dict, export, seconds: float) -> dict:
    """The trained `model` exported with `export(model, folder)` into models/<stage>/ (replaced whole); the
    final checkpoint's `state` (history, val_history, step, nodes) as metrics and curves; the timings and
    everything else to the stage's MLflow `run`. -> the metrics written."""
    with replace_dir(root / "models" / stage) as staging:
        files = export(model, staging)
    history = state["history"]
    # the rates differ run to run for the same weights: timings file and MLflow only
    science = [{k: v for k, v in r.items() if k != "images_per_s"} for r in history]
    curves, val = [figures(r) for r in science], [figures(r) for r in state["val_history"]]
    write_csv(root / "reports" / "plots" / f"{stage}.csv", curves)
    plot_history(curves, val, root / "reports" / "plots" / f"{stage}.png", stage)
    rates = sorted(r["images_per_s"] for r in history)
    # where it ran is the run's circumstance, as its times are: timings file and MLflow, not the tracked metrics
    timings = {"seconds": round(seconds, 1), "images_per_s": round(rates[len(rates) // 2], 2),  # median over steps
               "nodes": len(state.get("nodes", []))}  # the Ray nodes the workers ran on
    metrics = {
        "steps": state["step"], "workers": p["workers"],
        "train_last10": figures(mean_rows(science[-min(len(science), 10):])),
        "val_start": val[0], "val_end": val[-1],
    }
    write_json(root / "reports" / "metrics" / f"{stage}.json", metrics)
    write_timings(root, stage, timings)
    run.log_metrics({"final": metrics["train_last10"], "val_start": val[0], "val_end": val[-1], **timings})
    for f in files:
        run.log_artifact(root / "models" / stage / f, "model")
    run.log_artifact(root / "reports" / "plots" / f"{stage}.png")
    return metrics
