"""GSPN: 2D spatial propagation by line scans, the token mixer that replaces attention.

Public names: `gspn_scan` (one direction), `gspn_scan_4dir` (tb, bt, lr, rl in one call),
`gspn_scan_4dir_packed` (the same on inputs packed in the LINES order, see `lines_order`), the `GSPN`
module, and `BACKENDS`. The backend is chosen in one place (`choose_backend`): an explicit `backend=`
argument, else the environment variable `CGSPN_GSPN_BACKEND` (read once, at import), else `triton` for
CUDA tensors and `reference` for CPU tensors.

Every backend follows the same numerics: the gate normalization is done in log space, so that it is
finite and exact for every finite logit; NaN follows IEEE arithmetic through the recurrence as written (a
NaN input makes NaN exactly the outputs and gradients whose formula reads it, directly or through the
state), and the inputs the scan never reads (the logits of absent neighbours and every gate logit of a
line that starts the scan or a chunk) change nothing, whatever their value, and get gradient 0 (see
`reference`). On the meta device every backend returns outputs (and gradients) of the right shape and dtype
without launching anything.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .lines_order import from_lines_order, to_lines_order, unpack_heads
from .reference import DIRECTIONS, gspn_scan_4dir_reference, gspn_scan_reference

__all__ = ["gspn_scan", "gspn_scan_4dir", "gspn_scan_4dir_packed", "GSPN", "BACKENDS", "DIRECTIONS"]

BACKENDS = ("reference", "triton", "stepwise")
_ENV_BACKEND = os.environ.get("CGSPN_GSPN_BACKEND") or None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown GSPN backend {name!r}; known: {', '.join(BACKENDS)}")
    return name


def choose_backend(backend: str | None, x: torch.Tensor) -> str:
    name = backend or _ENV_BACKEND or ("triton" if x.is_cuda else "reference")
    return _check_backend(name, "backend" if backend else "CGSPN_GSPN_BACKEND")


def _check_grouped(name: str, t: torch.Tensor, lead: tuple, tail: tuple, C: int, what: str) -> None:
    """t must be [*lead, G, *tail] with G dividing C."""
    rank = len(lead) + 1 + len(tail)
    expected = f"[{', '.join(map(str, lead))}, G, {', '.join(map(str, tail))}]"
    if not isinstance(t, torch.Tensor) or t.dim() != rank:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be {what} {expected}, got {got}")
    shape = tuple(t.shape)
    G = shape[len(lead)]
    if shape[: len(lead)] != lead or shape[len(lead) + 1 :] != tail:
        raise ValueError(f"{name} must be {what} {expected} to match x, got {shape}")
    if G < 1 or C % G:
        raise ValueError(f"{name}: the group count G={G} must divide the channel count C={C}")


def check_inputs(x, gates, lam, u, ndir: int, direction: str, chunk) -> None:
    """Raise ValueError naming the argument for anything the operator does not accept."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be [B, C, H, W], got {got}")
    B, C, H, W = x.shape
    if min(B, C, H, W) < 1:
        raise ValueError(f"x must have no empty dimension, got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x: dtype {x.dtype} is not supported; use one of {', '.join(map(str, _DTYPES))}")
    lead = (B,) if ndir == 1 else (B, ndir)
    _check_grouped("gates", gates, lead, (3, H, W), C, "gate logits")
    _check_grouped("lam", lam, lead, (H, W), C, "input weights")
    if u is not None:
        _check_grouped("u", u, lead, (H, W), C, "output weights")
    for name, t in (("gates", gates), ("lam", lam), ("u", u)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: put all inputs on one device")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}: use one dtype for all inputs")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None or a positive int, got {chunk!r}")


def gspn_scan(x, gates, lam, u=None, *, direction: str = "tb", chunk: int | None = None, backend: str | None = None):
    """One-direction GSPN line scan, differentiable in x, gates, lam and u.

    Args:
        x: [B, C, H, W] input.
        gates: [B, G, 3, H, W] gate logits for the neighbours (k = 0, 1, 2 = lower, same, higher index
            on the previous line); normalized inside the op so that each row of propagation sums to 1.
            Channel c uses group c // (C // G).
        lam: [B, G', H, W] input weights (G' any divisor of C).
        u: [B, G'', H, W] output weights, or None for 1.
        direction: "tb" (rows, top to bottom), "bt", "lr" (columns, left to right) or "rl".
        chunk: restart the scan (previous line = 0) every `chunk` lines in scan order; None for a global scan.
        backend: "reference", "triton" or "stepwise"; None picks (see the module docstring).

    Returns:
        y: [B, C, H, W] in x's dtype, in the original pixel positions.

    Example:
        >>> x = torch.randn(2, 8, 7, 9)
        >>> gates, lam = torch.randn(2, 1, 3, 7, 9), torch.rand(2, 8, 7, 9)
        >>> gspn_scan(x, gates, lam, direction="lr").shape
        torch.Size([2, 8, 7, 9])
    """
    check_inputs(x, gates, lam, u, 1, direction, chunk)
    name = choose_backend(backend, x)
    if name == "triton":
        from .triton_scan import gspn_scan_triton

        return gspn_scan_triton(x, gates, lam, u, DIRECTIONS.index(direction), chunk)
    if name == "stepwise":
        from .stepwise import gspn_scan_stepwise

        return gspn_scan_stepwise(x, gates, lam, u, direction, chunk)
    return gspn_scan_reference(x, gates, lam, u, direction, chunk)


