"""The GSPN operator: reference against float64 gradcheck; triton and stepwise against the reference.

Every test draws fresh random inputs. Fast backends are checked by the flash-attention rule: their error
against the float64 reference is at most twice the error of the reference itself run in the same low
precision (plus a few units in the last place of the largest value), forward and every gradient. Kernel
outputs are poisoned with NaN before each launch, so an element a kernel never writes fails the test.

The numerics tests at the end (seeded draws) hold every backend to the same arithmetic: gate logits of
+-100 and +-1e4 against the float64 reference (itself checked against the definition and the limits), the
NaN rule (kernels/gspn/reference.py) with the same NaN masks everywhere, and shapes on the meta device.

On a GPU machine, `CGSPN_TEST_DEVICE=cuda python -m pytest tests/test_gspn_kernels.py -k reference`
runs the comparisons on the GPU (compiled kernels, not the interpreter), with larger GPU-only cases.
"""
import os

import pytest
import torch

from kernels.gspn import BACKENDS, DIRECTIONS, GSPN, gspn_scan, gspn_scan_4dir, gspn_scan_4dir_packed
from kernels.gspn import triton_scan
from kernels.gspn.lines_order import from_lines_order, row_and_column_major, to_lines_order
from kernels.gspn.reference import gspn_scan_4dir_reference, gspn_scan_reference

from gspn_inputs import extreme_gate_logits, inputs_of, make_inputs, max_err, output_and_grads

NAMES = ("y", "dx", "dgates", "dlam", "du")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(triton_scan, "POISON_FILL", float("nan"))


def _case_id(case):
    B, C, H, W, G, Gl, Gu, chunk, direction, dtype = case
    dt = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float64: "f64"}[dtype]
    return f"B{B}-C{C}-H{H}-W{W}-G{G}-lam{Gl}-u{Gu}-chunk{chunk}-{direction}-{dt}"


F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
# (B, C, H, W, G, G_lam, G_u, chunk, direction, dtype): odd shapes, every direction, groups 1 / C / between.
TRITON_CASES = [
    (2, 4, 7, 33, 1, 4, 4, None, "tb", F32),
    (2, 4, 33, 7, 4, 4, None, None, "bt", F32),
    (2, 6, 7, 33, 2, 6, 3, 3, "lr", F32),
    (2, 6, 33, 2, 3, 3, 6, None, "rl", F32),
    (2, 3, 1, 7, 3, 1, 3, None, "tb", F32),
    (2, 4, 2, 1, 1, 1, 1, None, "lr", F32),
    (2, 4, 7, 7, 2, 4, 2, 2, "4dir", F32),
    (2, 8, 33, 33, 1, 8, None, None, "4dir", F32),
    (2, 6, 7, 2, 6, 6, 6, 5, "4dir", F32),
    (2, 4, 33, 7, 2, 4, 4, 4, "tb", BF16),
    (2, 6, 7, 33, 3, 6, None, None, "rl", BF16),
    (2, 4, 7, 7, 1, 4, 1, 3, "4dir", BF16),
    (2, 3, 7, 33, 3, 3, None, 2, "4dir", F64),
    # "packed": gspn_scan_4dir_packed, lam given as logits (the C-GSPN mixer's call).
    (2, 4, 6, 11, 2, 4, 4, None, "packed", F32),
    (1, 6, 9, 5, 3, 6, 2, 3, "packed", BF16),
]
# Real sizes (long scans, BLOCK_L 256, a block's proxy width): too slow for the interpreter, GPU only.
GPU_CASES = [
    (2, 96, 64, 64, 4, 96, 96, None, "4dir", BF16),
    (1, 288, 128, 128, 4, 288, 288, None, "4dir", BF16),
    (1, 288, 128, 128, 4, 288, 288, None, "packed", BF16),
    (3, 8, 97, 130, 8, 8, 8, 16, "4dir", F32),
    (2, 16, 256, 256, 1, 16, 16, None, "tb", F32),
    (4, 12, 33, 200, 3, 12, None, None, "rl", BF16),
    (2, 24, 130, 65, 2, 24, 24, None, "lr", BF16),
]
DEVICE = os.environ.get("CGSPN_TEST_DEVICE", "cpu")
on_gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="GPU-sized case: set CGSPN_TEST_DEVICE=cuda on a GPU machine")
STEPWISE_CASES = [
    (2, 4, 7, 33, 2, 4, 4, None, "tb", F32),
    (2, 6, 33, 7, 3, 6, None, 4, "lr", F32),
    (2, 3, 7, 7, 1, 3, 3, 3, "4dir", F32),
    (2, 4, 7, 2, 4, 2, 4, None, "bt", BF16),
]


