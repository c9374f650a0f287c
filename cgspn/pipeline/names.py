"""The one place that names the pipeline's stages, the models evaluate compares, the environment variable
that ties a stage's MLflow run to the flow's parent run, and the training metric keys.

Training metrics are keyed `<teacher>/<figure>` (per teacher of the objective; `teacher_key`), with
`/<side>` appended for the high-resolution figures (`at_side`); figures with no teacher are bare names
(`loss`, `lr`, stage 1's `block<k>`). Validation metrics go to MLflow under `val/<key>`.
Writers build keys with these functions and readers take them apart with `split_key`, so a key's shape is
written down once.
"""
from __future__ import annotations

STAGES = ("shard", "teacher", "cache_teacher", "distill_stage1", "distill_stage2", "highres", "evaluate",
          "benchmark", "report")
# Lists what is at shard.path for DVC on every repro, before shard (dvc.yaml); not among STAGES: it always runs,
# writes the same listing while the data stays the same, and logs no MLflow run.
LISTING_STAGE = "data_listing"
TRAINING_STAGES = ("distill_stage1", "distill_stage2", "highres")
EVAL_MODELS = ("teacher", "random", *TRAINING_STAGES)  # the models evaluate can compare, in this order
PARENT_RUN_ENV = "CGSPN_PARENT_RUN_ID"  # set by the flow, read by every stage's MLflow run

# per-teacher figures of the adapted objective (training parts and validation fidelity)
PATCH_COSINE = "patch_cosine"  # adapted patch features against the teacher's, de-standardized
PATCH_COSINE_RAW = "patch_cosine_raw"  # the student's own patch tokens against the teacher's (same width)
SUMMARY_COSINE = "summary_cosine"
SUMMARY_COSINE_Z = "summary_cosine_z"  # the summary in the teacher's PHI-S space


def teacher_key(teacher: str, figure: str) -> str:
    """A per-teacher metric key: `dinov2_vits14_imgfocus/patch_cosine`."""
    return f"{teacher}/{figure}"


def at_side(key: str, side: int | str) -> str:
    """A high-resolution figure's key: `<key>/<side>px` (side as an int, or already `224px`)."""
    return f"{key}/{side}" if str(side).endswith("px") else f"{key}/{side}px"


def split_key(key: str) -> tuple[str | None, str, str | None]:
    """`teacher/figure[/side]` -> (teacher, figure, side); a bare figure -> (None, figure, None)."""
    parts = key.split("/")
    if len(parts) == 1:
        return None, parts[0], None
    return parts[0], parts[1], (parts[2] if len(parts) > 2 else None)


def teachers_in(keys) -> list[str]:
    """The teachers named by per-teacher keys, in first-seen order."""
    return list(dict.fromkeys(t for t, _, _ in map(split_key, keys) if t is not None))
