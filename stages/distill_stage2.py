"""Stage `distill_stage2`: end-to-end distillation from the stage-1 student. Student features go through
one adaptor per teacher and are matched to that teacher's cached features (spatial: MSE in PHI-S space;
summary: cosine; the patch tokens of the intermediate blocks in `block_targets`: MSE in PHI-S space),
weighted per teacher. `targets: online` recomputes them with the teachers instead (each at its
cache_teacher.teacher_scale). A teacher's grid may differ from the student's (a CNN's stride 32): its
targets are resized to the student's grid. Per-teacher losses are logged as `<teacher>/<term>`.
Writes models/distill_stage2/{student,adaptors}.safetensors (+ .json), reports/metrics and reports/plots.
"""
from __future__ import annotations

from pathlib import Path

from cgspn.pipeline.params import Param
from cgspn.pipeline.cli import run_stage
from cgspn.pipeline.inputs import (SHARDS, TEACHERS, Splits, check_raw_weight, check_splits, feature_names, teachers_config)
from cgspn.models.students import save_student_and_adaptors
from cgspn.pipeline.names import PATCH_COSINE, PATCH_COSINE_RAW, teacher_key
from cgspn.train.driver import run_training
from cgspn.train.schema import adapted_schema, check_weights, objective_params, train_schema

SCHEMA = {
    **train_schema(),
    **adapted_schema(),
    "splits": Param(list, item=str, auto=True),  # auto: train (+ mosaic_train where the data has it)
    "val_split": Param(str),  # auto: val (or test)
    "targets": Param(str, choices=("cache", "online")),
    "adaptor_hidden": Param(int, min=0),  # 0: max(student width, teacher width)
}


def main(p: dict, root: Path, run) -> dict:
    """Train the whole student against the teachers' features."""
    check_weights(p["teacher_weights"], "distill_stage2.teacher_weights")
    teachers = teachers_config(p, root, "distill_stage2")  # parameter errors first, before any input
    init = root / "models" / "distill_stage1" / "student.safetensors"
    if not init.exists():
        raise FileNotFoundError(f"{init}: missing (run distill_stage1 first)")
    check_raw_weight(p, teachers, init, "distill_stage2")
    splits = Splits(root)
    p["splits"] = splits.resolve(p["splits"], splits.train, "distill_stage2.splits")
    p["val_split"] = splits.resolve(p["val_split"], splits.val, "distill_stage2.val_split")
    features, names = {t: Path(f) for t, f in teachers["features"].items()}, feature_names(teachers)
    cached = features if p["targets"] == "cache" else None
    check_splits(root / SHARDS, p["splits"], "distill_stage2.splits", cached, names)
    check_splits(root / SHARDS, [p["val_split"]], "distill_stage2.val_split", features, names)
    task = {**teachers, "init_student": str(init.resolve()),
            "shards": str((root / SHARDS).resolve()), "splits": p["splits"], "val_split": p["val_split"],
            "val_count": p["val_count"], "batch_size": p["batch_size"], "targets": p["targets"],
            "adaptor_hidden": p["adaptor_hidden"], **objective_params(p)}
    inputs = [init.parent, root / SHARDS, root / TEACHERS, *features.values()]
    metrics = run_training("distill_stage2", p, root, run, task, inputs, save_student_and_adaptors)
    for t in task["teacher_weights"]:
        after = metrics["val_end"][teacher_key(t, PATCH_COSINE)]
        before = metrics["val_start"].get(teacher_key(t, PATCH_COSINE_RAW))  # the student's own tokens: same width only
        start = (f"stage-1 student {before:.4f}" if before is not None else
                 f"fresh adaptor {metrics['val_start'][teacher_key(t, PATCH_COSINE)]:.4f}")
        print(f"distill_stage2: {t}: mean patch cosine on {p['val_split']}: {start}, stage-2 student {after:.4f}")
    return metrics


if __name__ == "__main__":
    run_stage("distill_stage2", SCHEMA, main)
