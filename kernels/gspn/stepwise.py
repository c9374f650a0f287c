"""The original GSPN approach, kept only as the benchmark's baseline: one kernel launch per scan step.

Faithful to how the first GSPN release runs: gates are normalized by separate PyTorch ops and expanded to
every channel, each direction is a materialized transposed/flipped copy, and every step of the scan (and
of its reverse for the backward) is its own launch that reads the previous line back from memory.
Arithmetic inside a step is fp32 (fp64 for fp64 inputs); the state between steps is stored in the input dtype.
Gates are normalized by the reference's `normalize_gates` (log space, safe for every finite logit; the
logits the scan never reads are replaced there, so NaN follows the reference's rule). On the meta device
nothing is launched: the outputs only carry shapes.
"""
from __future__ import annotations

import torch

from .reference import expand_groups, from_scan_frame, normalize_gates, over_directions, to_scan_frame
from .triton_scan import _acc_dtype, _alloc, _launches, _next_pow2, tl, triton


@triton.jit
def gspn_step_fwd_kernel(x, g, lam, u, h, y, s, N, L, KEEP,
                         HAS_U: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    """Step s for every (batch, channel) row: x, lam, u, h, y [R, N, L]; g [R, 3, N, L], normalized."""
    i_r = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_L)
    m = p < L
    o = i_r * N * L + s * L + p
    o_g = i_r * 3 * N * L + s * L + p
    link = (p * 0 + KEEP) > 0  # does this step read the previous line?
    left = tl.load(h + o - L - 1, mask=m & link & (p >= 1), other=0.0).to(ACC)
    centre = tl.load(h + o - L, mask=m & link, other=0.0).to(ACC)
    right = tl.load(h + o - L + 1, mask=m & link & (p + 1 < L), other=0.0).to(ACC)
    g0 = tl.load(g + o_g, mask=m, other=0.0).to(ACC)
    g1 = tl.load(g + o_g + N * L, mask=m, other=0.0).to(ACC)
    g2 = tl.load(g + o_g + 2 * N * L, mask=m, other=0.0).to(ACC)
    b_x = tl.load(x + o, mask=m, other=0.0).to(ACC)
    b_l = tl.load(lam + o, mask=m, other=0.0).to(ACC)
    b_h = g0 * left + g1 * centre + g2 * right + b_l * b_x
    tl.store(h + o, b_h.to(h.dtype.element_ty), mask=m)
    if HAS_U:
        b_h = b_h * tl.load(u + o, mask=m, other=0.0).to(ACC)
    tl.store(y + o, b_h.to(y.dtype.element_ty), mask=m)


@triton.jit
def gspn_step_bwd_kernel(
    x, g, lam, u, h, dy, dh, dx, dg, dlam, du, s, N, L, KEEP, KEEP_NEXT,
    HAS_U: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr,
):
    """Reverse step s: dh[s] = u*dy[s] + P[s+1]^T dh[s+1]; then every per-channel gradient of step s."""
    i_r = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_L)
    m = p < L
    o = i_r * N * L + s * L + p
    o_g = i_r * 3 * N * L + s * L + p
    nxt = (p * 0 + KEEP_NEXT) > 0
    q0 = tl.load(g + o_g + L + 1, mask=m & nxt & (p + 1 < L), other=0.0).to(ACC)
    q0 *= tl.load(dh + o + L + 1, mask=m & nxt & (p + 1 < L), other=0.0).to(ACC)
    q1 = tl.load(g + o_g + N * L + L, mask=m & nxt, other=0.0).to(ACC)
    q1 *= tl.load(dh + o + L, mask=m & nxt, other=0.0).to(ACC)
    q2 = tl.load(g + o_g + 2 * N * L + L - 1, mask=m & nxt & (p >= 1), other=0.0).to(ACC)
    q2 *= tl.load(dh + o + L - 1, mask=m & nxt & (p >= 1), other=0.0).to(ACC)
    b_dy = tl.load(dy + o, mask=m, other=0.0).to(ACC)
    b_dh = q0 + q1 + q2
    if HAS_U:
        b_dh += b_dy * tl.load(u + o, mask=m, other=0.0).to(ACC)
        tl.store(du + o, (b_dy * tl.load(h + o, mask=m, other=0.0).to(ACC)).to(du.dtype.element_ty), mask=m)
    else:
        b_dh += b_dy
    tl.store(dh + o, b_dh.to(dh.dtype.element_ty), mask=m)
    tl.store(dx + o, (b_dh * tl.load(lam + o, mask=m, other=0.0).to(ACC)).to(dx.dtype.element_ty), mask=m)
    tl.store(dlam + o, (b_dh * tl.load(x + o, mask=m, other=0.0).to(ACC)).to(dlam.dtype.element_ty), mask=m)
    link = (p * 0 + KEEP) > 0
    h_left = tl.load(h + o - L - 1, mask=m & link & (p >= 1), other=0.0).to(ACC)
    h_centre = tl.load(h + o - L, mask=m & link, other=0.0).to(ACC)
    h_right = tl.load(h + o - L + 1, mask=m & link & (p + 1 < L), other=0.0).to(ACC)
    tl.store(dg + o_g, (b_dh * h_left).to(dg.dtype.element_ty), mask=m)
    tl.store(dg + o_g + N * L, (b_dh * h_centre).to(dg.dtype.element_ty), mask=m)
    tl.store(dg + o_g + 2 * N * L, (b_dh * h_right).to(dg.dtype.element_ty), mask=m)


