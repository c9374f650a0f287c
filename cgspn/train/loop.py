"""The worker side of the Ray Train loop the three training stages share.

`train_loop_per_worker(cfg)` runs on every Ray Train worker (cgspn.train.driver starts them): it builds the
stage's task (cgspn.distill.tasks) on its share of the shards, restores the last checkpoint if there is one,
and `run_steps` trains. Each step averages the gradients over the workers (one flat all-reduce), clips
them, and takes an AdamW step (weight decay on weight matrices only) with warmup + cosine learning rate.
Rank 0 validates at the start, every `val_every` steps and at the end; every `checkpoint_every` steps and at
the end rank 0 reports a checkpoint (model, optimizer, step, loss and validation histories) through
`ray.train.report`. Bad input that a worker finds (a shard that does not decode) is not raised like a crash:
the worker writes it where the driver reads it, and every worker stops. Rank 0 logs every loss, the learning
rate and images/s to the stage's MLflow run.

`run_steps` needs no Ray (tests drive it with a toy task); Ray and MLflow are imported inside the functions.
"""
from __future__ import annotations

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
        task, error = None, e
    if stop_for_bad_input(error, cfg, rank, world):
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

    try:
        run_steps(task, optimizer, state, cfg, rank, world, logger, report)
    except StopForBadInput:
        return


class StopForBadInput(Exception):
    """Every worker stops here: one of them found bad input in the data it read (reported for the driver)."""


def stop_for_bad_input(error: Exception | None, cfg: dict, rank: int, world: int) -> bool:
    """Called by every worker at the same point: True when any of them met bad input (an InputError) since
    the last call. Each such worker leaves its report where the driver reads it (WorkerInputError): bad data
    is not a crash, so Ray Train does not retry it and no worker waits on another that stopped."""
    if error is not None:
        from cgspn.data.locations import write_text  # the run's storage: a shared folder or object storage

        write_text(f"{cfg['driver']['errors']}/rank{rank}.json",
                   json.dumps({"kind": type(error).__name__, "message": str(error)}))
    return any(gather_objects(error is not None, world))


def checked(fn, cfg: dict, rank: int, world: int, run: bool = True):
    """fn() where `run` (every worker calls this at the same point); StopForBadInput when any worker's call
    raised an InputError. Images are read as batches ask for them, so bad data shows up during training."""
    from cgspn.pipeline.errors import InputError

    result, error = None, None
    try:
        result = fn() if run else None
    except InputError as e:
        error = e
    if stop_for_bad_input(error, cfg, rank, world):
        raise StopForBadInput()
    return result


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


def train_step(task, optimizer, params: list, step: int, opt: dict, world: int, cfg: dict, rank: int) -> dict:
    """One optimizer step at `step` -> its row: step (after it), loss and parts averaged over the workers,
    lr, grad_norm, images_per_s."""
    t0 = time.perf_counter()
    lr = set_learning_rates(optimizer, step, opt)
    task.trainable.train()
    loss, parts = checked(lambda: task.loss(step), cfg, rank, world)
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
    if state["step"] == 0:
        checked(lambda: validate(task, state, logger), cfg, rank, world, run=rank == 0)
    while state["step"] < total:
        row = train_step(task, optimizer, params, state["step"], opt, world, cfg, rank)
        state["step"] = step = row["step"]
        if rank == 0:
            state["history"].append(row)
            logger.log({k: v for k, v in row.items() if k != "step"}, step)
            if step % cfg["log_every"] == 0 or step == total:
                print(f"{cfg['stage']}: step {step}/{total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                      f"{row['images_per_s']:.1f} img/s", flush=True)
        if validates_at(step, total, cfg["val_every"]):
            checked(lambda: validate(task, state, logger), cfg, rank, world, run=rank == 0)
        if step % cfg["checkpoint_every"] == 0 or step == total:  # after validation: the checkpoint holds it
            report(state, row["loss"])

