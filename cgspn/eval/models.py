"""The models evaluate compares, loaded from the pipeline's outputs: the teacher (a ViT), a randomly
initialized student built with the seed, and the trained students with their adaptors; the students' other
teachers; and the teacher's outputs read back from its feature cache instead of computed again."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cgspn.data.subset import ShardSubset
from cgspn.distill.phis import PhiS, load_teacher_phis
from cgspn.eval.features import Encoder, OtherTeacher, Outputs
from cgspn.models.cgspn import cgspn_from_teacher_config
from cgspn.models.students import load_adaptors, load_student
from cgspn.models.vit import ViT
from cgspn.pipeline.errors import ParamError
from cgspn.pipeline.inputs import SHARDS, TEACHERS, feature_dir, teacher_entry
from cgspn.teachers.registry import family, load_teacher_file


def teacher_phis(root: Path, name: str) -> dict[str, PhiS]:
    """A teacher's PHI-S statistics, from its feature cache."""
    return load_teacher_phis(feature_dir(root, teacher_entry(root, name, "the students' adaptors")))


def load_encoders(p: dict, root: Path, device: str) -> dict[str, Encoder]:
    """{model: Encoder} for evaluate.models, the teacher first (the others' fidelity is measured against it),
    each on `device`. The random student is built with evaluate.seed."""
    entry = teacher_entry(root, p["teacher"], "evaluate.teacher")
    teacher = load_teacher_file(root / TEACHERS / entry["file"]).eval()
    if not isinstance(teacher, ViT):  # the random student and the block probes are built from a ViT
        raise ParamError(f"evaluate.teacher={p['teacher']!r} is not a ViT (family {family(teacher)}): evaluate "
                         f"compares the students with a ViT teacher")
    depth = len(teacher.blocks)
    if any(k >= depth for k in p["teacher_blocks"]):
        raise ParamError(f"evaluate.teacher_blocks={p['teacher_blocks']}: the teacher has blocks 0..{depth - 1}")
    phis = load_teacher_phis(feature_dir(root, entry))
    encoders = {}
    for name in ["teacher"] + [m for m in p["models"] if m != "teacher"]:
        if name == "teacher":
            encoders[name] = Encoder(name, teacher, blocks=p["teacher_blocks"])
        elif name == "random":
            torch.manual_seed(p["seed"])
            encoders[name] = Encoder(name, cgspn_from_teacher_config(teacher.cfg))
        else:
            folder = root / "models" / name
            if not (folder / "student.safetensors").exists():
                raise FileNotFoundError(f"{folder / 'student.safetensors'}: missing (run the {name} stage first)")
            student = load_student(folder / "student.safetensors")
            adaptor, others = None, {}
            if (folder / "adaptors.safetensors").exists():
                adaptors = load_adaptors(folder / "adaptors.safetensors")
                adaptor = adaptors[p["teacher"]].to(device)
                others = {t: (a.to(device), teacher_phis(root, t)) for t, a in adaptors.items() if t != p["teacher"]}
            encoders[name] = Encoder(name, student, adaptor, phis, others=others)
    for enc in encoders.values():
        enc.model.to(device)
    return encoders


def other_teachers(root: Path, encoders: dict[str, Encoder], device: str) -> dict[str, OtherTeacher]:
    """{teacher: OtherTeacher} for every teacher the students' adaptors hold besides evaluate.teacher."""
    found = {}
    for t in dict.fromkeys(t for enc in encoders.values() for t in enc.others):
        entry = teacher_entry(root, t, "the students' adaptors")
        folder = feature_dir(root, entry)
        scale = json.loads((folder / "meta.json").read_text()).get("scale", 1)
        found[t] = OtherTeacher(load_teacher_file(root / TEACHERS / entry["file"]).eval().to(device), scale, folder)
    return found


def teacher_meta(root: Path, name: str) -> tuple[Path, dict]:
    """(the teacher's feature cache folder, its meta.json)."""
    folder = feature_dir(root, teacher_entry(root, name, "evaluate.teacher"))
    if not (folder / "meta.json").exists():
        raise FileNotFoundError(f"{folder / 'meta.json'}: missing (run the cache_teacher stage first)")
    return folder, json.loads((folder / "meta.json").read_text())


def cache_reader(root: Path, folder: Path, meta: dict, limit: int | None):
    """A function (split, px, blocks) -> the teacher's Outputs on the split read from its feature cache
    (float16 there), where the cache holds that split at px with those blocks; else None."""
    base = meta["resolution"]

    def read(split: str, px: int, blocks: list[int]) -> Outputs | None:
        if not (px == base and meta.get("teacher_resolution", base) == base and split in meta["splits"]
                and set(blocks) <= set(meta.get("layers", []))):
            return None
        names = ("summary", "spatial", *(f"block{k}" for k in blocks))
        f = ShardSubset(root / SHARDS, [split], feature_dirs={"teacher": folder}, feature_names=names, limit=limit)
        f = {n: v.all().float() for n, v in f.features["teacher"].items()}
        stacked = (torch.stack([f[f"block{k}"] for k in blocks], 1) if blocks
                   else f["spatial"].new_zeros(len(f["summary"]), 0))
        return Outputs(f["summary"], f["summary"], f["spatial"], f["spatial"], stacked)

    return read
