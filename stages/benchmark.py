"""Stage `benchmark`: the GSPN kernel roofline (kernels.bench) and the block and model latency against
attention (benchmarks.blocks), on the device at hand: the full set on a CUDA GPU, reduced sizes on a CPU;
and the bytes a C-GSPN block's PyTorch ops move around the scan (benchmarks.block_traffic, counted, no timing).
Both write under reports/benchmarks/ with the device in the file names; this stage runs them and logs the
results to MLflow. On a GPU machine without the pipeline's packages, run the two modules directly.
"""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import block_traffic
from benchmarks import blocks as bench_blocks
from cgspn.pipeline.params import Param
from cgspn.pipeline.cli import run_stage
from kernels import bench as kernel_bench

SCHEMA = {
    "reps": Param(int, min=1),
    "kernel": Param(bool),
    "blocks": Param(bool),
    "cpu_sides": Param(list, item=int, min=16),  # block sides on a CPU; a GPU runs the full set
    "cpu_model_sides": Param(list, item=int, min=14),
}
OUT = Path("reports/benchmarks")


def main(p: dict, root: Path, run) -> dict:
    """Benchmark the kernel, the blocks and the models."""
    out = root / OUT
    out.mkdir(parents=True, exist_ok=True)
    metrics = {}
    if p["kernel"]:
        kernel = kernel_bench.main(["--out", str(out), "--reps", str(p["reps"])])
        metrics["copy_GBps"] = kernel["copy_GBps"]
    if p["blocks"]:
        sides = [] if torch.cuda.is_available() else ["--sides", *map(str, p["cpu_sides"]),
                                                      "--model-sides", *map(str, p["cpu_model_sides"])]
        blocks = bench_blocks.main(["--out", str(out), "--reps", str(p["reps"]), *sides])
        for s in blocks["speedups"]:
            metrics[f"speedup/w{s['width']}_b{s['batch']}_{s['side']}px_{s['mode']}"] = s["speedup"]
        for m in blocks["models"]:
            if "images_per_s" in m:
                metrics[f"images_per_s/{m['model']}_{m['side']}px"] = m["images_per_s"]
    traffic = block_traffic.main(["--out", str(out / "block-traffic.json")])  # counted, device-independent: seconds
    for layout, modes in traffic["layouts"].items():
        for mode, t in modes.items():
            metrics[f"glue_MB/{layout}_{mode}"] = t["glue_MB"]
    run.log_metrics(metrics)
    for f in sorted(out.glob("*")):
        if f.suffix in (".json", ".md", ".png"):
            run.log_artifact(f, "benchmarks")
    return metrics


if __name__ == "__main__":
    run_stage("benchmark", SCHEMA, main)
