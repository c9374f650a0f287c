"""Plain-PyTorch GSPN line scan: the oracle every other backend is tested against.

Everything here works in the *scan frame*: a direction's flip/transpose of the grid is undone into
`[..., N, L]`, where dim -2 holds the N scan steps in scan order and dim -1 the L positions of a line
(position p's neighbours on the previous line are p-1, p, p+1). This file may materialize those copies;
the Triton kernels reach the same elements by index arithmetic instead.

Gate normalization (`normalize_gates`) is done in log space, so that it is finite and accurate for every
finite logit, in every dtype. NaN follows IEEE arithmetic through the recurrence as written: a NaN input
makes NaN every output (and gradient) whose formula reads it, directly or through the state; inputs the
scan never reads (the logits of an absent neighbour, and every gate logit of a line that has no previous
line: the first line of the scan or of a chunk) change nothing, whatever their value, and get gradient 0.
Every backend follows the same rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DIRECTIONS = ("tb", "bt", "lr", "rl")


def to_scan_frame(t: torch.Tensor, direction: str) -> torch.Tensor:
    """`[..., H, W]` -> `[..., N, L]` with steps in scan order on dim -2."""
    if direction in ("lr", "rl"):
        t = t.transpose(-1, -2)
    if direction in ("bt", "rl"):
        t = t.flip(-2)
    return t


def from_scan_frame(t: torch.Tensor, direction: str) -> torch.Tensor:
    """Inverse of `to_scan_frame`: `[..., N, L]` -> `[..., H, W]` in the original pixel positions."""
    if direction in ("bt", "rl"):
        t = t.flip(-2)
    if direction in ("lr", "rl"):
        t = t.transpose(-1, -2)
    return t


def links(n: int, chunk: int | None, device=None) -> torch.Tensor:
    """[n] bools: does scan step s read the previous line? False at s = 0 and at every multiple of `chunk`."""
    s = torch.arange(n, device=device)
    return s > 0 if chunk is None else s % chunk != 0


def normalize_gates(a: torch.Tensor, chunk: int | None = None, reverse: bool = False) -> torch.Tensor:
    """Gate logits `a: [..., 3, N, L]` (scan frame) -> propagation weights of the same shape.

    `g_k = sigmoid(a_k) / sum of sigmoid(a_k')` over the neighbours k' that exist: there is no k=0
    (p-1) neighbour at p = 0 and no k=2 (p+1) neighbour at p = L-1, so every row is stochastic.

    Computed in log space, as the softmax of logsigmoid(a) over the existing neighbours (the same weights),
    which subtracts the largest log before exponentiating: finite and accurate for every finite logit in
    every dtype, forward and backward (sigmoid itself underflows to 0 below about -90 in float32 and -745 in
    float64, and the plain ratio was 0/0 there).

    Logits the scan never reads (absent neighbours; every line that has no previous line, see `links`, for
    this `chunk`) are replaced by 0 first, so that they change nothing, NaN included, and get gradient 0.
    With `reverse`, dim -2 holds the steps in reverse scan order (`scan_lines(..., reverse=True)`).
    """
    N, L = a.shape[-2:]
    p = torch.arange(L, device=a.device)
    exists = torch.stack([p > 0, torch.ones_like(p, dtype=torch.bool), p < L - 1])[:, None, :]  # (3, 1, L)
    linked = links(N, chunk, a.device)
    read = exists & (linked.flip(0) if reverse else linked)[:, None]  # (3, N, L)
    log_s = F.logsigmoid(torch.where(read, a, 0.0)).masked_fill(~exists, float("-inf"))
    return torch.softmax(log_s, dim=-3)


def expand_groups(t: torch.Tensor, channels: int, dim: int = 1) -> torch.Tensor:
    """Repeat a grouped tensor along `dim` so that channel c reads group `c // (channels // G)`."""
    return t.repeat_interleave(channels // t.shape[dim], dim=dim)


def scan_lines(x: torch.Tensor, g: torch.Tensor, lam: torch.Tensor, chunk: int | None,
               reverse: bool = False) -> torch.Tensor:
    """The recurrence in the scan frame, one line at a time (with `reverse`, dim -2 is walked from the last
    line to the first: the bottom-up and right-to-left scans without flipped copies).

    x, lam: [..., N, L]; g: [..., 3, N, L] normalized weights, broadcastable against x (a group's weights
    shared by its channels); returns h: [..., N, L] with
    `h[s] = g0*h[s-1][p-1] + g1*h[s-1][p] + g2*h[s-1][p+1] + lam*x`, restarting (h[s-1] = 0) at s = 0
    and at every multiple of `chunk`.
    """
    N = x.shape[-2]
    h = torch.zeros_like(x[..., 0, :])
    lines = []
    for step in range(N):
        s = N - 1 - step if reverse else step
        if chunk is not None and step % chunk == 0:
            h = torch.zeros_like(h)
        left = F.pad(h[..., :-1], (1, 0))  # h[s-1][p-1], 0 at p = 0
        right = F.pad(h[..., 1:], (0, 1))  # h[s-1][p+1], 0 at p = L-1
        h = g[..., 0, s, :] * left + g[..., 1, s, :] * h + g[..., 2, s, :] * right + lam[..., s, :] * x[..., s, :]
        lines.append(h)
    return torch.stack(lines[::-1] if reverse else lines, dim=-2)


def gspn_scan_reference(
    x: torch.Tensor,
    gates: torch.Tensor,
    lam: torch.Tensor,
    u: torch.Tensor | None = None,
    direction: str = "tb",
    chunk: int | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """One-direction GSPN scan, differentiable by autograd.

    x: [B, C, H, W]; gates: [B, G, 3, H, W] logits; lam, u: [B, G', H, W] (u=None means 1).
    Returns y: [B, C, H, W] in x's dtype. With `upcast`, float16/bfloat16 inputs are computed in float32;
    without it the whole scan runs in the input precision (the low-precision baseline of the tests).
    """
    B, C = x.shape[:2]
    G = gates.shape[1]
    dtype = x.dtype
    work = torch.float32 if upcast and dtype in (torch.float16, torch.bfloat16) else dtype

    # Lines as rows (a transposed view for lr/rl); bt and rl walk the rows backwards instead of flipping copies.
    reverse = direction in ("bt", "rl")

    def rows(t):
        return t.transpose(-1, -2) if direction in ("lr", "rl") else t

    def per_group(t):  # [B, G', H, W] -> [B, G, C/G, N, L] (G' = C: a view, no copy)
        return rows(expand_groups(t.to(work), C)).unflatten(1, (G, C // G))

    # Gates are normalized per group and shared by the group's channels by broadcasting: the same weights
    # as normalizing a per-channel copy, without C/G copies of the gates.
    g = normalize_gates(rows(gates.to(work)), chunk, reverse).unsqueeze(2)  # [B, G, 1, 3, N, L]
    h = scan_lines(rows(x.to(work)).unflatten(1, (G, C // G)), g, per_group(lam), chunk, reverse)
    y = h if u is None else h * per_group(u)
    return rows(y.flatten(1, 2)).to(dtype)


def over_directions(scan, x, gates, lam, u=None, **kwargs) -> torch.Tensor:
    """Run a one-direction `scan(x, gates, lam, u, direction=..., **kwargs)` for tb, bt, lr, rl and stack.

    gates [B, 4, G, 3, H, W], lam/u [B, 4, G', H, W] -> [B, 4, C, H, W].
    """
    outs = [
        scan(x, gates[:, d], lam[:, d], None if u is None else u[:, d], direction=direction, **kwargs)
        for d, direction in enumerate(DIRECTIONS)
    ]
    return torch.stack(outs, dim=1)


def gspn_scan_4dir_reference(x, gates, lam, u=None, chunk=None, upcast=True) -> torch.Tensor:
    """Four directions (tb, bt, lr, rl): gates [B, 4, G, 3, H, W], lam/u [B, 4, G', H, W] -> [B, 4, C, H, W]."""
    return over_directions(gspn_scan_reference, x, gates, lam, u, chunk=chunk, upcast=upcast)
