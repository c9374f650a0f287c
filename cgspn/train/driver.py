"""The driver side of a training stage: its Ray run and what names it.

`run_training` trains a stage on Ray Train and writes its outputs (cgspn.train.export). `fit` runs
`cgspn.train.loop.train_loop_per_worker` on a `TorchTrainer`; a run started again with the same
`RunConfig(name, storage_path)` resumes from its last checkpoint. The run name is a digest of what the run
computes (`run_key`): the config, the content of every input file and of the code the stage runs; so
changed parameters, data or code start afresh, while a killed run started again (or a copied tree)
resumes. Bad input a worker found is raised here as it was raised there (`WorkerInputError`), not retried.

Ray and MLflow are imported inside the functions: the library itself needs neither.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from cgspn.pipeline.errors import InputError
from cgspn.train.loop import CHECKPOINT_FILE, train_loop_per_worker


def content_digest(paths: list[Path], root: Path) -> str:
    """sha256 over the names (relative to root) and bytes of `paths`, folders walked in sorted order."""
    digest = hashlib.sha256()
    root = root.resolve()
    for path in sorted(Path(p).resolve() for p in paths):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            digest.update(str(f.relative_to(root) if f.is_relative_to(root) else f).encode() + b"\0")
            with open(f, "rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def run_key(stage: str, cfg: dict, inputs: list[Path], root: Path, code_root: Path | None = None) -> str:
    """`<stage>-<digest>` of what the run computes: the config (paths relative to root), the content of
    every input (files or folders) and of the code the stage runs (its import closure). A rerun of the
    same computation resumes that run; a change to any of these starts afresh. Independent of times and
    of where the tree lies, so a copied or re-checked-out tree finds its own checkpoints."""
    from cgspn.pipeline.code_closure import REPO_ROOT, code_digest

    stable = {k: v for k, v in cfg.items() if k not in ("mlflow", "driver")}  # per invocation, not the run's
    text = json.dumps(stable, sort_keys=True, default=str).replace(str(root.resolve()), "<root>")
    digest = hashlib.sha256(text.encode())
    digest.update(content_digest(inputs, root).encode())
    digest.update(code_digest(f"stages.{stage}", code_root or REPO_ROOT).encode())
    return f"{stage}-{digest.hexdigest()[:16]}"


class WorkerInputError(InputError):
    """Bad input a Ray worker found (raised there as `kind`); the stage reports it in one line, exit 2."""

    def __init__(self, message: str, kind: str = "InputError"):
        super().__init__(message)
        self.kind = kind


def fit(cfg: dict, scaling: dict, storage: Path, name: str) -> dict:
    """Run the training on Ray Train as run `name` under `storage`; returns the final checkpoint's state
    (model, history, ...). WorkerInputError for bad input a worker found."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cgspn.pipeline.cluster import start_ray

    started = start_ray(scaling["num_workers"] * scaling["cpus_per_worker"])
    try:
        resources = {"CPU": scaling["cpus_per_worker"]}
        if scaling["use_gpu"]:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=cfg,
            scaling_config=ScalingConfig(num_workers=scaling["num_workers"], use_gpu=scaling["use_gpu"],
                                         resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=str(storage.resolve()),
                                 failure_config=FailureConfig(max_failures=scaling["max_failures"]),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
        errors = sorted(Path(cfg["driver"]["errors"]).glob("rank*.json"), key=lambda f: int(f.stem[4:]))
        if errors:
            first = json.loads(errors[0].read_text())
            shutil.rmtree(cfg["driver"]["errors"], ignore_errors=True)
            raise WorkerInputError(first["message"], first["kind"])
        with result.checkpoint.as_directory() as d:
            return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    finally:
        if started:
            import ray

            ray.shutdown()


def run_training(stage: str, p: dict, root: Path, run, task_cfg: dict, inputs: list[Path], export) -> dict:
    """Train `stage` on Ray (its parameters `p`, its task's config `task_cfg`, the files it reads `inputs`),
    then write its outputs with `export(model, folder)` (cgspn.train.export.write_outputs); -> its metrics."""
    from cgspn.distill.tasks import TASKS
    from cgspn.pipeline.tracking import supersede_attempts, tracking_uri
    from cgspn.train.export import write_outputs

    cfg = {
        "stage": stage, "task": task_cfg, "seed": p["seed"], "threads": p["cpus_per_worker"],
        "opt": {k: p[k] for k in ("steps", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip",
                                  "backbone_lr_scale", "head_only_steps") if k in p},
        "checkpoint_every": p["checkpoint_every"], "val_every": p["val_every"], "log_every": p["log_every"],
    }
    scaling = {"num_workers": p["workers"], "cpus_per_worker": p["cpus_per_worker"], "use_gpu": p["use_gpu"],
               "max_failures": p["max_failures"]}
    key = run_key(stage, cfg, inputs, root)
    # An attempt of the same run that was killed stays RUNNING in MLflow: mark it failed, and pass it on so
    # that a worker that resumes from its checkpoint tags this run as its continuation.
    previous = supersede_attempts(run, key)
    cfg["mlflow"] = {"uri": tracking_uri(), "run_id": run.id, "previous_run": previous}
    storage = root / p["storage_path"]
    cfg["driver"] = {"errors": str((storage / key / f"input-errors-{run.id}").resolve())}  # workers' bad input
    print(f"{stage}: Ray run {key} (checkpoints under {storage / key})", flush=True)
    start = time.perf_counter()
    state = fit(cfg, scaling, storage, key)
    seconds = time.perf_counter() - start
    model = TASKS[stage].build(task_cfg)
    model.load_state_dict(state["model"])
    return write_outputs(stage, p, root, run, model, state, export, seconds)
