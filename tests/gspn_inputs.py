"""Random GSPN inputs and the error measures the kernel tests share."""
from __future__ import annotations

import torch


def make_inputs(B, C, H, W, G, G_lam, G_u, ndir=1, dtype=torch.float32, device="cpu"):
    """Fresh random (x, gates, lam, u) in float64, leaves with requires_grad; u is None when G_u is None.

    Shapes: x [B, C, H, W]; gates [B, (ndir,) G, 3, H, W]; lam [B, (ndir,) G_lam, H, W]; u likewise.
    The float64 tensors are rounded through `dtype` so that every backend sees the same values.
    """
    lead = (B,) if ndir == 1 else (B, ndir)

    def leaf(*shape, scale=1.0):
        t = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(torch.float64)
        return t.to(device).requires_grad_(True)

    x = leaf(B, C, H, W)
    gates = leaf(*lead, G, 3, H, W, scale=2.0)
    lam = leaf(*lead, G_lam, H, W)
    u = None if G_u is None else leaf(*lead, G_u, H, W)
    return x, gates, lam, u


def inputs_of(tensors, dtype):
    """Detached copies in `dtype` that require grad (None stays None)."""
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]


def output_and_grads(fn, tensors, dy):
    """Run fn(*tensors), backprop dy; returns [y, d(each tensor)] in float64 (None where a tensor is None)."""
    y = fn(*tensors)
    leaves = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad(y, leaves, dy.to(y.dtype)))
    return [y.double()] + [None if t is None else next(grads).double() for t in tensors]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def extreme_gate_logits(shape, scale, dtype=torch.float32, device="cpu"):
    """Gate logits [..., 3, H, W] of magnitude about `scale`, in float64 rounded through `dtype`, on `device`,
    with requires_grad. At each pixel the three logits are all hugely negative, all hugely positive, or of random
    signs; the three kinds alternate along every row and column (so every edge has each), and a spread of
    N(0, 2) on top keeps the normalized weights of a row apart."""
    H, W = shape[-2:]
    i, j = torch.arange(H)[:, None], torch.arange(W)[None, :]
    kind = (i + 2 * j + int(torch.randint(3, ()))) % 3  # [H, W]: 0 all negative, 1 all positive, 2 mixed
    mixed = torch.randint(2, shape, dtype=torch.float64) * 2 - 1
    sign = torch.where(kind == 0, -1.0, torch.where(kind == 1, 1.0, mixed))
    t = sign * scale + 2 * torch.randn(shape, dtype=torch.float64)
    return t.to(dtype).to(torch.float64).to(device).requires_grad_(True)
