"""ImageNet-1k readout through a classifier teacher's own head (issue 23): what a student learned of a CNN
teacher's image-level features, in the teacher's own terms.

The student's summary adaptor for the teacher predicts the teacher's summary (its pooled pre-logit
features) in PHI-S space, trained by a cosine loss there. Such a prediction has a direction but no
meaningful norm, so it is mapped back with `PhiS.from_direction` (its norm set to sqrt(D), the root-mean-square
norm of the standardized training targets, then de-standardized): the classifier then gets an input at the
scale of the summaries it was trained on. Plain `destandardize` would pass on whatever norm the head happened
to learn, and the classifier's bias and the mean's share of the logits would weigh more or less against it.
The teacher's own `classify` (its ImageNet head) turns that into logits, compared with the teacher's
predictions on the same images. The control is the same head architecture trained, with the same loss, on a
frozen, randomly initialized student's summaries.

Shapes: summaries [N, D]; logits [N, C]; class indices [N, k].
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from cgspn.eval.fit import fit_fixed_steps
from cgspn.distill.losses import cosine_distance
from cgspn.distill.phis import PhiS
from cgspn.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess
from cgspn.teachers.registry import teacher_normalization


def readout_logits(summary_z: torch.Tensor, phis: PhiS, classify: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A summary adaptor's output in PHI-S space [N, D_t] -> the teacher's logits [N, C]: `from_direction`,
    then the teacher's classifier."""
    return classify(phis.from_direction(summary_z.float()))


