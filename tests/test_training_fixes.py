"""The review's training fixes (issue 29): weight decay only on weight matrices, validation every `val_every`
steps whatever `checkpoint_every` is, all-zero loss weights are a parameter error, and a training stage
run twice on the same input writes the same bytes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cgspn.distill.tasks import Stage1Task, trainable_groups
from cgspn.models.adaptors import Adaptors
from cgspn.models.cgspn import cgspn_from_teacher_config
from cgspn.models.vit import ViTConfig
from cgspn.train.loop import build_optimizer, run_steps

TINY = ViTConfig(patch_size=7, dim=32, depth=2, heads=2, mlp_hidden=64, pos_grid=4, layer_scale=0.1)
OPT = {"steps": 10, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 1, "min_lr_ratio": 0.1, "grad_clip": 1.0,
       "backbone_lr_scale": 0.5}


def exempt(name: str, p: torch.Tensor) -> bool:
    """What the field leaves out of weight decay: norms and biases (vectors), LayerScale gammas, the mixer's
    direction-merge logits (a [4, C] matrix, but a softmax's logits, not a weight)."""
    return p.ndim <= 1 or "gamma" in name or "merge" in name


class GroupsOf:
    """A stand-in task whose trainable model and parameter groups are given."""

    def __init__(self, model: nn.Module, groups):
        self.trainable, self.param_groups = model, groups


def decay_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """{id(parameter): the weight decay AdamW applies to it}."""
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


def test_weight_decay_spares_norms_biases_gammas_and_merge_logits():
    torch.manual_seed(0)
    student = cgspn_from_teacher_config(TINY).requires_grad_(True)
    model = nn.ModuleDict({"student": student, "adaptors": Adaptors(32, {"t": 48})})
    optimizer = build_optimizer(GroupsOf(model, lambda *a: trainable_groups(model, *a)), OPT)
    decay, names = decay_of(optimizer), dict(model.named_parameters())
    assert set(decay) == {id(p) for p in names.values()}  # every parameter trains, once
    exempted = [n for n, p in names.items() if exempt(n, p)]
    assert any("merge_logits" in n for n in exempted) and any("gamma" in n for n in exempted)
    assert {n: decay[id(p)] for n, p in names.items() if exempt(n, p)} == dict.fromkeys(exempted, 0.0)
    assert {n: decay[id(p)] for n, p in names.items() if not exempt(n, p)} == {
        n: OPT["weight_decay"] for n, p in names.items() if not exempt(n, p)}
    # the backbone (the student) keeps its own learning-rate scale and schedule, decayed or not
    for g in optimizer.param_groups:
        students = {id(p) for p in student.parameters()}
        assert all(id(p) in students for p in g["params"]) == bool(g.get("backbone"))
        assert g["lr_scale"] == (OPT["backbone_lr_scale"] if g.get("backbone") else 1.0)


def test_stage1_decays_only_the_mixers_weight_matrices():
    torch.manual_seed(0)
    student = cgspn_from_teacher_config(TINY)
    for name, p in student.named_parameters():
        p.requires_grad_(".attn." in name)
    task = GroupsOf(student, lambda *a: Stage1Task.param_groups(GroupsOf(student, None), *a))
    decay = decay_of(build_optimizer(task, OPT))
    mixers = {n: p for n, p in student.named_parameters() if ".attn." in n}
    assert set(decay) == {id(p) for p in mixers.values()}
    assert any("merge_logits" in n for n in mixers)
    assert all(decay[id(p)] == (0.0 if exempt(n, p) else OPT["weight_decay"]) for n, p in mixers.items())


class CountingTask:
    """A linear regression that records the steps it was validated at."""

    def __init__(self):
        torch.manual_seed(0)
        self.trainable, self.images_per_step, self.validated = nn.Linear(3, 1), 4, []
        self.step = 0

    def param_groups(self, backbone_lr_scale: float = 1.0, weight_decay: float = 0.0):
        return [{"params": list(self.trainable.parameters()), "lr_scale": 1.0}]

    def loss(self, step: int):
        self.step = step + 1  # validate() runs after the step
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
        loss = (self.trainable(x) - x.sum(1, keepdim=True)).square().mean()
        return loss, {"mse": loss.item()}

    def validate(self) -> dict:
        self.validated.append(self.step)
        return {"loss": 0.0}


class NoLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass


def run_counting(steps: int, checkpoint_every: int, val_every: int) -> tuple[list[int], list[int]]:
    """-> (the steps validated at, the steps checkpointed at) of a training run of `steps` steps."""
    task, reported = CountingTask(), []
    cfg = {"stage": "toy", "opt": {**OPT, "steps": steps}, "checkpoint_every": checkpoint_every,
           "val_every": val_every, "log_every": 100}
    state = {"step": 0, "history": [], "val_history": []}
    run_steps(task, build_optimizer(task, cfg["opt"]), state, cfg, 0, 1, NoLogger(),
              lambda s, loss: reported.append(s["step"]))
    assert [r["step"] for r in state["val_history"]] == task.validated
    return task.validated, reported


def test_validation_runs_every_val_every_steps_whatever_checkpoint_every_is():
    assert run_counting(10, checkpoint_every=3, val_every=2) == ([0, 2, 4, 6, 8, 10], [3, 6, 9, 10])
    assert run_counting(10, checkpoint_every=4, val_every=3) == ([0, 3, 6, 9, 10], [4, 8, 10])
    assert run_counting(7, checkpoint_every=2, val_every=0) == ([0, 7], [2, 4, 6, 7])  # 0: the start and the end


def test_all_zero_loss_weights_are_a_parameter_error(micro, tmp_path, capsys):
    """Weights that are all 0 weigh nothing (stage 1 divided by their sum): exit 2, one line naming them."""
    from micro import VIT, copy_root, expect_exit, write_params

    root = copy_root(micro["root"], tmp_path / "root")
    expect_exit(capsys, "distill_stage1", write_params(tmp_path / "a.yaml", distill_stage1__block_weights=[0.0] * 12),
                root, "a.yaml: distill_stage1.block_weights are all 0")
    for stage in ("distill_stage2", "highres"):
        expect_exit(capsys, stage, write_params(tmp_path / f"{stage}.yaml", **{f"{stage}__teacher_weights": {VIT: 0}}),
                    root, f"{stage}.yaml: {stage}.teacher_weights are all 0")


class ToyStudent(nn.Module):
    """Images [B, 3, h, w] -> patch tokens [B, h, w, 16] (a linear map per pixel) and their mean as summary."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 16)

    def forward(self, x: torch.Tensor):
        from types import SimpleNamespace

        tokens = self.proj(x.permute(0, 2, 3, 1))
        return SimpleNamespace(patch_tokens=tokens, summary=tokens.mean((1, 2)))


def test_highres_losses_are_those_in_the_phis_space_of_their_resolution(tmp_path):
    """The objective with statistics estimated where its targets come from (`objective.local`, as highres sets
    them per resolution) computes the losses that standardizing prediction and target with those statistics
    gives: the spatial MSE and the summary cosine in the local PHI-S space, the prediction de-standardized
    from the heads' space (the cache's statistics, where stage 2 trained them) as evaluate reads it."""
    from cgspn.distill.losses import cosine_distance, spatial_loss
    from cgspn.distill.phis import Moments, PhiS, phis_file
    from cgspn.distill.tasks import AdaptedObjective

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g)
    cache, here = (torch.randn(600, 8, generator=g) @ mix for _ in range(2))
    here = 0.5 * here + 3.0  # the targets at another resolution: smaller spread, another mean
    folder = tmp_path / "features"
    folder.mkdir()
    for kind in ("spatial", "summary"):
        PhiS.estimate(Moments.of(cache)).save(folder / phis_file(kind))
    local = PhiS.estimate(Moments.of(here))
    cfg = {"teacher_weights": {"t": 1.0}, "block_targets": {}, "features": {"t": str(folder)}, "teacher_dims": {"t": 8},
           "summary_weight": 1.0, "spatial_weight": 1.0, "raw_weight": 0.0, "block_weight": 1.0}
    torch.manual_seed(0)
    model = nn.ModuleDict({"student": ToyStudent(), "adaptors": Adaptors(16, {"t": 8})})
    x = torch.randn(4, 3, 2, 2, generator=g)
    targets = {"t": {"summary": here[:4], "spatial": here[4:20].reshape(4, 2, 2, 8)}}
    objective = AdaptedObjective(cfg, "cpu")
    objective.local = {"t": {"spatial": local, "summary": local}}
    _, parts = objective.terms(model, x, targets)
    base = objective.phis["t"]
    with torch.no_grad():
        summary_z, spatial_z = model["adaptors"]["t"](*(lambda o: (o.summary, o.patch_tokens))(model["student"](x)))
    expected_spatial = spatial_loss(local.standardize(base["spatial"].destandardize(spatial_z)),
                                    local.standardize(targets["t"]["spatial"]))
    expected_summary = cosine_distance(local.standardize(base["summary"].from_direction(summary_z)),
                                       local.standardize(targets["t"]["summary"]))
    assert parts["t/spatial"] == pytest.approx(expected_spatial.item(), rel=1e-4)
    assert parts["t/summary"] == pytest.approx(expected_summary.item(), rel=1e-4)
