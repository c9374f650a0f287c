"""Stage `highres`: continue the stage-2 student at higher resolutions (`scales` x the cached resolution),
one data split per scale (bigger mosaics), with teacher targets computed online at that resolution (a
ViT teacher's position grid interpolated; each teacher at its cache_teacher.teacher_scale x it). Writes models/highres/{student,adaptors}.safetensors (+ .json).
"""
from __future__ import annotations

from pathlib import Path

from cgspn.pipeline.errors import ParamError
from cgspn.pipeline.params import Param
from cgspn.pipeline.cli import run_stage
from cgspn.pipeline.inputs import SHARDS, TEACHERS, Splits, check_raw_weight, check_splits, teachers_config
from cgspn.models.students import load_adaptors, save_student_and_adaptors
from cgspn.pipeline.names import PATCH_COSINE, at_side, teacher_key
from cgspn.train.driver import run_training
from cgspn.train.schema import adapted_schema, check_weights, objective_params, train_schema

SCHEMA = {
    **train_schema(batch_size=False),
    **adapted_schema(),  # block_targets: blocks stage 2 trained heads for
    "scales": Param(list, item=int, min=1),  # resolutions: scale x the resolution of the feature cache
    "splits": Param(list, item=str, auto=True),  # one training split per scale; auto: mosaic_train_x<s>, else train
    "val_splits": Param(list, item=str, auto=True),  # one validation split per scale; auto: mosaic_val_x<s>, else val
    "batch_sizes": Param(list, item=int, min=1),  # per worker, one per scale
}


def main(p: dict, root: Path, run) -> dict:
    """Train the student at high resolution."""
    check_weights(p["teacher_weights"], "highres.teacher_weights")
    n = len(p["scales"])
    splits = Splits(root)
    p["splits"] = splits.resolve(p["splits"], lambda param: [splits.at_scale(splits.train(param)[-1], s)
                                                             for s in p["scales"]], "highres.splits")
    p["val_splits"] = splits.resolve(p["val_splits"], lambda param: [splits.at_scale(
        "mosaic_val" if splits.has("mosaic_val") else splits.val(param), s) for s in p["scales"]], "highres.val_splits")
    for key in ("splits", "val_splits", "batch_sizes"):
        if len(p[key]) != n:
            raise ParamError(f"highres.{key} needs one entry per scale ({n}), got {p[key]}")
    init = root / "models" / "distill_stage2"
    for f in ("student.safetensors", "adaptors.safetensors"):
        if not (init / f).exists():
            raise FileNotFoundError(f"{init / f}: missing (run distill_stage2 first)")
    teachers = teachers_config(p, root, "highres")
    check_raw_weight(p, teachers, init / "student.safetensors", "highres")
    heads = load_adaptors(init / "adaptors.safetensors")
    untrained = sorted(set(teachers["teacher_weights"]) - set(heads))
    if untrained:
        raise ParamError(f"highres.teacher_weights names {untrained}, for which stage 2 trained no adaptor "
                         f"(it trained {sorted(heads)}; see distill_stage2.teacher_weights)")
    for t, blocks in teachers["block_targets"].items():
        missing = sorted(set(blocks) - {int(k) for k in heads[t].blocks})
        if missing:
            raise ParamError(f"highres.block_targets.{t} has blocks {missing} for which stage 2 "
                             f"trained no adaptor head (distill_stage2.block_targets)")
    check_splits(root / SHARDS, p["splits"], "highres.splits")
    check_splits(root / SHARDS, p["val_splits"], "highres.val_splits")
    resolutions = [s * teachers["resolution"] for s in p["scales"]]
    task = {**teachers, "init_student": str((init / "student.safetensors").resolve()),
            "init_adaptors": str((init / "adaptors.safetensors").resolve()), "shards": str((root / SHARDS).resolve()),
            "resolutions": resolutions, "splits": p["splits"], "val_splits": p["val_splits"],
            "val_count": p["val_count"], "batch_sizes": p["batch_sizes"], **objective_params(p)}
    inputs = [init, root / SHARDS, root / TEACHERS, *map(Path, teachers["features"].values())]  # PHI-S stats
    metrics = run_training("highres", p, root, run, task, inputs, save_student_and_adaptors)
    for t in teachers["teacher_weights"]:
        for r in resolutions:
            k = at_side(teacher_key(t, PATCH_COSINE), r)
            print(f"highres: {t} at {r} px: mean patch cosine {metrics['val_start'][k]:.4f} -> "
                  f"{metrics['val_end'][k]:.4f}")
    return metrics


if __name__ == "__main__":
    run_stage("highres", SCHEMA, main)
