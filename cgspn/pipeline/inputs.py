"""What a stage reads of the earlier stages' outputs, found and checked before any work starts.

    entry = teacher_entry(root, "dinov2_vits14_imgfocus", "distill_stage1.teacher")  # teachers.json entry
    teachers = teachers_config(p, root, "distill_stage2")   # paths, widths, feature caches of the weighted teachers
    check_splits(root / SHARDS, ["train", "val"], "distill_stage1.splits", feature_dirs)  # indexes, shards, keys
    splits = Splits(root)          # what data/shards/dataset.json says each split holds
    splits.resolve(p["splits"], splits.train, "distill_stage1.splits")   # "auto" -> the data's own

Errors name the parameter (ParamError: the stage's command line adds the parameters file) or the file
(FileNotFoundError, ShardError). Paths are relative to the stage's root, as dvc.yaml lists them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from cgspn.models.checkpoint import read_config
from cgspn.data.shards import check_shard_pair, feature_shard, shard_keys, split_shards
from cgspn.pipeline.errors import ParamError, ShardError

SHARDS = Path("data/shards")
TEACHERS = Path("models/teachers")
FEATURES = Path("data/features")


def teacher_entry(root: Path, name: str, param: str) -> dict:
    """The teachers.json entry for `name`, or ParamError naming the parameter and the known teachers."""
    index = root / TEACHERS / "teachers.json"
    if not index.exists():
        raise FileNotFoundError(f"{index}: missing (run the teacher stage first)")
    teachers = {t["name"]: t for t in json.loads(index.read_text())["teachers"]}
    if name not in teachers:
        raise ParamError(f"{param}={name!r} is not among the materialized teachers {sorted(teachers)}")
    return teachers[name]


def feature_dir(root: Path, entry: dict) -> Path:
    """The feature cache folder of a teacher (its teachers.json entry)."""
    return root / FEATURES / Path(entry["file"]).stem


def teachers_config(p: dict, root: Path, section: str) -> dict:
    """Paths, widths, feature folders and input scales of the weighted teachers, their block targets, and
    the student's training resolution: the caches' common `resolution` (each teacher saw the images at
    `teacher_scales[t]` x that, its meta.json's `scale`; 1 for caches written before there was one).
    A block target must be in the teacher's feature cache (its PHI-S statistics are there)."""
    if not p["teacher_weights"]:
        raise ParamError(f"{section}.teacher_weights must name at least one teacher")
    unknown = sorted(set(p["block_targets"]) - set(p["teacher_weights"]))
    if unknown:
        raise ParamError(f"{section}.block_targets names {unknown}, which are not in teacher_weights")
    cfg = {"teacher_weights": {}, "teacher_paths": {}, "teacher_dims": {}, "teacher_scales": {}, "features": {},
           "block_targets": {}, "block_weight": p["block_weight"]}
    resolutions = set()
    for name, weight in p["teacher_weights"].items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ParamError(f"{section}.teacher_weights.{name} must be a finite number >= 0, got {weight!r}")
        entry = teacher_entry(root, name, f"{section}.teacher_weights")
        features = feature_dir(root, entry)
        meta = features / "meta.json"
        if not meta.exists():
            raise FileNotFoundError(f"{meta}: missing (run the cache_teacher stage first)")
        meta = json.loads(meta.read_text())
        resolutions.add(meta["resolution"])
        blocks = p["block_targets"].get(name, [])
        if not isinstance(blocks, list) or any(isinstance(k, bool) or not isinstance(k, int) for k in blocks):
            raise ParamError(f"{section}.block_targets.{name} must be a list of block indices, got {blocks!r}")
        missing = sorted(set(blocks) - set(meta.get("layers", [])))
        if missing:
            raise ParamError(f"{section}.block_targets.{name} has blocks {missing} that the feature "
                             f"cache does not hold (cache_teacher.layers is {meta.get('layers', [])})")
        if blocks:
            cfg["block_targets"][name] = blocks
        cfg["teacher_weights"][name] = float(weight)
        cfg["teacher_paths"][name] = str((root / TEACHERS / entry["file"]).resolve())
        cfg["teacher_dims"][name] = entry["config"]["dim"]
        cfg["teacher_scales"][name] = meta.get("scale", 1)
        cfg["features"][name] = str(features.resolve())
    if len(resolutions) != 1:
        raise ParamError(f"{section}.teacher_weights: the teachers' feature caches differ in their (student's) "
                         f"resolution {sorted(resolutions)}; run cache_teacher for all of them at once")
    cfg["resolution"] = resolutions.pop()
    return cfg


def feature_names(teachers: dict) -> dict[str, tuple[str, ...]]:
    """{teacher: the features a distillation reads of its cache}: summary, spatial and its block targets.
    `teachers` holds "teacher_weights" and "block_targets" (as `teachers_config` returns them)."""
    return {t: ("summary", "spatial", *(f"block{k}" for k in teachers["block_targets"].get(t, [])))
            for t in teachers["teacher_weights"]}


def check_raw_weight(p: dict, teachers: dict, student: Path, section: str) -> None:
    """`raw_weight` > 0 compares the student's own tokens with a teacher's, with no head between: one
    teacher must have the student's width (read from the student's config beside its weights)."""
    dim = read_config(student)["dim"]
    if p["raw_weight"] > 0 and dim not in teachers["teacher_dims"].values():
        raise ParamError(f"{section}.raw_weight={p['raw_weight']} needs a teacher of the student's "
                         f"width {dim}, but the teachers have {teachers['teacher_dims']}; set it to 0")


def check_splits(shards: Path, splits: list[str], param: str, feature_dirs: dict[str, Path] | None = None,
                 feature_names: dict[str, tuple[str, ...]] | None = None) -> int:
    """Before any worker starts: every split has its index and shards, every shard is a complete tar, and
    every feature shard holds the image shard's keys in order with the named features. Returns the number
    of samples; ParamError for a split that does not exist or holds nothing, ShardError naming the file."""
    total = 0
    for split in splits:
        try:
            shard_files = split_shards(shards, split)
        except ShardError as e:
            if (shards / f"{split}.json").exists():
                raise
            raise ParamError(f"{param}: {e}") from None
        count = 0
        for shard in shard_files:
            keys = shard_keys(shard)
            count += len(keys)
            for teacher, folder in (feature_dirs or {}).items():
                names = (feature_names or {}).get(teacher, ())
                check_shard_pair(shard, keys, feature_shard(folder, shard.name), names)
        if count == 0:
            raise ParamError(f"{param}: split {split!r} holds no samples ({shards / (split + '.json')})")
        total += count
    return total


class Splits:
    """The splits the shard stage wrote and what each holds (data/shards/dataset.json), and the "auto" value
    of every split parameter: training on `train` (plus `mosaic_train` where it exists), validation on `val`,
    a scale s on `<split>_x<s>` where the data has such bigger images, else on the split itself."""

    def __init__(self, root: Path):
        index = root / SHARDS / "dataset.json"
        if not index.exists():
            raise FileNotFoundError(f"{index}: missing (run the shard stage first)")
        self.info = json.loads(index.read_text())
        self.names = list(self.info["splits"])

    def has(self, split: str, what: str | None = None) -> bool:
        """Whether the split exists (with `what`: and every sample has "labels" or "masks")."""
        entry = self.info["splits"].get(split)
        return entry is not None and entry["count"] > 0 and (what is None or bool(entry.get(what)))

    def train(self, param: str) -> list[str]:
        found = [s for s in ("train", "mosaic_train") if self.has(s)]
        if not found:
            raise ParamError(f"{param}=auto: the data has no 'train' split (splits: {self.names}); name the "
                             f"training splits")
        return found

    def val(self, param: str) -> str:
        found = [s for s in ("val", "test", "mosaic_val") if self.has(s)]
        if not found:
            raise ParamError(f"{param}=auto: the data has no 'val' or 'test' split (splits: {self.names}); "
                             f"name the validation split, or give the data one (shard.val_fraction)")
        return found[0]

    def base(self, param: str) -> list[str]:
        """Every split of images at the training resolution: not the bigger `_x<s>` ones, not `photos`."""
        return [s for s in self.names if self.has(s) and s != "photos" and not re.search(r"_x\d+$", s)]

    def at_scale(self, split: str, scale: int) -> str:
        """The split's bigger images for scale s (`<split>_x<s>`) where they exist, else the split itself."""
        return f"{split}_x{scale}" if scale > 1 and self.has(f"{split}_x{scale}") else split

    def with_masks(self, kind: str) -> str | None:
        """The split to probe segmentation on (kind "train" or "val"): mosaics where they exist, else the
        data's own split with label maps; None when the data has no masks there."""
        names = ("mosaic_train", "train") if kind == "train" else ("mosaic_val", "val", "test")
        return next((s for s in names if self.has(s, "masks")), None)

    def resolve(self, value, auto, param: str):
        """`value`, or `auto(param)` when it is "auto" (and says what that became)."""
        if value != "auto":
            return value
        value = auto(param)
        print(f"{param}=auto: {value}", flush=True)
        return value
