"""Stage `evaluate`: how good each model's features are, against the teacher, on whatever the data allows.

Models: the teacher, a randomly initialized student, and the distill_stage1, distill_stage2 and highres
students. For each:
- kNN top-1 where the data has labels: the validation images against the training images (the model's
  summary vector, the adaptor's summary where there is one, and mean-pooled patch features);
- a linear segmentation probe (BatchNorm + 1x1 conv) where the data has label maps, trained on the training
  split and scored (mIoU) on the validation split at 1x, 2x and 4x the training resolution: the bigger
  mosaics `<split>_x<s>` where the embedded data has them, else the same images at s x the resolution,
  label maps resized and cropped with them; the data's ignore label is not scored;
- fidelity to the teacher (mean cosine of the adapted patch features) at those sizes, always; for the
  students with adaptors, fidelity to each teacher of their adaptors too (`fidelity_per_teacher`: patch
  features, summary, and the summary in PHI-S space), that teacher seeing the images at its own side
  (meta.json's scale) with its own normalization, its grid resized to the student's;
- an ImageNet-1k readout where stage 2's teachers include a classifier (a teacher with `classify`, the
  EfficientNet): the students' summary adaptor for it, mapped back from PHI-S space, through the teacher's
  own head, against the teacher's own predictions on the validation images and the photos, beside a control
  head trained on a random frozen student (cgspn.eval.imagenet_readout; `readout_control_steps`);
- parameter counts.
What the data does not allow is recorded under "not_measured" with the reason. The teacher's features at
the cache's resolution are read from the feature cache (float16), not recomputed. The teacher's blocks in
`teacher_blocks` get the segmentation probe too. Writes reports/metrics/evaluate.json,
reports/figures/evaluate_resolution.png and reports/figures/pca_maps.png (a photo of the `photos` split,
else the first validation image).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cgspn.data.memory import ShardSubset
from cgspn.data.shards import decode_image, decode_mask, iter_samples, split_shards
from cgspn.data.preprocess import to_batch
from cgspn.pipeline.errors import ParamError
from cgspn.eval.knn import knn_top1
from cgspn.eval.segmentation import mean_iou, train_seg_probe
from cgspn.eval.fidelity import teacher_fidelity
from cgspn.eval.figures import pca_figure, resolution_figure
from cgspn.eval.imagenet_readout import measure
from cgspn.models.adaptors import AdaptorMLP
from cgspn.models.cgspn import cgspn_from_teacher_config
from cgspn.models.vit import ViT, parameter_count
from cgspn.pipeline.outputs import write_json, write_timings
from cgspn.pipeline.params import Param
from cgspn.distill.phis import PhiS, load_teacher_phis
from cgspn.pipeline.cli import run_stage
from cgspn.pipeline.inputs import SHARDS, TEACHERS, Splits, feature_dir, teacher_entry
from cgspn.models.students import load_adaptors, load_student
from cgspn.teachers.registry import family, load_teacher_file, teacher_normalization, teacher_side
from cgspn.data.preprocess import preprocess_mask

SCHEMA = {
    "teacher": Param(str),
    "models": Param(list, item=str, choices=("teacher", "random", "distill_stage1", "distill_stage2", "highres")),
    "knn_bank_split": Param(str),  # memory bank; auto: train where it has labels
    "knn_query_split": Param(str),  # auto: val (or test) where it has labels
    "knn_k": Param(int, min=1),
    "knn_temperature": Param(float, min=1e-6),
    "seg_train_split": Param(str),  # auto: mosaic_train, else train, where it has label maps
    "seg_val_split": Param(str),  # auto: mosaic_val, else val (or test), where it has label maps
    "seg_scales": Param(list, item=int, min=1),
    "seg_steps": Param(int, min=1),  # optimizer steps of each segmentation probe
    "teacher_blocks": Param(list, item=int, min=0),  # teacher blocks to probe too (the block targets)
    "pca_photo": Param(str),  # a photo of the photos split; without that split, the first validation image
    "pca_sizes": Param(list, item=int, min=14),
    "pca_model": Param(str),
    "max_images": Param(int, min=0),  # per split (0: all): caps memory and time on a large data set
    "batch_size": Param(int, min=1),
    "threads": Param(int, min=1),
    "device": Param(str, choices=("auto", "cpu", "cuda")),  # auto: a CUDA GPU when there is one
    "seed": Param(int, min=0),
    "readout_control_steps": Param(int, min=1),  # optimizer steps of the ImageNet readout's control head
}
METRICS = Path("reports/metrics/evaluate.json")
FIGURES = Path("reports/figures")


class Encoder:
    """One model under evaluation, on its device: images -> float32 CPU tensors (summary [B, D], patch
    features [B, h, w, D], features in the teacher's space [B, h, w, D_t] for fidelity, the model's own
    summary [B, D], the patch tokens of
    `blocks` [B, K, h, w, D] from the same forward pass (the teacher's intermediate blocks; K = 0 for the
    others)). Students with adaptors map into the teacher's space through them (PHI-S de-standardized);
    the others are compared as they are. `others` {teacher: (its TeacherAdaptor, its PHI-S statistics)}: the
    other teachers a student's adaptors hold, whose predictions `forward(x, others=True)` adds."""

    def __init__(self, name: str, model, adaptor=None, phis: dict[str, PhiS] | None = None,
                 blocks: list[int] = (), others: dict | None = None):
        self.name, self.model, self.adaptor, self.phis, self.blocks = name, model.eval(), adaptor, phis, list(blocks)
        self.others = others or {}

    @torch.no_grad()
    def forward(self, x: torch.Tensor, others: bool = False):
        """-> (the five tensors of `__call__`, {teacher: (summary [B, D_t], patch features [B, h, w, D_t])} of
        the other teachers, de-standardized like the teacher's; {} unless `others`)."""
        x = x.to(next(self.model.parameters()).device)
        out = self.model(x, layers=self.blocks) if self.blocks else self.model(x)
        summary, teacher_space = out.summary, out.patch_tokens
        if self.adaptor is not None:
            summary_z, spatial_z = self.adaptor(out.summary, out.patch_tokens)
            summary = self.phis["summary"].from_direction(summary_z)
            teacher_space = self.phis["spatial"].destandardize(spatial_z)
        blocks = (torch.stack([out.layer_tokens[k] for k in self.blocks], 1) if self.blocks
                  else out.patch_tokens.new_zeros(x.shape[0], 0))
        adapted = {}
        for t, (adaptor, phis) in (self.others.items() if others else ()):
            summary_z, spatial_z = adaptor(out.summary, out.patch_tokens)
            adapted[t] = (phis["summary"].from_direction(summary_z).float().cpu(),
                          phis["spatial"].destandardize(spatial_z).float().cpu())
        return tuple(t.float().cpu() for t in (summary, out.patch_tokens, teacher_space, out.summary, blocks)), adapted

    def __call__(self, x: torch.Tensor):
        return self.forward(x)[0]


