"""The Ray Train loop the three training stages share.

`fit(config, scaling, root)` runs `train_loop_per_worker` on a `TorchTrainer`: every worker builds the
stage's task (cgspn.distill) on its share of the shards, and each step averages the gradients over the
workers (one flat all-reduce), clips them, and takes an AdamW step with warmup + cosine learning rate.
Every `checkpoint_every` steps rank 0 reports a checkpoint (model, optimizer, step, loss history) through
`ray.train.report`. A run started again with the same `RunConfig(name, storage_path)` resumes from the
last one; the run name holds a hash of the config, so changed parameters start afresh. Rank 0 logs every
loss, the learning rate and images/s to the stage's MLflow run.

Ray and MLflow are imported inside the functions: the library itself needs neither.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

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

    def log(self, metrics: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        from .tracking import metric_name

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()])


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    from .distill import TASKS

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg["threads"])
    device = ray.train.torch.get_device()
    task = TASKS[cfg["stage"]](cfg["task"], device, rank, world, cfg["seed"])
    model, opt_cfg = task.trainable, cfg["opt"]
    groups = task.param_groups(opt_cfg.get("backbone_lr_scale", 1.0))
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"])
    step, history, val_history = 0, [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, val_history = state["step"], state["history"], state["val_history"]
        if rank == 0:
            print(f"{cfg['stage']}: resumed from the checkpoint at step {step}", flush=True)
    else:
        average_across_workers([p.data for p in model.parameters()], world)  # identical start everywhere
    logger = MetricLogger(cfg["mlflow"]) if rank == 0 else MetricLogger(None)
    if step == 0 and rank == 0:
        val_history.append({"step": 0, **task.validate()})
        logger.log({f"val/{k}": v for k, v in val_history[-1].items() if k != "step"}, 0)
    total = opt_cfg["steps"]
    while step < total:
        t0 = time.perf_counter()
        lr, backbone_lr = learning_rate(step, opt_cfg), backbone_learning_rate(step, opt_cfg)
        for group in optimizer.param_groups:
            if group.get("backbone"):
                group["lr"] = backbone_lr * group["lr_scale"]
                for p in group["params"]:  # frozen (no backward through it) while only the heads train
                    p.requires_grad_(step >= opt_cfg.get("head_only_steps", 0))
            else:
                group["lr"] = lr * group["lr_scale"]
        model.train()
        loss, parts = task.loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_across_workers([p.grad for p in params if p.grad is not None], world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opt_cfg["grad_clip"])
        optimizer.step()
        step += 1
        logged = torch.tensor([loss.item(), *parts.values()], dtype=torch.float64)
        average_across_workers([logged], world)  # the losses of the whole step, not rank 0's share
        row = {"step": step, "loss": logged[0].item(), **dict(zip(parts, logged[1:].tolist())), "lr": lr,
               "grad_norm": grad_norm.item(), "images_per_s": task.images_per_step * world / (time.perf_counter() - t0)}
        if rank == 0:
            history.append(row)
            logger.log({k: v for k, v in row.items() if k != "step"}, step)
            if step % cfg["log_every"] == 0 or step == total:
                print(f"{cfg['stage']}: step {step}/{total} loss {row['loss']:.4f} lr {lr:.2e} "
                      f"{row['images_per_s']:.1f} img/s", flush=True)
        if step % cfg["checkpoint_every"] == 0 or step == total:
            if rank == 0 and (step == total or (cfg["val_every"] and step % cfg["val_every"] == 0)):
                val_history.append({"step": step, **task.validate()})
                logger.log({f"val/{k}": v for k, v in val_history[-1].items() if k != "step"}, step)
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                "history": history, "val_history": val_history}, Path(d) / CHECKPOINT_FILE)
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report({"step": step, "loss": row["loss"]}, checkpoint=ckpt)


def run_name(stage: str, cfg: dict) -> str:
    """`<stage>-<hash of the config and its input files>`: a rerun with the same inputs resumes that run."""
    stable = {k: v for k, v in cfg.items() if k != "mlflow"}  # the MLflow run id changes every invocation
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode())
    for path in sorted(cfg.get("inputs", [])):
        p = Path(path)
        digest.update(p.name.encode() + str(p.stat().st_size).encode() + str(p.stat().st_mtime_ns).encode())
    return f"{stage}-{digest.hexdigest()[:12]}"


def fit(cfg: dict, scaling: dict, storage: Path) -> dict:
    """Run the training on Ray Train; returns the final checkpoint's state (model, history, ...)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .cluster import start_ray

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
            run_config=RunConfig(name=run_name(cfg["stage"], cfg), storage_path=str(storage.resolve()),
                                 failure_config=FailureConfig(max_failures=scaling["max_failures"]),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    finally:
        if started:
            import ray

            ray.shutdown()


# --- the driver side of a training stage ----------------------------------------------------------

def train_schema():
    from .params import Param

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


def mean_rows(rows: list[dict]) -> dict:
    """Per key, the mean over the rows that have it (parts can exist on some steps only)."""
    keys = dict.fromkeys(k for r in rows for k in r if k != "step")
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def run_training(stage: str, p: dict, root: Path, run, task_cfg: dict, inputs: list[Path], export) -> dict:
    """Train on Ray, export the final model with `export(model, folder)` into models/<stage>/ (replaced
    whole), write reports/metrics/<stage>.json and reports/plots/<stage>.{csv,png}, log to MLflow."""
    from .distill import TASKS
    from .outputs import replace_dir, write_json
    from .plots import plot_history, write_csv
    from .tracking import tracking_uri

    cfg = {
        "stage": stage, "task": task_cfg, "seed": p["seed"], "threads": p["cpus_per_worker"],
        "opt": {k: p[k] for k in ("steps", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip",
                                  "backbone_lr_scale", "head_only_steps") if k in p},
        "checkpoint_every": p["checkpoint_every"], "val_every": p["val_every"], "log_every": p["log_every"],
        "mlflow": {"uri": tracking_uri(), "run_id": run.id}, "inputs": [str(i) for i in inputs],
    }
    scaling = {"num_workers": p["workers"], "cpus_per_worker": p["cpus_per_worker"], "use_gpu": p["use_gpu"],
               "max_failures": p["max_failures"]}
    start = time.perf_counter()
    state = fit(cfg, scaling, root / p["storage_path"])
    seconds = time.perf_counter() - start
    model = TASKS[stage].build(task_cfg)
    model.load_state_dict(state["model"])
    with replace_dir(root / "models" / stage) as staging:
        files = export(model, staging)
    history, val = state["history"], state["val_history"]
    write_csv(root / "reports" / "plots" / f"{stage}.csv", history)
    plot_history(history, val, root / "reports" / "plots" / f"{stage}.png", stage)
    rates = sorted(r["images_per_s"] for r in history)
    last = history[-min(len(history), 10):]
    metrics = {
        "steps": state["step"], "seconds": round(seconds, 1), "workers": p["workers"],
        "images_per_s": round(rates[len(rates) // 2], 2),  # median over steps
        "train_last10": mean_rows(last),
        "val_start": val[0], "val_end": val[-1],
    }
    write_json(root / "reports" / "metrics" / f"{stage}.json", metrics)
    run.log_metrics({"final": metrics["train_last10"], "val_start": val[0], "val_end": val[-1],
                     "images_per_s": metrics["images_per_s"], "seconds": metrics["seconds"]})
    for f in files:
        run.log_artifact(root / "models" / stage / f, "model")
    run.log_artifact(root / "reports" / "plots" / f"{stage}.png")
    return metrics