def _links(s: int, chunk: int | None) -> int:
    """1 when step s reads the previous line, 0 at the first line of the scan or of a chunk."""
    return int(s > 0 and (chunk is None or s % chunk != 0))


class StepwiseScan(torch.autograd.Function):
    """x, lam, u: [B, C, N, L]; g: [B, C, 3, N, L] normalized weights, all contiguous, in the scan frame."""

    @staticmethod
    def forward(ctx, x, g, lam, u, chunk):
        B, C, N, L = x.shape
        h = _alloc(x.shape, x.dtype, x.device)
        y = h if u is None else _alloc(x.shape, x.dtype, x.device)
        for s in range(N if _launches(x) else 0):
            gspn_step_fwd_kernel[(B * C,)](
                x, g, lam, u if u is not None else lam, h, y, s, N, L, _links(s, chunk),
                HAS_U=u is not None, BLOCK_L=_next_pow2(L), ACC=_acc_dtype(x.dtype),
            )
        ctx.save_for_backward(x, g, lam, u, h)
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, lam, u, h = ctx.saved_tensors
        dy = dy.contiguous()
        B, C, N, L = x.shape
        dh, dx, dlam = (_alloc(x.shape, x.dtype, x.device) for _ in range(3))
        du = _alloc(x.shape, x.dtype, x.device) if u is not None else None
        dg = _alloc(g.shape, g.dtype, x.device)
        for s in reversed(range(N if _launches(x) else 0)):
            gspn_step_bwd_kernel[(B * C,)](
                x, g, lam, u if u is not None else lam, h, dy, dh, dx, dg, dlam, du if du is not None else dlam,
                s, N, L, _links(s, ctx.chunk), int(s + 1 < N and _links(s + 1, ctx.chunk)),
                HAS_U=u is not None, BLOCK_L=_next_pow2(L), ACC=_acc_dtype(x.dtype),
            )
        return dx, dg, dlam, du, None


def gspn_scan_stepwise(x, gates, lam, u=None, direction: str = "tb", chunk=None) -> torch.Tensor:
    """Same contract as the reference: x [B, C, H, W], gates [B, G, 3, H, W], lam/u [B, G', H, W] -> [B, C, H, W]."""
    C = x.shape[1]

    def frame(t):
        return to_scan_frame(expand_groups(t, C), direction).contiguous()

    g = normalize_gates(frame(gates), chunk).contiguous()
    y = StepwiseScan.apply(frame(x), g, frame(lam), None if u is None else frame(u), chunk)
    return from_scan_frame(y, direction)


def gspn_scan_4dir_stepwise(x, gates, lam, u=None, chunk=None) -> torch.Tensor:
    """Four directions, one after another: gates [B, 4, G, 3, H, W], lam/u [B, 4, G', H, W] -> [B, 4, C, H, W]."""
    return over_directions(gspn_scan_stepwise, x, gates, lam, u, chunk=chunk)
