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


def storage_uri(storage_path: str, root: Path) -> str:
    """Where a stage's Ray Train runs go: a URI (s3://...) as it is, a local path resolved against root."""
    from cgspn.data.locations import is_remote

    return storage_path if is_remote(storage_path) else str((root / storage_path).resolve())


def worker_input_error(folder: str) -> WorkerInputError | None:
    """The first rank's bad-input report in `folder` (a path or URI; removed once read), else None."""
    from cgspn.data.locations import read_texts, remove_tree

    reports = read_texts(folder, ".json")
    if not reports:
        return None
    first = json.loads(reports[min(reports, key=lambda name: int(name[4:-5]))])  # rank<k>.json
    remove_tree(folder)
    return WorkerInputError(first["message"], first["kind"])


def fit(cfg: dict, scaling: dict, storage: str, name: str) -> dict:
    """Run the training on Ray Train as run `name` under `storage` (a local folder or a URI); returns the
    final checkpoint's state (model, history, ...). WorkerInputError for bad input a worker found."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cgspn.data.locations import is_remote
    from cgspn.pipeline.cluster import check_resources, start_ray

    local = [] if is_remote(storage) else [Path(storage)]  # local storage must be one every node sees
    started = start_ray(scaling["num_workers"] * scaling["cpus_per_worker"], cfg["stage"],
                        shared=local + [Path(p) for p in cfg["driver"]["reads"]])
    try:
        gpus = scaling["gpus_per_worker"]
        resources = {"CPU": scaling["cpus_per_worker"], **({"GPU": gpus} if gpus else {})}
        check_resources(resources, scaling["num_workers"], f"{cfg['stage']}'s {scaling['num_workers']} workers")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=cfg,
            scaling_config=ScalingConfig(num_workers=scaling["num_workers"], use_gpu=gpus > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=scaling["max_failures"]),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
        error = worker_input_error(cfg["driver"]["errors"])
        if error:
            raise error
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
    scaling = {"num_workers": p["workers"], "cpus_per_worker": p["cpus_per_worker"],
               "gpus_per_worker": p["gpus_per_worker"], "max_failures": p["max_failures"]}
    key = run_key(stage, cfg, inputs, root)
    # An attempt of the same run that was killed stays RUNNING in MLflow: mark it failed, and pass it on so
    # that a worker that resumes from its checkpoint tags this run as its continuation.
    previous = supersede_attempts(run, key)
    cfg["mlflow"] = {"uri": tracking_uri(), "run_id": run.id, "previous_run": previous}
    storage = storage_uri(p["storage_path"], root)
    # where workers report bad input (beside the checkpoints), and the local folders they read
    cfg["driver"] = {"errors": f"{storage}/{key}/input-errors-{run.id}", "reads": [str(root.resolve())]}
    print(f"{stage}: Ray run {key} (checkpoints under {storage}/{key})", flush=True)
    start = time.perf_counter()
    state = fit(cfg, scaling, storage, key)
    seconds = time.perf_counter() - start
    model = TASKS[stage].build(task_cfg)
    model.load_state_dict(state["model"])
    return write_outputs(stage, p, root, run, model, state, export, seconds)
