"""The three distillation tasks the training loop (cgspn.train.loop) runs: what to train, a step's loss, and
validation. Each task is built on every worker from a plain dict (its params plus resolved paths).

- `Stage1Task` (module-wise): the frozen teacher runs once per batch with `return_blocks`; every student
  mixer gets the teacher's normalized input to its block and must reproduce the teacher's attention output
  there (relative MSE + cosine term per block, weighted). Only the mixers train.
- `Stage2Task` (end to end): everything trains. Student features go through each teacher's adaptor heads
  and are matched to that teacher's features, spatial in PHI-S space (MSE), summary by cosine, and the
  patch tokens of chosen intermediate blocks of the teacher (`block_targets`) like the spatial ones.
  Targets come from the feature cache, or from the teachers online (`targets: online`).
- `HighresTask`: stage 2's objective at higher resolutions, with targets from the teachers computed online
  at that resolution (a ViT's position grid interpolated). Steps cycle through the resolutions.

Teachers of any family (ViT, CNN) take part in stages 2 and highres; stage 1 needs a ViT's block outputs.
A teacher sees the student's images at `teacher_scales[t]` x the student's side with its own normalization,
exactly as cache_teacher gave them to it; its grid may differ from the student's (another stride or side),
and its spatial targets are resized to the student's grid (`AdaptedObjective.on_grid`), never the reverse.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cgspn.data.subset import ShardSubset
from cgspn.distill.fidelity import teacher_fidelity
from cgspn.distill.losses import block_loss, cosine_distance, mean_cosine, spatial_loss
from cgspn.models.adaptors import Adaptors, match_grid
from cgspn.models.cgspn import cgspn_from_teacher_config, init_from_teacher
from cgspn.distill.phis import Moments, PhiS, load_teacher_phis
from cgspn.pipeline.inputs import feature_names
from cgspn.pipeline.names import (PATCH_COSINE, PATCH_COSINE_RAW, SUMMARY_COSINE, SUMMARY_COSINE_Z, at_side,
                                  teacher_key)
from cgspn.models.students import load_adaptors, load_student
from cgspn.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_batch
from cgspn.teachers.registry import load_teacher_file, load_vit, teacher_normalization, teacher_side


def load_teachers(paths: dict[str, str], device) -> dict[str, nn.Module]:
    """{teacher: frozen teacher module of any family on `device`} from {teacher: checkpoint path}."""
    return {t: load_teacher_file(path).eval().requires_grad_(False).to(device) for t, path in paths.items()}


def autocast(device):
    """bf16 autocast on GPUs; a no-op on CPUs (CPU bf16 matmuls are slow and lose the comparison)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def decays(name: str, p: nn.Parameter) -> bool:
    """Whether AdamW's weight decay applies: to weight matrices only, as the field does. Norms and biases
    (ndim <= 1), LayerScale gammas (`gamma`) and the mixer's direction-merge logits (`merge_logits`, a [4, C]
    matrix, but softmax logits whose scale is the merge) are left out: decay would pull them to 0 (a norm's
    gain, a residual branch's scale) or to an even merge, not towards a simpler model."""
    return p.ndim > 1 and "gamma" not in name and "merge" not in name