def load_encoders(p: dict, root: Path, device: str) -> dict[str, Encoder]:
    entry = teacher_entry(root, p["teacher"], "evaluate.teacher")
    teacher = load_teacher_file(root / TEACHERS / entry["file"]).eval()
    if not isinstance(teacher, ViT):  # the random student and the block probes are built from a ViT
        raise ParamError(f"evaluate.teacher={p['teacher']!r} is not a ViT (family {family(teacher)}): evaluate "
                         f"compares the students with a ViT teacher")
    phis = load_teacher_phis(feature_dir(root, entry))
    encoders = {}
    # The teacher first: the students' fidelity is measured against its features.
    for name in ["teacher"] + [m for m in p["models"] if m != "teacher"]:
        if name == "teacher":
            encoders[name] = Encoder(name, teacher, blocks=p["teacher_blocks"])
        elif name == "random":
            torch.manual_seed(p["seed"])
            encoders[name] = Encoder(name, cgspn_from_teacher_config(teacher.cfg))
        else:
            folder = root / "models" / name
            if not (folder / "student.safetensors").exists():
                raise FileNotFoundError(f"{folder / 'student.safetensors'}: missing (run the {name} stage first)")
            student = load_student(folder / "student.safetensors")
            adaptor, others = None, {}
            if (folder / "adaptors.safetensors").exists():
                adaptors = load_adaptors(folder / "adaptors.safetensors")
                adaptor = adaptors[p["teacher"]]
                others = {t: (a.to(device), teacher_phis(root, t)) for t, a in adaptors.items() if t != p["teacher"]}
            encoders[name] = Encoder(name, student, adaptor, phis, others=others)
    for enc in encoders.values():
        enc.model.to(device)
        if enc.adaptor is not None:
            enc.adaptor.to(device)
    return encoders


