"""The Ray Train loop the three training stages share.

`fit(config, scaling, root)` runs `train_loop_per_worker` on a `TorchTrainer`: every worker builds the
stage's task (cgspn.distill.tasks) on its share of the shards, and each step averages the gradients over the
workers (one flat all-reduce), clips them, and takes an AdamW step with warmup + cosine learning rate.
Every `checkpoint_every` steps rank 0 reports a checkpoint (model, optimizer, step, loss history) through
`ray.train.report`. A run started again with the same `RunConfig(name, storage_path)` resumes from the
last one. The run name is a digest of what the run computes (`run_key`): the config, the content of every
input file and of the code the stage runs; so changed parameters, data or code start afresh, while a
killed run started again (or a copied tree) resumes. Bad input that a worker finds (a shard that does not
decode) is not retried like a crashed worker: every worker stops, and the driver raises the worker's error
as it was raised (`WorkerInputError`). Rank 0 logs every loss, the learning rate and images/s to the
stage's MLflow run.

Ray and MLflow are imported inside the functions: the library itself needs neither.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cgspn.pipeline.errors import InputError, ParamError

CHECKPOINT_FILE = "state.pt"


def learning_rate(step: int, opt: dict) -> float:
    """Linear warmup over `warmup_steps`, then cosine from `lr` down to `lr * min_lr_ratio` at `steps`."""
    lr, warmup, total = opt["lr"], opt["warmup_steps"], opt["steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = lr * opt["min_lr_ratio"]
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def backbone_learning_rate(step: int, opt: dict) -> float:
    """The inherited backbone's rate: 0 for the first `head_only_steps` (the fresh heads learn first, so
    that their early, random gradients do not distort the backbone), then its own warmup and cosine over
    the remaining steps."""
    frozen = opt.get("head_only_steps", 0)
    if step < frozen:
        return 0.0
    return learning_rate(step - frozen, {**opt, "steps": opt["steps"] - frozen})


def gather_objects(obj, world: int) -> list:
    """`obj` of every worker, in rank order (a list of one without a process group)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def average_across_workers(tensors: list[torch.Tensor], world: int) -> None:
    """In place: every tensor becomes the mean over the workers (one flat all-reduce)."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class MetricLogger:
    """Rank 0's line to the stage's MLflow run (the driver opened it; the worker writes by run id)."""

    def __init__(self, mlflow_cfg: dict | None):
        self.client = None
        if mlflow_cfg:
            import mlflow

            self.client, self.run_id = mlflow.MlflowClient(mlflow_cfg["uri"]), mlflow_cfg["run_id"]
            self.previous = mlflow_cfg.get("previous_run")

    def tag_resumed(self, step: int) -> None:
        """Mark the stage's run as the continuation of the attempt whose checkpoint it resumed from."""
        if self.client is None:
            return
        self.client.set_tag(self.run_id, "cgspn.resumed_from_step", str(step))
        if self.previous:
            self.client.set_tag(self.run_id, "cgspn.resumes_run", self.previous)

    def log(self, metrics: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        from cgspn.pipeline.tracking import metric_name

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()])


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    from cgspn.distill.tasks import TASKS

    from cgspn.pipeline.errors import InputError

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg["threads"])
    device = ray.train.torch.get_device()
    try:
        task, error = TASKS[cfg["stage"]](cfg["task"], device, rank, world, cfg["seed"]), None
    except InputError as e:  # bad data is not a crash: no retry, every worker stops, the driver says why
        task, error = None, {"kind": type(e).__name__, "message": str(e)}
        path = Path(cfg["driver"]["errors"]) / f"rank{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(error))
    if any(gather_objects(error is not None, world)):
        return
    nodes = sorted(set(gather_objects(ray.get_runtime_context().get_node_id(), world)))
    optimizer = build_optimizer(task, cfg["opt"])
    state = {"step": 0, "history": [], "val_history": [], "nodes": nodes}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        task.trainable.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update({k: saved[k] for k in ("step", "history", "val_history")})
    else:
        average_across_workers([p.data for p in task.trainable.parameters()], world)  # identical start everywhere
    logger = MetricLogger(cfg["mlflow"]) if rank == 0 else MetricLogger(None)
    if checkpoint and rank == 0:
        print(f"{cfg['stage']}: resumed from the checkpoint at step {state['step']}", flush=True)
        logger.tag_resumed(state["step"])

    def report(state: dict, loss: float) -> None:
        """Rank 0's checkpoint of `state` (with the model and optimizer) to Ray Train; every rank reports."""
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save({"model": task.trainable.state_dict(), "optimizer": optimizer.state_dict(), **state},
                           Path(d) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"step": state["step"], "loss": loss}, checkpoint=ckpt)

    run_steps(task, optimizer, state, cfg, rank, world, logger, report)


