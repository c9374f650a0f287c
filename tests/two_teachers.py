"""The two-teacher micro configuration (issue 23): the DINOv2 ViT and the EfficientNet-Lite0 CNN, with which
the Prefect flow's run (conftest.flow_run, conftest.trained) caches, trains and evaluates."""
from __future__ import annotations

from micro import TWO_TEACHERS, write_params


def two_teacher_params(path, **changes):
    """MICRO with both teachers materialized and weighted (cache_teacher.teacher_scale is MICRO's: the CNN
    at 2 x 28 = 56 px, a 2 x 2 grid at stride 32 like the student's 14-px patches at 28 px)."""
    return write_params(path, **{**TWO_TEACHERS, **changes})