def teacher_phis(root: Path, name: str) -> dict[str, PhiS]:
    """A teacher's PHI-S statistics, from its feature cache."""
    return load_teacher_phis(feature_dir(root, teacher_entry(root, name, "the students' adaptors")))


def encode(encoder: Encoder, images: list[np.ndarray], resolution: int, batch_size: int):
    """All images at `resolution` -> (summary [N, D], patches [N, h, w, D], teacher space [N, h, w, D_t],
    own summary [N, D], block tokens [N, K, h, w, D])."""
    return encode_all(encoder, images, resolution, batch_size)[0]


def encode_all(encoder: Encoder, images: list[np.ndarray], resolution: int, batch_size: int, others: bool = False):
    """`encode`'s five tensors, and with `others` {teacher: (summary [N, D_t], patches [N, h, w, D_t])} of the
    encoder's other teachers, from the same forward passes."""
    parts = [encoder.forward(to_batch(images[i : i + batch_size], resolution, "cpu"), others)
             for i in range(0, len(images), batch_size)]
    five = [torch.cat(t) for t in zip(*(a for a, _ in parts))]
    return five, {t: tuple(torch.cat(x) for x in zip(*(b[t] for _, b in parts))) for t in (parts[0][1] if parts else {})}


def cached_outputs(root: Path, folder: Path, split: str, blocks: list[int], limit: int | None = None):
    """The teacher's outputs on `split` read from its feature cache (float16, at the cache's resolution)
    instead of computed again: the same five items as `encode`."""
    names = ("summary", "spatial", *(f"block{k}" for k in blocks))
    f = ShardSubset(root / SHARDS, [split], feature_dirs={"teacher": folder}, feature_names=names, limit=limit)
    f = {n: v.float() for n, v in f.features["teacher"].items()}
    stacked = (torch.stack([f[f"block{k}"] for k in blocks], 1) if blocks
               else f["spatial"].new_zeros(len(f["summary"]), 0))
    return f["summary"], f["spatial"], f["spatial"], f["summary"], stacked


@dataclass
class OtherTeacher:
    """A teacher of the students' adaptors besides evaluate.teacher: its module (on the device), the side it
    sees the images at as a multiple of the student's (its cache's meta.json `scale`), its feature cache."""

    model: torch.nn.Module
    scale: float
    folder: Path


def other_teachers(root: Path, encoders: dict[str, Encoder], device: str) -> dict[str, OtherTeacher]:
    """{teacher: OtherTeacher} for every teacher the students' adaptors hold besides evaluate.teacher."""
    found = {}
    for t in dict.fromkeys(t for enc in encoders.values() for t in enc.others):
        entry = teacher_entry(root, t, "the students' adaptors")
        folder = feature_dir(root, entry)
        scale = json.loads((folder / "meta.json").read_text()).get("scale", 1)
        found[t] = OtherTeacher(load_teacher_file(root / TEACHERS / entry["file"]).eval().to(device), scale, folder)
    return found


@torch.no_grad()
def teacher_outputs(model, images: list[np.ndarray], side: int, batch_size: int, device: str):
    """A teacher on images at `side` with its own normalization -> (summary [N, D], patches [N, h, w, D]) on the CPU."""
    mean, std = teacher_normalization(model)
    parts = [model(to_batch(images[i : i + batch_size], side, device, mean, std)) for i in range(0, len(images), batch_size)]
    return torch.cat([o.summary.float().cpu() for o in parts]), torch.cat([o.patch_tokens.float().cpu() for o in parts])


def readout_teacher(p: dict, encoders: dict[str, Encoder], others: dict[str, OtherTeacher]):
    """(the teacher the ImageNet readout goes through, None) or (None, why it is not measured): the first
    teacher of the students' adaptors with an ImageNet classifier (`classify`)."""
    if not any(enc.adaptor is not None for enc in encoders.values()):
        return None, "no student with adaptors (distill_stage2, highres) is among evaluate.models"
    found = [t for t, o in others.items() if hasattr(o.model, "classify")]
    if not found:
        names = ", ".join([p["teacher"], *others])
        return None, (f"stage 2's teachers ({names}) include no ImageNet-1k classifier (a teacher with `classify`, "
                      "such as efficientnet_lite0)")
    return found[0], None


