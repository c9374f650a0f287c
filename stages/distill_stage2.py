"""Stage `distill_stage2`: end-to-end distillation from the stage-1 student. Student features go through
one adaptor per teacher and are matched to that teacher's cached features (spatial: MSE in PHI-S space;
summary: cosine; the patch tokens of the intermediate blocks in `block_targets`: MSE in PHI-S space),
weighted per teacher. `targets: online` recomputes them with the teacher instead.
Writes models/distill_stage2/{student,adaptors}.safetensors (+ .json), reports/metrics and reports/plots.
"""
from __future__ import annotations

import json
from pathlib import Path

from cgspn.checkpoint import read_config
from cgspn.errors import ParamError
from cgspn.params import Param
from cgspn.stage import run_stage
from cgspn.students import save_adaptors, save_student
from cgspn.train import run_training, train_schema
from stages.distill_stage1 import TEACHERS, teacher_entry

SCHEMA = {
    **train_schema(),
    "backbone_lr_scale": Param(float, min=0.0, max=1.0),  # x lr for the inherited backbone; heads get lr
    "head_only_steps": Param(int, min=0),  # the backbone is frozen for these first steps
    "teacher_weights": Param(dict),  # {teacher name: weight}
    "splits": Param(list, item=str),
    "val_split": Param(str),
    "targets": Param(str, choices=("cache", "online")),
    "spatial_weight": Param(float, min=0.0),
    "summary_weight": Param(float, min=0.0),
    "raw_weight": Param(float, min=0.0),  # the student's own patch tokens against the teacher's (same width)
    "block_targets": Param(dict),  # {teacher: [block, ...]}: intermediate blocks to match too (cached ones)
    "block_weight": Param(float, min=0.0),
    "adaptor_hidden": Param(int, min=0),  # 0: max(student width, teacher width)
}
SHARDS = Path("data/shards")
FEATURES = Path("data/features")


def teachers_config(p: dict, root: Path, section: str) -> dict:
    """Paths, widths and feature folders of the weighted teachers, their block targets, the resolution of
    their cache. A block target must be in the teacher's feature cache (its PHI-S statistics are there)."""
    if not p["teacher_weights"]:
        raise ParamError(f"params.yaml: {section}.teacher_weights must name at least one teacher")
    unknown = sorted(set(p["block_targets"]) - set(p["teacher_weights"]))
    if unknown:
        raise ParamError(f"params.yaml: {section}.block_targets names {unknown}, which are not in teacher_weights")
    cfg = {"teacher_weights": {}, "teacher_paths": {}, "teacher_dims": {}, "features": {}, "block_targets": {},
           "block_weight": p["block_weight"]}
    resolutions = set()
    for name, weight in p["teacher_weights"].items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ParamError(f"params.yaml: {section}.teacher_weights.{name} must be a number >= 0, got {weight!r}")
        entry = teacher_entry(root, name, f"{section}.teacher_weights")
        features = root / FEATURES / Path(entry["file"]).stem
        meta = features / "meta.json"
        if not meta.exists():
            raise FileNotFoundError(f"{meta}: missing (run the cache_teacher stage first)")
        meta = json.loads(meta.read_text())
        resolutions.add(meta["resolution"])
        blocks = p["block_targets"].get(name, [])
        if not isinstance(blocks, list) or any(isinstance(k, bool) or not isinstance(k, int) for k in blocks):
            raise ParamError(f"params.yaml: {section}.block_targets.{name} must be a list of block indices, "
                             f"got {blocks!r}")
        missing = sorted(set(blocks) - set(meta.get("layers", [])))
        if missing:
            raise ParamError(f"params.yaml: {section}.block_targets.{name} has blocks {missing} that the feature "
                             f"cache does not hold (cache_teacher.layers is {meta.get('layers', [])})")
        if blocks:
            cfg["block_targets"][name] = blocks
        cfg["teacher_weights"][name] = float(weight)
        cfg["teacher_paths"][name] = str((root / TEACHERS / entry["file"]).resolve())
        cfg["teacher_dims"][name] = entry["config"]["dim"]
        cfg["features"][name] = str(features.resolve())
    if len(resolutions) != 1:
        raise ParamError(f"the teachers' feature caches differ in resolution {sorted(resolutions)}")
    cfg["resolution"] = resolutions.pop()
    return cfg


def check_raw_weight(p: dict, teachers: dict, student: Path, section: str) -> None:
    """`raw_weight` > 0 compares the student's own tokens with a teacher's, with no head between: one
    teacher must have the student's width (read from the student's config beside its weights)."""
    dim = read_config(student)["dim"]
    if p["raw_weight"] > 0 and dim not in teachers["teacher_dims"].values():
        raise ParamError(f"params.yaml: {section}.raw_weight={p['raw_weight']} needs a teacher of the student's "
                         f"width {dim}, but the teachers have {teachers['teacher_dims']}; set it to 0")


def export_student_and_adaptors(model, folder: Path) -> list[str]:
    save_student(model["student"], folder / "student.safetensors")
    save_adaptors(model["adaptors"], folder / "adaptors.safetensors")
    return ["student.safetensors", "student.json", "adaptors.safetensors", "adaptors.json"]


def main(p: dict, root: Path, run) -> dict:
    """Train the whole student against the teachers' features."""
    teachers = teachers_config(p, root, "distill_stage2")  # parameter errors first, before any input
    init = root / "models" / "distill_stage1" / "student.safetensors"
    if not init.exists():
        raise FileNotFoundError(f"{init}: missing (run distill_stage1 first)")
    check_raw_weight(p, teachers, init, "distill_stage2")
    task = {**teachers, "init_student": str(init.resolve()),
            "shards": str((root / SHARDS).resolve()), "splits": p["splits"], "val_split": p["val_split"],
            "val_count": p["val_count"], "batch_size": p["batch_size"], "targets": p["targets"],
            "spatial_weight": p["spatial_weight"], "summary_weight": p["summary_weight"], "raw_weight": p["raw_weight"],
            "adaptor_hidden": p["adaptor_hidden"]}
    inputs = [init] + [Path(f) / "meta.json" for f in task["features"].values()]
    metrics = run_training("distill_stage2", p, root, run, task, inputs, export_student_and_adaptors)
    for t in task["teacher_weights"]:
        before, after = metrics["val_start"][f"{t}/patch_cosine_raw"], metrics["val_end"][f"{t}/patch_cosine"]
        print(f"distill_stage2: {t}: mean patch cosine on {p['val_split']}: stage-1 student {before:.4f}, "
              f"stage-2 student {after:.4f}")
    return metrics


if __name__ == "__main__":
    run_stage("distill_stage2", SCHEMA, main)