def gspn_scan_4dir(x, gates, lam, u=None, *, chunk: int | None = None, backend: str | None = None):
    """The four directions tb, bt, lr, rl of `gspn_scan` over one input (one launch on the triton backend).

    Args:
        x: [B, C, H, W].
        gates: [B, 4, G, 3, H, W] gate logits, direction axis in the order tb, bt, lr, rl.
        lam: [B, 4, G', H, W]; u: [B, 4, G'', H, W] or None.
        chunk, backend: as for `gspn_scan`.

    Returns:
        ys: [B, 4, C, H, W], every direction's output in the original pixel positions.

    Example:
        >>> x = torch.randn(1, 4, 5, 6)
        >>> gspn_scan_4dir(x, torch.randn(1, 4, 2, 3, 5, 6), torch.rand(1, 4, 4, 5, 6)).shape
        torch.Size([1, 4, 4, 5, 6])
    """
    check_inputs(x, gates, lam, u, 4, "tb", chunk)
    name = choose_backend(backend, x)
    if name == "triton":
        from .triton_scan import gspn_scan_4dir_triton

        return gspn_scan_4dir_triton(x, gates, lam, u, chunk)
    if name == "stepwise":
        from .stepwise import gspn_scan_4dir_stepwise

        return gspn_scan_4dir_stepwise(x, gates, lam, u, chunk)
    return gspn_scan_4dir_reference(x, gates, lam, u, chunk)


def check_packed(x, heads, groups, chunk) -> None:
    """Raise ValueError naming the argument for anything `gspn_scan_4dir_packed` does not accept."""
    if not isinstance(groups, (tuple, list)) or len(groups) != 3 or not all(isinstance(g, int) and g > 0 for g in groups):
        raise ValueError(f"groups must be three positive ints (G, G_lam, G_u), got {groups!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be [B, C, H, W], got {got}")
    B, C, H, W = x.shape
    G, Gl, Gu = groups
    expected = (B, 4, 3 * G + Gl + Gu, H * W)
    if not isinstance(heads, torch.Tensor) or tuple(heads.shape) != expected:
        got = tuple(heads.shape) if isinstance(heads, torch.Tensor) else type(heads).__name__
        raise ValueError(f"heads must be [B, 4, 3G + G_lam + G_u, H*W] = {list(expected)} for x {tuple(x.shape)} "
                         f"and groups {tuple(groups)}, got {got}")
    # The per-part checks (group divisibility, dtype, device, chunk) are those of the unpacked scan.
    gates, lam, u = unpack_heads(heads.unflatten(-1, (H, W)), tuple(groups))
    check_inputs(x, gates, lam, u, 4, "tb", chunk)


def gspn_scan_4dir_packed(x, heads, groups, *, chunk: int | None = None, backend: str | None = None):
    """`gspn_scan_4dir` on inputs packed as one matmul over tokens writes them, in the LINES order.

    Args:
        x: [B, C, H, W] input.
        heads: [B, 4, 3G + G' + G'', H*W], per direction (tb, bt, lr, rl): the gate logits (index 3g + k for
            group g, neighbour k), the logits of lam (lam = sigmoid, applied inside the op), and u; each
            direction's plane flattened in the LINES order (`lines_order.to_lines_order`).
        groups: (G, G', G''), the group counts of gates, lam and u.
        chunk, backend: as for `gspn_scan`.

    Returns:
        ys: [B, 4, C, H*W] in the LINES order (`lines_order.from_lines_order` gives [B, 4, C, H, W]).
        Equal to `to_lines_order(gspn_scan_4dir(x, gates, sigmoid(lam_logits), u))` of the unpacked inputs.

    Example:
        >>> x, heads = torch.randn(1, 4, 5, 6), torch.randn(1, 4, 3 * 2 + 4 + 4, 30)
        >>> gspn_scan_4dir_packed(x, heads, (2, 4, 4)).shape
        torch.Size([1, 4, 4, 30])
    """
    check_packed(x, heads, groups, chunk)
    name = choose_backend(backend, x)
    if name == "triton":
        from .packed_op import gspn_scan_4dir_packed_triton

        return gspn_scan_4dir_packed_triton(x, heads, groups, chunk)
    gates, lam_logits, u = unpack_heads(from_lines_order(heads, x.shape[-2:]), tuple(groups))
    return to_lines_order(gspn_scan_4dir(x, gates, torch.sigmoid(lam_logits), u, chunk=chunk, backend=name))


class GSPN(nn.Module):
    """`gspn_scan_4dir` (or `gspn_scan` for one `direction`) as a module with fixed chunk and backend.

    forward(x [B, C, H, W], gates, lam, u=None) -> [B, 4, C, H, W], or [B, C, H, W] for one direction.
    """

    def __init__(self, direction: str | None = None, chunk: int | None = None, backend: str | None = None):
        super().__init__()
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"direction must be None or one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if backend is not None:
            _check_backend(backend, "backend")
        self.direction, self.chunk, self.backend = direction, chunk, backend

    def forward(self, x, gates, lam, u=None):
        if self.direction is None:
            return gspn_scan_4dir(x, gates, lam, u, chunk=self.chunk, backend=self.backend)
        return gspn_scan(x, gates, lam, u, direction=self.direction, chunk=self.chunk, backend=self.backend)

    def extra_repr(self) -> str:
        return f"direction={self.direction or '4dir'}, chunk={self.chunk}, backend={self.backend or 'auto'}"