def imagenet_readout(p: dict, root: Path, encoders: dict[str, Encoder], teacher: OtherTeacher, name: str, base: int,
                     limit: int | None, val_split: str, device: str) -> dict:
    """The ImageNet-1k readout (cgspn.eval.imagenet_readout.measure) of every student whose adaptors hold `name`,
    and of the control (a fresh head of the same architecture on the random student, built with the seed
    the `random` model is, trained on the training splits' cached summaries of the teacher), on `val_split`
    and the photos split where there is one, both capped at max_images."""
    splits = Splits(root)
    sets, photos = {"val": ShardSubset(root / SHARDS, [val_split], limit=limit).images}, []
    if splits.has("photos"):
        samples = split_samples(root, "photos", limit)
        sets["photos"] = [decode_image(sample, shard) for sample, shard in samples]
        photos = [sample.get("txt", sample["__key__"].encode()).decode() for sample, _ in samples]
    train_splits = splits.train("evaluate (ImageNet readout control)")
    train = ShardSubset(root / SHARDS, train_splits, feature_dirs={name: teacher.folder}, feature_names=("summary",),
                        limit=limit)
    students = {n: (enc.model, enc.others[name][0].summary) for n, enc in encoders.items() if name in enc.others}
    like = next(iter(students.values()))[1]  # stage 2's summary head for this teacher: the control's architecture
    torch.manual_seed(p["seed"])  # as the `random` model is built: the same random student
    control = cgspn_from_teacher_config(encoders["teacher"].model.cfg).eval().to(device)
    head = AdaptorMLP(like.norm.normalized_shape[0], like.fc2.out_features, like.fc1.out_features)
    side = teacher_side(base, teacher.scale)
    print(f"evaluate: ImageNet readout through {name}'s classifier: students at {base} px, the teacher at {side} px",
          flush=True)
    found = measure(teacher.model, teacher_phis(root, name)["summary"], students, (control, head),
                    (train.images, train.features[name]["summary"].float()), sets, base, side,
                    p["readout_control_steps"], p["batch_size"], p["seed"], device,
                    say=lambda line: print(f"evaluate: ImageNet readout {line}", flush=True),
                    labels={"val": labels_of(root, val_split, limit)} if splits.has(val_split, "labels") else None)
    top5 = found["top5"].get("photos", {})
    return {"teacher": name, "resolution": base, "teacher_resolution": side,
            "splits": {"val": val_split, "photos": "photos" if photos else None, "control": train_splits},
            "images": {k: len(v) for k, v in sets.items()}, "control_images": len(train),
            "control_steps": p["readout_control_steps"], "agreement": found["agreement"], "ceiling": found["ceiling"],
            "label_bound": found["label_bound"],
            "photos": {photo: {m: top5[m][i] for m in top5} for i, photo in enumerate(photos)},
            "classes": "ImageNet-1k class indices (no installed package ships the class names)"}


def readout_line(r: dict) -> str:
    return "; ".join(f"{m} " + ", ".join(f"{k} top-1 {v['top1']:.3f} top-5 {v['top5']:.3f}" for k, v in per.items())
                     for m, per in r["agreement"].items())


def split_samples(root: Path, split: str, limit: int | None):
    """The first `limit` samples of a split (all with None), undecoded."""
    out = []
    for shard in split_shards(root / SHARDS, split):
        for sample in iter_samples(shard):
            if limit and len(out) >= limit:
                return out
            out.append((sample, shard))
    return out


def labels_of(root: Path, split: str, limit: int | None) -> torch.Tensor:
    return torch.tensor([int(s["cls"]) for s, _ in split_samples(root, split, limit)])


def masks_at(root: Path, split: str, px: int, limit: int | None) -> torch.Tensor:
    """uint8 [N, px, px]: the split's label maps as `preprocess` frames their images at px."""
    return torch.stack([preprocess_mask(decode_mask(s, sh), px) for s, sh in split_samples(root, split, limit)])


