"""Fidelity figures: how close a student's predictions of a teacher's features are to that teacher's own,
the one definition that training's validation and the evaluate stage both report."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cgspn.distill.phis import PhiS
from cgspn.models.adaptors import match_grid


def teacher_fidelity(summary: torch.Tensor, patches: torch.Tensor, teacher_summary: torch.Tensor,
                     teacher_patches: torch.Tensor, summary_phis: PhiS) -> dict[str, float]:
    """How close a student's predictions of one teacher's features are to that teacher's, as mean cosines:
    "patch" over every patch of every image (the teacher's grid [N, h_t, w_t, D] resized to the prediction's
    [N, h, w, D] as in training, `match_grid`), "summary" over the images ([N, D]), and "summary_z", the
    summary in the teacher's PHI-S standardized space (the part that tells images apart; raw summaries share
    a large common component). Predictions are in the teacher's space (de-standardized)."""
    patch = F.cosine_similarity(patches.float(), match_grid(teacher_patches.float(), tuple(patches.shape[1:3])), dim=-1)
    z = [summary_phis.standardize(v.double()) for v in (summary, teacher_summary)]
    return {"patch": patch.mean().item(),
            "summary": F.cosine_similarity(summary.float(), teacher_summary.float(), dim=-1).mean().item(),
            "summary_z": F.cosine_similarity(*z, dim=-1).mean().item()}
