"""The parameters of the training stages: what every one takes (`train_schema`), what the two adapted
stages (distill_stage2, highres) share (`adapted_schema`, `objective_params`), and the checks on them that
the schema cannot make (`check_weights`)."""
from __future__ import annotations

from cgspn.pipeline.errors import ParamError
from cgspn.pipeline.params import Param


def train_schema(batch_size: bool = True) -> dict[str, Param]:
    """What every training stage takes: the schedule, the optimizer, checkpoints, validation, Ray's workers
    (`batch_size` per worker, unless the stage has its own, as highres has one per scale)."""
    schema = {
        "steps": Param(int, min=1),
        "batch_size": Param(int, min=1),  # per worker
        "lr": Param(float, min=0.0),
        "weight_decay": Param(float, min=0.0),  # AdamW's, on weight matrices only
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
        "gpus_per_worker": Param(float, min=0.0),  # 0: CPU only; a fraction shares a GPU between workers
        "max_failures": Param(int, min=0),
        "storage_path": Param(str),  # Ray Train checkpoints: relative to the root, absolute, or s3://... URI
    }
    if not batch_size:
        del schema["batch_size"]
    return schema


def adapted_schema() -> dict[str, Param]:
    """What distill_stage2 and highres share: the teachers and the terms of the adapted objective
    (cgspn.distill.tasks.AdaptedObjective), and the backbone's rate and head-only start."""
    return {
        "backbone_lr_scale": Param(float, min=0.0, max=1.0),  # x lr for the inherited backbone; heads get lr
        "head_only_steps": Param(int, min=0),  # the backbone is frozen for these first steps
        "teacher_weights": Param(dict),  # {teacher name: weight}
        "spatial_weight": Param(float, min=0.0),
        "summary_weight": Param(float, min=0.0),
        "raw_weight": Param(float, min=0.0),  # the student's own patch tokens against the teacher's (same width)
        "block_targets": Param(dict),  # {teacher: [block, ...]}: cached intermediate blocks to match too (own heads)
        "block_weight": Param(float, min=0.0),
    }


def objective_params(p: dict) -> dict:
    """The adapted objective's weights from a stage's parameters, as its task takes them (the teachers'
    weights and block targets come resolved from cgspn.pipeline.inputs.teachers_config)."""
    return {k: p[k] for k in ("spatial_weight", "summary_weight", "raw_weight")}


def check_weights(weights: list | dict, param: str) -> None:
    """ParamError when loss weights are given but all 0 (the objective would weigh nothing; stage 1 divides
    by their sum). Values of the wrong type are left to the checks that know them."""
    values = list(weights.values()) if isinstance(weights, dict) else list(weights)
    if values and all(not isinstance(w, bool) and w == 0 for w in values):
        raise ParamError(f"{param} are all 0: nothing would be trained; give at least one a weight > 0")

