"""Fidelity: how close a student's predictions of a teacher's features are to that teacher's own."""
from __future__ import annotations

import torch.nn.functional as F

from cgspn.distill.fidelity import teacher_fidelity
from cgspn.data.feature_cache import teacher_features_batched
from cgspn.eval.protocol import Context, Protocol, round4
from cgspn.report.markdown import table
from cgspn.teachers.display import teacher_label
from cgspn.teachers.registry import teacher_side


class Fidelity(Protocol):
    """Fidelity to the teacher on the validation images at each of `seg_scales` x the training resolution,
    like for like: `fidelity`, every model's own patch tokens against the teacher's (where the widths agree);
    `fidelity_adapted`, a student's adaptor output against them; `fidelity_per_teacher`, for students with
    adaptors, `teacher_fidelity` to each teacher of their adaptors (that teacher at its own side and
    normalization, its grid resized to the student's)."""

    name = "fidelity"
    title = "fidelity"

    def prepare(self, ctx: Context) -> str | None:
        seg = ctx.used.get("seg")
        self.split = seg[1] if seg else ctx.splits.val("evaluate (fidelity)")
        self.other_targets = {}
        ctx.used[self.name] = self.split
        return None

    def other_reference(self, ctx: Context, t: str, split: str, px: int):
        """Teacher t's (summary, patch features) on the split's images at px x its scale, computed once."""
        if (t, split, px) not in self.other_targets:
            other = ctx.others[t]
            side = teacher_side(px, other.scale)
            images = ctx.store.images(split)
            ctx.say(f"{t} at {side} px: its features on {split} ({len(images)} images, for the per-teacher fidelity)")
            found = teacher_features_batched(other.model, images, side, ctx.p["batch_size"])
            self.other_targets[t, split, px] = found["summary"], found["spatial"]
        return self.other_targets[t, split, px]

    def measure(self, ctx: Context, model: str) -> dict:
        enc = ctx.encoders[model]
        r = {"fidelity": {}, "fidelity_adapted": {}}
        for s in ctx.p["seg_scales"]:
            px, split = ctx.base * s, ctx.splits.at_scale(self.split, s)
            ref = ctx.store.outputs("teacher", split, px)
            out = ctx.store.outputs(model, split, px, others=True)
            if out.patches.shape[-1] == ref.patches.shape[-1]:
                r["fidelity"][str(px)] = round4(F.cosine_similarity(out.patches, ref.patches, dim=-1).mean())
            if enc.adaptor is None:
                continue
            r["fidelity_adapted"][str(px)] = round4(F.cosine_similarity(out.teacher_space, ref.patches, dim=-1).mean())
            per = r.setdefault("fidelity_per_teacher", {})
            found = {ctx.p["teacher"]: (out.summary, out.teacher_space, ref.own_summary, ref.patches, enc.phis)}
            for t, (t_sum, t_patch) in out.others.items():
                found[t] = (t_sum, t_patch, *self.other_reference(ctx, t, split, px), enc.others[t][1])
            for t, (pred_sum, pred_patch, ref_sum, ref_patch, phis) in found.items():
                for kind, v in teacher_fidelity(pred_sum, pred_patch, ref_sum, ref_patch, phis["summary"]).items():
                    per.setdefault(t, {}).setdefault(kind, {})[str(px)] = round4(v)
        return r

    def line(self, r: dict) -> list[str]:
        parts = ["fidelity " + ", ".join(f"{k}px {v:.3f}" for k, v in r.get("fidelity", {}).items())]
        if r.get("fidelity_adapted"):
            parts.append("adapted " + ", ".join(f"{k}px {v:.3f}" for k, v in r["fidelity_adapted"].items()))
        for t, kinds in r.get("fidelity_per_teacher", {}).items():
            parts.append(f"to {t}: patch " + ", ".join(f"{k}px {v:.3f}" for k, v in kinds["patch"].items())
                         + ", summary (PHI-S) " + ", ".join(f"{k}px {v:.3f}" for k, v in kinds["summary_z"].items()))
        return parts

    def report_lines(self, ev: dict, names: dict[str, str]) -> list[str]:
        """The students' fidelity to each teacher of their adaptors (`fidelity_per_teacher`)."""
        models = ev["models"]
        sides = sorted({int(k) for r in models.values() for k in r.get("fidelity", {}) or r.get("fidelity_adapted", {})})
        rows = []
        for name, r in models.items():
            for t, kinds in r.get("fidelity_per_teacher", {}).items():
                rows.append([names.get(name, name), teacher_label(t)]
                            + [" / ".join(f"{kinds[k][str(s)]:.3f}" if str(s) in kinds.get(k, {}) else "-"
                                          for k in ("patch", "summary", "summary_z")) for s in sides])
        if not rows:
            return []
        return ["Fidelity to each teacher: the students' adaptor outputs for that teacher against its own features on "
                "the same images (each teacher at its own input side and normalization, its grid resized to the "
                "student's as in training). Mean cosine of the patch features / of the summary / of the summary in the "
                "teacher's PHI-S standardized space (the part that tells images apart: raw summaries share a large "
                "common component):", "",
                table(["model", "teacher"] + [f"patch / summary / summary PHI-S, {s} px" for s in sides], rows), ""]