def build_optimizer(task, opt: dict) -> torch.optim.Optimizer:
    """AdamW over the task's parameter groups, each with its `lr_scale` and `weight_decay` (the task
    leaves norms, biases, gammas and merge logits undecayed)."""
    groups = task.param_groups(opt.get("backbone_lr_scale", 1.0), opt["weight_decay"])
    return torch.optim.AdamW(groups, lr=opt["lr"], weight_decay=opt["weight_decay"])


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, opt: dict) -> float:
    """The schedule's rates for `step` into every group (the backbone's own schedule, frozen while only the
    heads train); returns the heads' rate."""
    lr, backbone_lr = learning_rate(step, opt), backbone_learning_rate(step, opt)
    for group in optimizer.param_groups:
        if group.get("backbone"):
            group["lr"] = backbone_lr * group["lr_scale"]
            for p in group["params"]:  # frozen (no backward through it) while only the heads train
                p.requires_grad_(step >= opt.get("head_only_steps", 0))
        else:
            group["lr"] = lr * group["lr_scale"]
    return lr


def validate(task, state: dict, logger) -> None:
    """Rank 0: the task's validation figures at the current step, kept in state["val_history"] and logged."""
    state["val_history"].append({"step": state["step"], **task.validate()})
    logger.log({f"val/{k}": v for k, v in state["val_history"][-1].items() if k != "step"}, state["step"])


def validates_at(step: int, total: int, val_every: int) -> bool:
    """Validation after `step`: every `val_every` steps and at the end (0: only at the end; step 0 is
    validated before training starts)."""
    return step == total or (val_every > 0 and step % val_every == 0)


def train_step(task, optimizer, params: list, step: int, opt: dict, world: int) -> dict:
    """One optimizer step at `step` -> its row: step (after it), loss and parts averaged over the workers,
    lr, grad_norm, images_per_s."""
    t0 = time.perf_counter()
    lr = set_learning_rates(optimizer, step, opt)
    task.trainable.train()
    loss, parts = task.loss(step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_across_workers([p.grad for p in params if p.grad is not None], world)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, opt["grad_clip"])
    optimizer.step()
    logged = torch.tensor([loss.item(), *parts.values()], dtype=torch.float64)
    average_across_workers([logged], world)  # the losses of the whole step, not rank 0's share
    return {"step": step + 1, "loss": logged[0].item(), **dict(zip(parts, logged[1:].tolist())), "lr": lr,
            "grad_norm": grad_norm.item(), "images_per_s": task.images_per_step * world / (time.perf_counter() - t0)}


