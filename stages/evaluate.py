"""Stage `evaluate`: how good each model's features are, against the teacher, on whatever the data allows.

Models (evaluate.models): the teacher, a randomly initialized student, and the distill_stage1,
distill_stage2 and highres students. Every registered protocol (cgspn.eval.protocol.protocols: kNN, the
segmentation probe, fidelity, the ImageNet readout, and any registered with `register`) measures each model
over one shared feature store (cgspn.eval.features: each model's features on a split at a side computed
once; the teacher's at the cache's side read from its feature cache). What the data does not allow is
recorded under "not_measured" with the reason. Writes reports/metrics/evaluate.json,
reports/figures/evaluate_resolution.png and reports/figures/pca_maps.png; timings go to
reports/timings/evaluate.json and MLflow.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from cgspn.eval.features import FeatureStore
from cgspn.eval.figures import pca_figure, pca_sample, resolution_figure
from cgspn.eval.models import cache_reader, load_encoders, other_teachers, teacher_meta
from cgspn.eval.protocol import Context, protocols
from cgspn.models.vit import parameter_count
from cgspn.pipeline.cli import run_stage
from cgspn.pipeline.errors import ParamError
from cgspn.pipeline.inputs import SHARDS, Splits
from cgspn.pipeline.names import EVAL_MODELS
from cgspn.pipeline.outputs import write_json, write_timings
from cgspn.pipeline.params import Param

SCHEMA = {
    "teacher": Param(str),
    "models": Param(list, item=str, choices=EVAL_MODELS),
    "knn_bank_split": Param(str),  # memory bank; auto: train where it has labels
    "knn_query_split": Param(str),  # auto: val (or test) where it has labels
    "knn_k": Param(int, min=1),
    "knn_temperature": Param(float, min=1e-6),
    "seg_train_split": Param(str),  # auto: mosaic_train, else train, where it has label maps
    "seg_val_split": Param(str),  # auto: mosaic_val, else val (or test), where it has label maps
    "seg_scales": Param(list, item=int, min=1),
    "seg_steps": Param(int, min=1),  # optimizer steps of each segmentation probe
    "teacher_blocks": Param(list, item=int, min=0),  # teacher blocks to probe too (the block targets)
    "pca_photo": Param(str),  # a photo of the photos split; without that split, the first validation image
    "pca_sizes": Param(list, item=int, min=14),
    "pca_model": Param(str),
    "pca_teacher_max_side": Param(int, min=0),  # the teacher's PCA maps up to this side (0: every size)
    "max_images": Param(int, min=0),  # per split (0: all): caps memory and time on a large data set
    "batch_size": Param(int, min=1),
    "threads": Param(int, min=1),
    "device": Param(str, choices=("auto", "cpu", "cuda")),  # auto: a CUDA GPU when there is one
    "seed": Param(int, min=0),
    "readout_control_steps": Param(int, min=1),  # optimizer steps of the ImageNet readout's control head
}
METRICS = Path("reports/metrics/evaluate.json")
FIGURES = Path("reports/figures")


def say(line: str) -> None:
    print(f"evaluate: {line}", flush=True)


def pick_device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamError("evaluate.device=cuda, but torch sees no CUDA GPU here")
    return ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice


def main(p: dict, root: Path, run) -> dict:
    """Evaluate every model."""
    torch.set_num_threads(p["threads"])
    device = pick_device(p["device"])
    if p["pca_model"] not in p["models"]:
        raise ParamError(f"evaluate.pca_model={p['pca_model']!r} is not in evaluate.models {p['models']}")
    folder, meta = teacher_meta(root, p["teacher"])
    limit = p["max_images"] or None
    encoders = load_encoders(p, root, device)
    store = FeatureStore(root, root / SHARDS, encoders, p["batch_size"], limit, cache_reader(root, folder, meta, limit))
    ctx = Context(p, root, device, meta["resolution"], Splits(root), encoders, store,
                  others=other_teachers(root, encoders, device), say=say)
    active, inactive, not_measured = [], [], {}
    for protocol in protocols():
        why = protocol.prepare(ctx)
        if why:
            not_measured[protocol.name] = why
            inactive.append(protocol)
            say(f"{protocol.title} not measured: {why}")
        else:
            active.append(protocol)
    photo = pca_sample(p, ctx.splits, store, ctx.used["fidelity"], say)
    results, seconds = {}, {}
    for n, name in enumerate(encoders, 1):
        start = time.perf_counter()
        say(f"[{n}/{len(encoders)}] {name} ...")
        results[name] = {"parameters": parameter_count(encoders[name].model)}
        for protocol in inactive:
            results[name].update(protocol.empty())
        for protocol in active:
            results[name].update(protocol.measure(ctx, name))
        if name != "teacher":  # every student's fidelity reads the teacher's
            store.release(name)
        seconds[name] = round(time.perf_counter() - start, 1)
        say(f"{name}: " + "; ".join(part for pr in active for part in pr.line(results[name])) + f" ({seconds[name]} s)")
    metrics = {"resolution": ctx.base, "device": device,
               "splits": {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.used.items()},
               "knn_k": p["knn_k"], "knn_temperature": p["knn_temperature"], "seg_steps": p["seg_steps"],
               "not_measured": not_measured, "models": results}
    for protocol in active:
        start = time.perf_counter()
        found = protocol.finish(ctx, results)
        if found:
            metrics.update(found)
            seconds[protocol.name] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    resolution_figure(results, root / FIGURES / "evaluate_resolution.png", p["knn_k"])
    pca_figure(photo, encoders["teacher"], encoders[p["pca_model"]], p["pca_sizes"], root / FIGURES / "pca_maps.png",
               p["pca_teacher_max_side"] or None)
    seconds["figures"] = round(time.perf_counter() - start, 1)
    write_timings(root, "evaluate", {"seconds": seconds})
    write_json(root / METRICS, metrics)  # last: the metrics file and the figures are of the same run
    run.log_metrics({**metrics, "seconds": seconds})
    for f in sorted((root / FIGURES).glob("*.png")):
        run.log_artifact(f, "figures")
    return metrics


if __name__ == "__main__":
    run_stage("evaluate", SCHEMA, main)
