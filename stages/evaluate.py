"""Stage `evaluate`: how good each model's features are, against the teacher.

Models: the teacher, a randomly initialized student, and the distill_stage1, distill_stage2 and highres
students. For each: kNN top-1 on the Fashion-MNIST `val` garments against the `train` garments (the model's summary
vector, the adaptor's summary where there is one, and mean-pooled patch features), a linear segmentation probe (BatchNorm + 1x1 conv, trained on
`mosaic_train[_x<s>]`, mIoU on `mosaic_val[_x<s>]`) at 1x, 2x and 4x the training resolution, fidelity
to the teacher (mean cosine of the adapted patch features) at those sizes, and parameter counts. The
teacher's features at the cache's resolution are read from the feature cache (float16), not recomputed. The
teacher's intermediate blocks in `teacher_blocks` (the students' block targets) get the segmentation probe
too, so that a student's figure can be read against every target it learned from. Writes
reports/metrics/evaluate.json, reports/figures/evaluate_resolution.png and reports/figures/pca_maps.png.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from cgspn.data.memory import ShardSubset
from cgspn.data.shards import decode_mask, iter_samples, split_shards
from cgspn.distill import to_batch
from cgspn.evaluation import knn_top1, mean_iou, train_seg_probe
from cgspn.figures import pca_figure, resolution_figure
from cgspn.models.cgspn import cgspn_from_teacher_config
from cgspn.models.vit import parameter_count
from cgspn.errors import ParamError
from cgspn.outputs import write_json
from cgspn.params import Param
from cgspn.phis import PhiS, load_teacher_phis
from cgspn.stage import run_stage
from cgspn.stage_inputs import SHARDS, TEACHERS, feature_dir, teacher_entry
from cgspn.students import load_adaptors, load_student
from cgspn.teachers import load_vit

SCHEMA = {
    "teacher": Param(str),
    "models": Param(list, item=str, choices=("teacher", "random", "distill_stage1", "distill_stage2", "highres")),
    "knn_bank_split": Param(str),  # memory bank
    "knn_query_split": Param(str),
    "knn_k": Param(int, min=1),
    "knn_temperature": Param(float, min=1e-6),
    "seg_scales": Param(list, item=int, min=1),
    "seg_steps": Param(int, min=1),  # optimizer steps of each segmentation probe
    "teacher_blocks": Param(list, item=int, min=0),  # teacher blocks to probe too (the block targets)
    "pca_photo": Param(str),
    "pca_sizes": Param(list, item=int, min=14),
    "pca_model": Param(str),
    "batch_size": Param(int, min=1),
    "threads": Param(int, min=1),
    "seed": Param(int, min=0),
}
METRICS = Path("reports/metrics/evaluate.json")
FIGURES = Path("reports/figures")


class Encoder:
    """One model under evaluation: images -> (summary [B, D], patch features [B, h, w, D], features in the
    teacher's space [B, h, w, D_t] for fidelity, the model's own summary [B, D], the patch tokens of
    `blocks` [B, K, h, w, D] from the same forward pass (the teacher's intermediate blocks; K = 0 for the
    others)). Students with adaptors map into the teacher's space through them (PHI-S de-standardized);
    the others are compared as they are."""

    def __init__(self, name: str, model, adaptor=None, phis: dict[str, PhiS] | None = None,
                 blocks: list[int] = ()):
        self.name, self.model, self.adaptor, self.phis, self.blocks = name, model.eval(), adaptor, phis, list(blocks)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor):
        out = self.model(x, layers=self.blocks) if self.blocks else self.model(x)
        summary, teacher_space = out.summary, out.patch_tokens
        if self.adaptor is not None:
            summary_z, spatial_z = self.adaptor(out.summary, out.patch_tokens)
            summary = self.phis["summary"].from_direction(summary_z)
            teacher_space = self.phis["spatial"].destandardize(spatial_z)
        blocks = (torch.stack([out.layer_tokens[k] for k in self.blocks], 1) if self.blocks
                  else out.patch_tokens.new_zeros(x.shape[0], 0))
        return summary, out.patch_tokens, teacher_space, out.summary, blocks


def load_encoders(p: dict, root: Path) -> dict[str, Encoder]:
    entry = teacher_entry(root, p["teacher"], "evaluate.teacher")
    teacher = load_vit(root / TEACHERS / entry["file"]).eval()
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
            adaptor = None
            if (folder / "adaptors.safetensors").exists():
                adaptor = load_adaptors(folder / "adaptors.safetensors")[p["teacher"]]
            encoders[name] = Encoder(name, student, adaptor, phis)
    return encoders


def encode(encoder: Encoder, images: list[np.ndarray], resolution: int, batch_size: int):
    """All images at `resolution` -> (summary [N, D], patches [N, h, w, D], teacher space [N, h, w, D_t],
    own summary [N, D], block tokens [N, K, h, w, D])."""
    parts = [encoder(to_batch(images[i : i + batch_size], resolution, "cpu")) for i in range(0, len(images), batch_size)]
    return [torch.cat(t) for t in zip(*parts)]


def cached_outputs(root: Path, folder: Path, split: str, blocks: list[int]):
    """The teacher's outputs on `split` read from its feature cache (float16, at the cache's resolution)
    instead of computed again: the same five items as `encode`."""
    names = ("summary", "spatial", *(f"block{k}" for k in blocks))
    f = ShardSubset(root / SHARDS, [split], feature_dirs={"teacher": folder}, feature_names=names)
    f = {n: v.float() for n, v in f.features["teacher"].items()}
    stacked = (torch.stack([f[f"block{k}"] for k in blocks], 1) if blocks
               else f["spatial"].new_zeros(len(f["summary"]), 0))
    return f["summary"], f["spatial"], f["spatial"], f["summary"], stacked


def labels_of(root: Path, split: str) -> torch.Tensor:
    return torch.tensor([int(s["cls"]) for sh in split_shards(root / SHARDS, split) for s in iter_samples(sh)])


def masks_of(root: Path, split: str) -> torch.Tensor:
    return torch.from_numpy(np.stack([decode_mask(s, sh) for sh in split_shards(root / SHARDS, split)
                                      for s in iter_samples(sh)]))


def seg_split(kind: str, scale: int) -> str:
    return f"mosaic_{kind}" if scale == 1 else f"mosaic_{kind}_x{scale}"


def main(p: dict, root: Path, run) -> dict:
    """Evaluate every model."""
    torch.set_num_threads(p["threads"])
    entry = teacher_entry(root, p["teacher"], "evaluate.teacher")
    if p["pca_model"] not in p["models"]:
        raise ParamError(f"evaluate.pca_model={p['pca_model']!r} is not in evaluate.models {p['models']}")
    features = feature_dir(root, entry)
    if not (features / "meta.json").exists():
        raise FileNotFoundError(f"{features / 'meta.json'}: missing (run the cache_teacher stage first)")
    meta = json.loads((features / "meta.json").read_text())
    base = meta["resolution"]
    photo = next((s for sh in split_shards(root / SHARDS, "photos") for s in iter_samples(sh)
                  if s.get("txt", b"").decode() == p["pca_photo"]), None)
    if photo is None:
        raise ParamError(f"evaluate.pca_photo={p['pca_photo']!r}: no such photo in the photos split")
    encoders = load_encoders(p, root)
    depth = len(encoders["teacher"].model.blocks)
    if any(k >= depth for k in p["teacher_blocks"]):
        raise ParamError(f"evaluate.teacher_blocks={p['teacher_blocks']}: the teacher has blocks "
                         f"0..{depth - 1}")
    classes = len(json.loads((root / SHARDS / "dataset.json").read_text())["mask_classes"])
    bank = ShardSubset(root / SHARDS, [p["knn_bank_split"]])
    queries = ShardSubset(root / SHARDS, [p["knn_query_split"]])
    bank_labels, query_labels = labels_of(root, p["knn_bank_split"]), labels_of(root, p["knn_query_split"])
    seg = {s: {kind: (ShardSubset(root / SHARDS, [seg_split(kind, s)]).images, masks_of(root, seg_split(kind, s)))
               for kind in ("train", "val")} for s in p["seg_scales"]}
    results, teacher_val = {}, {}

    def outputs(enc: Encoder, split: str, images: list[np.ndarray], px: int):
        """`encode`, except that the teacher's outputs at the cache's resolution come from the cache."""
        if (enc.name == "teacher" and px == base and split in meta["splits"]
                and set(enc.blocks) <= set(meta.get("layers", []))):
            return cached_outputs(root, features, split, enc.blocks)
        return encode(enc, images, px, p["batch_size"])

    for name, enc in encoders.items():
        start = time.perf_counter()
        r = {"parameters": parameter_count(enc.model)}
        b_sum, b_patch, _, b_own, _ = outputs(enc, p["knn_bank_split"], bank.images, base)
        q_sum, q_patch, _, q_own, _ = outputs(enc, p["knn_query_split"], queries.images, base)
        knn = lambda a, b: knn_top1(a, bank_labels, b, query_labels, p["knn_k"], p["knn_temperature"])  # noqa: E731
        # The model's own summary vector, the one every model has; and, for students with an adaptor, the
        # adaptor's prediction of the teacher's summary.
        r["knn_summary"] = knn(b_own, q_own)
        r["knn_summary_adapted"] = knn(b_sum, q_sum) if enc.adaptor is not None else None
        r["knn_mean_patch"] = knn(b_patch.mean((1, 2)), q_patch.mean((1, 2)))
        r["seg_miou"], r["seg_miou_adapted"], r["fidelity"] = {}, {}, {}
        for s, data in seg.items():
            px = base * s
            _, tr_patch, tr_teacher_space, _, tr_blocks = outputs(enc, seg_split("train", s), data["train"][0], px)
            _, va_patch, va_teacher_space, _, va_blocks = outputs(enc, seg_split("val", s), data["val"][0], px)
            # The probe reads the model's own patch features (what every model has), and for students with
            # an adaptor also the adaptor's prediction of the teacher's features.
            probes = [("seg_miou", tr_patch, va_patch)]
            if enc.adaptor is not None:
                probes.append(("seg_miou_adapted", tr_teacher_space, va_teacher_space))
            for key, train_f, val_f in probes:
                probe = train_seg_probe(train_f, data["train"][1], classes, p["seg_steps"], seed=p["seed"])
                r[key][str(px)] = mean_iou(probe, val_f, data["val"][1], classes)
            for j, k in enumerate(enc.blocks):  # the teacher's intermediate blocks
                probe = train_seg_probe(tr_blocks[:, j], data["train"][1], classes, p["seg_steps"], seed=p["seed"])
                r.setdefault("seg_miou_blocks", {}).setdefault(str(k), {})[str(px)] = mean_iou(
                    probe, va_blocks[:, j], data["val"][1], classes)
            if name == "teacher":
                teacher_val[s] = va_patch
            if s in teacher_val and va_teacher_space.shape[-1] == teacher_val[s].shape[-1]:
                cos = torch.nn.functional.cosine_similarity(va_teacher_space.float(), teacher_val[s].float(), dim=-1)
                r["fidelity"][str(px)] = cos.mean().item()
        r["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = r
        adapted = f" (adapted {r['knn_summary_adapted']:.3f})" if enc.adaptor is not None else ""
        print(f"evaluate: {name}: kNN summary {r['knn_summary']:.3f}{adapted}, mean-patch {r['knn_mean_patch']:.3f}; "
              f"seg mIoU {', '.join(f'{k}px {v:.3f}' for k, v in r['seg_miou'].items())}; "
              f"fidelity {', '.join(f'{k}px {v:.3f}' for k, v in r['fidelity'].items())} ({r['seconds']} s)",
              flush=True)
        for k, seg_k in r.get("seg_miou_blocks", {}).items():
            print(f"evaluate: {name} block {k}: seg mIoU {', '.join(f'{s}px {v:.3f}' for s, v in seg_k.items())}",
                  flush=True)
    metrics = {"resolution": base, "models": results}
    resolution_figure(results, root / FIGURES / "evaluate_resolution.png")
    pca_figure(photo, encoders["teacher"], encoders[p["pca_model"]], p["pca_sizes"],
               root / FIGURES / "pca_maps.png")
    write_json(root / METRICS, metrics)  # last: the metrics file and the figures are of the same run
    run.log_metrics(metrics)
    for f in sorted((root / FIGURES).glob("*.png")):
        run.log_artifact(f, "figures")
    return metrics


if __name__ == "__main__":
    run_stage("evaluate", SCHEMA, main)
