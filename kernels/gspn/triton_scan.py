"""Fused GSPN line scan in Triton: one launch for every step (and for all four directions).

Layout of the work. A program owns one line of the scan (all L positions) for a block of channels, for
one batch element and one direction, and walks the N steps in order, keeping the state `h` of the
previous line in fp32 registers. The two neighbours `h[p-1]`, `h[p+1]` cross threads, so each step also
writes the line to a small per-program scratch buffer (two slots, ping-pong, one barrier per step) that
stays in L1/L2. Directions are index arithmetic (a runtime direction id picks which axis is the line and
whether steps run backwards). In place, a column line (lr, rl) has stride W; so by default the kernels read
copies in the LINES layout, where every direction's lines are contiguous (column planes transposed).

Channel blocks are chosen so that every block lies inside one group of each grouped tensor (gates, lam,
u). A grouped tensor is then loaded once per step as one `[1, L]` line and broadcast over the block's
channels ("compact multi-channel propagation"), and its gradient is reduced over the block in registers.
When a group is larger than a block, each block writes its share to its own fp32 slice and the slices are
summed afterwards: deterministic, no atomics.

Gate normalization is fused both ways (`_gate_weights`) and done in log space, so that it is finite and
exact for every finite logit; NaN follows the reference's rule (kernels/gspn/reference.py): IEEE arithmetic
through the recurrence, and the logits the scan never reads (absent neighbours, every gate of a line that
starts the scan or a chunk) are never used (`tl.where`, not a multiplication by 0) and get gradient 0.

The backward needs `h` of every line. It is saved by the forward in the storage dtype: when `u` is None
`h` is the output itself (no extra memory); otherwise the forward writes one more `[B, ndir, C, H, W]`
tensor (only when a gradient is needed).

On the meta device the launchers run as everywhere else but launch nothing: shapes and dtypes only, forward
and backward (what the fake implementation of the packed custom op, `packed_op`, declares for torch.compile).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from kernels import TRITON_IMPORTED_EARLY  # sets TRITON_INTERPRET=1 on CPU-only machines

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Launch tuning; kernels/NOTES.md has the measurements behind these values, kernels/tune.py sweeps them.
# At most this many elements in one program's [BLOCK_C, BLOCK_L] tile.
MAX_TILE_ELEMENTS = 1024
# On a GPU, channel blocks are made small enough for this many programs per multiprocessor (0: largest blocks).
PROGRAMS_PER_SM = 4
# Load the next step's inputs before this step's neighbour exchange, so that their latency overlaps it.
PREFETCH = True
# Read the column directions (lr, rl) from LINES-layout copies with their planes transposed: a column line
# read in place has stride W, so every element costs a memory sector of its own; the copies cost one
# coalesced pass over the inputs and outputs instead.
TRANSPOSE_COLUMNS = True
# `chunk=None` is passed as a chunk longer than any scan, so that only step 0 starts from h = 0.
NO_CHUNK = 1 << 30
# Tests set this to NaN so that any element a kernel fails to write shows up.
POISON_FILL: float | None = None


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_FILL is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, POISON_FILL, dtype=dtype, device=device)


@triton.jit
def _line_offsets(c0, c, mask_c, CPG, s_row, p, s_pos, mask_p, SHARED: tl.constexpr):
    """Offsets and mask of one line of a grouped tensor: [1, BLOCK_L] if shared by the block, else per channel."""
    if SHARED:
        off = (c0 // CPG).to(tl.int64) * s_row + p[None, :].to(tl.int64) * s_pos
        m = mask_p[None, :]
    else:
        off = (c // CPG).to(tl.int64)[:, None] * s_row + p[None, :].to(tl.int64) * s_pos
        m = mask_c[:, None] & mask_p[None, :]
    return off, m


@triton.jit
def _sigmoid_scaled(a, c):
    """sigmoid(a) exp(-c) = exp(min(a, 0) - c) / (1 + exp(-|a|)): no overflow when min(a, 0) <= c, and with
    c = 0 the sigmoid itself, accurate for every a. NaN for a NaN `a` (through exp(-|a|))."""
    return tl.exp(tl.minimum(a, 0.0) - c) / (1.0 + tl.exp(-tl.abs(a)))


@triton.jit
def _sigmoid_neg(a):
    """sigmoid(-a) = 1 - sigmoid(a) without the cancellation: exp(-max(a, 0)) / (1 + exp(-|a|)); NaN for NaN."""
    t = tl.exp(-tl.abs(a))
    return tl.where(a >= 0, t, 1.0) / (1.0 + t)


@triton.jit
def _gate_weights(a0, a1, a2, p, L):
    """Fused stability-context normalization: logits -> weights (g0, g1, g2), g_k = sigmoid(a_k) / S over the
    existing neighbours (g0 = 0 at p = 0, g2 = 0 at p = L-1), i.e. the softmax of logsigmoid(a) over them.

    As that softmax subtracts the largest log, each sigmoid is scaled by exp(-c), c = min(largest existing
    logit, 0), which cancels in g_k and puts the largest term in [1/2, 1]: accurate for every finite logit
    (plain sigmoids underflow below about -90 in float32, and S = 0 gave 0/0).
    An absent neighbour's logit is never used, whatever its value (NaN included); a NaN logit that is used
    makes the whole row NaN.
    """
    a0 = tl.where(p > 0, a0, a1)  # an absent neighbour copies the centre: the max is that of the existing ones
    a2 = tl.where(p < L - 1, a2, a1)
    c = tl.minimum(tl.maximum(tl.maximum(a0, a1, propagate_nan=tl.PropagateNan.ALL), a2,
                              propagate_nan=tl.PropagateNan.ALL), 0.0)
    e0 = tl.where(p > 0, _sigmoid_scaled(a0, c), 0.0)
    e1 = _sigmoid_scaled(a1, c)
    e2 = tl.where(p < L - 1, _sigmoid_scaled(a2, c), 0.0)
    inv = 1.0 / (e0 + e1 + e2)
    return e0 * inv, e1 * inv, e2 * inv


@triton.jit
def _scan_geometry(d, H, W):
    """Direction id (0 tb, 1 bt, 2 lr, 3 rl) -> (is_col, rev, N steps, L positions)."""
    is_col = (d >= 2).to(tl.int32)
    rev = d % 2
    N = H + is_col * (W - H)
    L = W + is_col * (H - W)
    return is_col, rev, N, L


@triton.jit
def _strides(is_col, s_h, s_w, L, LINES: tl.constexpr):
    """(step stride, position stride) of a tensor for this direction. In the LINES layout every plane holds
    its direction's lines contiguously (the column directions' planes transposed): (L, 1) for all."""
    if LINES:
        return L, 1
    return s_h + is_col * (s_w - s_h), s_w + is_col * (s_h - s_w)


@triton.jit
def _step_row(s, rev, N):
    """Row (or column) of the grid that step s visits: s, or N-1-s for the reversed directions."""
    return (s + rev * (N - 1 - 2 * s)).to(tl.int64)


@triton.jit
def _fwd_inputs(p_a, p_x, p_l, p_u, t, as_t, xs_t, ls_t, us_t, sak, m_a, mask, m_l, m_u,
                HAS_U: tl.constexpr, ACC: tl.constexpr, LAM_LOGITS: tl.constexpr):
    """The forward's loads for grid row t: three gate logits, x, lam (the sigmoid of the loaded logits with
    LAM_LOGITS) and u (x again when there is no u)."""
    a0 = tl.load(p_a + t * as_t, mask=m_a, other=0.0).to(ACC)
    a1 = tl.load(p_a + t * as_t + sak, mask=m_a, other=0.0).to(ACC)
    a2 = tl.load(p_a + t * as_t + 2 * sak, mask=m_a, other=0.0).to(ACC)
    b_x = tl.load(p_x + t * xs_t, mask=mask, other=0.0).to(ACC)
    b_l = tl.load(p_l + t * ls_t, mask=m_l, other=0.0).to(ACC)
    if LAM_LOGITS:
        b_l = _sigmoid_scaled(b_l, 0.0)
    b_u = b_x
    if HAS_U:
        b_u = tl.load(p_u + t * us_t, mask=m_u, other=0.0).to(ACC)
    return a0, a1, a2, b_x, b_l, b_u


@triton.jit
def gspn_fwd_kernel(
    x, a, lam, u, y, h_out, scratch,
    H, W, CB, CHUNK, DIR_BASE, CPG_A, CPG_L, CPG_U,
    sxd, sxb, sxc, sxh, sxw,
    sab, sad, sag, sak, sah, saw,
    slb, sld, slg, slh, slw,
    sub, sud, sug, suh, suw,
    syb, syd, syc, syh, syw,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    SHARED_A: tl.constexpr, SHARED_L: tl.constexpr, SHARED_U: tl.constexpr,
    HAS_U: tl.constexpr, STORE_H: tl.constexpr, ACC: tl.constexpr, PREFETCH: tl.constexpr, LINES: tl.constexpr,
    LAM_LOGITS: tl.constexpr,
):
    i_cb, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    is_col, rev, N, L = _scan_geometry(DIR_BASE + i_d, H, W)

    c0 = i_cb * CB
    o_c = tl.arange(0, BLOCK_C)
    c = c0 + o_c
    mask_c = o_c < CB
    p = tl.arange(0, BLOCK_L)
    mask_p = p < L
    mask = mask_c[:, None] & mask_p[None, :]

    # Per-tensor line offsets (without the step) and step strides.
    xs_t, xs_p = _strides(is_col, sxh, sxw, L, LINES)
    p_x = x + ((DIR_BASE + i_d) // 2).to(tl.int64) * sxd + i_b.to(tl.int64) * sxb + c.to(tl.int64)[:, None] * sxc
    p_x += p[None, :].to(tl.int64) * xs_p
    as_t, as_p = _strides(is_col, sah, saw, L, LINES)
    o_a, m_a = _line_offsets(c0, c, mask_c, CPG_A, sag, p, as_p, mask_p, SHARED_A)
    p_a = a + i_b.to(tl.int64) * sab + i_d.to(tl.int64) * sad + o_a
    ls_t, ls_p = _strides(is_col, slh, slw, L, LINES)
    o_l, m_l = _line_offsets(c0, c, mask_c, CPG_L, slg, p, ls_p, mask_p, SHARED_L)
    p_l = lam + i_b.to(tl.int64) * slb + i_d.to(tl.int64) * sld + o_l
    if HAS_U:
        us_t, us_p = _strides(is_col, suh, suw, L, LINES)
        o_u, m_u = _line_offsets(c0, c, mask_c, CPG_U, sug, p, us_p, mask_p, SHARED_U)
        p_u = u + i_b.to(tl.int64) * sub + i_d.to(tl.int64) * sud + o_u
    else:  # placeholders, never loaded
        p_u, us_t, m_u = p_x, xs_t, mask
    ys_t, ys_p = _strides(is_col, syh, syw, L, LINES)
    o_y = i_b.to(tl.int64) * syb + i_d.to(tl.int64) * syd + c.to(tl.int64)[:, None] * syc
    o_y += p[None, :].to(tl.int64) * ys_p

    # Two scratch slots of [BLOCK_C, BLOCK_L] per program for the neighbour exchange.
    pid = (i_b * tl.num_programs(1) + i_d) * tl.num_programs(0) + i_cb
    p_s = scratch + pid.to(tl.int64) * (2 * BLOCK_C * BLOCK_L) + o_c[:, None] * BLOCK_L + p[None, :]
    m_left = mask & (p[None, :] >= 1)
    m_right = mask & (p[None, :] + 1 < L)

    h = tl.zeros([BLOCK_C, BLOCK_L], ACC)
    if PREFETCH:  # inputs of step 0, loaded before the loop; each step then loads the next step's
        n_a0, n_a1, n_a2, n_x, n_l, n_u = _fwd_inputs(
            p_a, p_x, p_l, p_u, _step_row(0, rev, N), as_t, xs_t, ls_t, us_t, sak, m_a, mask, m_l, m_u, HAS_U, ACC,
            LAM_LOGITS)
    for s in range(0, N):
        t = _step_row(s, rev, N)  # row (or column) of the grid that step s writes
        if PREFETCH:
            a0, a1, a2, b_x, b_l, b_u = n_a0, n_a1, n_a2, n_x, n_l, n_u
            # Issued before this step's neighbour exchange, so their latency overlaps it (the last step
            # reloads its own row rather than read past the end).
            n_a0, n_a1, n_a2, n_x, n_l, n_u = _fwd_inputs(
                p_a, p_x, p_l, p_u, _step_row(tl.minimum(s + 1, N - 1), rev, N), as_t, xs_t, ls_t, us_t, sak,
                m_a, mask, m_l, m_u, HAS_U, ACC, LAM_LOGITS)
        else:
            a0, a1, a2, b_x, b_l, b_u = _fwd_inputs(
                p_a, p_x, p_l, p_u, t, as_t, xs_t, ls_t, us_t, sak, m_a, mask, m_l, m_u, HAS_U, ACC, LAM_LOGITS)
        prev = p_s + ((s + 1) % 2) * (BLOCK_C * BLOCK_L)
        left = tl.load(prev - 1, mask=m_left, other=0.0, volatile=True)
        right = tl.load(prev + 1, mask=m_right, other=0.0, volatile=True)
        g0, g1, g2 = _gate_weights(a0, a1, a2, p[None, :], L)

        keep = (s % CHUNK) != 0  # the first line of a chunk starts from h = 0 (and reads no gate)
        h = tl.where(keep, g0 * left + g1 * h + g2 * right, 0.0) + b_l * b_x
        h = tl.where(mask, h, 0.0)
        b_y = h
        if HAS_U:
            b_y = h * b_u
        tl.store(y + o_y + t * ys_t, b_y.to(y.dtype.element_ty), mask=mask)
        if STORE_H:
            tl.store(h_out + o_y + t * ys_t, h.to(h_out.dtype.element_ty), mask=mask)
        tl.store(p_s + (s % 2) * (BLOCK_C * BLOCK_L), h)
        tl.debug_barrier()


@triton.jit
def _bwd_inputs(s, rev, N, p_dy, p_u, p_x, p_l, p_a, h_in, o_y, dys_t, us_t, xs_t, ls_t, as_t, ys_t, ys_p, sak,
                mask, m_u, m_l, m_a, m_left, m_right, pp, HAS_U: tl.constexpr, ACC: tl.constexpr):
    """The backward's loads for step s: dy, u (dy again when there is no u), x, lam, the state of step s-1
    at p, p-1 and p+1 (zero for step 0), and the three gate logits."""
    t = _step_row(s, rev, N)
    b_dy = tl.load(p_dy + t * dys_t, mask=mask, other=0.0).to(ACC)
    b_u = b_dy
    if HAS_U:
        b_u = tl.load(p_u + t * us_t, mask=m_u, other=0.0).to(ACC)
    b_x = tl.load(p_x + t * xs_t, mask=mask, other=0.0).to(ACC)
    b_l = tl.load(p_l + t * ls_t, mask=m_l, other=0.0).to(ACC)
    has_prev = (pp * 0 + s) >= 1  # [1, BLOCK_L]: a tensor mask, which the interpreter needs
    p_hp = h_in + o_y + _step_row(s - 1, rev, N) * ys_t
    h_prev = tl.load(p_hp, mask=mask & has_prev, other=0.0).to(ACC)
    h_left = tl.load(p_hp - ys_p, mask=m_left & has_prev, other=0.0).to(ACC)
    h_right = tl.load(p_hp + ys_p, mask=m_right & has_prev, other=0.0).to(ACC)
    a0 = tl.load(p_a + t * as_t, mask=m_a, other=0.0).to(ACC)
    a1 = tl.load(p_a + t * as_t + sak, mask=m_a, other=0.0).to(ACC)
    a2 = tl.load(p_a + t * as_t + 2 * sak, mask=m_a, other=0.0).to(ACC)
    return b_dy, b_u, b_x, b_l, h_prev, h_left, h_right, a0, a1, a2


@triton.jit
def gspn_bwd_kernel(
    x, a, lam, u, h_in, dy, scratch, dx, da, dlam, du,
    H, W, CB, CHUNK, DIR_BASE, CPG_A, CPG_L, CPG_U,
    sxd, sxb, sxc, sxh, sxw,
    sab, sad, sag, sak, sah, saw,
    slb, sld, slg, slh, slw,
    sub, sud, sug, suh, suw,
    syb, syd, syc, syh, syw,
    sdyb, sdyd, sdyc, sdyh, sdyw,
    sdas, sdab, sdad, sdag, sdak, sdah, sdaw,
    sdls, sdlb, sdld, sdlg, sdlh, sdlw,
    sdus, sdub, sdud, sdug, sduh, sduw,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    SHARED_A: tl.constexpr, SHARED_L: tl.constexpr, SHARED_U: tl.constexpr,
    HAS_U: tl.constexpr, ACC: tl.constexpr, PREFETCH: tl.constexpr, LINES: tl.constexpr,
    LAM_LOGITS: tl.constexpr,
):
    """Reverse scan of the adjoint: dh_s = u*dy_s + P_{s+1}^T dh_{s+1}, from the last step to the first.

    h_in, dx: [B, ndir, C, H, W] (strides sy*); da/dlam/du: [NBLK, B, ndir, G, (3,) H, W] where a block
    whose group spans several blocks writes its own slice NBLK-index `(c0 % CPG) // CB`.
    """
    i_cb, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    is_col, rev, N, L = _scan_geometry(DIR_BASE + i_d, H, W)

    c0 = i_cb * CB
    o_c = tl.arange(0, BLOCK_C)
    c = c0 + o_c
    mask_c = o_c < CB
    p = tl.arange(0, BLOCK_L)
    mask_p = p < L
    mask = mask_c[:, None] & mask_p[None, :]
    pp = p[None, :]

    xs_t, xs_p = _strides(is_col, sxh, sxw, L, LINES)
    p_x = x + ((DIR_BASE + i_d) // 2).to(tl.int64) * sxd + i_b.to(tl.int64) * sxb + c.to(tl.int64)[:, None] * sxc
    p_x += pp.to(tl.int64) * xs_p
    as_t, as_p = _strides(is_col, sah, saw, L, LINES)
    o_a, m_a = _line_offsets(c0, c, mask_c, CPG_A, sag, p, as_p, mask_p, SHARED_A)
    p_a = a + i_b.to(tl.int64) * sab + i_d.to(tl.int64) * sad + o_a
    ls_t, ls_p = _strides(is_col, slh, slw, L, LINES)
    o_l, m_l = _line_offsets(c0, c, mask_c, CPG_L, slg, p, ls_p, mask_p, SHARED_L)
    p_l = lam + i_b.to(tl.int64) * slb + i_d.to(tl.int64) * sld + o_l
    ys_t, ys_p = _strides(is_col, syh, syw, L, LINES)
    o_y = i_b.to(tl.int64) * syb + i_d.to(tl.int64) * syd + c.to(tl.int64)[:, None] * syc + pp.to(tl.int64) * ys_p
    dys_t, dys_p = _strides(is_col, sdyh, sdyw, L, LINES)
    p_dy = dy + i_b.to(tl.int64) * sdyb + i_d.to(tl.int64) * sdyd + c.to(tl.int64)[:, None] * sdyc
    p_dy += pp.to(tl.int64) * dys_p

    # Gradient slices of the grouped tensors.
    das_t, das_p = _strides(is_col, sdah, sdaw, L, LINES)
    o_da, _ = _line_offsets(c0, c, mask_c, CPG_A, sdag, p, das_p, mask_p, SHARED_A)
    p_da = da + ((c0 % CPG_A) // CB).to(tl.int64) * sdas + i_b.to(tl.int64) * sdab + i_d.to(tl.int64) * sdad + o_da
    dls_t, dls_p = _strides(is_col, sdlh, sdlw, L, LINES)
    o_dl, _ = _line_offsets(c0, c, mask_c, CPG_L, sdlg, p, dls_p, mask_p, SHARED_L)
    p_dl = dlam + ((c0 % CPG_L) // CB).to(tl.int64) * sdls + i_b.to(tl.int64) * sdlb + i_d.to(tl.int64) * sdld + o_dl
    if HAS_U:
        us_t, us_p = _strides(is_col, suh, suw, L, LINES)
        o_u, m_u = _line_offsets(c0, c, mask_c, CPG_U, sug, p, us_p, mask_p, SHARED_U)
        p_u = u + i_b.to(tl.int64) * sub + i_d.to(tl.int64) * sud + o_u
        dus_t, dus_p = _strides(is_col, sduh, sduw, L, LINES)
        o_du, _ = _line_offsets(c0, c, mask_c, CPG_U, sdug, p, dus_p, mask_p, SHARED_U)
        p_du = du + ((c0 % CPG_U) // CB).to(tl.int64) * sdus + i_b.to(tl.int64) * sdub + i_d.to(tl.int64) * sdud + o_du
    else:  # placeholders, never loaded
        p_u, us_t, m_u = p_x, xs_t, mask

    # Scratch: two slots, each holding q0 = g0*dh and q2 = g2*dh of the step scanned just before.
    pid = (i_b * tl.num_programs(1) + i_d) * tl.num_programs(0) + i_cb
    TILE: tl.constexpr = BLOCK_C * BLOCK_L
    p_s = scratch + pid.to(tl.int64) * (4 * TILE) + o_c[:, None] * BLOCK_L + pp
    m_left = mask & (pp >= 1)
    m_right = mask & (pp + 1 < L)

    q1 = tl.zeros([BLOCK_C, BLOCK_L], ACC)
    t_last = _step_row(N - 1, rev, N)
    h_cur = tl.load(h_in + o_y + t_last * ys_t, mask=mask, other=0.0).to(ACC)  # h of the current step
    if PREFETCH:  # inputs of the last step, loaded before the loop; each step then loads the one before it
        n_dy, n_u, n_x, n_l, n_hp, n_hl, n_hr, n_a0, n_a1, n_a2 = _bwd_inputs(
            N - 1, rev, N, p_dy, p_u, p_x, p_l, p_a, h_in, o_y, dys_t, us_t, xs_t, ls_t, as_t, ys_t, ys_p, sak,
            mask, m_u, m_l, m_a, m_left, m_right, pp, HAS_U, ACC)
    for k in range(0, N):
        s = N - 1 - k
        t = _step_row(s, rev, N)
        keep_next = (k > 0) & (((s + 1) % CHUNK) != 0)  # does P_{s+1} link step s to step s+1?
        keep = (s % CHUNK) != 0  # does P_s link step s to step s-1?
        if PREFETCH:
            b_dy, b_u, b_x, b_l, h_prev, h_left, h_right, a0, a1, a2 = (
                n_dy, n_u, n_x, n_l, n_hp, n_hl, n_hr, n_a0, n_a1, n_a2)
            n_dy, n_u, n_x, n_l, n_hp, n_hl, n_hr, n_a0, n_a1, n_a2 = _bwd_inputs(
                tl.maximum(s - 1, 0), rev, N, p_dy, p_u, p_x, p_l, p_a, h_in, o_y, dys_t, us_t, xs_t, ls_t, as_t,
                ys_t, ys_p, sak, mask, m_u, m_l, m_a, m_left, m_right, pp, HAS_U, ACC)
        else:
            b_dy, b_u, b_x, b_l, h_prev, h_left, h_right, a0, a1, a2 = _bwd_inputs(
                s, rev, N, p_dy, p_u, p_x, p_l, p_a, h_in, o_y, dys_t, us_t, xs_t, ls_t, as_t, ys_t, ys_p, sak,
                mask, m_u, m_l, m_a, m_left, m_right, pp, HAS_U, ACC)

        slot = p_s + ((k + 1) % 2) * (2 * TILE)
        q0_right = tl.load(slot + 1, mask=m_right, other=0.0, volatile=True)  # g0[s+1, p+1] dh[s+1, p+1]
        q2_left = tl.load(slot + TILE - 1, mask=m_left, other=0.0, volatile=True)  # g2[s+1, p-1] dh[s+1, p-1]
        if HAS_U:
            dh = b_u * b_dy
            b_du = h_cur * b_dy
            if SHARED_U:
                b_du = tl.sum(b_du, axis=0, keep_dims=True)
            tl.store(p_du + t * dus_t, b_du.to(du.dtype.element_ty), mask=m_u)
        else:
            dh = b_dy
        dh += tl.where(keep_next, q0_right + q1 + q2_left, 0.0)
        dh = tl.where(mask, dh, 0.0)

        b_dl = b_x * dh
        if LAM_LOGITS:  # b_l holds logits: lam = sigmoid(b_l), d lam / d b_l = sigmoid(b_l) sigmoid(-b_l)
            b_dl = b_dl * _sigmoid_neg(b_l)
            b_l = _sigmoid_scaled(b_l, 0.0)
            b_dl = b_dl * b_l
        tl.store(dx + o_y + t * ys_t, (b_l * dh).to(dx.dtype.element_ty), mask=mask)
        if SHARED_L:
            b_dl = tl.sum(b_dl, axis=0, keep_dims=True)
        tl.store(p_dl + t * dls_t, b_dl.to(dlam.dtype.element_ty), mask=m_l)

        dg0 = tl.where(keep, dh * h_left, 0.0)
        dg1 = tl.where(keep, dh * h_prev, 0.0)
        dg2 = tl.where(keep, dh * h_right, 0.0)
        if SHARED_A:
            dg0 = tl.sum(dg0, axis=0, keep_dims=True)
            dg1 = tl.sum(dg1, axis=0, keep_dims=True)
            dg2 = tl.sum(dg2, axis=0, keep_dims=True)

        g0, g1, g2 = _gate_weights(a0, a1, a2, pp, L)
        # da_k = g_k sigmoid(-a_k) (dg_k - sum_k' g_k' dg_k'), which is sigmoid'(a_k) / S (...) with no division
        # by a small S; 0 for a logit the scan does not read (absent neighbour, first line of a chunk). Each
        # sigmoid(-a_k) is recomputed here rather than kept from `_gate_weights`: fewer live registers.
        centre = g0 * dg0 + g1 * dg1 + g2 * dg2
        da0 = tl.where(keep & (pp > 0), g0 * _sigmoid_neg(a0) * (dg0 - centre), 0.0)
        da1 = tl.where(keep, g1 * _sigmoid_neg(a1) * (dg1 - centre), 0.0)
        da2 = tl.where(keep & (pp < L - 1), g2 * _sigmoid_neg(a2) * (dg2 - centre), 0.0)
        p_dat = p_da + t * das_t
        tl.store(p_dat, da0.to(da.dtype.element_ty), mask=m_a)
        tl.store(p_dat + sdak, da1.to(da.dtype.element_ty), mask=m_a)
        tl.store(p_dat + 2 * sdak, da2.to(da.dtype.element_ty), mask=m_a)

        # Hand g_k(s) * dh_s to step s-1: q1 stays in registers, q0 and q2 cross threads via scratch.
        q1 = g1 * dh
        out = p_s + (k % 2) * (2 * TILE)
        tl.store(out, g0 * dh)
        tl.store(out + TILE, g2 * dh)
        tl.debug_barrier()
        h_cur = h_prev


# ---------------------------------------------------------------- launchers


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _channel_block(C: int, cpgs: list[int], block_l: int, lines: int, min_programs: int) -> int:
    """Channels per program: a divisor of every group size > 1 (so a block never straddles a group), and
    the largest such divisor that still gives `min_programs` programs over the `lines` (batch x directions)
    when one does, else the smallest. Large blocks share grouped loads; small ones fill the GPU when the
    batch is small (each program walks its steps one after the other, so idle multiprocessors are lost)."""
    shared = [g for g in cpgs if g > 1]
    limit = math.gcd(*shared) if shared else C
    cap = max(1, MAX_TILE_ELEMENTS // block_l)
    divisors = [d for d in range(1, min(limit, cap) + 1) if limit % d == 0]
    enough = [d for d in divisors if (C // d) * lines >= min_programs]
    return max(enough) if enough else min(divisors)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _min_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return PROGRAMS_PER_SM * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def num_warps_for(tile_elements: int) -> int:
    """8 warps for tiles of 1024+ elements: at 4 the backward hits 255 registers and spills to the stack
    (compile report for sm_90, kernels/NOTES.md); at 8 it needs 155-182 and no stack."""
    return 8 if tile_elements >= 1024 else 4


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _Plan:
    """Launch geometry shared by the forward and backward of one call."""

    def __init__(self, x, a, lam, u, dir_base: int, ndir: int):
        B, C, H, W = x.shape
        self.B, self.C, self.H, self.W, self.ndir, self.dir_base = B, C, H, W, ndir, dir_base
        rows, cols = dir_base + ndir <= 2, dir_base >= 2  # only row (tb, bt) or only column (lr, rl) directions
        L = W if rows else H if cols else max(H, W)
        self.block_l = _next_pow2(L)
        self.cpg = [C // a.shape[2], C // lam.shape[2], C // (u.shape[2] if u is not None else C)]
        self.cb = _channel_block(C, self.cpg, self.block_l, ndir * B, _min_programs(x.device))
        self.block_c = _next_pow2(self.cb)
        self.shared = [g > 1 for g in self.cpg]
        self.grid = (C // self.cb, ndir, B)
        self.programs = (C // self.cb) * ndir * B
        self.acc = _acc_dtype(x.dtype)
        self.scratch_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    def n_slices(self, i: int) -> int:
        """How many blocks share one group of grouped tensor i (0 gates, 1 lam, 2 u)."""
        return self.cpg[i] // self.cb if self.shared[i] else 1

    def common_args(self, x, a, lam, u, chunk: int | None, sxd: int):
        uu = u if u is not None else lam  # placeholder pointer, never read when HAS_U is False
        return (
            self.H, self.W, self.cb, chunk or NO_CHUNK, self.dir_base, self.cpg[0], self.cpg[1], self.cpg[2],
            sxd, *x.stride(), *a.stride(), *lam.stride(), *uu.stride(),
        )

    def meta(self, has_u: bool, lines: bool, lam_logits: bool) -> dict:
        return dict(
            BLOCK_C=self.block_c, BLOCK_L=self.block_l, SHARED_A=self.shared[0], SHARED_L=self.shared[1],
            SHARED_U=self.shared[2], HAS_U=has_u, ACC=self.acc, PREFETCH=PREFETCH, LINES=lines,
            LAM_LOGITS=lam_logits, num_warps=num_warps_for(self.block_c * self.block_l),
        )


def _launches(x: torch.Tensor) -> bool:
    """Should a launcher run its kernels on x's device? False on the meta device (shapes only); raises for
    CPU tensors when Triton is not in interpreter mode."""
    if x.device.type == "meta":
        return False
    if x.device.type == "cpu" and (TRITON_IMPORTED_EARLY or not INTERPRETED):
        raise RuntimeError(
            "the triton GSPN backend got CPU tensors but Triton is not in interpreter mode: set "
            "TRITON_INTERPRET=1 in the environment before Python starts (or before anything imports triton), "
            "or use backend='reference'"
        )
    return True


def gspn_fwd(x, a, lam, u, dir_base: int, ndir: int, chunk: int | None, store_h: bool, sxd: int = 0,
             lines: bool = False, lam_logits: bool = False):
    """x: [B, C, H, W]; a: [B, ndir, G, 3, H, W]; lam, u: [B, ndir, G', H, W] (u may be None).

    Returns (y, h): y [B, ndir, C, H, W]; h the saved state for the backward (y itself when u is None,
    a separate tensor when `store_h`, else None). With `lines`, every tensor is in the LINES layout
    (`_to_lines`) and x is the first of a pair whose second (`sxd` elements on) is x transposed, which the
    column directions read. With `lam_logits`, lam holds logits and the kernel applies the sigmoid.
    """
    plan = _Plan(x, a, lam, u, dir_base, ndir)
    B, C, H, W = x.shape
    y = _alloc((B, ndir, C, H, W), x.dtype, x.device)
    h = _alloc((B, ndir, C, H, W), x.dtype, x.device) if (store_h and u is not None) else None
    scratch = _alloc((plan.programs * 2 * plan.block_c * plan.block_l,), plan.scratch_dtype, x.device)
    args = plan.common_args(x, a, lam, u, chunk, sxd)
    if _launches(x):
        gspn_fwd_kernel[plan.grid](
            x, a, lam, u if u is not None else lam, y, h if h is not None else y, scratch,
            *args, *y.stride(),
            STORE_H=h is not None, **plan.meta(u is not None, lines, lam_logits),
        )
    return y, (y if u is None else h)


def gspn_bwd(x, a, lam, u, h, dy, dir_base: int, ndir: int, chunk: int | None, sxd: int = 0, lines: bool = False,
             lam_logits: bool = False, into=None):
    """Gradients of `gspn_fwd` for dy [B, ndir, C, H, W], in the layout the kernels read (LINES when `lines`).

    Returns (dx_dirs, da, dlam, du): dx_dirs [B, ndir, C, H, W] is each direction's share of dx (float32 when
    ndir > 1, for the caller to sum); the others are shaped like a, lam, u (du None when u is None). `into`:
    optional tensors (da, dlam, du) shaped like a, lam, u that receive the gradients and are returned.
    """
    plan = _Plan(x, a, lam, u, dir_base, ndir)
    B, C, H, W = x.shape
    dev = x.device
    f32 = plan.scratch_dtype
    dx_dirs = _alloc((B, ndir, C, H, W), x.dtype if ndir == 1 else f32, dev)
    outs = into if into is not None else [None if t is None else _alloc(t.shape, t.dtype, dev) for t in (a, lam, u)]

    def grad_buffer(i, out):
        """Where the kernel writes gradient i: the output itself, or one float32 slice per block sharing a group."""
        n = plan.n_slices(i)
        return out.unsqueeze(0) if n == 1 else _alloc((n, *out.shape), f32, dev)

    da, dlam = grad_buffer(0, outs[0]), grad_buffer(1, outs[1])
    du = grad_buffer(2, outs[2]) if u is not None else dlam  # placeholder when HAS_U is False
    scratch = _alloc((plan.programs * 4 * plan.block_c * plan.block_l,), f32, dev)
    args = plan.common_args(x, a, lam, u, chunk, sxd)
    if _launches(x):
        gspn_bwd_kernel[plan.grid](
            x, a, lam, u if u is not None else lam, h, dy, scratch, dx_dirs, da, dlam, du,
            *args, *h.stride(), *dy.stride(), *da.stride(), *dlam.stride(), *du.stride(),
            **plan.meta(u is not None, lines, lam_logits),
        )
    for buf, out in zip((da, dlam, du if u is not None else None), outs):
        if buf is not None and buf.shape[0] > 1:
            out.copy_(buf.sum(0))
    return dx_dirs, *outs


# ---------------------------------------------------------------- the LINES layout
# Each [.., H, W] plane of a direction holds that direction's lines contiguously: rows as they are for tb and
# bt, the transposed plane ([.., W, H] in memory) for lr and rl. Every line read is then coalesced, and all
# four directions still run in one launch.


def _planes_transposed(t: torch.Tensor) -> torch.Tensor:
    """The memory of [.., H, W] planes (each contiguous) seen as [.., W, H]; a view, never a copy."""
    return t.view(*t.shape[:-2], t.shape[-1], t.shape[-2])


def _first_column(dir_base: int) -> int:
    """Index along the direction axis where the column directions (ids 2, 3) start."""
    return max(0, 2 - dir_base)


def _to_lines(t: torch.Tensor | None, dir_base: int) -> torch.Tensor | None:
    """[B, ndir, .., H, W] for directions dir_base.. -> a contiguous copy in the LINES layout."""
    if t is None:
        return None
    k = _first_column(dir_base)
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out[:, :k].copy_(t[:, :k])
    _planes_transposed(out[:, k:]).copy_(t[:, k:].transpose(-1, -2))
    return out


def _from_lines(t: torch.Tensor, dir_base: int) -> torch.Tensor:
    """Inverse of `_to_lines`: [B, ndir, .., H, W] in the LINES layout -> the ordinary layout."""
    k = _first_column(dir_base)
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out[:, :k].copy_(t[:, :k])
    out[:, k:].copy_(_planes_transposed(t[:, k:]).transpose(-1, -2))
    return out


def _x_pair(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] -> [2, B, C, H, W]: x, then its transposed planes (what lr and rl read)."""
    out = torch.empty((2, *x.shape), dtype=x.dtype, device=x.device)
    out[0].copy_(x)
    _planes_transposed(out[1]).copy_(x.transpose(-1, -2))
    return out