def _pack(gates, lam_logits, u):
    """Ordinary-layout parts [B, 4, ..., H, W] -> the packed heads [B, 4, 3G + G' + G'', H*W] (LINES order)."""
    return to_lines_order(torch.cat((gates.flatten(2, 3), lam_logits, u), dim=2))


def _op(direction, backend, upcast=True):
    """The operator under test as fn(x, gates, lam, u, chunk) -> output in the ordinary layout. For "packed",
    lam is given as logits."""
    if direction == "packed":
        if backend == "reference":
            return lambda x, g, l, u, chunk: gspn_scan_4dir_reference(x, g, torch.sigmoid(l), u, chunk, upcast=upcast)
        return lambda x, g, l, u, chunk: from_lines_order(
            gspn_scan_4dir_packed(x, _pack(g, l, u), (g.shape[2], l.shape[2], u.shape[2]), chunk=chunk, backend=backend),
            x.shape[-2:])
    if backend == "reference":
        if direction == "4dir":
            return lambda x, g, l, u, chunk: gspn_scan_4dir_reference(x, g, l, u, chunk, upcast=upcast)
        return lambda x, g, l, u, chunk: gspn_scan_reference(x, g, l, u, direction, chunk, upcast=upcast)
    if direction == "4dir":
        return lambda x, g, l, u, chunk: gspn_scan_4dir(x, g, l, u, chunk=chunk, backend=backend)
    return lambda x, g, l, u, chunk: gspn_scan(x, g, l, u, direction=direction, chunk=chunk, backend=backend)


def check_against_reference(case, backend):
    B, C, H, W, G, Gl, Gu, chunk, direction, dtype = case
    ndir = 4 if direction in ("4dir", "packed") else 1
    leaves = make_inputs(B, C, H, W, G, Gl, Gu, ndir, dtype, device=DEVICE)
    out_shape = (B, ndir, C, H, W) if ndir == 4 else (B, C, H, W)
    dy = torch.randn(out_shape, dtype=torch.float64).to(dtype).to(torch.float64).to(DEVICE)

    def run(backend, dtype, upcast=True):
        op = _op(direction, backend, upcast)
        return output_and_grads(lambda *t: op(*t, chunk), inputs_of(leaves, dtype), dy)

    exact = run("reference", torch.float64)
    low = run("reference", dtype, upcast=False)
    fast = run(backend, dtype)
    eps = torch.finfo(dtype).eps
    for name, f, r, lo in zip(NAMES, fast, exact, low):
        if r is None:
            assert f is None
            continue
        assert f.shape == r.shape, f"{name}: shape {tuple(f.shape)} != {tuple(r.shape)}"
        assert not torch.isnan(f).any(), f"{name}: NaN (an element was never written)"
        err, base = max_err(f, r), max_err(lo, r)
        floor = 8 * eps * max(1.0, r.abs().max().item())  # a few ulps: float64 has no lower baseline
        assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x {base:.3g} (reference in {dtype}) + {floor:.3g}"


@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_matches_reference(case):
    check_against_reference(case, "triton")


@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
@on_gpu_only
def test_triton_matches_reference_gpu_sizes(case):
    check_against_reference(case, "triton")


LAUNCH_CASES = [
    (1, 4, 5, 9, 2, 4, 2, 3, "4dir", F32),
    (1, 4, 5, 9, 2, 4, 2, None, "packed", F32),
    (2, 6, 9, 5, 3, 6, None, None, "lr", BF16),
]


@pytest.mark.parametrize("case", LAUNCH_CASES, ids=_case_id)
@pytest.mark.parametrize(
    "settings",
    [{"PREFETCH": False}, {"PREFETCH": True}, {"TRANSPOSE_COLUMNS": False}],
    ids=["no-prefetch", "prefetch", "columns-in-place"],
)
def test_triton_launch_variants_match_reference(case, settings, monkeypatch):
    """The launch choices that tuning switches (kernels/tune.py), each with the smallest channel blocks
    (what a GPU picks to fill its multiprocessors when the batch is small)."""
    for name, value in settings.items():
        monkeypatch.setattr(triton_scan, name, value)
    monkeypatch.setattr(triton_scan, "_min_programs", lambda device: 10**9)
    check_against_reference(case, "triton")