def plan(p: dict, root: Path) -> tuple[dict, dict]:
    """What can be measured on this data: ({"knn": (bank, query) | None, "seg": (train, val) | None},
    {metric: why not}). Named splits must exist and hold what the metric needs."""
    splits, used, missing = Splits(root), {}, {}
    knn = [p["knn_bank_split"], p["knn_query_split"]]
    if knn == ["auto", "auto"] and not (splits.has("train", "labels") and
                                        any(splits.has(s, "labels") for s in ("val", "test"))):
        used["knn"], missing["knn"] = None, "the data has no labels (kNN needs a labelled train and val split)"
    else:
        knn = [splits.resolve(knn[0], lambda _: "train", "evaluate.knn_bank_split"),
               splits.resolve(knn[1], splits.val, "evaluate.knn_query_split")]
        for param, split in zip(("knn_bank_split", "knn_query_split"), knn):
            if not splits.has(split, "labels"):
                raise ParamError(f"evaluate.{param}={split!r}: no such split with labels (splits: {splits.names})")
        used["knn"] = tuple(knn)
    seg = [p["seg_train_split"], p["seg_val_split"]]
    auto = [splits.with_masks("train"), splits.with_masks("val")]
    seg = [a if v == "auto" else v for v, a in zip(seg, auto)]
    if None in seg:
        used["seg"], missing["seg"] = None, "the data has no masks (the segmentation probe needs label maps)"
    else:
        for param, split in zip(("seg_train_split", "seg_val_split"), seg):
            if not splits.has(split, "masks"):
                raise ParamError(f"evaluate.{param}={split!r}: no such split with masks (splits: {splits.names})")
        used["seg"] = tuple(seg)
    return used, missing


def pca_image(p: dict, root: Path, val_split: str) -> dict:
    """The sample shown in the PCA figure: `pca_photo` of the photos split, else the first validation image."""
    splits = Splits(root)
    if splits.has("photos"):
        photo = next((s for s, _ in split_samples(root, "photos", None)
                      if s.get("txt", b"").decode() == p["pca_photo"]), None)
        if photo is None:
            raise ParamError(f"evaluate.pca_photo={p['pca_photo']!r}: no such photo in the photos split")
        return photo
    sample = split_samples(root, val_split, 1)[0][0]
    print(f"evaluate: no photos split: the PCA figure shows {val_split}'s first image "
          f"({sample.get('source.txt', sample['__key__'].encode()).decode()})", flush=True)
    return {**sample, "txt": sample.get("source.txt", sample["__key__"].encode())}