def top_classes(logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """logits [N, C] -> the k most likely classes [N, k], most likely first."""
    return logits.float().topk(k, dim=-1).indices


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """How often the student's readout agrees with the teacher, over N images, as fractions in [0, 1]:
    top1 = the same most likely class; top5 = the teacher's most likely class is among the student's five
    (top-5 accuracy with the teacher's prediction as the label)."""
    teacher = teacher_logits.float().argmax(-1)
    student = top_classes(student_logits, 5)
    return {"top1": (student[:, 0] == teacher).float().mean().item(),
            "top5": (student == teacher[:, None]).any(-1).float().mean().item()}


def label_bound(labels: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """The agreement of the best predictor that knows each image's label [N] and nothing else: per label, the
    teacher's most frequent classes over these images [N, C] (top1: the most frequent; top5: the five most
    frequent). Fractions in [0, 1]; what the labels alone explain of the teacher's predictions."""
    teacher = teacher_logits.float().argmax(-1)
    top1 = top5 = 0
    for label in labels.unique():
        classes, counts = teacher[labels == label].unique(return_counts=True)
        ranked = counts.sort(descending=True).values
        top1, top5 = top1 + ranked[:1].sum().item(), top5 + ranked[:5].sum().item()
    return {"top1": top1 / len(teacher), "top5": top5 / len(teacher)}


def train_control_head(features: torch.Tensor, targets: torch.Tensor, head: nn.Module, phis: PhiS, steps: int,
                       batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Fit `head` (a fresh summary adaptor head, [N, D_s] -> [N, D_t]) to a teacher's summaries with stage 2's
    summary loss: cosine distance in PHI-S space. features [N, D_s]: a frozen student's summaries; targets
    [N, D_t]: the teacher's (raw, as cached). AdamW, cosine learning-rate decay, shuffled passes drawn by a
    generator seeded with `seed`; `steps` optimizer steps. Returns the head in eval mode."""
    z = phis.standardize(targets.double()).float()
    features = features.float()
    return fit_fixed_steps(head, lambda idx: cosine_distance(head(features[idx]), z[idx]), len(features), steps,
                           batch_size, lr=lr, weight_decay=1e-4, seed=seed)


def batches(images: list[np.ndarray], side: int, batch_size: int, device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 images [H, W, 3] -> batches [B, 3, side, side] on `device`, normalized with (mean, std)."""
    for i in range(0, len(images), batch_size):
        yield torch.cat([preprocess(img, side, mean, std) for img in images[i : i + batch_size]]).to(device)


@torch.no_grad()
def teacher_predictions(teacher: nn.Module, images: list[np.ndarray], side: int, batch_size: int, device):
    """The teacher's own predictions: images at `side` with its own normalization -> (summaries [N, D], logits
    [N, C]), on the CPU."""
    mean, std = teacher_normalization(teacher)
    summaries = torch.cat([teacher(x).summary.float() for x in batches(images, side, batch_size, device, mean, std)])
    return summaries.cpu(), teacher.classify(summaries).float().cpu()


@torch.no_grad()
def student_summaries(student: nn.Module, images: list[np.ndarray], side: int, batch_size: int, device) -> torch.Tensor:
    """The student's own summary vectors (what a summary adaptor reads) at `side` -> [N, D_s] (CPU)."""
    return torch.cat([student(x).summary.float().cpu() for x in batches(images, side, batch_size, device)])


@torch.no_grad()
def head_logits(head: nn.Module, summaries: torch.Tensor, phis: PhiS, teacher: nn.Module) -> torch.Tensor:
    """Student summaries [N, D_s] through a summary head and the teacher's classifier -> logits [N, C] (CPU)."""
    device = next(head.parameters()).device
    return readout_logits(head(summaries.to(device)), phis, teacher.classify).float().cpu()


def measure(teacher: nn.Module, phis: PhiS, students: dict[str, tuple[nn.Module, nn.Module]],
            control: tuple[nn.Module, nn.Module], train: tuple[list[np.ndarray], torch.Tensor],
            sets: dict[str, list[np.ndarray]], side: int, teacher_side: int, steps: int, batch_size: int, seed: int,
            device, say: Callable[[str], None] = print, labels: dict[str, torch.Tensor] | None = None) -> dict:
    """The readout of every student and of the control on every image set, against the teacher.

    students: {name: (student, its summary head for this teacher)}; control: (a frozen random student, a fresh
    head of the same architecture), whose head is first trained (`train_control_head`, `steps` steps) on
    `train` = (images, the teacher's cached summaries [N, D_t]); sets: {set name: uint8 images}. Students see
    the images at `side`, the teacher at `teacher_side` with its own normalization.
    Returns {"agreement": {model: {set: {"top1", "top5"}}}, "top5": {set: {"teacher" or model: [N][5] class
    indices}}, "ceiling": {set: {"top1", "top5"}}, "label_bound": {set: {"top1", "top5"}}}, the models in the
    order given and "control" last. The ceiling is the readout of a perfect direction: the teacher's own
    summaries standardized, then read out like a head's output (what `from_direction`'s typical norm alone
    costs). label_bound (`label_bound`), for the sets with `labels` ({set: [N] class ids}): how far knowing the
    images' labels alone goes."""
    summaries, reference = {}, {}
    for k, images in sets.items():
        summaries[k], reference[k] = teacher_predictions(teacher, images, teacher_side, batch_size, device)
    ceiling = {k: agreement(readout_logits(phis.standardize(summaries[k].double()).to(device), phis,
                                           teacher.classify).cpu(), reference[k]) for k in sets}
    logits, total = {}, len(students) + 1
    for i, (name, (student, head)) in enumerate(students.items(), 1):
        say(f"[{i}/{total}] {name}: its summary head -> the teacher's classifier on "
            + ", ".join(f"{k} ({len(v)} images)" for k, v in sets.items()))
        logits[name] = {k: head_logits(head, student_summaries(student, images, side, batch_size, device), phis, teacher)
                        for k, images in sets.items()}
    student, head = control
    images, targets = train
    say(f"[{total}/{total}] control: a fresh summary head on the frozen random student, {steps} steps on "
        f"{len(images)} training images, then the same readout")
    features = student_summaries(student, images, side, batch_size, device)
    head = train_control_head(features, targets, head.cpu(), phis, steps, batch_size, seed=seed).to(device)
    logits["control"] = {k: head_logits(head, student_summaries(student, images_k, side, batch_size, device), phis,
                                        teacher) for k, images_k in sets.items()}
    return {"agreement": {m: {k: agreement(v, reference[k]) for k, v in per_set.items()} for m, per_set in logits.items()},
            "top5": {k: {"teacher": top_classes(reference[k]).tolist(),
                         **{m: top_classes(per_set[k]).tolist() for m, per_set in logits.items()}} for k in sets},
            "ceiling": ceiling,
            "label_bound": {k: label_bound(v, reference[k]) for k, v in (labels or {}).items()}}