@pytest.mark.parametrize("case", STEPWISE_CASES, ids=_case_id)
def test_stepwise_matches_reference(case):
    check_against_reference(case, "stepwise")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk", [None, 2])
def test_reference_gradcheck(direction, chunk):
    x, gates, lam, u = make_inputs(2, 4, 5, 3, 2, 4, 1, dtype=torch.float64)
    op = lambda *t: gspn_scan_reference(*t, direction, chunk)  # noqa: E731
    # fast_mode: the analytical and numerical Jacobians against fresh random vectors (torch's own check),
    # instead of every column of the numerical Jacobian (~5x less time)
    assert torch.autograd.gradcheck(op, (x, gates, lam, u), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rows_are_stochastic(backend, dtype):
    """x = lam = u = 1: each direction's output counts the lines scanned so far (tb row i gives i + 1)."""
    B, C, H, W = 2, 3, 7, 33
    x = torch.ones(B, C, H, W, dtype=dtype)
    gates = torch.randn(B, 4, 1, 3, H, W, dtype=dtype) * 3
    ones = torch.ones(B, 4, C, H, W, dtype=dtype)
    ys = gspn_scan_4dir(x, gates, ones, ones, backend=backend)
    i = torch.arange(H, dtype=dtype)[:, None].expand(H, W)
    j = torch.arange(W, dtype=dtype)[None, :].expand(H, W)
    expected = torch.stack([i + 1, H - i, j + 1, W - j])[:, None]  # tb, bt, lr, rl; [4, 1, H, W]
    tol = 8 * torch.finfo(dtype).eps * max(H, W)
    torch.testing.assert_close(ys, expected.expand_as(ys), rtol=0, atol=tol)
    tb = gspn_scan(x, gates[:, 0], ones[:, 0], backend=backend)
    torch.testing.assert_close(tb, (i + 1).expand_as(tb), rtol=0, atol=tol)


@pytest.mark.parametrize("backend", ["triton", "stepwise"])
def test_non_contiguous_inputs(backend):
    B, C, H, W = 2, 4, 7, 9
    x = torch.randn(B, C, W, H).transpose(-1, -2)  # [B, C, H, W] with swapped strides
    gates = torch.randn(B, 4, 2, 3, H, 2 * W)[..., ::2]
    lam = torch.randn(B, 4, H, W, C).permute(0, 1, 4, 2, 3)
    u = torch.randn(B, 4, 1, H, W).expand(B, 4, 2, H, W)
    assert not any(t.is_contiguous() for t in (x, gates, lam, u))
    torch.testing.assert_close(
        gspn_scan_4dir(x, gates, lam, u, backend=backend), gspn_scan_4dir_reference(x, gates, lam, u)
    )
    torch.testing.assert_close(
        gspn_scan(x, gates[:, 2], lam[:, 2], u[:, 2], direction="lr", backend=backend),
        gspn_scan_reference(x, gates[:, 2], lam[:, 2], u[:, 2], "lr"),
    )


def test_lines_order_puts_each_directions_lines_first():
    """Plane positions: tb, bt row-major (n = i*W + j); lr, rl column-major (n = j*H + i); and the inverse."""
    H, W = 3, 5
    grid = torch.arange(H * W).view(H, W)
    t = torch.stack([grid + 100 * d for d in range(4)])[None, :, None]  # [1, 4, 1, H, W]
    lines = to_lines_order(t)
    for i in range(H):
        for j in range(W):
            assert lines[0, 0, 0, i * W + j] == grid[i, j] and lines[0, 1, 0, i * W + j] == grid[i, j] + 100
            assert lines[0, 2, 0, j * H + i] == grid[i, j] + 200 and lines[0, 3, 0, j * H + i] == grid[i, j] + 300
    assert torch.equal(from_lines_order(lines, (H, W)), t)
    pair = row_and_column_major(grid[None, None])
    assert pair[0, 0, 0].tolist() == grid.flatten().tolist() and pair[0, 1, 0].tolist() == grid.T.flatten().tolist()


def test_packed_rejects_bad_heads():
    x = torch.randn(1, 4, 3, 5)
    with pytest.raises(ValueError, match=r"heads must be \[B, 4, 3G \+ G_lam \+ G_u, H\*W\] = \[1, 4, 14, 15\]"):
        gspn_scan_4dir_packed(x, torch.randn(1, 4, 14, 3, 5), (2, 4, 4))
    with pytest.raises(ValueError, match="groups must be three positive ints"):
        gspn_scan_4dir_packed(x, torch.randn(1, 4, 14, 15), (2, 4))
    with pytest.raises(ValueError, match="lam: the group count G=3"):
        gspn_scan_4dir_packed(x, torch.randn(1, 4, 13, 15), (2, 3, 4))


def test_packed_op_passes_torch_librarys_checks():
    """cgspn::scan_4dir_packed (what the triton backend runs) on fresh random inputs, through torch.library's
    own checks: the schema, the output shapes declared for torch.compile (its fake implementation) against the
    real ones, the autograd registration and AOT dispatch, forward and backward."""
    from kernels.gspn import packed_op

    B, C, H, W, (G, Gl, Gu) = 1, 4, 3, 5, (2, 4, 2)
    x = torch.randn(B, C, H, W, requires_grad=True)
    heads = torch.randn(B, 4, 3 * G + Gl + Gu, H * W, requires_grad=True)
    torch.library.opcheck(packed_op.scan_4dir_packed, (x, heads, [G, Gl, Gu], 2, True))


def test_module_matches_function():
    x, gates, lam, u = (t.detach() for t in make_inputs(1, 4, 5, 6, 2, 4, 2, ndir=4))
    torch.testing.assert_close(GSPN(chunk=2)(x, gates, lam, u), gspn_scan_4dir(x, gates, lam, u, chunk=2))
    one = GSPN(direction="bt", backend="triton")
    torch.testing.assert_close(one(x, gates[:, 1], lam[:, 1]), gspn_scan(x, gates[:, 1], lam[:, 1], direction="bt"))


def _good():
    return [t.detach().float() for t in make_inputs(1, 4, 3, 5, 2, 4, 2)]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(0, torch.randn(4, 3, 5)), "x must be"),
        (lambda a: a.__setitem__(1, torch.randn(1, 2, 3, 3, 6)), "gates must be"),
        (lambda a: a.__setitem__(1, torch.randn(1, 3, 3, 3, 5)), "gates: the group count G=3"),
        (lambda a: a.__setitem__(2, torch.randn(1, 4, 5, 3)), "lam must be"),
        (lambda a: a.__setitem__(3, torch.randn(1, 3, 3, 5)), "u: the group count"),
        (lambda a: a.__setitem__(2, a[2].double()), "lam has dtype"),
        (lambda a: a.__setitem__(1, a[1].to("meta")), "gates is on meta"),
        (lambda a: a.__setitem__(0, a[0].long()), "x: dtype"),
    ],
    ids=["x-rank", "gates-shape", "gates-groups", "lam-shape", "u-groups", "mixed-dtype", "mixed-device", "int-x"],
)
def test_bad_input_names_the_argument(mutate, message):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        gspn_scan(*args)


