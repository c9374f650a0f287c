"""The two-teacher micro configuration (issue 23): the DINOv2 ViT and the EfficientNet-Lite0 CNN. conftest's
`two_teachers_cached` and `two_teachers_stage2` build it once per session for every test file that needs it."""
from __future__ import annotations

from micro import write_params

VIT, CNN = "dinov2_vits14_imgfocus", "efficientnet_lite0"
BOTH = {VIT: 1.0, CNN: 1.0}
FAST = {"workers": 1, "steps": 3, "checkpoint_every": 3, "val_count": 4}  # one Ray Train worker, a few steps


def two_teacher_params(path, **changes):
    """MICRO with both teachers materialized and weighted (cache_teacher.teacher_scale is MICRO's: the CNN
    at 2 x 28 = 56 px, a 2 x 2 grid at stride 32 like the student's 14-px patches at 28 px)."""
    return write_params(path, teacher__names=[VIT, CNN], distill_stage2__teacher_weights=BOTH,
                        highres__teacher_weights=BOTH, **changes)
