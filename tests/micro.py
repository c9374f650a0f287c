"""A micro configuration of the whole pipeline for tests: a few dozen images at 28 px, a few steps.

Every Ray worker process imports torch and Ray (~5 CPU-seconds each on the 2-core machine), so only stage 1
trains on two workers (the gradient averaging); the other stages take one. tests/test_ray_cluster.py runs
cache_teacher and stage 1 on two workers on two nodes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import yaml

from cgspn.pipeline.cli import run_stage

TRAIN_COMMON = {
    "batch_size": 4, "lr": 0.001, "weight_decay": 0.0, "warmup_steps": 1, "min_lr_ratio": 0.1, "grad_clip": 1.0,
    "checkpoint_every": 3, "val_every": 0, "val_count": 8, "log_every": 1, "seed": 0, "workers": 2,
    "cpus_per_worker": 1, "gpus_per_worker": 0, "max_failures": 0, "storage_path": "runs/ray", "steps": 6,
}
MICRO = {
    "shard": {
        "source": "fashion_mnist", "path": "/usr/share/datasets/fashion-mnist", "ignore_label": 0,
        "train_count": 40, "val_count": 20, "mosaic_train_count": 8, "mosaic_val_count": 4, "mosaic_canvas": 28,
        "garments_per_mosaic": [1, 2], "garment_size": [10, 20], "mosaic_scales": [2], "mosaic_scaled_train_count": 4,
        "mosaic_eval_count": 2, "photos": True, "val_fraction": 0.25, "max_per_shard": 16, "seed": 0,
    },
    "teacher": {"names": ["dinov2_vits14_imgfocus"]},
    "cache_teacher": {
        "resolution": 28, "splits": "auto", "layers": {"dinov2_vits14_imgfocus": [5]},
        "teacher_scale": {"efficientnet_lite0": 2}, "phis_splits": ["train"],
        "workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "batch_size": 8, "store": None,
    },
    "distill_stage1": {**TRAIN_COMMON, "teacher": "dinov2_vits14_imgfocus", "resolution": 28,
                       "splits": "auto", "val_split": "auto", "block_weights": [],
                       "cosine_weight": 1.0},
    "distill_stage2": {**TRAIN_COMMON, "teacher_weights": {"dinov2_vits14_imgfocus": 1.0},
                       "splits": "auto", "val_split": "auto", "targets": "cache",
                       "spatial_weight": 1.0, "summary_weight": 1.0, "raw_weight": 1.0, "adaptor_hidden": 0,
                       "block_targets": {"dinov2_vits14_imgfocus": [5]}, "block_weight": 1.0,
                       "backbone_lr_scale": 0.5, "head_only_steps": 2, "workers": 1},
    "highres": {**{k: v for k, v in TRAIN_COMMON.items() if k != "batch_size"}, "steps": 2, "checkpoint_every": 2,
                "teacher_weights": {"dinov2_vits14_imgfocus": 1.0}, "scales": [2], "splits": "auto",
                "val_splits": "auto", "batch_sizes": [2], "val_count": 2, "spatial_weight": 1.0,
                "summary_weight": 1.0, "raw_weight": 0.0, "block_targets": {"dinov2_vits14_imgfocus": [5]},
                "block_weight": 1.0, "backbone_lr_scale": 0.5, "head_only_steps": 2, "workers": 1},  # every step head-only: the backbone stays put
}
MICRO.update({
    "evaluate": {"teacher": "dinov2_vits14_imgfocus",
                 "models": ["teacher", "random", "distill_stage1", "distill_stage2", "highres"],
                 "knn_bank_split": "auto", "knn_query_split": "auto", "knn_k": 5, "knn_temperature": 0.07,
                 "seg_train_split": "auto", "seg_val_split": "auto", "seg_scales": [1, 2], "seg_steps": 4, "teacher_blocks": [5], "pca_photo": "astronaut", "pca_sizes": [56, 112],
                 "pca_model": "highres", "pca_teacher_max_side": 56, "max_images": 0, "batch_size": 16, "threads": 2, "device": "auto", "seed": 0,
                 "readout_control_steps": 20},
    "benchmark": {"reps": 1, "kernel": False, "blocks": True, "cpu_sides": [64], "cpu_model_sides": [56]},
    "report": {"title_note": "micro test run"},
})
DATA_STAGES = ["shard", "teacher", "cache_teacher"]
# The Prefect flow's run (conftest.flow_run) distills from both teachers, as the default pipeline does; the
# micro root (conftest.micro) and the other tests keep MICRO's one teacher unless they say otherwise.
VIT, CNN = "dinov2_vits14_imgfocus", "efficientnet_lite0"
BOTH = {VIT: 1.0, CNN: 1.0}
TWO_TEACHERS = {"teacher__names": [VIT, CNN], "distill_stage2__teacher_weights": BOTH, "highres__teacher_weights": BOTH}
TRAIN_STAGES = ["distill_stage1", "distill_stage2", "highres"]


def stage_module(stage: str):
    import importlib

    return importlib.import_module(f"stages.{stage}")


def write_params(path: Path, **changes) -> Path:
    """MICRO with `section__key=value` changes, written as a params file."""
    params = json.loads(json.dumps(MICRO))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params))
    return path


def run(stage: str, params: Path, root: Path) -> dict:
    module = stage_module(stage)
    return run_stage(stage, module.SCHEMA, module.main, ["--params", str(params), "--root", str(root)])


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def link_checkpoints(src: str, dst: str) -> None:
    """shutil.copytree's copy_function that hard-links checkpoints (.safetensors) and copies everything else.

    A test root holds the teacher (85 MB) and often students; a copy of each in every test filled a CI disk.
    Linking is safe because nothing writes a checkpoint in place: `cgspn.models.checkpoint.save_model` writes a
    temporary file and renames it over the old name, which replaces the link, never the shared file."""
    if src.endswith(".safetensors"):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def copy_tree(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    """src copied to dest (symlinks kept, checkpoints hard-linked), without the paths in `skip` (relative to
    src, e.g. "runs" or ".dvc/cache")."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if os.path.relpath(os.path.join(folder, n), src) in skip]

    shutil.copytree(src, dest, symlinks=True, copy_function=link_checkpoints, ignore=ignore)
    return dest