def test_bad_options_name_the_argument(monkeypatch):
    x, gates, lam, u = _good()
    with pytest.raises(ValueError, match="direction must be one of"):
        gspn_scan(x, gates, lam, direction="diag")
    with pytest.raises(ValueError, match="chunk must be"):
        gspn_scan(x, gates, lam, chunk=0)
    with pytest.raises(ValueError, match="backend: unknown GSPN backend 'cuda'"):
        gspn_scan(x, gates, lam, backend="cuda")
    with pytest.raises(ValueError, match="gates must be gate logits"):
        gspn_scan_4dir(x, gates, lam)  # one-direction gates given to the 4-direction call
    import kernels.gspn as gspn

    monkeypatch.setattr(gspn, "_ENV_BACKEND", "fast")
    with pytest.raises(ValueError, match="CGSPN_GSPN_BACKEND: unknown GSPN backend 'fast'"):
        gspn_scan(x, gates, lam)


def test_backend_choice(monkeypatch):
    import kernels.gspn as gspn

    x = torch.zeros(1)
    monkeypatch.setattr(gspn, "_ENV_BACKEND", None)
    assert gspn.choose_backend(None, x) == "reference"
    assert gspn.choose_backend("stepwise", x) == "stepwise"
    monkeypatch.setattr(gspn, "_ENV_BACKEND", "triton")
    assert gspn.choose_backend(None, x) == "triton"
    assert gspn.choose_backend("reference", x) == "reference"