class GSPNFunction(torch.autograd.Function):
    """Autograd around the fused kernels. Inputs carry a direction axis (size ndir) after the batch.
    With `lines`, the kernels work on LINES-layout copies."""

    @staticmethod
    def forward(ctx, x, a, lam, u, dir_base: int, ndir: int, chunk, needs_grad: bool, lines: bool = False):
        sxd = 0
        if lines:
            pair = _x_pair(x)
            x, sxd = pair[0], pair.stride(0)
            a, lam, u = (_to_lines(t, dir_base) for t in (a, lam, u))
        y, h = gspn_fwd(x, a, lam, u, dir_base, ndir, chunk, store_h=needs_grad, sxd=sxd, lines=lines)
        ctx.save_for_backward(pair if lines else x, a, lam, u, h)
        ctx.geometry = (dir_base, ndir, chunk, sxd, lines)
        return _from_lines(y, dir_base) if lines else y

    @staticmethod
    def backward(ctx, dy):
        x, a, lam, u, h = ctx.saved_tensors
        dir_base, lines = ctx.geometry[0], ctx.geometry[-1]
        if lines:
            x, dy = x[0], _to_lines(dy, dir_base)
        dx_dirs, *grads = gspn_bwd(x, a, lam, u, h, dy, *ctx.geometry)
        if lines:
            dx_dirs, grads = _from_lines(dx_dirs, dir_base), [_from_lines(g, dir_base) if g is not None else None
                                                              for g in grads]
        dx = (dx_dirs[:, 0] if dx_dirs.shape[1] == 1 else dx_dirs.sum(1)).to(x.dtype)
        return dx, *grads, None, None, None, None, None


