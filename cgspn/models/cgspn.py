"""The C-GSPN student: the teacher's block structure with each attention replaced by a GSPN mixer.

No positional embedding and no CLS token: it runs at any size whose sides are multiples of the patch size,
with no interpolation. The image-level summary comes from a head over the patch grid. Parameter names match
the teacher's (`patch_embed.proj`, `blocks.{i}.norm1/ls1/norm2/mlp/ls2`, `norm`) so that `init_from_teacher`
copies those one to one; `blocks.{i}.attn` is the GSPN mixer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from cgspn.models.gspn_mixer import GSPNMixer, GSPNMixerConfig
from cgspn.models.layers import Mlp, PatchEmbed, check_image_size
from cgspn.models.vit import Block, ViTConfig, ViTOutput


@dataclass
class CGSPNConfig:
    patch_size: int = 14
    dim: int = 384
    depth: int = 12
    mlp_hidden: int = 1536
    layer_scale: float | None = 1e-5
    norm_eps: float = 1e-6
    in_chans: int = 3
    mixer: GSPNMixerConfig = field(default_factory=GSPNMixerConfig)
    summary_hidden: int = 1536  # hidden width of the summary head's MLP


class SummaryHead(nn.Module):
    """patch tokens [B, h, w, D] -> summary [B, D]: mean pooling, LayerNorm, MLP."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        pooled = patch_tokens.mean(dim=(1, 2))  # (B, D)
        return pooled + self.mlp(self.norm(pooled))


class CGSPN(nn.Module):
    """images [B, 3, H, W] (sides multiples of the patch size) -> ViTOutput (patch_tokens, summary, ...).

    With `return_blocks`, `block_inputs[i]` / `mixer_outputs[i]` are [B, h*w, D]: the normalized input to
    block i's mixer and the mixer's output (patch tokens only; the teacher's also hold its CLS token first).
    """

    def __init__(self, cfg: CGSPNConfig = CGSPNConfig()):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embed = PatchEmbed(cfg.patch_size, D, cfg.in_chans)
        self.blocks = nn.ModuleList(
            Block(D, GSPNMixer(D, cfg.mixer), cfg.mlp_hidden, cfg.layer_scale, cfg.norm_eps) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.summary_head = SummaryHead(D, cfg.summary_hidden, cfg.norm_eps)
        for name, p in self.named_parameters():
            if p.dim() == 2 and ".attn." not in name:
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, images: torch.Tensor, return_blocks: bool = False) -> ViTOutput:
        check_image_size(images, self.cfg.patch_size, type(self).__name__)
        x, (h, w) = self.patch_embed(images)  # (B, h*w, D)
        record = [] if return_blocks else None
        for block in self.blocks:
            x = block(x, record, hw=(h, w))
        patch_tokens = self.norm(x).reshape(x.shape[0], h, w, -1)
        out = ViTOutput(patch_tokens=patch_tokens, summary=self.summary_head(patch_tokens))
        if record:
            out.block_inputs = [y for y, _ in record]
            out.mixer_outputs = [m for _, m in record]
        return out

    def mixer_forward(self, index: int, normalized_tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Block `index`'s mixer alone on given normalized patch tokens [B, h*w, D] (stage-1 distillation)."""
        return self.blocks[index].attn(normalized_tokens, hw=hw)


def cgspn_from_teacher_config(vit_cfg: ViTConfig, **overrides) -> CGSPN:
    """The student isomorphic to a teacher: same patch size, width, depth, MLP, norms, layer scale."""
    shared = {f.name: getattr(vit_cfg, f.name) for f in fields(CGSPNConfig) if hasattr(vit_cfg, f.name)}
    unknown = set(overrides) - {f.name for f in fields(CGSPNConfig)}
    if unknown:
        raise ValueError(f"cgspn_from_teacher_config: unknown CGSPNConfig fields {sorted(unknown)}")
    return CGSPN(CGSPNConfig(**{**shared, **overrides}))


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict:
    """Copy every teacher tensor whose name and shape match into the student.

    Returns {"copied": student names copied, "fresh": student names left as initialized,
    "skipped": teacher names with no match (attention, CLS token, position grid)}.
    """
    source = teacher.state_dict()
    target = student.state_dict()
    copied = [k for k, v in target.items() if k in source and source[k].shape == v.shape]
    with torch.no_grad():
        for k in copied:
            target[k].copy_(source[k])
    return {
        "copied": copied,
        "fresh": [k for k in target if k not in copied],
        "skipped": [k for k in source if k not in set(copied)],
    }


def describe_init(report: dict) -> str:
    """One line per category, e.g. 'copied 146 tensors (patch_embed, blocks.*.norm1, ...)'."""
    def groups(names):
        parts = [["*" if p.isdigit() else p for p in n.split(".")] for n in names]
        short = sorted({".".join(p[:-1]) if len(p) > 1 else p[0] for p in parts})
        return ", ".join(short)

    return "\n".join(f"{key} {len(report[key])} tensors: {groups(report[key])}" for key in ("copied", "fresh", "skipped"))