# ---------------------------------------------------------------- numerics: extreme logits, NaN, meta device


def _leaves_with(leaves, index, positions, value):
    """leaves with tensor `index`'s elements at the bool mask `positions` set to `value`."""
    out = list(leaves)
    out[index] = leaves[index].detach().masked_fill(positions, value)
    return out


def _exists(L):
    p = torch.arange(L)
    return torch.stack([p > 0, torch.ones(L, dtype=torch.bool), p < L - 1])[:, None, :]  # [3, 1, L]


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_reference_normalization_is_exact(scale):
    """normalize_gates in float64 against the definition, sigmoid(a_k) / sum of sigmoid(a_k') over the
    existing neighbours, run in float64 where it does not underflow (logits of about +-1 and +-100; forward
    and gradient), against the gradient's closed form g_k sigmoid(-a_k) (dg_k - sum g dg), and for huge logits
    (+-100, +-1e4) against the limits: all negative -> softmax(a), all positive -> uniform, mixed -> uniform
    over the positive ones and exp(a) / n_positive for the others. The first line (no previous line) is not
    read: the weights of zero logits, gradient 0."""
    from kernels.gspn.reference import normalize_gates

    torch.manual_seed(11)
    N, L = 5, 7
    a = extreme_gate_logits((2, 3, N, L), scale, torch.float64)
    g = normalize_gates(a)
    dg = torch.randn_like(g)
    (da,) = torch.autograd.grad(g, a, dg)
    assert torch.isfinite(g).all() and torch.isfinite(da).all()
    exists = _exists(L)
    torch.testing.assert_close(g[..., 0, :], (exists[:, 0] / exists[:, 0].sum(0)).to(g).expand_as(g[..., 0, :]))
    assert torch.equal(da[..., 0, :], torch.zeros_like(da[..., 0, :]))

    b, g1, dg1, da1 = (t[..., 1:, :] for t in (a.detach(), g, dg, da))  # the lines that are read
    closed = torch.where(exists, g1 * torch.sigmoid(-b) * (dg1 - (g1 * dg1).sum(-3, keepdim=True)), 0.0)
    torch.testing.assert_close(da1, closed, rtol=1e-12, atol=1e-15)
    if scale <= 100:
        b.requires_grad_(True)
        s = torch.sigmoid(b) * exists
        definition = s / s.sum(-3, keepdim=True)
        (da_definition,) = torch.autograd.grad(definition, b, dg1)
        torch.testing.assert_close(g1, definition.detach(), rtol=1e-13, atol=1e-300)
        torch.testing.assert_close(da1, da_definition, rtol=1e-12, atol=1e-15)
        b = b.detach()
    if scale < 100:
        return
    neg, pos = (b < 0) & exists, (b > 0) & exists
    n_pos = pos.sum(-3, keepdim=True)
    all_neg = n_pos == 0
    limit = torch.where(all_neg, torch.softmax(b.masked_fill(~exists, float("-inf")), dim=-3),
                        torch.where(pos, 1.0, torch.where(neg, b.exp(), 0.0)) / n_pos.clamp(min=1))
    torch.testing.assert_close(g1, limit, rtol=1e-12, atol=0)
    softmax_grad = limit * (dg1 - (limit * dg1).sum(-3, keepdim=True))
    torch.testing.assert_close(da1, torch.where(all_neg & exists, softmax_grad, 0.0), rtol=1e-10, atol=1e-30)


def _extreme_id(case):
    B, C, H, W, G, Gl, Gu, chunk, direction, backend = case
    return f"{backend}-{direction}-C{C}-G{G}-chunk{chunk}"


