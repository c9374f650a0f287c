"""Stage `distill_stage1`: module-wise distillation. Each student mixer learns to reproduce the teacher's
attention output from the teacher's own normalized block input; everything else is the teacher's, frozen.
Writes models/distill_stage1/student.safetensors (+ .json), reports/metrics and reports/plots.
"""
from __future__ import annotations

from pathlib import Path

from cgspn.pipeline.errors import ParamError
from cgspn.pipeline.params import Param
from cgspn.pipeline.cli import run_stage
from cgspn.pipeline.inputs import SHARDS, TEACHERS, Splits, check_splits, teacher_entry
from cgspn.teachers.registry import family_of
from cgspn.models.students import save_student
from cgspn.train.driver import run_training
from cgspn.train.schema import check_weights, train_schema

SCHEMA = {
    **train_schema(),
    "teacher": Param(str),  # a name in models/teachers/teachers.json
    "resolution": Param(int, min=14),
    "splits": Param(list, item=str, auto=True),  # auto: train (+ mosaic_train where the data has it)
    "val_split": Param(str),  # auto: val (or test)
    "block_weights": Param(list, item=float, min=0.0),  # one per block; [] = all equal
    "cosine_weight": Param(float, min=0.0),
}


def main(p: dict, root: Path, run) -> dict:
    """Train the student's mixers block by block."""
    teacher = teacher_entry(root, p["teacher"], "distill_stage1.teacher")
    if not family_of(teacher["config"]).blocks:
        family = teacher["config"].get("family")
        raise ParamError(f"distill_stage1.teacher={p['teacher']!r} is not a ViT (family {family}): module-wise "
                         f"distillation needs a ViT's per-block attention inputs and outputs")
    if p["resolution"] % teacher["config"]["patch_size"]:
        raise ParamError(f"distill_stage1.resolution={p['resolution']} is not a multiple of the "
                         f"patch size {teacher['config']['patch_size']}")
    check_weights(p["block_weights"], "distill_stage1.block_weights")
    depth = teacher["config"]["depth"]
    if p["block_weights"] and len(p["block_weights"]) != depth:
        raise ParamError(f"distill_stage1.block_weights has {len(p['block_weights'])} entries; the teacher has "
                         f"{depth} blocks (or [] for equal weights)")
    splits = Splits(root)
    p["splits"] = splits.resolve(p["splits"], splits.train, "distill_stage1.splits")
    p["val_split"] = splits.resolve(p["val_split"], splits.val, "distill_stage1.val_split")
    check_splits(root / SHARDS, p["splits"], "distill_stage1.splits")
    check_splits(root / SHARDS, [p["val_split"]], "distill_stage1.val_split")
    teacher_path = root / TEACHERS / teacher["file"]
    task = {"teacher_path": str(teacher_path.resolve()), "shards": str((root / SHARDS).resolve()),
            "splits": p["splits"], "val_split": p["val_split"], "val_count": p["val_count"],
            "resolution": p["resolution"], "batch_size": p["batch_size"], "block_weights": p["block_weights"],
            "cosine_weight": p["cosine_weight"]}

    def export(model, folder: Path) -> list[str]:
        save_student(model, folder / "student.safetensors")
        return ["student.safetensors", "student.json"]

    metrics = run_training("distill_stage1", p, root, run, task, [root / TEACHERS, root / SHARDS], export)
    start, end = metrics["val_start"]["loss"], metrics["val_end"]["loss"]
    print(f"distill_stage1: mean per-block validation loss {start:.4f} -> {end:.4f} ({start / end:.1f}x lower)")
    return metrics


if __name__ == "__main__":
    run_stage("distill_stage1", SCHEMA, main)