def copy_repo(root: Path, dest: Path) -> Path:
    """A DVC repository copied to `dest` without its Ray checkpoints (runs/), with a DVC cache of its own: the
    original's files hard-linked (DVC never writes a cache file in place; it replaces workspace files whole)."""
    repo = copy_tree(root, dest, skip=("runs", ".dvc/cache"))
    if (root / ".dvc/cache").exists():
        shutil.copytree(root / ".dvc/cache", repo / ".dvc/cache", copy_function=os.link)
    return repo


def copy_root(root: Path, dest: Path, parts=("data/shards", "data/features", "models/teachers")) -> Path:
    for sub in parts:
        copy_tree(root / sub, dest / sub)
    return dest


def error_line(output: str, stage: str) -> str:
    """The one line a stage prints for bad input (`stage <name>: error: ...`); fails on a traceback or on
    more than one such line."""
    # In-process runs only: Ray's log handler may still hold a stream an earlier test's capture closed, and
    # the logging module then prints "--- Logging error ---", a traceback of its own, and "Arguments: ...".
    own = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", output, flags=re.S)
    # Lines a Ray worker or actor printed (prefixed "(Name pid=N)") are Ray's, not the stage's: Ray Train's
    # PlacementGroupCleaner prints a traceback when another Ray instance runs on the machine.
    own = "\n".join(line for line in own.splitlines() if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=\d+", line))
    lines = [line for line in own.splitlines() if line.startswith(f"stage {stage}: error: ")]
    assert len(lines) == 1 and "Traceback" not in own, output[-3000:]
    return lines[0]


def expect_exit(capsys, stage: str, params: Path, root: Path, *needles: str) -> str:
    """Run a stage that must fail on bad input: exit status 2, one error line, every needle in it."""
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        run(stage, params, root)
    assert exit_info.value.code == 2
    line = error_line(capsys.readouterr().err, stage)
    for needle in needles:
        assert needle in line, line
    return line


def break_image(shard: Path, index: int = 0) -> str:
    """Rewrite `shard` (a complete tar still) with the image of sample `index` replaced by bytes that do not
    decode; returns that sample's key."""
    import webdataset as wds

    from cgspn.data.shards import iter_samples

    samples = list(iter_samples(shard))
    ext = next(e for e in ("png", "jpg") if e in samples[index])
    samples[index][ext] = b"\x89PNG not really" + bytes(64)
    with wds.TarWriter(str(shard)) as sink:
        for sample in samples:
            sink.write(sample)
    return samples[index]["__key__"]


def make_repo(dest: Path) -> Path:
    """A git + DVC repository at `dest` holding this project's pipeline code and the MICRO parameters with
    both teachers (TWO_TEACHERS)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(repo / name, dest / name)
    for sub in ["stages", "cgspn", "kernels", "benchmarks"]:
        shutil.copytree(repo / sub, dest / sub, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(dest / "params.yaml", **TWO_TEACHERS)
    (dest / ".gitignore").write_text("/data/*\n!/data/listing.json\n/models/\n/runs/\n__pycache__/\nmlflow.db\n")
    dvc = str(Path(sys.executable).with_name("dvc"))
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "micro pipeline"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


@contextlib.contextmanager
def own_tracking(db: Path):
    """MLFLOW_TRACKING_URI = sqlite:///<db> inside the block, the previous value afterwards."""
    saved, uri = os.environ.get("MLFLOW_TRACKING_URI"), f"sqlite:///{db}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def stage_run(trained: dict, stage: str):
    """The MLflow run of `stage` under the flow's first parent run (later tests run stages again)."""
    import mlflow

    client = mlflow.MlflowClient(trained["tracking_uri"])
    runs = client.search_runs([trained["experiment"]], f"tags.mlflow.parentRunId = '{trained['parent']}' "
                              f"and tags.`cgspn.stage` = '{stage}' and attributes.status = 'FINISHED'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]