# (B, C, H, W, G, G_lam, G_u, chunk, direction, backend), each run in float32.
EXTREME_CASES = [
    (1, 2, 4, 5, 1, 2, 1, 3, "4dir", "triton"),  # one gate group for all channels (reduced in registers)
    (1, 2, 5, 4, 2, 2, None, None, "rl", "triton"),  # per-channel gates, no u
    (1, 2, 4, 5, 1, 2, 2, None, "packed", "triton"),  # lam logits of the same magnitude as the gates
    (1, 2, 4, 5, 1, 2, 2, 2, "4dir", "stepwise"),
    (1, 2, 4, 5, 2, 2, 1, 3, "4dir", "reference"),  # the reference itself, in float32
]


@pytest.mark.parametrize("scale", [100.0, 1e4], ids=["100", "1e4"])
@pytest.mark.parametrize("case", EXTREME_CASES, ids=_extreme_id)
def test_extreme_gate_logits_match_float64_reference(case, scale):
    """Gate logits of +-100 and +-1e4 (every row all negative, all positive or mixed; every edge too): each
    backend in float32, forward and every gradient, within a few float32 ulps of the float64 reference
    (plain sigmoids underflow there: 0/0, NaN)."""
    B, C, H, W, G, Gl, Gu, chunk, direction, backend = case
    torch.manual_seed(int(scale) + C + H)
    ndir = 4 if direction in ("4dir", "packed") else 1
    x, gates, lam, u = make_inputs(B, C, H, W, G, Gl, Gu, ndir, device=DEVICE)
    gates = extreme_gate_logits(gates.shape, scale, device=DEVICE)
    if direction == "packed":
        lam = extreme_gate_logits(lam.shape, scale, device=DEVICE)
    leaves = (x, gates, lam, u)
    out_shape = (B, ndir, C, H, W) if ndir == 4 else (B, C, H, W)
    dy = torch.randn(out_shape, dtype=torch.float64).float().double().to(DEVICE)

    def run(backend, dtype):
        op = _op(direction, backend)
        return output_and_grads(lambda *t: op(*t, chunk), inputs_of(leaves, dtype), dy)

    exact, fast = run("reference", torch.float64), run(backend, torch.float32)
    for name, f, r in zip(NAMES, fast, exact):
        if r is None:
            continue
        assert torch.isfinite(r).all(), f"{name}: the float64 reference is not finite"
        assert torch.isfinite(f).all(), f"{name}: not finite"
        tol = 64 * torch.finfo(torch.float32).eps * max(1.0, r.abs().max().item())
        assert max_err(f, r) <= tol, f"{name}: error {max_err(f, r):.3g} > {tol:.3g}"


def _read_gate_logits(B, G, H, W, chunk):
    """[B, 4, G, 3, H, W] bools: the gate logits the 4-direction scan reads. In direction d, pixel (i, j) is
    step s at position p of a line of length L; logit k is read when the step has a previous line
    (s > 0, s % chunk != 0) and neighbour k exists (k = 0: p > 0, k = 2: p < L - 1)."""
    i, j = torch.arange(H)[:, None].expand(H, W), torch.arange(W)[None, :].expand(H, W)
    geometry = {"tb": (i, j, W), "bt": (H - 1 - i, j, W), "lr": (j, i, H), "rl": (W - 1 - j, i, H)}
    planes = []
    for d in DIRECTIONS:
        s, p, L = geometry[d]
        linked = (s > 0) & ((s % chunk != 0) if chunk else True)
        planes.append(torch.stack([linked & (p > 0), linked, linked & (p < L - 1)]))
    return torch.stack(planes)[None, :, None].expand(B, 4, G, 3, H, W)


NAN_TARGETS = ["x", "gates", "lam", "u", "unread-gates"]
# (direction, backend) checked against the float64 reference of the same call (for "packed": lam as logits).
NAN_BACKENDS = [("4dir", "reference"), ("4dir", "triton"), ("4dir", "stepwise"), ("packed", "triton")]


