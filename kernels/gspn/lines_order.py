"""The LINES order: each direction's plane flattened so that its scan lines are contiguous.

An [H, W] plane of direction tb or bt is flattened row-major (n = i*W + j); of lr or rl, column-major
(n = j*H + i). A network that computes the scan's inputs with a matmul over tokens can write them in this
order directly (tb and bt from the tokens in row-major order, lr and rl from the tokens in column-major
order), and the fused kernels then read every line with unit stride and no copy (`gspn_scan_4dir_packed`).
"""
from __future__ import annotations

import torch


def to_lines_order(t: torch.Tensor) -> torch.Tensor:
    """[B, 4, ..., H, W] (directions tb, bt, lr, rl) -> [B, 4, ..., H*W] in the LINES order (a copy)."""
    return torch.cat((t[:, :2].flatten(-2), t[:, 2:].transpose(-1, -2).flatten(-2)), dim=1)


def from_lines_order(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `to_lines_order`: [B, 4, ..., H*W] -> [B, 4, ..., H, W]."""
    H, W = hw
    return torch.cat((t[:, :2].unflatten(-1, (H, W)), t[:, 2:].unflatten(-1, (W, H)).transpose(-1, -2)), dim=1)


def row_and_column_major(x: torch.Tensor, extra_rows: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, C, H, W] -> [B, 2, C (+ R), H*W]: x flattened row-major, then column-major (what the heads of tb/bt
    and of lr/rl are computed from), each followed by `extra_rows` [R, H*W] when given."""
    B, C, H, W = x.shape
    parts = [x.flatten(-2), x.transpose(-1, -2).flatten(-2)]
    if extra_rows is not None:
        extra = extra_rows.expand(B, *extra_rows.shape)
        parts = [parts[0], extra, parts[1], extra]
    return torch.cat(parts, dim=1).view(B, 2, -1, H * W)


def unpack_heads(heads: torch.Tensor, groups: tuple[int, int, int]):
    """heads [B, 4, 3G + G' + G'', ...] -> (gate logits [B, 4, G, 3, ...], lam logits [B, 4, G', ...],
    u [B, 4, G'', ...]), views."""
    G, Gl, Gu = groups
    return heads[:, :, : 3 * G].unflatten(2, (G, 3)), heads[:, :, 3 * G : 3 * G + Gl], heads[:, :, 3 * G + Gl :]
