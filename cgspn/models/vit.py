"""A ViT in the DINOv2 layout: the teacher (with converted weights) and the isomorphic baseline.

Parameter names follow DINOv2 (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.norm1`,
`.attn.qkv`, `.attn.proj`, `.ls1.gamma`, `.norm2`, `.mlp.fc1`, `.mlp.fc2`, `.ls2.gamma`, `norm`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cgspn.models.attention import Attention
from cgspn.models.layers import LayerScale, Mlp, PatchEmbed, check_image_size


@dataclass
class ViTConfig:
    patch_size: int = 14
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_hidden: int = 1536
    pos_grid: int = 37  # side of the learned position grid (37 x 37 for DINOv2 at 518 px)
    layer_scale: float | None = 1e-5  # init of the layer scales; None: no layer scale
    norm_eps: float = 1e-6
    in_chans: int = 3


@dataclass
class ViTOutput:
    patch_tokens: torch.Tensor  # (B, h, w, D) after the final norm
    summary: torch.Tensor  # (B, D) the CLS token after the final norm
    block_inputs: list[torch.Tensor] = field(default_factory=list)  # per block (B, 1+h*w, D): norm1(x), token 0 = CLS
    mixer_outputs: list[torch.Tensor] = field(default_factory=list)  # per block (B, 1+h*w, D): attention output
    layer_tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # block k -> (B, h, w, D), final norm applied


class Block(nn.Module):
    """Pre-norm transformer block with layer scale; `mixer` is attention here, GSPN in the student."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_hidden: int, layer_scale: float | None, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = mixer
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim, layer_scale)

    def forward(self, x: torch.Tensor, record: list | None = None, **mixer_kwargs) -> torch.Tensor:
        y = self.norm1(x)
        m = self.attn(y, **mixer_kwargs)
        if record is not None:
            record.append((y, m))
        x = x + self.ls1(m)
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """images [B, 3, H, W] (sides multiples of the patch size) -> ViTOutput."""

    def __init__(self, cfg: ViTConfig = ViTConfig()):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embed = PatchEmbed(cfg.patch_size, D, cfg.in_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, D))
        self.blocks = nn.ModuleList(
            Block(D, Attention(D, cfg.heads), cfg.mlp_hidden, cfg.layer_scale, cfg.norm_eps) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, 1+h*w, D): the learned grid resized bicubically to h x w (as DINOv2 does for other sizes)."""
        n = self.cfg.pos_grid
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (h, w) == (n, n):
            return self.pos_embed
        grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)  # no antialias, as DINOv2
        return torch.cat([cls, grid.to(cls.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def forward(self, images: torch.Tensor, return_blocks: bool = False, layers: Sequence[int] = ()) -> ViTOutput:
        """`layers`: blocks (0-based) whose output patch tokens to return too, through the final norm."""
        check_image_size(images, self.cfg.patch_size, type(self).__name__)
        bad = [k for k in layers if not 0 <= k < len(self.blocks)]
        if bad:
            raise ValueError(f"layers: block indices {bad} out of range 0..{len(self.blocks) - 1}")
        x, (h, w) = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding(h, w)
        record = [] if return_blocks else None
        layer_tokens = {}
        for k, block in enumerate(self.blocks):
            x = block(x, record)
            if k in layers:
                layer_tokens[k] = self.norm(x[:, 1:]).reshape(x.shape[0], h, w, -1)
        x = self.norm(x)
        out = ViTOutput(patch_tokens=x[:, 1:].reshape(x.shape[0], h, w, -1), summary=x[:, 0], layer_tokens=layer_tokens)
        if record:
            out.block_inputs = [y for y, _ in record]
            out.mixer_outputs = [m for _, m in record]
        return out


def isomorphic_vit(cfg: ViTConfig = ViTConfig()) -> ViT:
    """The attention baseline for benchmarks: the teacher's architecture, randomly initialized."""
    model = ViT(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2 and "pos_embed" not in name:
            nn.init.trunc_normal_(p, std=0.02)
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