@pytest.mark.parametrize("target", NAN_TARGETS)
def test_nan_inputs_agree_across_backends(target):
    """The NaN rule (kernels/gspn/reference.py): NaN in an input makes NaN exactly the outputs that depend on
    it (checked on the float64 reference: the outputs that change when those entries change), and every
    backend (float32) gives the same NaN masks, forward and every gradient, and the same finite values; gate
    logits the scan never reads (absent neighbours, lines that start the scan or a chunk) change nothing,
    NaN included, and get gradient 0."""
    B, C, H, W, G, Gl, Gu, chunk = 1, 2, 3, 4, 1, 2, 1, 2
    torch.manual_seed(NAN_TARGETS.index(target))
    leaves = [t.detach() for t in make_inputs(B, C, H, W, G, Gl, Gu, ndir=4, device=DEVICE)]
    index = {"x": 0, "gates": 1, "lam": 2, "u": 3, "unread-gates": 1}[target]
    read = _read_gate_logits(B, G, H, W, chunk).to(DEVICE)
    if target == "unread-gates":
        where = ~read
    else:  # two random entries (of the gate logits, two that are read)
        allowed = read if target == "gates" else torch.ones_like(leaves[index], dtype=torch.bool)
        picked = allowed.flatten().nonzero()[torch.randperm(int(allowed.sum()))[:2], 0]
        where = torch.zeros_like(allowed).flatten().index_fill(0, picked, True).view(allowed.shape)
    nan_leaves = _leaves_with(leaves, index, where, float("nan"))
    dy = torch.randn(B, 4, C, H, W, dtype=torch.float64).float().double().to(DEVICE)

    def run(direction, backend, tensors, dtype):
        op = _op(direction, backend)
        return output_and_grads(lambda *t: op(*t, chunk), inputs_of(tensors, dtype), dy)

    for direction in ("4dir", "packed"):
        y = run(direction, "reference", nan_leaves, torch.float64)[0]
        changed = [run(direction, "reference", _leaves_with(leaves, index, where, v), torch.float64)[0]
                   for v in (0.7, -1.3)]
        assert torch.equal(y.isnan(), changed[0] != changed[1]), f"{direction}: NaN outputs != dependent outputs"
    if target == "unread-gates":
        assert not y.isnan().any()

    for direction, backend in NAN_BACKENDS:
        exact = run(direction, "reference", nan_leaves, torch.float64)
        fast = run(direction, backend, nan_leaves, torch.float32)
        for name, f, r in zip(NAMES, fast, exact):
            what = f"{direction} {backend} {name}"
            assert torch.equal(f.isnan(), r.isnan()), f"{what}: NaN at {(f.isnan() != r.isnan()).nonzero().tolist()}"
            finite = ~r.isnan()
            tol = 1e-4 * max(1.0, r[finite].abs().max().item())
            assert max_err(f[finite], r[finite]) <= tol, f"{what}: error {max_err(f[finite], r[finite]):.3g}"
            if target == "unread-gates":
                assert not r.isnan().any(), f"{what}: an unread gate logit made NaN"
                if name == "dgates":
                    assert not f[where].any() and not r[where].any(), f"{what}: an unread gate logit got a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_device_gives_shapes_and_dtypes(backend):
    """On the meta device every entry point returns meta tensors of the output's shape and dtype, without
    launching anything, and autograd gives meta gradients shaped like the inputs."""
    B, C, H, W, G = 2, 4, 5, 6, 2

    def meta(*shape):
        return torch.empty(shape, device="meta", dtype=torch.bfloat16, requires_grad=True)

    x = meta(B, C, H, W)
    gates, lam, u = meta(B, G, 3, H, W), meta(B, C, H, W), meta(B, 1, H, W)
    gates4, lam4 = meta(B, 4, G, 3, H, W), meta(B, 4, 1, H, W)
    heads = meta(B, 4, 3 * G + 1 + C, H * W)
    calls = [
        (lambda: gspn_scan(x, gates, lam, u, direction="rl", chunk=2, backend=backend), (B, C, H, W),
         (x, gates, lam, u)),
        (lambda: gspn_scan_4dir(x, gates4, lam4, backend=backend), (B, 4, C, H, W), (x, gates4, lam4)),
        (lambda: gspn_scan_4dir_packed(x, heads, (G, 1, C), chunk=3, backend=backend), (B, 4, C, H * W),
         (x, heads)),
    ]
    for fn, shape, inputs in calls:
        y = fn()
        assert (y.device.type, tuple(y.shape), y.dtype) == ("meta", shape, torch.bfloat16)
        grads = torch.autograd.grad(y, inputs, torch.empty_like(y))
        for g, t in zip(grads, inputs):
            assert (g.device.type, g.shape, g.dtype) == ("meta", t.shape, t.dtype)
