"""Sweep the fused kernels' launch choices on a GPU and print which is fastest for each shape.

The choices are module settings of `kernels.gspn.triton_scan`: PROGRAMS_PER_SM (how small channel blocks get
so that a small batch still fills the GPU; 0 keeps the largest), MAX_TILE_ELEMENTS (the largest tile of one
program), PREFETCH (load the next step's inputs before this step's neighbour exchange) and TRANSPOSE_COLUMNS
(scan lr and rl on transposed copies, with coalesced loads). Each variant is
checked against the default variant's output first (same inputs), then timed forward and forward+backward.

    python -m kernels.tune --out DIR       # writes DIR/tune-<device>.json
    python -m kernels.tune --smoke         # one small call of every kernel variant, for compute-sanitizer

Needs a CUDA GPU; needs only torch and triton.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path

import torch

from kernels.bench import Shape, _run, device_info, median_ms, provenance
from kernels.gspn import triton_scan

# (PROGRAMS_PER_SM, MAX_TILE_ELEMENTS, PREFETCH, TRANSPOSE_COLUMNS); the first is the first kernel's launch.
VARIANTS = [
    (0, 4096, False, False),
    (4, 1024, True, False),
    (4, 1024, False, True),
    (4, 1024, True, True),
    (1, 1024, True, True),
    (2, 1024, True, True),
    (8, 1024, True, True),
    (16, 1024, True, True),
    (4, 4096, True, True),
    (4, 512, True, True),
]
SHAPES = [
    # The C-GSPN block's scan (proxy width 288 = 1152 / 4, 4 gate groups, lam and u per channel).
    Shape("block1152-2048px-B1", "4dir", 1, 288, 128, 128, 4, 288, 288),
    Shape("block1152-4096px-B1", "4dir", 1, 288, 256, 256, 4, 288, 288),
    Shape("block1152-1024px-B32", "4dir", 32, 288, 64, 64, 4, 288, 288),
    Shape("block384-2048px-B1", "4dir", 1, 96, 128, 128, 4, 96, 96),
    Shape("gspn2-tb", "tb", 16, 8, 1024, 1024, 8, 8, 8),
]
SETTINGS = ("PROGRAMS_PER_SM", "MAX_TILE_ELEMENTS", "PREFETCH", "TRANSPOSE_COLUMNS")


def use(variant) -> None:
    for name, value in zip(SETTINGS, variant):
        setattr(triton_scan, name, value)


def outputs(shape: Shape, tensors, dy) -> list[torch.Tensor]:
    """y and the four gradients from the triton backend."""
    with torch.enable_grad():
        return [t.detach() for t in _run(shape, "triton", tensors, True, dy)]


def plan_of(shape: Shape, tensors) -> triton_scan._Plan:
    """The launch geometry the current settings give."""
    x, gates, lam, u = tensors
    if shape.op == "tb":
        return triton_scan._Plan(x, *(t.unsqueeze(1) for t in (gates, lam, u)), 0, 1)
    return triton_scan._Plan(x, gates, lam, u, 0, 4)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def smoke() -> None:
    """Every kernel variant once on small shapes, synchronizing after each (for compute-sanitizer)."""
    for variant in VARIANTS:
        use(variant)
        for shape in (Shape("s4", "4dir", 2, 8, 13, 21, 2, 8, 8), Shape("s1", "tb", 2, 6, 9, 35, 3, 6, 1)):
            tensors = shape.tensors(torch.bfloat16, "cuda")
            nd = 4 if shape.op == "4dir" else 1
            dy = torch.randn(shape.B, *([nd] if nd > 1 else []), shape.C, shape.H, shape.W, device="cuda",
                             dtype=torch.bfloat16)
            outputs(shape, tensors, dy)
            torch.cuda.synchronize()
    print(f"smoke: {len(VARIANTS)} variants x 2 shapes ran")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="run every variant once on small shapes and stop")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if args.smoke:
        return smoke()
    default = tuple(getattr(triton_scan, n) for n in SETTINGS)
    info = device_info("cuda")
    print(f"launch sweep on {info['device']}, median of {args.reps}; default {dict(zip(SETTINGS, default))}", flush=True)
    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)
        tensors = shape.tensors(torch.bfloat16, "cuda")
        nd = 4 if shape.op == "4dir" else 1
        dy = torch.randn(shape.B, *([nd] if nd > 1 else []), shape.C, shape.H, shape.W, device="cuda", dtype=torch.bfloat16)
        use(default)
        want = outputs(shape, tensors, dy)
        for variant in VARIANTS:
            use(variant)
            plan = plan_of(shape, tensors)
            err = max(rel_err(g, w) for g, w in zip(outputs(shape, tensors, dy), want))
            row = dict(shape=shape.name, **dict(zip(SETTINGS, variant)), channels_per_program=plan.cb,
                       programs=plan.programs, max_rel_diff_vs_default=err)
            for mode in ("fwd", "fwd+bwd"):
                backward = mode == "fwd+bwd"
                ctx = torch.enable_grad() if backward else torch.no_grad()

                def fn():
                    with ctx:
                        _run(shape, "triton", tensors, backward, dy)

                row[f"{mode}_ms"] = median_ms(fn, "cuda", args.reps)
            rows.append(row)
            print(f"  {shape.name:>22} pps {variant[0]:>2} tile {variant[1]:>4} prefetch {variant[2]:d} "
                  f"transpose {variant[3]:d}: "
                  f"cb {plan.cb:>3} programs {plan.programs:>6}  fwd {row['fwd_ms']:8.3f} ms  "
                  f"fwd+bwd {row['fwd+bwd_ms']:8.3f} ms  diff {err:.1e}", flush=True)
    use(default)
    report = dict(info=info, **provenance(info["device"]), method=f"median of {args.reps}, CUDA events, L2 flushed, bf16", settings=SETTINGS, rows=rows)
    slug = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"tune-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\nfastest per shape:")
    for shape in SHAPES:
        mine = [r for r in rows if r["shape"] == shape.name]
        for mode in ("fwd", "fwd+bwd"):
            best = min(mine, key=lambda r: r[f"{mode}_ms"])
            base = next(r for r in mine if tuple(r[n] for n in SETTINGS) == VARIANTS[0])
            print(f"  {shape.name:>22} {mode:>7}: {best[f'{mode}_ms']:.3f} ms with "
                  f"{ {n: best[n] for n in SETTINGS} } ({base[f'{mode}_ms'] / best[f'{mode}_ms']:.2f}x the first kernel)")
    return report


if __name__ == "__main__":
    main()
