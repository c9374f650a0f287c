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

from cgspn.data.feature_cache import teacher_features_batched
from cgspn.eval.fit import fit_fixed_steps
from cgspn.eval.protocol import Context, Protocol, round4
from cgspn.report.markdown import pct, table
from cgspn.teachers.display import teacher_label
from cgspn.teachers.registry import family_of
from cgspn.distill.losses import cosine_distance
from cgspn.distill.phis import PhiS
from cgspn.data.preprocess import to_batch


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


@torch.no_grad()
def teacher_predictions(teacher: nn.Module, images: list[np.ndarray], side: int, batch_size: int, device):
    """The teacher's own predictions: images at `side` with its own normalization -> (summaries [N, D], logits
    [N, C]), on the CPU."""
    summaries = teacher_features_batched(teacher, images, side, batch_size)["summary"]
    return summaries, teacher.classify(summaries.to(device)).float().cpu()


@torch.no_grad()
def student_summaries(student: nn.Module, images: list[np.ndarray], side: int, batch_size: int, device) -> torch.Tensor:
    """The student's own summary vectors (what a summary adaptor reads) at `side` -> [N, D_s] (CPU)."""
    return torch.cat([student(to_batch(images[i : i + batch_size], side, device)).summary.float().cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def head_logits(head: nn.Module, summaries: torch.Tensor, phis: PhiS, teacher: nn.Module) -> torch.Tensor:
    """Student summaries [N, D_s] through a summary head and the teacher's classifier -> logits [N, C] (CPU)."""
    device = next(head.parameters()).device
    return readout_logits(head(summaries.to(device)), phis, teacher.classify).float().cpu()


def measure(teacher: nn.Module, phis: PhiS, students: dict[str, tuple[nn.Module, nn.Module]],
            control: tuple[nn.Module, nn.Module], train: tuple[list[np.ndarray], torch.Tensor],
            sets: dict[str, list[np.ndarray]], side: int, teacher_side: int, steps: int, batch_size: int, seed: int,
            device, say: Callable[[str], None] = print, labels: dict[str, torch.Tensor] | None = None,
            summaries: Callable[[str, str], torch.Tensor] | None = None) -> dict:
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
    def own(name: str, k: str, student: nn.Module, images: list[np.ndarray]) -> torch.Tensor:
        return summaries(name, k) if summaries else student_summaries(student, images, side, batch_size, device)

    teacher_summaries, reference = {}, {}
    for k, images in sets.items():
        teacher_summaries[k], reference[k] = teacher_predictions(teacher, images, teacher_side, batch_size, device)
    ceiling = {k: agreement(readout_logits(phis.standardize(teacher_summaries[k].double()).to(device), phis,
                                           teacher.classify).cpu(), reference[k]) for k in sets}
    logits, total = {}, len(students) + 1
    for i, (name, (student, head)) in enumerate(students.items(), 1):
        say(f"[{i}/{total}] {name}: its summary head -> the teacher's classifier on "
            + ", ".join(f"{k} ({len(v)} images)" for k, v in sets.items()))
        logits[name] = {k: head_logits(head, own(name, k, student, images), phis, teacher) for k, images in sets.items()}
    student, head = control
    images, targets = train
    say(f"[{total}/{total}] control: a fresh summary head on the frozen random student, {steps} steps on "
        f"{len(images)} training images, then the same readout")
    features = own("control", "train", student, images)
    head = train_control_head(features, targets, head.cpu(), phis, steps, batch_size, seed=seed).to(device)
    logits["control"] = {k: head_logits(head, own("control", k, student, images_k), phis, teacher)
                         for k, images_k in sets.items()}
    return {"agreement": {m: {k: agreement(v, reference[k]) for k, v in per_set.items()} for m, per_set in logits.items()},
            "top5": {k: {"teacher": top_classes(reference[k]).tolist(),
                         **{m: top_classes(per_set[k]).tolist() for m, per_set in logits.items()}} for k in sets},
            "ceiling": ceiling,
            "label_bound": {k: label_bound(v, reference[k]) for k, v in (labels or {}).items()}}


class ImageNetReadout(Protocol):
    """Where stage 2's teachers include an ImageNet-1k classifier (a teacher with `classify`, the
    EfficientNet): every student's summary adaptor for it, mapped back from PHI-S space, through the
    teacher's own head, against the teacher's own predictions on the validation images and the photos, beside
    a control head trained on the random student (`measure`). Params: readout_control_steps, batch_size, seed,
    max_images."""

    name = "imagenet_readout"
    title = "ImageNet readout"

    def prepare(self, ctx: Context) -> str | None:
        self.teacher = None
        if not any(enc.adaptor is not None for enc in ctx.encoders.values()):
            return "no student with adaptors (distill_stage2, highres) is among evaluate.models"
        found = [t for t, o in ctx.others.items() if family_of(o.model).classifier]
        if not found:
            names = ", ".join([ctx.p["teacher"], *ctx.others])
            return (f"stage 2's teachers ({names}) include no ImageNet-1k classifier (a teacher with `classify`, "
                    "such as efficientnet_lite0)")
        self.teacher = found[0]
        knn = ctx.used.get("knn")
        self.val_split = knn[1] if knn else ctx.splits.val("evaluate (ImageNet readout)")
        return None

    def finish(self, ctx: Context, results: dict[str, dict]) -> dict:
        if self.teacher is None:
            return {}
        from cgspn.data.subset import Chain, ShardSubset
        from cgspn.eval.features import Encoder
        from cgspn.distill.phis import load_teacher_phis
        from cgspn.models.adaptors import AdaptorMLP
        from cgspn.models.cgspn import cgspn_from_teacher_config
        from cgspn.teachers.registry import teacher_side

        name, p, teacher, store = self.teacher, ctx.p, ctx.others[self.teacher], ctx.store
        sets, photos = {"val": store.images(self.val_split)}, []
        if ctx.splits.has("photos"):
            sets["photos"] = store.images("photos")
            photos = [s.get("txt", s["__key__"].encode()).decode() for s, _ in store.samples("photos")]
        train_splits = ctx.splits.train("evaluate (ImageNet readout control)")
        parts = [ShardSubset(store.shards, [s], feature_dirs={name: teacher.folder}, feature_names=("summary",),
                             limit=store.limit) for s in train_splits]
        train_images = Chain([part.images for part in parts])
        targets = torch.cat([part.features[name]["summary"].all().float() for part in parts])
        students = {n: (enc.model, enc.others[name][0].summary) for n, enc in ctx.encoders.items() if name in enc.others}
        like = next(iter(students.values()))[1]  # stage 2's summary head for this teacher: the control's architecture
        if "random" not in store.encoders:  # the control's student is the `random` model, built with the same seed
            torch.manual_seed(p["seed"])
            fresh = cgspn_from_teacher_config(ctx.encoders["teacher"].model.cfg).eval().to(ctx.device)
            store.encoders["random"] = Encoder("random", fresh)
        control = store.encoders["random"].model
        torch.manual_seed(p["seed"])  # the control head's initialization: the seed's, not whatever ran before it
        head = AdaptorMLP(like.norm.normalized_shape[0], like.fc2.out_features, like.fc1.out_features)
        side = teacher_side(ctx.base, teacher.scale)
        ctx.say(f"ImageNet readout through {name}'s classifier: students at {ctx.base} px, the teacher at {side} px")
        labels = {"val": store.labels(self.val_split)} if ctx.splits.has(self.val_split, "labels") else None
        split_of = {"val": self.val_split, "photos": "photos"}

        def summaries(model: str, k: str) -> torch.Tensor:  # the store's own summaries at the training side
            model = "random" if model == "control" else model
            if k == "train":
                return torch.cat([store.own_summary(model, s, ctx.base) for s in train_splits])
            return store.own_summary(model, split_of[k], ctx.base)

        found = measure(teacher.model, load_teacher_phis(teacher.folder)["summary"], students, (control, head),
                        (train_images, targets), sets, ctx.base, side, p["readout_control_steps"], p["batch_size"],
                        p["seed"], ctx.device, say=lambda line: ctx.say(f"ImageNet readout {line}"), labels=labels,
                        summaries=summaries)
        top5 = found["top5"].get("photos", {})
        rounded = lambda d: {k: {m: round4(v) for m, v in per.items()} for k, per in d.items()}  # noqa: E731
        readout = {"teacher": name, "resolution": ctx.base, "teacher_resolution": side,
                   "splits": {"val": self.val_split, "photos": "photos" if photos else None, "control": train_splits},
                   "images": {k: len(v) for k, v in sets.items()}, "control_images": len(train_images),
                   "control_steps": p["readout_control_steps"],
                   "agreement": {m: rounded(per) for m, per in found["agreement"].items()},
                   "ceiling": rounded(found["ceiling"]), "label_bound": rounded(found["label_bound"]),
                   "photos": {photo: {m: top5[m][i] for m in top5} for i, photo in enumerate(photos)},
                   "classes": "ImageNet-1k class indices (no installed package ships the class names)"}
        ctx.say("ImageNet readout: " + "; ".join(
            f"{m} " + ", ".join(f"{k} top-1 {v['top1']:.3f} top-5 {v['top5']:.3f}" for k, v in per.items())
            for m, per in readout["agreement"].items()))
        return {"imagenet_readout": readout}

    def report_lines(self, ev: dict, names: dict[str, str]) -> list[str]:
        """The readout: agreement with the teacher, student against control, the photos' top-5 classes; or why
        it was not measured."""
        why = ev.get("not_measured", {}).get("imagenet_readout")
        r = ev.get("imagenet_readout")
        if not r:
            return [f"ImageNet-1k readout: not measured: {why}.", ""] if why else []
        label = {**names, "control": f"control: a fresh summary head on the random student ({r['control_steps']} steps)"}
        sets = [k for k in ("val", "photos") if r["images"].get(k)]
        split = {"val": f"`{r['splits']['val']}`", "photos": "photos"}
        rows = [[label.get(m, m)] + [pct(per[k][kind]) if k in per else "-" for k in sets for kind in ("top1", "top5")]
                for m, per in r["agreement"].items()]
        out = ["### ImageNet-1k readout", "",
               f"The students' summary adaptor for {teacher_label(r['teacher'])}, mapped back from PHI-S space by its "
               "direction at the typical norm (`from_direction`), followed by the teacher's own ImageNet classifier, "
               f"against the teacher's own predictions (the teacher at {r['teacher_resolution']} px with its own "
               f"normalization, the students at {r['resolution']} px). Top-1: the same class; top-5: the teacher's class "
               "among the student's five. The control is the same readout with a fresh head of the same architecture "
               "trained (stage 2's summary loss, cosine in PHI-S space) on the cached teacher summaries of "
               + ", ".join(f"`{s}`" for s in r["splits"]["control"]) + f" ({r['control_images']} images) on the frozen, "
               "randomly initialized student. Images: " + ", ".join(f"{split[k]} {r['images'][k]}" for k in sets) + ".", "",
               table(["model"] + [f"{split[k]} top-{n} agreement (%)" for k in sets for n in (1, 5)], rows), ""]
        if r.get("ceiling"):
            out += ["Ceiling: the teacher's own summaries read out the same way (standardized, then `from_direction`) "
                    "agree " + ", ".join(f"{pct(r['ceiling'][k]['top1'])}% top-1 / {pct(r['ceiling'][k]['top5'])}% top-5 "
                                         f"on {split[k]}" for k in sets if k in r["ceiling"])
                    + " with its predictions: what the typical norm alone costs a perfect direction.", ""]
        bound = {k: v for k, v in (r.get("label_bound") or {}).items() if k in sets}
        if bound:
            out += ["What the labels alone explain: a predictor that knows each image's label and nothing else (per "
                    "label, the teacher's most frequent classes on these images) agrees at most "
                    + ", ".join(f"{pct(v['top1'])}% top-1 / {pct(v['top5'])}% top-5 on {split[k]}" for k, v in bound.items())
                    + ". A readout above that has learned more of the teacher than the labels hold; where it is low, "
                    "twice a control that learns the labels' share is out of reach.", ""]
        if r.get("photos"):
            models = list(next(iter(r["photos"].values())))
            out += [f"The photos' five most likely classes, most likely first ({r['classes']}):", "",
                    table(["photo"] + [f"teacher: {teacher_label(r['teacher'])}" if m == "teacher" else label.get(m, m)
                                        for m in models],
                           [[photo] + [", ".join(map(str, top[m])) for m in models] for photo, top in r["photos"].items()]),
                    ""]
        return out