def decay_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float, **group) -> list[dict]:
    """The parameters `named` as up to two AdamW groups with `group`'s entries: the decayed ones with
    `weight_decay`, the others with 0 (empty groups left out)."""
    split = ({**group, "params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
             {**group, "params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0})
    return [g for g in split if g["params"]]


def trainable_groups(model: nn.Module, backbone_lr_scale: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups, each with the `lr_scale` the training loop multiplies the schedule by and
    its `weight_decay` (`decays`).

    The backbone is the student: what it inherited (patch embedding, blocks, final norm: the teacher's
    weights and stage 1's mixers) and its own summary head. The adaptors start fresh. Fine-tuning the student
    at a fraction of the heads' rate keeps it near the teacher's features while the heads learn. The summary
    head is fresh too, but it is the student's own summary (its residual MLP adds to the pooled tokens):
    at the heads' rate it learned to serve the summary adaptor and its kNN top-1 fell 2.7 points below that
    of the pooled tokens it starts from (70.1 against 72.8 in one stage-2 run; 72.1 at the student's rate).
    The backbone's groups are marked `"backbone": True`: the loop gives them their own schedule
    (`head_only_steps`).
    """
    backbone, heads = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("student.") else heads).append((name, p))
    return [*decay_groups(backbone, weight_decay, lr_scale=backbone_lr_scale, backbone=True),
            *decay_groups(heads, weight_decay, lr_scale=1.0)]


class Stage1Task:
    def __init__(self, cfg: dict, device, rank: int, world: int, seed: int):
        self.cfg, self.device, self.rank, self.seed = cfg, device, rank, seed
        self.teacher = load_vit(cfg["teacher_path"]).eval().requires_grad_(False).to(device)
        torch.manual_seed(seed)
        self.trainable = self.build(cfg, self.teacher).to(device)
        self.data = ShardSubset(cfg["shards"], cfg["splits"], rank, world)
        self.val = ShardSubset(cfg["shards"], [cfg["val_split"]], limit=cfg["val_count"]) if rank == 0 else None
        w = cfg["block_weights"] or [1.0] * len(self.teacher.blocks)  # the stage checked the length
        self.weights = torch.tensor(w) / sum(w)
        self.images_per_step = cfg["batch_size"]

    def param_groups(self, backbone_lr_scale: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
        """The mixers (all that trains here), their weight matrices decayed (`decays`)."""
        named = [(n, p) for n, p in self.trainable.named_parameters() if p.requires_grad]
        return decay_groups(named, weight_decay, lr_scale=1.0)

    @staticmethod
    def build(cfg: dict, teacher=None) -> nn.Module:
        """The student, its non-mixer weights copied from the teacher and frozen."""
        teacher = teacher or load_vit(cfg["teacher_path"])
        student = cgspn_from_teacher_config(teacher.cfg)
        init_from_teacher(student, teacher)
        for name, p in student.named_parameters():
            p.requires_grad_(".attn." in name)
        return student

    def block_losses(self, images: list[np.ndarray]) -> torch.Tensor:
        """[depth] loss per block for one batch."""
        x = to_batch(images, self.cfg["resolution"], self.device)
        hw = (x.shape[-2] // self.teacher.cfg.patch_size, x.shape[-1] // self.teacher.cfg.patch_size)
        with torch.no_grad(), autocast(self.device):
            t = self.teacher(x, return_blocks=True)
        losses = []
        with autocast(self.device):
            for i, (inp, out) in enumerate(zip(t.block_inputs, t.mixer_outputs)):
                pred = self.trainable.mixer_forward(i, inp[:, 1:], hw)  # patch tokens; the student has no CLS
                losses.append(block_loss(pred, out[:, 1:], self.cfg["cosine_weight"]))
        return torch.stack(losses)

    def loss(self, step: int):
        idx = self.data.batch_indices(step, self.cfg["batch_size"], self.seed, self.rank)
        per_block = self.block_losses([self.data.images[i] for i in idx])
        return (self.weights.to(per_block.device) * per_block).sum(), {
            f"block{i}": v for i, v in enumerate(per_block.detach().tolist())}

    @torch.no_grad()
    def validate(self) -> dict:
        self.trainable.eval()
        totals = []
        for start in range(0, len(self.val), self.cfg["batch_size"]):
            batch = self.val.images[start : start + self.cfg["batch_size"]]
            totals.append(self.block_losses(batch) * len(batch))
        per_block = (torch.stack(totals).sum(0) / len(self.val)).tolist()
        return {"loss": float(np.mean(per_block)), **{f"block{i}": v for i, v in enumerate(per_block)}}


def local_weight(base: PhiS, local: PhiS | None) -> float:
    """The factor that turns an MSE in `base`'s PHI-S space into the MSE in `local`'s. PHI-S is a shift, a
    rotation and one scale, so an MSE there is |x_p - x_t|^2 / alpha^2: only alpha differs, and the heads keep
    predicting in `base`'s space (the one stage 2 trained them in and evaluate reads)."""
    return 1.0 if local is None else (base.scale / local.scale) ** 2


def local_summary(pred: torch.Tensor, target: torch.Tensor, base: PhiS,
                  local: PhiS | None) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target [B, D] in `base`'s space -> a pair whose cosine is the one in `local`'s space: the
    prediction read as `from_direction` reads it (its direction at the base set's RMS norm sqrt(D)), both
    centred on `local`'s mean. Rotation and scale leave a cosine as it is; the mean does not (a summary set
    whose mean is off the origin has every cosine high)."""
    if local is None:
        return pred, target
    centre = base.standardize(torch.as_tensor(local.mean, dtype=target.dtype, device=target.device))
    return F.normalize(pred, dim=-1) * pred.shape[-1] ** 0.5 - centre, target - centre


class AdaptedObjective:
    """Student features through each teacher's adaptors, compared with that teacher's targets, both in the
    teacher's PHI-S standardized space: spatial (and each block target) by MSE, summary by cosine. With
    `raw_weight` > 0 the student's own patch tokens (no adaptor) are matched to the final patch tokens of
    each teacher of the student's width too, like the spatial ones: the probes read those tokens, and the
    adaptors alone let them drift from the teacher's while the adapted features improve. The
    summary is standardized too because a teacher's summary vectors share a large common component
    (DINOv2's: cosine 0.91 to their mean on Fashion-MNIST); a cosine on raw vectors is then near 0.95 for a
    head that predicts only that mean, and says nothing about what tells images apart."""

    def __init__(self, cfg: dict, device):
        self.cfg, self.device = cfg, device
        self.teachers = list(cfg["teacher_weights"])
        self.blocks = {t: cfg["block_targets"].get(t, []) for t in self.teachers}  # block targets per teacher
        self.names = feature_names(cfg)  # per teacher, the features the objective reads (names in the cache)
        self.phis = {t: load_teacher_phis(cfg["features"][t]) for t in self.teachers}
        # {teacher: {name: PhiS}} estimated where the targets come from (highres: per resolution); the losses
        # are then those in that space (`local_weight`, `local_summary`). Empty: the cache's statistics.
        self.local: dict[str, dict[str, PhiS]] = {}

    def on_grid(self, target: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """A cached or online target [B, D] or [B, h_t, w_t, D] -> float32 on the device, grids resized to hw."""
        target = target.float().to(self.device)
        return match_grid(target, hw) if target.dim() == 4 else target

    def predictions(self, trainable: nn.Module, teacher: str, out) -> dict[str, torch.Tensor]:
        """The adaptor heads of `teacher` on the student's output -> {feature name: prediction in PHI-S space}."""
        adaptor = trainable["adaptors"][teacher]
        tokens = out.patch_tokens.float()
        preds = dict(zip(("summary", "spatial"), adaptor(out.summary.float(), tokens)))
        preds.update({f"block{k}": adaptor.blocks[str(k)](tokens) for k in self.blocks[teacher]})
        return preds

    def terms(self, trainable: nn.Module, x: torch.Tensor, targets: dict) -> tuple[torch.Tensor, dict]:
        """targets[teacher][name]: "summary" [B, D_t], "spatial" and "block<k>" [B, h_t, w_t, D_t]
        -> (weighted loss, parts)."""
        with autocast(self.device):
            out = trainable["student"](x)
        hw = tuple(out.patch_tokens.shape[1:3])
        weight = {"summary": self.cfg["summary_weight"], "spatial": self.cfg["spatial_weight"],
                  "raw": self.cfg["raw_weight"]}
        total, parts = 0.0, {}
        for t in self.teachers:
            preds = self.predictions(trainable, t, out)
            if weight["raw"] > 0 and out.patch_tokens.shape[-1] == self.cfg["teacher_dims"][t]:
                preds["raw"] = self.phis[t]["spatial"].standardize(out.patch_tokens.float())
            for name, pred in preds.items():
                source = "spatial" if name == "raw" else name  # the raw tokens share the spatial target
                base, local = self.phis[t][source], self.local.get(t, {}).get(source)
                z = base.standardize(self.on_grid(targets[t][source], hw))
                if name == "summary":
                    loss = cosine_distance(*local_summary(pred, z, base, local))
                else:
                    loss = spatial_loss(pred, z) * local_weight(base, local)
                parts[teacher_key(t, name)] = loss.item()
                total = total + self.cfg["teacher_weights"][t] * weight.get(name, self.cfg["block_weight"]) * loss
        return total, parts

    @torch.no_grad()
    def fidelity(self, trainable: nn.Module, x: torch.Tensor, targets: dict) -> dict:
        """Mean cosine similarity to each teacher: adapted patch features and summary (de-standardized;
        `summary_cosine_z` in standardized space, the part that tells images apart), and the raw student
        patch tokens where widths agree."""
        out = trainable["student"](x)
        hw = tuple(out.patch_tokens.shape[1:3])
        result = {}
        for t in self.teachers:
            preds, phis = self.predictions(trainable, t, out), self.phis[t]
            summary, spatial = (self.on_grid(targets[t][name], hw) for name in ("summary", "spatial"))
            figures = teacher_fidelity(phis["summary"].from_direction(preds["summary"]),
                                       phis["spatial"].destandardize(preds["spatial"]), summary, spatial, phis["summary"])
            for name, figure in ((PATCH_COSINE, "patch"), (SUMMARY_COSINE, "summary"), (SUMMARY_COSINE_Z, "summary_z")):
                result[teacher_key(t, name)] = figures[figure]
            for name in self.names[t][2:]:
                result[teacher_key(t, f"{name}_cosine")] = mean_cosine(phis[name].destandardize(preds[name]),
                                                           self.on_grid(targets[t][name], hw))
            if spatial.shape[-1] == out.patch_tokens.shape[-1]:
                result[teacher_key(t, PATCH_COSINE_RAW)] = mean_cosine(out.patch_tokens, spatial)
        return result


def online_targets(teachers: dict, images: list[np.ndarray], x: torch.Tensor, scales: dict[str, float], device,
                   blocks: dict[str, list[int]]) -> dict:
    """The teachers on the student's batch -> targets[teacher][name] as `AdaptedObjective.terms` takes them,
    with "block<k>" for each k in blocks[teacher].

    images: the batch's uint8 images [H, W, 3]; x: the student's input built from them, [B, 3, r, r] with
    ImageNet's normalization. Teacher t gets the same images at teacher_side(r, scales[t]) with its own
    normalization, built afresh from `images` through `preprocess` (not converted from x: resizing x again
    would resample an already resampled image), so that it sees exactly what cache_teacher gave it. x itself
    is reused where side and normalization agree."""
    r = x.shape[-1]
    inputs = {(r, IMAGENET_MEAN, IMAGENET_STD): x}
    targets = {}
    for t, model in teachers.items():
        side, (mean, std) = teacher_side(r, scales.get(t, 1)), teacher_normalization(model)
        if (side, mean, std) not in inputs:
            inputs[side, mean, std] = to_batch(images, side, device, mean, std)
        with torch.no_grad(), autocast(device):
            out = model(inputs[side, mean, std], layers=blocks[t])
        targets[t] = {"summary": out.summary.float(), "spatial": out.patch_tokens.float(),
                      **{f"block{k}": v.float() for k, v in out.layer_tokens.items()}}
    return targets


def cached_targets(features: dict, idx: torch.Tensor) -> dict:
    """features[teacher][name]: [N, ...] held by a ShardSubset -> the rows idx, as targets[teacher][name]."""
    return {t: {n: f[idx] for n, f in named.items()} for t, named in features.items()}


class Stage2Task:
    def __init__(self, cfg: dict, device, rank: int, world: int, seed: int):
        self.cfg, self.device, self.rank, self.seed = cfg, device, rank, seed
        torch.manual_seed(seed)
        self.trainable = self.build(cfg).to(device)
        self.objective = AdaptedObjective(cfg, device)
        online = cfg["targets"] == "online"
        self.teachers = load_teachers({t: cfg["teacher_paths"][t] for t in self.objective.teachers},
                                      device) if online else {}
        feature_dirs = None if online else {t: Path(cfg["features"][t]) for t in self.objective.teachers}
        names = self.objective.names
        self.data = ShardSubset(cfg["shards"], cfg["splits"], rank, world, feature_dirs, names)
        val_dirs = {t: Path(cfg["features"][t]) for t in self.objective.teachers}
        self.val = (ShardSubset(cfg["shards"], [cfg["val_split"]], feature_dirs=val_dirs, feature_names=names,
                                limit=cfg["val_count"]) if rank == 0 else None)
        self.images_per_step = cfg["batch_size"]

    def param_groups(self, backbone_lr_scale: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
        return trainable_groups(self.trainable, backbone_lr_scale, weight_decay)

    @staticmethod
    def build(cfg: dict) -> nn.Module:
        """{"student": from `cfg["init_student"]`, "adaptors": fresh heads, one set per teacher}."""
        student = load_student(cfg["init_student"]).requires_grad_(True)
        adaptors = Adaptors(student.cfg.dim, cfg["teacher_dims"], cfg["adaptor_hidden"] or None,
                            cfg["block_targets"])
        return nn.ModuleDict({"student": student, "adaptors": adaptors})

    def loss(self, step: int):
        idx = self.data.batch_indices(step, self.cfg["batch_size"], self.seed, self.rank)
        images = [self.data.images[i] for i in idx]
        x = to_batch(images, self.cfg["resolution"], self.device)
        if self.teachers:
            targets = online_targets(self.teachers, images, x, self.cfg["teacher_scales"], self.device,
                                     self.objective.blocks)
        else:
            targets = cached_targets(self.data.features, torch.as_tensor(idx))
        return self.objective.terms(self.trainable, x, targets)

    @torch.no_grad()
    def validate(self) -> dict:
        self.trainable.eval()
        sums, n = {}, 0
        B = self.cfg["batch_size"]
        for start in range(0, len(self.val), B):
            idx = torch.arange(start, min(start + B, len(self.val)))
            x = to_batch([self.val.images[i] for i in idx], self.cfg["resolution"], self.device)
            targets = cached_targets(self.val.features, idx)
            _, losses = self.objective.terms(self.trainable, x, targets)
            for k, v in {**losses, **self.objective.fidelity(self.trainable, x, targets)}.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            n += len(idx)
        return {k: v / n for k, v in sums.items()}


PHIS_IMAGES = 64  # training images per resolution highres estimates its targets' PHI-S statistics from


def same_on_every_worker(m: Moments) -> Moments:
    """Rank 0's sums on every worker (under a process group; the workers computed them from the same
    images, and this keeps them equal to the last bit on unlike machines too). Every worker must call it:
    highres does so at its first step of each resolution, never in rank 0's validation."""
    if not (dist.is_available() and dist.is_initialized()):
        return m
    flat = torch.from_numpy(np.concatenate([[float(m.count)], m.total, m.outer.ravel()]))
    dist.broadcast(flat, 0)
    D = len(m.total)
    return Moments(int(flat[0].item()), flat[1 : 1 + D].numpy(), flat[1 + D :].numpy().reshape(D, D))


class HighresTask(Stage2Task):
    """Targets online at each resolution (each teacher at its scale of it); one data split per resolution
    (bigger mosaics for bigger images). The targets of each resolution are standardized as PHI-S statistics
    estimated there say (`local_phis`), not as the cache's at the training resolution: on Fashion-MNIST
    mosaics at 224 px those put a common component into the summaries (cosine 0.87 to their mean for
    DINOv2, 0.95 for the EfficientNet) and weigh the spatial terms 1.5x and 2.7x."""

    def __init__(self, cfg: dict, device, rank: int, world: int, seed: int):
        self.cfg, self.device, self.rank, self.seed = cfg, device, rank, seed
        torch.manual_seed(seed)
        self.trainable = self.build(cfg).to(device)
        self.objective = AdaptedObjective(cfg, device)
        self.teachers = load_teachers({t: cfg["teacher_paths"][t] for t in self.objective.teachers}, device)
        self.data = [ShardSubset(cfg["shards"], [s], rank, world) for s in cfg["splits"]]
        self.val = ([ShardSubset(cfg["shards"], [s], limit=cfg["val_count"]) for s in cfg["val_splits"]]
                    if rank == 0 else None)
        self.images_per_step = float(np.mean(cfg["batch_sizes"]))
        self.local: dict[int, dict] = {}  # per resolution, estimated at its first step (every worker is there)

    @torch.no_grad()
    def local_phis(self, j: int) -> dict[str, dict[str, PhiS]]:
        """{teacher: {name: PhiS}} of the online targets at resolution j, from PHIS_IMAGES images of its
        training split (a seeded choice among its first 4 x PHIS_IMAGES), summed in a fixed order: the same
        statistics on every worker and every run."""
        r, B = self.cfg["resolutions"][j], max(self.cfg["batch_sizes"][j], 8)
        pool = ShardSubset(self.cfg["shards"], [self.cfg["splits"][j]], limit=4 * PHIS_IMAGES)
        pick = np.sort(np.random.default_rng(self.seed).permutation(len(pool))[:PHIS_IMAGES])
        images = [pool.images[i] for i in pick]
        moments: dict[tuple[str, str], Moments] = {}
        for start in range(0, len(images), B):
            batch = images[start : start + B]
            x = to_batch(batch, r, self.device)
            targets = online_targets(self.teachers, batch, x, self.cfg["teacher_scales"], self.device,
                                     self.objective.blocks)
            for t, named in targets.items():
                for name, v in named.items():
                    m = Moments.of(v.cpu())
                    moments[t, name] = moments[t, name] + m if (t, name) in moments else m
        local = {t: {} for t in self.teachers}
        for (t, name), m in moments.items():
            local[t][name] = PhiS.estimate(same_on_every_worker(m))
        return local

    @staticmethod
    def build(cfg: dict) -> nn.Module:
        """{"student", "adaptors"}, both from stage 2's outputs."""
        return nn.ModuleDict({"student": load_student(cfg["init_student"]).requires_grad_(True),
                              "adaptors": load_adaptors(cfg["init_adaptors"]).requires_grad_(True)})

    def loss(self, step: int):
        j = step % len(self.cfg["resolutions"])
        data, B, r = self.data[j], self.cfg["batch_sizes"][j], self.cfg["resolutions"][j]
        idx = data.batch_indices(step // len(self.cfg["resolutions"]), B, self.seed, self.rank)
        images = [data.images[i] for i in idx]
        x = to_batch(images, r, self.device)
        targets = online_targets(self.teachers, images, x, self.cfg["teacher_scales"], self.device,
                                 self.objective.blocks)
        if j not in self.local:
            self.local[j] = self.local_phis(j)
        self.objective.local = self.local[j]
        loss, parts = self.objective.terms(self.trainable, x, targets)
        return loss, {at_side(k, r): v for k, v in parts.items()}

    @torch.no_grad()
    def validate(self) -> dict:
        self.trainable.eval()
        result = {}
        for val, r, B in zip(self.val, self.cfg["resolutions"], self.cfg["batch_sizes"]):
            sums, n = {}, 0
            for start in range(0, len(val), B):
                images = val.images[start : start + B]
                x = to_batch(images, r, self.device)
                targets = online_targets(self.teachers, images, x, self.cfg["teacher_scales"], self.device,
                                         self.objective.blocks)
                for k, v in self.objective.fidelity(self.trainable, x, targets).items():
                    sums[k] = sums.get(k, 0.0) + v * len(x)
                n += len(x)
            result.update({at_side(k, r): v / n for k, v in sums.items()})
        return result


TASKS = {"distill_stage1": Stage1Task, "distill_stage2": Stage2Task, "highres": HighresTask}
