"""Teachers from hubs, for users with a network and the libraries: timm and Hugging Face DINOv2 models."""
from __future__ import annotations

import importlib

from cgspn.models.vit import ViT, ViTConfig
from cgspn.pipeline.errors import MissingLibraryError
from cgspn.teachers.packaged import dinov2_hf_to_ours


def _require(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingLibraryError(f"this teacher needs the package {module!r}, which does not import here "
                                  f"({err}): {install}") from None


def load_timm(model_name: str) -> ViT:
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


def load_hf(repo_id: str) -> ViT:
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
