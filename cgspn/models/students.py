"""Saving and loading a C-GSPN student and its adaptor heads (safetensors + a JSON config beside each).

    save_student(student, "models/distill_stage2/student.safetensors")
    student = load_student("models/distill_stage2/student.safetensors")
    adaptors = load_adaptors("models/distill_stage2/adaptors.safetensors")   # Adaptors, one per teacher
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cgspn.models.checkpoint import load_state, read_config, save_model
from cgspn.models.adaptors import Adaptors
from cgspn.models.cgspn import CGSPN, CGSPNConfig
from cgspn.models.gspn_mixer import GSPNMixerConfig


def student_config(student: CGSPN) -> dict:
    return dataclasses.asdict(student.cfg)


def student_from_config(cfg: dict, where: str = "config") -> CGSPN:
    known = {f.name for f in dataclasses.fields(CGSPNConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"{where}: unknown CGSPNConfig keys {unknown}")
    cfg = dict(cfg)
    cfg["mixer"] = GSPNMixerConfig(**cfg.get("mixer", {}))
    return CGSPN(CGSPNConfig(**cfg))


def save_student(student: CGSPN, path: str | Path) -> Path:
    return save_model(student, path, student_config(student))


def load_student(path: str | Path) -> CGSPN:
    return load_state(student_from_config(read_config(path), str(Path(path).with_suffix(".json"))), path)


def save_adaptors(adaptors: Adaptors, path: str | Path) -> Path:
    return save_model(adaptors, path, adaptors_config(adaptors))


def adaptors_config(adaptors: Adaptors) -> dict:
    """The JSON config: "hidden" is one width when every teacher's heads share it, else {teacher: width}
    (the default max(student, teacher width) differs between a 384-d and a 1280-d teacher)."""
    first = next(iter(adaptors.values()))
    hidden = {name: a.summary.fc1.out_features for name, a in adaptors.items()}
    return {"student_dim": first.summary.norm.normalized_shape[0],
            "hidden": hidden[next(iter(hidden))] if len(set(hidden.values())) == 1 else hidden,
            "teacher_dims": {name: a.summary.fc2.out_features for name, a in adaptors.items()},
            "blocks": {name: [int(k) for k in a.blocks] for name, a in adaptors.items() if len(a.blocks)}}


def load_adaptors(path: str | Path) -> Adaptors:
    cfg = read_config(path)
    return load_state(Adaptors(cfg["student_dim"], cfg["teacher_dims"], cfg["hidden"], cfg.get("blocks")), path)


def save_student_and_adaptors(model, folder: Path) -> list[str]:
    """model: {"student", "adaptors"} (a training stage's trainable) -> both checkpoints in `folder`;
    returns the file names written."""
    save_student(model["student"], folder / "student.safetensors")
    save_adaptors(model["adaptors"], folder / "adaptors.safetensors")
    return ["student.safetensors", "student.json", "adaptors.safetensors", "adaptors.json"]
