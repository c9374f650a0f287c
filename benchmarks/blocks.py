"""Block and model benchmark: one C-GSPN block against one attention block of the same width, and the
whole student against the isomorphic ViT. Needs only torch, triton, numpy and matplotlib.

    python -m benchmarks.blocks            # CUDA: the full set; CPU: reduced sizes, labelled CPU
    python -m benchmarks.blocks --out DIR  # writes DIR/blocks.json, blocks-<device>.json, speedup and roofline plots
    python -m benchmarks.blocks --compiled # both blocks eager and torch.compile'd: DIR/blocks-compiled-<device>.json
    python -m benchmarks.blocks --replot   # only redraw the plots of the records in DIR (no timing)

Blocks: pre-norm transformer blocks (norm, mixer, layer scale, MLP 4x) on the tokens of a square image of
side S with patch 16, i.e. (S/16)^2 tokens; the attention mixer is PyTorch SDPA (FlashAttention on a GPU),
the C-GSPN mixer projects to a proxy width of width/4 and scans in four directions. Forward, and forward
plus backward, at each side, width and batch; peak memory on CUDA. Times are medians of N after warm-up
(CUDA events with the L2 cache flushed on a GPU; perf_counter on a CPU). Every record carries the date (UTC),
the commit and the device it was measured on (`kernels.bench.provenance`).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from kernels.bench import device_info, median_ms, provenance

from cgspn.report.published import BUDGET_S, GOAL, GOAL_SIDE, GOAL_SPEEDUP, PUBLISHED, repetitions  # noqa: F401 (re-exported)
from cgspn.models.attention import Attention
from cgspn.pipeline.outputs import write_json
from cgspn.models.cgspn import CGSPN, CGSPNConfig
from cgspn.models.gspn_mixer import GSPNMixer, GSPNMixerConfig
from cgspn.models.vit import Block, ViT, ViTConfig

PATCH = 16
GPU_SET = {"sides": [224, 512, 1024, 2048, 4096], "widths": [384, 1152], "batches": [1, 32], "model_sides": [224, 512, 1024, 2048]}
# Batch 32 at 4096 px is left out: one attention forward+backward there takes about a minute on an H100.
MAX_SIDE_AT_BATCH = {32: 2048}
CPU_SET = {"sides": [224, 448, 896], "widths": [384], "batches": [1], "model_sides": [224, 448]}
# Both blocks under torch.compile (the GSPN scan stays one opaque custom op, kernels/gspn/packed_op.py): the
# compiler fuses the glue every transformer block has (GELU, LayerNorm, residual adds, layer scales). GPU only,
# at the goal's width and batch: a compile costs tens of seconds per shape and mode (minutes on a 2-core CPU).
COMPILED_SET = {"width": 1152, "batch": 1, "sides": [1024, 2048, 4096]}


class UnpackedGSPNMixer(GSPNMixer):
    """The mixer in its layout before the packed one (1x1 conv heads, sigmoid of lam in PyTorch, the scan's own
    copies into the LINES layout) on every backend: the baseline the packed layout is measured against."""

    _propagate_packed = GSPNMixer._propagate


def make_block(kind: str, width: int) -> Block:
    """kind: "attention", "cgspn" or "cgspn-unpacked" (`UnpackedGSPNMixer`); a "-compiled" suffix is stripped
    here (`block_steps` compiles)."""
    kind = kind.removesuffix("-compiled")
    if kind == "attention":
        mixer = Attention(width, width // 64)
    else:
        mixer_class = UnpackedGSPNMixer if kind == "cgspn-unpacked" else GSPNMixer
        mixer = mixer_class(width, GSPNMixerConfig(proxy_dim=width // 4, groups=4))
    return Block(width, mixer, 4 * width, 1e-5, 1e-6)


def graphed(fn, device: str):
    """fn captured once in a CUDA graph, returned as its replay: the GPU's work without Python's per-op launch
    overhead (which on the benchmark machine costs a block about 1.5 ms whatever its size). fn itself on a CPU."""
    if device != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture: compiles kernels, allocates workspaces
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_both(fn, device: str, reps: int) -> tuple[float, float]:
    """(graph-replay ms, eager ms) of fn; on a CPU both are the eager time."""
    eager = median_ms(fn, device, reps, budget_s=BUDGET_S)
    return (median_ms(graphed(fn, device), device, reps, budget_s=BUDGET_S) if device == "cuda" else eager), eager


def block_steps(kind: str, width: int, side: int, batch: int, dtype, device: str,
                compile_mode: str | None = None) -> dict:
    """{"fwd": one forward without grad, "fwd+bwd": forward and backward to the input and every parameter}
    of one block on random tokens of a square image of `side` px."""
    grid = side // PATCH
    block = make_block(kind, width).to(device, dtype)
    x = torch.randn(batch, grid * grid, width, device=device, dtype=dtype, requires_grad=True)
    kwargs = {"hw": (grid, grid)} if not kind.startswith("attention") else {}
    leaves = [x, *block.parameters()]
    if kind.endswith("-compiled"):
        torch._dynamo.reset()  # a fresh cache per row: every row compiles its own shapes, none falls back to eager
        block = torch.compile(block, dynamic=False, fullgraph=True, mode=compile_mode)

    def forward():
        with torch.no_grad():
            block(x, **kwargs)

    def forward_backward():
        torch.autograd.grad(block(x, **kwargs).float().square().mean(), leaves)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def time_block(kind: str, width: int, side: int, batch: int, dtype, device: str, reps: int,
               compile_mode: str | None = None) -> dict:
    grid = side // PATCH
    row = {"block": kind, "width": width, "side": side, "tokens": grid * grid, "batch": batch}
    try:
        for mode, fn in block_steps(kind, width, side, batch, dtype, device, compile_mode).items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row[f"{mode}_ms"], row[f"{mode}_eager_ms"] = time_both(fn, device, reps)
            row[f"{mode}_peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as error:  # noqa: BLE001 - a block the compiler fails on is reported in its row; the rest runs
        if not kind.endswith("-compiled"):
            raise
        row["error"] = f"torch.compile failed: {type(error).__name__}: {str(error)[:500]}"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def print_row(r: dict) -> None:
    print(f"  {r['block']:>18} width {r['width']} batch {r['batch']:>2} side {r['side']:>4}: "
          + (r.get("error") or f"fwd {r['fwd_ms']:.2f} ms, fwd+bwd {r['fwd+bwd_ms']:.2f} ms "
             f"(eager {r['fwd_eager_ms']:.2f}, {r['fwd+bwd_eager_ms']:.2f})"), flush=True)


def time_models(sides: list[int], dtype, device: str, reps: int) -> list[dict]:
    """Images/s of the student and the isomorphic ViT-S/14 (batch 1) at each side (rounded to patch 14)."""
    cfg = ViTConfig()
    models = {"cgspn": CGSPN(CGSPNConfig()), "vit": ViT(cfg)}
    rows = []
    for side in sides:
        side14 = side // cfg.patch_size * cfg.patch_size
        x = torch.randn(1, 3, side14, side14, device=device, dtype=dtype)
        for name, model in models.items():
            model = model.to(device, dtype).eval()

            def forward():
                with torch.no_grad():
                    model(x)

            try:
                ms, eager_ms = time_both(forward, device, reps)
                rows.append({"model": name, "side": side14, "batch": 1, "ms": ms, "images_per_s": 1e3 / ms,
                             "eager_ms": eager_ms, "eager_images_per_s": 1e3 / eager_ms})
            except torch.OutOfMemoryError:
                rows.append({"model": name, "side": side14, "batch": 1, "error": "out of memory"})
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def speedups(rows: list[dict], timing: str = "", block: str = "cgspn", baseline: str = "attention") -> list[dict]:
    """`baseline` time over `block` time for every (width, side, batch, mode) both finished; `timing` "" for
    the graph-replay times, "_eager" for the eager ones."""
    out = []
    for r in rows:
        if r["block"] != block or "error" in r:
            continue
        a = next((x for x in rows if x["block"] == baseline and all(x[k] == r[k] for k in ("width", "side", "batch"))), None)
        if a is None or "error" in a:
            continue
        for mode in ("fwd", "fwd+bwd"):
            out.append({"width": r["width"], "side": r["side"], "batch": r["batch"], "mode": mode,
                        "speedup": a[f"{mode}{timing}_ms"] / r[f"{mode}{timing}_ms"]})
    return out


def plot_speedup(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    colors = plt.get_cmap("tab10").colors
    sides, i = set(), 0
    for series, style, note in (("speedups", "-", ""), ("speedups_compiled", "--", ", both compiled")):
        found = report.get(series, [])
        for width, batch, mode in sorted({(s["width"], s["batch"], s["mode"]) for s in found}):
            pts = sorted((s["side"], s["speedup"]) for s in found
                         if (s["width"], s["batch"], s["mode"]) == (width, batch, mode))
            sides |= {p[0] for p in pts}
            ax.plot(*zip(*pts), style, marker="o" if mode == "fwd" else "s", color=colors[i % len(colors)],
                    label=f"width {width}, batch {batch}, {mode}{note}")
            i += 1
    ax.axhline(GOAL_SPEEDUP, color="red", ls=":", lw=1.2, label=f"goal: {GOAL_SPEEDUP:g}x at {GOAL_SIDE} px")
    ax.axhline(1, color="black", lw=0.8, label="1x: as fast as attention")
    ax.set(xscale="log", yscale="log", xlabel="image side (px, patch 16)", ylabel="attention time / C-GSPN time",
           title=f"C-GSPN block vs attention block ({report['info']['device']})")
    ax.minorticks_off()  # ticks at the measured sides and plain speedups, no overlapping log-scale labels
    ax.set_xticks(sorted(sides), [str(s) for s in sorted(sides)])
    values = [s["speedup"] for series in ("speedups", "speedups_compiled") for s in report.get(series, [])]
    low, high = min(values + [1.0]), max(values + [GOAL_SPEEDUP])
    ax.set_yticks([2.0**k for k in range(-6, 7) if low / 2 < 2.0**k < high * 2],
                  [f"{2.0**k:g}x" for k in range(-6, 7) if low / 2 < 2.0**k < high * 2])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the data
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Estimated arithmetic of the scan per element and direction: three neighbour products and sums, lam*x,
# u*h and the gate normalization (three sigmoids and a division) forward; about twice that backward.
SCAN_FLOPS = {"fwd": 20, "fwd+bwd": 60}


def matmul_flops(device: str, dtype, reps: int) -> float:
    """Ceiling for compute: FLOP/s of a large square matmul, measured here."""
    n = 8192 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (median_ms(lambda: a @ b, device, reps) / 1e3)


def plot_roofline(kernel_report: dict, path: Path, peak_flops: float) -> None:
    """The classic roofline: achieved FLOP/s of every kernel row against its arithmetic intensity (estimated
    FLOPs over the fewest bytes the op must move), under the two measured roofs: copy bandwidth x intensity
    and the matmul FLOP/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import numpy as np

    rows = kernel_report["rows"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 5.5), squeeze=False, sharey=True)
    bw = kernel_report["copy_GBps"] * 1e9
    colors = dict(zip(sorted({r["backend"] for r in rows}), plt.get_cmap("tab10").colors))
    for ax, mode in zip(axes[0], modes):
        pts = []
        for r in (r for r in rows if r["mode"] == mode):
            flops = SCAN_FLOPS[r["mode"]] * r["B"] * r["C"] * r["H"] * r["W"] * (4 if r["op"] == "4dir" else 1)
            pts.append((flops / r["min_bytes"], flops / (r["ms"] / 1e3), r["name"], r["backend"]))
        for backend, color in colors.items():
            mine = [p for p in pts if p[3] == backend]
            if mine:
                ax.scatter([p[0] for p in mine], [p[1] for p in mine], label=backend, s=18, color=color, zorder=3)
        # Every point named by its shape, the names in a column right of the points (evenly spaced on the log
        # axis, in the points' order) with a leader line each: many shapes share one intensity.
        pts.sort(key=lambda p: p[1])
        x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
        y_lo, y_hi = min(p[1] for p in pts), max(p[1] for p in pts)
        label_y = np.geomspace(y_lo, max(y_hi, y_lo * 1.5 ** len(pts)), len(pts)) if len(pts) > 1 else [y_lo]
        for (x_, y_, name, backend), ly in zip(pts, label_y):
            ax.annotate(name, (x_, y_), xytext=(x_hi * 3, ly), fontsize=6, color=colors[backend], va="center",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": colors[backend], "alpha": 0.6})
        x = np.geomspace(x_lo / 4, x_hi * 40, 100)
        ax.plot(x, np.minimum(bw * x, peak_flops), color="red", lw=1,
                label=f"roof: copy {kernel_report['copy_GBps']:.0f} GB/s, matmul {peak_flops / 1e12:.2f} TFLOP/s")
        ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (estimated FLOP per byte)",
               title=f"GSPN scan roofline, {mode} ({kernel_report['info']['device']})")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="upper left")
    axes[0, 0].set_ylabel("achieved FLOP/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile_block(width: int, side: int, batch: int, device: str, top: int = 15) -> None:
    """Print where one C-GSPN block's GPU time goes (torch.profiler, CUDA time per op), forward and fwd+bwd."""
    from torch.profiler import ProfilerActivity, profile

    for mode, step in block_steps("cgspn", width, side, batch, torch.bfloat16, device).items():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"C-GSPN block, width {width}, side {side}, batch {batch}, {mode}: CUDA time over 5 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))


def compiled_benchmark(sides: list[int], dtype, device: str, reps: int, info: dict, method: str, path: Path,
                       compile_mode: str | None = None) -> dict:
    """Both blocks eager and under torch.compile (COMPILED_SET's width and batch), all in this run: the speedup
    with both compiled, and what compiling gains each block. Writes `path` and a speedup plot beside it."""
    width, batch = COMPILED_SET["width"], COMPILED_SET["batch"]
    rows = []
    for side in sides:
        for kind in ("cgspn", "cgspn-compiled", "attention", "attention-compiled"):
            rows.append(time_block(kind, width, side, batch, dtype, device, reps, compile_mode))
            print_row(rows[-1])
    report = {"info": info, **provenance(info["device"]),
              "scope": f"width {width}, batch {batch}: eager and torch.compile'd blocks",
              "method": method + f"; torch.compile(block, dynamic=False, fullgraph=True, mode={compile_mode!r}), "
                                 "the GSPN scan one custom op",
              "published": PUBLISHED, "goal": GOAL, "blocks": rows, "speedups": speedups(rows),
              "speedups_compiled": speedups(rows, block="cgspn-compiled", baseline="attention-compiled"),
              "compiled_over_eager": {kind: speedups(rows, block=f"{kind}-compiled", baseline=kind)
                                      for kind in ("cgspn", "attention")}}
    plot_speedup(report, path.with_name(path.stem.replace("blocks", "speedup") + ".png"))
    write_json(path, report)
    for label, found in (("eager", report["speedups"]), ("both compiled", report["speedups_compiled"]),
                         *((f"{k} compiled over eager", v) for k, v in report["compiled_over_eager"].items())):
        for s in found:
            print(f"  {label}, width {s['width']} batch {s['batch']} side {s['side']} {s['mode']}: {s['speedup']:.2f}x")
    print(PUBLISHED + "\n" + GOAL)
    return report


def replot(out: Path) -> dict:
    """Redraw the plots of the block records in `out` from their JSON, timing nothing: speedup-<device>.png
    for every blocks-<device>.json and blocks-compiled-<device>*.json, and roofline-<device>.png where a GPU
    record has its kernel-<device>.json beside it (none for a CPU: its kernel rows time Triton's interpreter)."""
    drawn = []
    for path in sorted(out.glob("blocks-*.json")):
        record = json.loads(path.read_text())
        speedup = path.with_name(path.stem.replace("blocks", "speedup", 1) + ".png")
        plot_speedup(record, speedup)
        drawn.append(speedup)
        slug = path.stem.removeprefix("blocks-")
        kernel_json = out / f"kernel-{slug}.json"
        if (not path.stem.startswith("blocks-compiled-") and record["info"].get("kind") == "cuda"
                and kernel_json.exists() and "matmul_flops" in record):
            roofline = out / f"roofline-{slug}.png"
            plot_roofline(json.loads(kernel_json.read_text()), roofline, record["matmul_flops"])
            drawn.append(roofline)
    for p in drawn:
        print(f"wrote {p}")
    return {"plots": [str(p) for p in drawn]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    parser.add_argument("--sides", type=int, nargs="+", default=None, help="image sides of the block benchmark")
    parser.add_argument("--model-sides", type=int, nargs="+", default=None, help="image sides of the model benchmark")
    parser.add_argument("--compiled", action="store_true",
                        help="only time both blocks eager and under torch.compile at width "
                             f"{COMPILED_SET['width']}, batch {COMPILED_SET['batch']} (--sides, default "
                             f"{COMPILED_SET['sides']}); writes blocks-compiled-<device>.json")
    parser.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs"], default=None,
                        help="torch.compile mode of --compiled; max-autotune-no-cudagraphs lets Inductor use Triton "
                             "matmuls with GELU fused into fc1 (minutes of autotuning per shape); the file name "
                             "gets the mode")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the speedup (and, for a GPU, roofline) plots of the records in --out")
    parser.add_argument("--profile", type=int, nargs=3, metavar=("WIDTH", "SIDE", "BATCH"),
                        help="only print where one C-GSPN block's GPU time goes, for this width, side and batch")
    args = parser.parse_args(argv)
    device = args.device
    if args.replot:
        return replot(args.out)
    if args.profile:
        return profile_block(*args.profile, device)
    sizes = dict(GPU_SET if device == "cuda" else CPU_SET)
    sizes["sides"] = args.sides or sizes["sides"]
    sizes["model_sides"] = args.model_sides or sizes["model_sides"]
    reps = args.reps or (20 if device == "cuda" else 3)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    info = device_info(device)
    print(f"block benchmark on {info['device']}, median of {reps}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    method = (f"{repetitions(reps)}, {str(dtype).replace('torch.', '')}, patch {PATCH}" + (", CUDA graph replays with the L2 cache flushed before each (device time); eager "
                                  "times (with Python's launch overhead) beside them" if device == "cuda" else ""))
    if args.compile_mode and not args.compiled:
        parser.error("--compile-mode applies to --compiled only")
    if args.compiled:
        mode = args.compile_mode if args.compile_mode != "default" else None
        path = args.out / f"blocks-compiled-{slug}{'-' + mode if mode else ''}.json"
        return compiled_benchmark(args.sides or COMPILED_SET["sides"], dtype, device, reps, info, method, path, mode)
    rows = []
    for width in sizes["widths"]:
        for batch in sizes["batches"]:
            for side in sizes["sides"]:
                if side > MAX_SIDE_AT_BATCH.get(batch, side):
                    continue
                # On a CPU both C-GSPN layouts run the same reference path, so only the GPU times the unpacked one.
                for kind in ("cgspn", "cgspn-unpacked", "attention") if device == "cuda" else ("cgspn", "attention"):
                    rows.append(time_block(kind, width, side, batch, dtype, device, reps))
                    print_row(rows[-1])
    report = {"info": info, **provenance(info["device"]), "reps": reps, "budget_s": BUDGET_S,
              "scope": "full set" if device == "cuda" else "CPU: reduced sizes", "method": method,
              "published": PUBLISHED, "goal": GOAL, "blocks": rows, "speedups": speedups(rows),
              "speedups_eager": speedups(rows, "_eager"),
              # The packed mixer layout against the unpacked one, same run (GPU only).
              "packed_over_unpacked": speedups(rows, block="cgspn", baseline="cgspn-unpacked"),
              "models": time_models(sizes["model_sides"], dtype, device, reps)}
    plot_speedup(report, args.out / f"speedup-{slug}.png")
    report["matmul_flops"] = matmul_flops(device, dtype, reps)
    kernel_json = args.out / f"kernel-{slug}.json"
    if kernel_json.exists() and device == "cuda":  # on a CPU the kernel rows time Triton's interpreter: no roofline
        plot_roofline(json.loads(kernel_json.read_text()), args.out / f"roofline-{slug}.png", report["matmul_flops"])
    for stem in ("blocks", f"blocks-{slug}"):
        write_json(args.out / f"{stem}.json", report)
    for s in report["speedups"]:
        print(f"  speedup width {s['width']} batch {s['batch']} side {s['side']} {s['mode']}: {s['speedup']:.2f}x")
    for s in report["packed_over_unpacked"]:
        print(f"  packed layout over unpacked, width {s['width']} batch {s['batch']} side {s['side']} {s['mode']}: "
              f"{s['speedup']:.2f}x")
    print(PUBLISHED + "\n" + GOAL)
    return report


if __name__ == "__main__":
    main()