def main(p: dict, root: Path, run) -> dict:
    """Evaluate every model."""
    torch.set_num_threads(p["threads"])
    device = ("cuda" if torch.cuda.is_available() else "cpu") if p["device"] == "auto" else p["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise ParamError("evaluate.device=cuda, but torch sees no CUDA GPU here")
    entry = teacher_entry(root, p["teacher"], "evaluate.teacher")
    if p["pca_model"] not in p["models"]:
        raise ParamError(f"evaluate.pca_model={p['pca_model']!r} is not in evaluate.models {p['models']}")
    features = feature_dir(root, entry)
    if not (features / "meta.json").exists():
        raise FileNotFoundError(f"{features / 'meta.json'}: missing (run the cache_teacher stage first)")
    meta = json.loads((features / "meta.json").read_text())
    base, limit = meta["resolution"], p["max_images"] or None
    used, not_measured = plan(p, root)
    for what, why in not_measured.items():
        print(f"evaluate: {'kNN' if what == 'knn' else 'segmentation'} not measured: {why}", flush=True)
    splits = Splits(root)
    fidelity_split = used["seg"][1] if used["seg"] else splits.val("evaluate (fidelity)")
    photo = pca_image(p, root, fidelity_split)
    dataset = splits.info
    encoders = load_encoders(p, root, device)
    depth = len(encoders["teacher"].model.blocks)
    if any(k >= depth for k in p["teacher_blocks"]):
        raise ParamError(f"evaluate.teacher_blocks={p['teacher_blocks']}: the teacher has blocks 0..{depth - 1}")
    if used["knn"]:
        bank = ShardSubset(root / SHARDS, [used["knn"][0]], limit=limit)
        queries = ShardSubset(root / SHARDS, [used["knn"][1]], limit=limit)
        bank_labels, query_labels = (labels_of(root, s, limit) for s in used["knn"])
    # per scale: (train images, train masks, val images, val masks) for the probe, or the fidelity images alone
    classes, ignore = len(dataset["mask_classes"] or []), dataset.get("ignore_label")
    scaled = {}
    for s in p["seg_scales"]:
        px = base * s
        if used["seg"]:
            tr, va = (splits.at_scale(x, s) for x in used["seg"])
            scaled[s] = {"train": (tr, ShardSubset(root / SHARDS, [tr], limit=limit).images, masks_at(root, tr, px, limit)),
                         "val": (va, ShardSubset(root / SHARDS, [va], limit=limit).images, masks_at(root, va, px, limit))}
        else:
            va = splits.at_scale(fidelity_split, s)
            scaled[s] = {"val": (va, ShardSubset(root / SHARDS, [va], limit=limit).images, None)}
    results, teacher_val, teacher_summary, other_targets, seconds = {}, {}, {}, {}, {}
    extra = other_teachers(root, encoders, device)  # the students' other teachers (per-teacher fidelity, readout)
    classifier, why = readout_teacher(p, encoders, extra)
    if why:
        not_measured["imagenet_readout"] = why
        print(f"evaluate: ImageNet readout not measured: {why}", flush=True)

    def outputs(enc: Encoder, split: str, images: list[np.ndarray], px: int, others: bool = False):
        """`encode_all`, except that the teacher's outputs at the cache's resolution come from the cache."""
        if (enc.name == "teacher" and px == base and meta.get("teacher_resolution", base) == base
                and split in meta["splits"] and set(enc.blocks) <= set(meta.get("layers", []))):
            return cached_outputs(root, features, split, enc.blocks, limit), {}
        return encode_all(enc, images, px, p["batch_size"], others)

    def other_val(t: str, s: int, split: str, images: list[np.ndarray]):
        """Teacher t's (summary, patch features) on the fidelity images at scale s, computed once."""
        if (t, s) not in other_targets:
            side = teacher_side(base * s, extra[t].scale)
            print(f"evaluate: {t} at {side} px: its features on {split} ({len(images)} images, for the "
                  "per-teacher fidelity)", flush=True)
            other_targets[t, s] = teacher_outputs(extra[t].model, images, side, p["batch_size"], device)
        return other_targets[t, s]

    for n, (name, enc) in enumerate(encoders.items(), 1):
        start = time.perf_counter()
        print(f"evaluate: [{n}/{len(encoders)}] {name} ...", flush=True)
        r = {"parameters": parameter_count(enc.model), "knn_summary": None, "knn_summary_adapted": None,
             "knn_mean_patch": None, "seg_miou": {}, "seg_miou_adapted": {}, "fidelity": {}}
        if used["knn"]:
            b_sum, b_patch, _, b_own, _ = outputs(enc, used["knn"][0], bank.images, base)[0]
            q_sum, q_patch, _, q_own, _ = outputs(enc, used["knn"][1], queries.images, base)[0]
            knn = lambda a, b: knn_top1(a, bank_labels, b, query_labels, p["knn_k"], p["knn_temperature"])  # noqa: E731
            # The model's own summary vector, the one every model has; and, for students with an adaptor, the
            # adaptor's prediction of the teacher's summary.
            r["knn_summary"] = knn(b_own, q_own)
            r["knn_summary_adapted"] = knn(b_sum, q_sum) if enc.adaptor is not None else None
            r["knn_mean_patch"] = knn(b_patch.mean((1, 2)), q_patch.mean((1, 2)))
        for s, data in scaled.items():
            px = base * s
            va_split, va_images, va_masks = data["val"]
            (va_sum, va_patch, va_teacher_space, va_own, va_blocks), va_others = outputs(
                enc, va_split, va_images, px, others=True)
            if "train" in data:
                tr_split, tr_images, tr_masks = data["train"]
                _, tr_patch, tr_teacher_space, _, tr_blocks = outputs(enc, tr_split, tr_images, px)[0]
                # The probe reads the model's own patch features (what every model has), and for students with
                # an adaptor also the adaptor's prediction of the teacher's features.
                probes = [("seg_miou", tr_patch, va_patch)]
                if enc.adaptor is not None:
                    probes.append(("seg_miou_adapted", tr_teacher_space, va_teacher_space))
                for j, k in enumerate(enc.blocks):  # the teacher's intermediate blocks
                    probes.append((("seg_miou_blocks", str(k)), tr_blocks[:, j], va_blocks[:, j]))
                for i, (key, train_f, val_f) in enumerate(probes, 1):
                    print(f"evaluate: {name} at {px} px: segmentation probe {i}/{len(probes)} "
                          f"({key if isinstance(key, str) else 'block ' + key[1]}, {p['seg_steps']} steps)", flush=True)
                    probe = train_seg_probe(train_f, tr_masks, classes, p["seg_steps"], seed=p["seed"], ignore=ignore)
                    score = mean_iou(probe, val_f, va_masks, classes, ignore=ignore)
                    target = r[key] if isinstance(key, str) else r.setdefault(key[0], {}).setdefault(key[1], {})
                    target[str(px)] = score
            if name == "teacher":
                teacher_val[s], teacher_summary[s] = va_patch, va_own
            if s in teacher_val and va_teacher_space.shape[-1] == teacher_val[s].shape[-1]:
                cos = torch.nn.functional.cosine_similarity(va_teacher_space.float(), teacher_val[s].float(), dim=-1)
                r["fidelity"][str(px)] = cos.mean().item()
            if enc.adaptor is not None and s in teacher_val:  # each teacher of the adaptors, evaluate.teacher first
                per = r.setdefault("fidelity_per_teacher", {})
                found = {p["teacher"]: (va_sum, va_teacher_space, teacher_summary[s], teacher_val[s], enc.phis)}
                for t, (t_sum, t_patch) in va_others.items():
                    found[t] = (t_sum, t_patch, *other_val(t, s, va_split, va_images), enc.others[t][1])
                for t, (pred_sum, pred_patch, ref_sum, ref_patch, phis) in found.items():
                    figures = teacher_fidelity(pred_sum, pred_patch, ref_sum, ref_patch, phis["summary"])
                    for kind, v in figures.items():
                        per.setdefault(t, {}).setdefault(kind, {})[str(px)] = v
        seconds[name] = round(time.perf_counter() - start, 1)
        results[name] = r
        print(f"evaluate: {name}: {summary_line(r)} ({seconds[name]} s)", flush=True)
    readout = None
    if classifier:
        start = time.perf_counter()
        readout = imagenet_readout(p, root, encoders, extra[classifier], classifier, base, limit,
                                   used["knn"][1] if used["knn"] else splits.val("evaluate (ImageNet readout)"), device)
        seconds["imagenet_readout"] = round(time.perf_counter() - start, 1)
        print(f"evaluate: ImageNet readout: {readout_line(readout)} ({seconds['imagenet_readout']} s)", flush=True)
    metrics = {"resolution": base, "device": device, "splits": {k: list(v) if v else None for k, v in used.items()},
               "knn_k": p["knn_k"], "knn_temperature": p["knn_temperature"], "seg_steps": p["seg_steps"],
               "not_measured": not_measured, "models": results}
    if readout:
        metrics["imagenet_readout"] = readout
    resolution_figure(results, root / FIGURES / "evaluate_resolution.png", p["knn_k"])
    pca_figure(photo, encoders["teacher"], encoders[p["pca_model"]], p["pca_sizes"], root / FIGURES / "pca_maps.png")
    write_timings(root, "evaluate", {"seconds": seconds})
    write_json(root / METRICS, metrics)  # last: the metrics file and the figures are of the same run
    run.log_metrics({**metrics, "seconds": seconds})
    for f in sorted((root / FIGURES).glob("*.png")):
        run.log_artifact(f, "figures")
    return metrics


def summary_line(r: dict) -> str:
    parts = []
    if r["knn_summary"] is not None:
        adapted = f" (adapted {r['knn_summary_adapted']:.3f})" if r["knn_summary_adapted"] is not None else ""
        parts.append(f"kNN summary {r['knn_summary']:.3f}{adapted}, mean-patch {r['knn_mean_patch']:.3f}")
    if r["seg_miou"]:
        parts.append("seg mIoU " + ", ".join(f"{k}px {v:.3f}" for k, v in r["seg_miou"].items()))
    for k, seg_k in r.get("seg_miou_blocks", {}).items():
        parts.append(f"block {k} seg mIoU " + ", ".join(f"{s}px {v:.3f}" for s, v in seg_k.items()))
    parts.append("fidelity " + ", ".join(f"{k}px {v:.3f}" for k, v in r["fidelity"].items()))
    for t, kinds in r.get("fidelity_per_teacher", {}).items():
        parts.append(f"to {t}: patch " + ", ".join(f"{k}px {v:.3f}" for k, v in kinds["patch"].items())
                     + ", summary (PHI-S) " + ", ".join(f"{k}px {v:.3f}" for k, v in kinds["summary_z"].items()))
    return "; ".join(parts)


if __name__ == "__main__":
    run_stage("evaluate", SCHEMA, main)
