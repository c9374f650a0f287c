"""Roofline benchmark of the GSPN operator: fused Triton against the stepwise baseline (and the reference on CPU).

For every shape it times forward and forward+backward (median of N), counts the fewest bytes each must
move (every input read once, every output written once; the backward as its own pass over dy, x, gates,
lam, u and the four gradients), measures the device's copy bandwidth in the same run, and writes
`reports/benchmarks/kernel.json` and `kernel.md` (plus copies named by device, so that a CPU run never
replaces a GPU record) and a bar plot of the achieved fraction of the copy bandwidth.

    python -m kernels.bench                 # the shapes for this device (small ones on a CPU)
    python -m kernels.bench --reps 50       # more repetitions

On a CPU the Triton kernels run in Triton's interpreter: those figures check that the benchmark runs and
say nothing about GPU speed. Needs only torch, triton, numpy and matplotlib.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels.gspn import gspn_scan, gspn_scan_4dir


@dataclass(frozen=True)
class Shape:
    name: str
    op: str  # "tb" (one direction) or "4dir"
    B: int
    C: int
    H: int
    W: int
    G: int  # gate groups
    G_lam: int
    G_u: int

    def tensors(self, dtype, device):
        """Random inputs (gates are logits), leaves requiring grad: x, gates, lam, u."""
        lead = (self.B,) if self.op == "tb" else (self.B, 4)
        make = lambda *s: torch.randn(*s, dtype=dtype, device=device).requires_grad_(True)  # noqa: E731
        return (
            make(self.B, self.C, self.H, self.W),
            make(*lead, self.G, 3, self.H, self.W),
            make(*lead, self.G_lam, self.H, self.W),
            make(*lead, self.G_u, self.H, self.W),
        )

    def min_bytes(self, itemsize: int) -> tuple[int, int]:
        """Fewest bytes for (forward, forward+backward)."""
        nd = 1 if self.op == "tb" else 4
        px = self.H * self.W * self.B
        x, y = self.C * px, nd * self.C * px
        params = nd * (3 * self.G + self.G_lam + self.G_u) * px
        fwd = x + params + y
        bwd = (y + x + params) + (x + params)  # reads dy, x, params; writes dx, dparams
        return fwd * itemsize, (fwd + bwd) * itemsize


# Small enough for Triton's interpreter (about 5 ms per program per step here).
CPU_SHAPES = [
    Shape("tb-tiny", "tb", 1, 4, 12, 12, 4, 4, 4),
    Shape("4dir-tiny-compact", "4dir", 1, 4, 12, 12, 1, 4, 4),
]
GPU_SHAPES = [
    # The GSPN-2 shape: published 71.4 ms stepwise vs 1.8 ms fused (A100).
    Shape("gspn2-tb", "tb", 16, 8, 1024, 1024, 8, 8, 8),
    Shape("gspn2-4dir", "4dir", 16, 8, 1024, 1024, 8, 8, 8),
    # Proxy widths of a ViT (patch 16) at 1024 px (64x64 grid) and 2048 px (128x128 grid).
    *[
        Shape(f"vit{side}-B{B}-C{C}", "4dir", B, C, grid, grid, 1, C, C)
        for side, grid in ((1024, 64), (2048, 128))
        for B in (1, 32)
        for C in (96, 288)
    ],
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, reps: int, warmup: int = 1, budget_s: float | None = None) -> float:
    """Median wall time of fn() in ms; on a GPU timed with events, with the L2 cache flushed before each rep.
    With `budget_s`, slow functions get fewer reps (never under 5) so that one timing takes about that long."""
    for _ in range(warmup):
        fn()
    _sync(device)
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device=device) if device == "cuda" else None
    times = []
    while len(times) < reps:
        if device == "cuda":
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and len(times) == 1:
            reps = min(reps, max(5, int(budget_s * 1e3 / max(times[0], 1e-3))))
    return statistics.median(times)


def copy_bandwidth_gbps(device: str, reps: int) -> float:
    """Ceiling: a large device-to-device copy, bytes read plus bytes written over the median time."""
    n = (512 if device == "cuda" else 64) * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _run(shape: Shape, backend: str, tensors, backward: bool, dy=None) -> list[torch.Tensor]:
    """y, and with `backward` the gradients of (y * dy).sum() for (x, gates, lam, u)."""
    x, gates, lam, u = tensors
    if shape.op == "tb":
        y = gspn_scan(x, gates, lam, u, direction="tb", backend=backend)
    else:
        y = gspn_scan_4dir(x, gates, lam, u, backend=backend)
    return [y, *torch.autograd.grad(y, tensors, dy)] if backward else [y]


def bench_shape(shape: Shape, backends, dtype, device: str, reps: int, copy_gbps: float) -> list[dict]:
    tensors = shape.tensors(dtype, device)
    itemsize = tensors[0].element_size()
    fwd_bytes, fb_bytes = shape.min_bytes(itemsize)
    nd = 1 if shape.op == "tb" else 4
    dy = torch.randn(shape.B, *([nd] if nd > 1 else []), shape.C, shape.H, shape.W, dtype=dtype, device=device)
    rows = []
    for backend in backends:
        for mode, nbytes in (("fwd", fwd_bytes), ("fwd+bwd", fb_bytes)):
            backward = mode == "fwd+bwd"
            ctx = torch.enable_grad() if backward else torch.no_grad()

            def fn():
                with ctx:
                    _run(shape, backend, tensors, backward, dy)

            ms = median_ms(fn, device, reps, budget_s=3.0)
            gbps = nbytes / ms / 1e6
            rows.append(
                dict(
                    **asdict(shape), dtype=str(dtype).replace("torch.", ""), backend=backend, mode=mode,
                    ms=ms, min_bytes=nbytes, GBps=gbps, pct_copy=100 * gbps / copy_gbps,
                )
            )
            print(f"  {shape.name:>22} {backend:>9} {mode:>7}: {ms:10.3f} ms  {gbps:8.2f} GB/s", flush=True)
    for row in rows:
        base = next(r for r in rows if r["backend"] == "stepwise" and r["mode"] == row["mode"])
        row["speedup_vs_stepwise"] = base["ms"] / row["ms"]
    return rows


def device_info(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    import triton

    return dict(
        device=name, kind=device, torch=torch.__version__, triton=triton.__version__,
        triton_interpreted=os.environ.get("TRITON_INTERPRET") == "1",
    )


def git_head() -> str:
    """The commit of the checkout this file is in (`git rev-parse HEAD`), or "unknown" without git or a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def provenance(device: str) -> dict:
    """What every benchmark record carries: when (UTC), at which commit and on which device it was measured."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git_head(), "device": device, "provenance": "recorded when measured"}


def markdown(report: dict) -> str:
    info = report["info"]
    lines = [
        f"# GSPN kernel benchmark: {info['device']}",
        "",
        f"{report['method']}. Copy-bandwidth ceiling measured in the same run: "
        f"**{report['copy_GBps']:.1f} GB/s**. torch {info['torch']}, triton {info['triton']}"
        + (" (interpreter: CPU figures, not GPU speed)" if info["triton_interpreted"] else "") + ".",
        "",
        "| shape | op | B | C | HxW | G | backend | mode | ms | GB/s | % of copy | x stepwise |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['op']} | {r['B']} | {r['C']} | {r['H']}x{r['W']} | {r['G']} | {r['backend']} "
            f"| {r['mode']} | {r['ms']:.3f} | {r['GBps']:.3g} | {r['pct_copy']:.3g} | {r['speedup_vs_stepwise']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = list(dict.fromkeys((r["name"], r["mode"]) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        values = [
            next((r["pct_copy"] for r in rows if (r["name"], r["mode"]) == k and r["backend"] == backend), 0)
            for k in labels
        ]
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=backend)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")  # the interpreter and the baseline sit orders of magnitude below the ceiling
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels([f"{n}\n{m}" for n, m in labels], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("% of measured copy bandwidth (log)")
    ax.set_title(f"GSPN scan, {report['info']['device']} ({report['method']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per timing (median is reported)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = args.device
    reps = args.reps or (30 if device == "cuda" else 3)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    backends = ["stepwise", "triton"] + (["reference"] if device == "cpu" else [])

    info = device_info(device)
    print(f"GSPN kernel benchmark on {info['device']} ({len(shapes)} shapes, median of {reps})", flush=True)
    copy_gbps = copy_bandwidth_gbps(device, reps=max(reps, 5))
    print(f"  copy bandwidth: {copy_gbps:.1f} GB/s", flush=True)
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, backends, dtype, device, reps, copy_gbps)
    timing = "CUDA events, L2 flushed before each rep" if device == "cuda" else "perf_counter"
    report = dict(
        info=info, copy_GBps=copy_gbps, method=f"median of {reps} ({timing}), {str(dtype).replace('torch.', '')}",
        command=" ".join([Path(sys.executable).name, "-m", "kernels.bench", *(argv or sys.argv[1:])]), rows=rows,
        **provenance(info["device"]),
    )

    args.out.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    for stem in ("kernel", f"kernel-{slug}"):
        _write(args.out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
        _write(args.out / f"{stem}.md", markdown(report))
    plot(report, args.out / f"kernel-{slug}.png")
    print(markdown(report))
    print(f"wrote {args.out}/kernel.json, kernel.md and kernel-{slug}.{{json,md,png}}")
    return report


if __name__ == "__main__":
    main()
