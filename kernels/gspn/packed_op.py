"""The packed four-direction scan as PyTorch custom operators (`torch.ops.cgspn.*`), with autograd.

An operator with a declared output shape (its "fake" implementation) is one opaque node to torch.compile:
the compiler fuses the PyTorch ops around the scan (GELU, LayerNorm, residual adds, layer scales) and calls
the scan's own Triton kernels as they are, forward and backward. Eager calls go through the same operators.

    scan_4dir_packed(x [B, C, H, W], heads [B, 4, K, H*W], groups, chunk, store_h)
        -> ys [B, 4, C, H*W] (LINES order), pair [2, B, C, H, W] (x and its transposed planes, what the
           column directions read; kept for the backward), h [B, 4, C, H, W] (the state the backward needs;
           empty when not store_h)
    scan_4dir_packed_backward(pair, heads, h, dys [B, 4, C, H*W], groups, chunk) -> dx [B, C, H, W], dheads
"""
from __future__ import annotations

import torch

from .lines_order import unpack_heads
from .triton_scan import _alloc, _needs_grad, _planes_transposed, _x_pair, gspn_bwd, gspn_fwd


def _unpack_heads(heads: torch.Tensor, hw: tuple[int, int], groups) -> tuple[torch.Tensor, ...]:
    """heads [B, 4, K, H*W] -> views (gate logits [B, 4, G, 3, H, W], lam logits, u [B, 4, G', H, W]); each
    plane keeps its LINES order in memory, which the kernels read with LINES strides whatever the shape says."""
    return unpack_heads(heads.unflatten(-1, hw), tuple(groups))


def packed_forward(x: torch.Tensor, heads: torch.Tensor, groups: list[int], chunk: int | None,
                   store_h: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    pair = _x_pair(x)
    a, lam, u = _unpack_heads(heads.contiguous(), (H, W), groups)
    y, h = gspn_fwd(pair[0], a, lam, u, 0, 4, chunk, store_h=store_h, sxd=pair.stride(0), lines=True,
                    lam_logits=True)
    return y.view(B, 4, C, H * W), pair, (h if store_h else x.new_empty(0))


scan_4dir_packed = torch.library.custom_op("cgspn::scan_4dir_packed", packed_forward, mutates_args=())


@scan_4dir_packed.register_fake
def _(x, heads, groups, chunk, store_h):
    B, C, H, W = x.shape
    h = x.new_empty((B, 4, C, H, W)) if store_h else x.new_empty(0)
    return x.new_empty((B, 4, C, H * W)), x.new_empty((2, B, C, H, W)), h


def packed_backward(pair: torch.Tensor, heads: torch.Tensor, h: torch.Tensor, dys: torch.Tensor,
                    groups: list[int], chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = pair.shape[1:]
    heads = heads.contiguous()
    # The heads' gradient is written into one tensor of their shape, part by part (no buffers to stitch).
    dheads = _alloc(heads.shape, heads.dtype, heads.device)
    dx_dirs, *_ = gspn_bwd(
        pair[0], *_unpack_heads(heads, (H, W), groups), h, dys.contiguous().view(B, 4, C, H, W), 0, 4,
        chunk, sxd=pair.stride(0), lines=True, lam_logits=True, into=_unpack_heads(dheads, (H, W), groups),
    )
    dx = dx_dirs[:, 0] + dx_dirs[:, 1] + _planes_transposed(dx_dirs[:, 2] + dx_dirs[:, 3]).transpose(-1, -2)
    return dx.to(pair.dtype), dheads


scan_4dir_packed_backward = torch.library.custom_op("cgspn::scan_4dir_packed_backward", packed_backward,
                                                    mutates_args=())


@scan_4dir_packed_backward.register_fake
def _(pair, heads, h, dys, groups, chunk):
    return pair.new_empty(pair.shape[1:]), torch.empty_like(heads, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, heads, groups, chunk, store_h = inputs
    _, pair, h = output
    ctx.mark_non_differentiable(pair, h)
    ctx.set_materialize_grads(False)  # else autograd fills gradients of zeros for pair and h (57 MB at 2048 px)
    ctx.save_for_backward(pair, heads, h)
    ctx.groups, ctx.chunk, ctx.store_h = groups, chunk, store_h


def _backward(ctx, dys, _dpair, _dh):
    if not ctx.store_h:
        raise RuntimeError("cgspn::scan_4dir_packed ran with store_h=False, so it kept no state for a backward")
    pair, heads, h = ctx.saved_tensors
    dx, dheads = scan_4dir_packed_backward(pair, heads, h, dys, ctx.groups, ctx.chunk)
    return dx, dheads, None, None, None


scan_4dir_packed.register_autograd(_backward, setup_context=_setup_context)


def gspn_scan_4dir_packed_triton(x, heads, groups, chunk=None):
    """x [B, C, H, W], heads [B, 4, 3G + G' + G'', H*W] (LINES order) -> ys [B, 4, C, H*W] (LINES order)."""
    return scan_4dir_packed(x, heads, list(groups), chunk, _needs_grad(x, heads))[0]