def _needs_grad(*tensors) -> bool:
    """Will autograd call the backward? (Decided outside the Function, where grad mode is still visible.)"""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _scan(x, a, lam, u, dir_base: int, ndir: int, chunk) -> torch.Tensor:
    """Directions dir_base .. dir_base+ndir-1 (inputs with a direction axis of size ndir) -> [B, ndir, C, H, W],
    in one launch; on LINES-layout copies when some are column directions and TRANSPOSE_COLUMNS is set."""
    lines = TRANSPOSE_COLUMNS and dir_base + ndir > 2
    return GSPNFunction.apply(x, a, lam, u, dir_base, ndir, chunk, _needs_grad(x, a, lam, u), lines)


def gspn_scan_triton(x, gates, lam, u=None, direction_id: int = 0, chunk=None):
    """One direction: gates [B, G, 3, H, W], lam/u [B, G', H, W] -> y [B, C, H, W]."""
    add_dir = lambda t: None if t is None else t.unsqueeze(1)  # noqa: E731
    return _scan(x, add_dir(gates), add_dir(lam), add_dir(u), direction_id, 1, chunk)[:, 0]


def gspn_scan_4dir_triton(x, gates, lam, u=None, chunk=None):
    """All four directions in one launch: gates [B, 4, G, 3, H, W], lam/u [B, 4, G', H, W] -> [B, 4, C, H, W]."""
    return _scan(x, gates, lam, u, 0, 4, chunk)