def run_steps(task, optimizer, state: dict, cfg: dict, rank: int, world: int, logger, report) -> None:
    """Train from state["step"] to cfg["opt"]["steps"]. Rank 0 keeps every row in state["history"] and
    validates at step 0 and where `validates_at`; `report(state, loss)` is called on every rank every
    `checkpoint_every` steps and at the end (Ray Train's checkpoint)."""
    opt, total = cfg["opt"], cfg["opt"]["steps"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if state["step"] == 0 and rank == 0:
        validate(task, state, logger)
    while state["step"] < total:
        row = train_step(task, optimizer, params, state["step"], opt, world)
        state["step"] = step = row["step"]
        if rank == 0:
            state["history"].append(row)
            logger.log({k: v for k, v in row.items() if k != "step"}, step)
            if step % cfg["log_every"] == 0 or step == total:
                print(f"{cfg['stage']}: step {step}/{total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                      f"{row['images_per_s']:.1f} img/s", flush=True)
        if rank == 0 and validates_at(step, total, cfg["val_every"]):
            validate(task, state, logger)
        if step % cfg["checkpoint_every"] == 0 or step == total:  # after validation: the checkpoint holds it
            report(state, row["loss"])


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


# --- the driver side of a training stage ----------------------------------------------------------

def train_schema():
    from cgspn.pipeline.params import Param

    return {
        "steps": Param(int, min=1),
        "batch_size": Param(int, min=1),  # per worker
        "lr": Param(float, min=0.0),
        "weight_decay": Param(float, min=0.0),
        "warmup_steps": Param(int, min=0),
        "min_lr_ratio": Param(float, min=0.0, max=1.0),
        "grad_clip": Param(float, min=0.0),
        "checkpoint_every": Param(int, min=1),
        "val_every": Param(int, min=0),  # 0: validate only at the start and the end
        "val_count": Param(int, min=1),
        "log_every": Param(int, min=1),
        "seed": Param(int, min=0),
        "workers": Param(int, min=1),
        "cpus_per_worker": Param(int, min=1),
        "use_gpu": Param(bool),
        "max_failures": Param(int, min=0),
        "storage_path": Param(str),  # Ray Train checkpoints, relative to the root
    }


def check_weights(weights: list | dict, param: str) -> None:
    """ParamError when loss weights are given but all 0 (the objective would weigh nothing; stage 1 divides
    by their sum). Values of the wrong type are left to the checks that know them."""
    values = list(weights.values()) if isinstance(weights, dict) else list(weights)
    if values and all(not isinstance(w, bool) and w == 0 for w in values):
        raise ParamError(f"{param} are all 0: nothing would be trained; give at least one a weight > 0")


def figure(value, digits: int = 4):
    """A float at `digits` significant digits (what a loss or a cosine means; a rerun elsewhere differs
    further down); anything else as it is."""
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def figures(row: dict) -> dict:
    """Every float of a row (or a nested dict of rows) at 4 significant digits."""
    return {k: figures(v) if isinstance(v, dict) else figure(v) for k, v in row.items()}


def mean_rows(rows: list[dict]) -> dict:
    """Per key, the mean over the rows that have it (parts can exist on some steps only)."""
    keys = dict.fromkeys(k for r in rows for k in r if k != "step")
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def run_training(stage: str, p: dict, root: Path, run, task_cfg: dict, inputs: list[Path], export) -> dict:
    """Train on Ray, export the final model with `export(model, folder)` into models/<stage>/ (replaced
    whole), write reports/metrics/<stage>.json and reports/plots/<stage>.{csv,png}, log to MLflow."""
    from cgspn.distill.tasks import TASKS
    from cgspn.pipeline.outputs import replace_dir, write_json, write_timings
    from cgspn.train.curves import plot_history, write_csv
    from cgspn.pipeline.tracking import supersede_attempts, tracking_uri

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
    with replace_dir(root / "models" / stage) as staging:
        files = export(model, staging)
    history, val = state["history"], state["val_history"]
    # the tracked curves and metrics hold what training computed, at the precision that means something (a
    # rerun elsewhere differs in the last bits); the rates (which differ run to run for the same weights) go
    # to the timings file and MLflow
    science = [{k: v for k, v in r.items() if k != "images_per_s"} for r in history]
    curves = [figures(r) for r in science]
    val = [figures(r) for r in val]
    write_csv(root / "reports" / "plots" / f"{stage}.csv", curves)
    plot_history(curves, val, root / "reports" / "plots" / f"{stage}.png", stage)
    rates = sorted(r["images_per_s"] for r in history)
    timings = {"seconds": round(seconds, 1), "images_per_s": round(rates[len(rates) // 2], 2)}  # median over steps
    metrics = {
        "steps": state["step"], "workers": p["workers"],
        "nodes": len(state.get("nodes", [])),  # Ray nodes the workers ran on
        "train_last10": figures(mean_rows(science[-min(len(science), 10):])),
        "val_start": val[0], "val_end": val[-1],
    }
    write_json(root / "reports" / "metrics" / f"{stage}.json", metrics)
    write_timings(root, stage, timings)
    run.log_metrics({"final": metrics["train_last10"], "val_start": val[0], "val_end": val[-1], **timings})
    for f in files:
        run.log_artifact(root / "models" / stage / f, "model")
    run.log_artifact(root / "reports" / "plots" / f"{stage}.png")
    return metrics
