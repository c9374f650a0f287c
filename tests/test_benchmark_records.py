"""Benchmark records carry when, at which commit and on which device they were measured; their words about
repetitions match what the timer does; the plots are drawn (files, not pixels), with no roofline for a CPU."""
import json
import subprocess

from benchmarks import blocks as bench_blocks
from kernels import bench as kernel_bench


def test_provenance_is_date_commit_device_and_survives_no_git(monkeypatch):
    p = kernel_bench.provenance("NVIDIA H200")
    assert p["device"] == "NVIDIA H200" and p["date"].endswith("Z") and len(p["date"]) == 20
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert p["commit"] == (head or "unknown")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(kernel_bench.subprocess, "run", no_git)
    assert kernel_bench.provenance("cpu")["commit"] == "unknown"


def test_repetitions_say_what_median_ms_does():
    calls = []

    def slow():
        calls.append(1)

    kernel_bench.median_ms(slow, "cpu", 3, budget_s=0.0)  # 1 warm-up + 3: fewer than 5 stay as asked
    assert len(calls) == 4 and bench_blocks.repetitions(3) == "median of 3 repetitions per timing after one warm-up"
    calls.clear()
    kernel_bench.median_ms(slow, "cpu", 20, budget_s=0.0)  # over budget at once: down to 5, never fewer
    assert len(calls) == 6 and "up to 20" in bench_blocks.repetitions(20) and "down to 5" in bench_blocks.repetitions(20)


def kernel_record(device: str) -> dict:
    rows = [{"name": f"shape{i}", "op": "4dir", "B": 1, "C": 8, "H": 64, "W": 64, "backend": backend, "mode": mode,
             "ms": 0.5 + i, "min_bytes": 1e6} for i in range(3) for backend in ("stepwise", "triton")
            for mode in ("fwd", "fwd+bwd")]
    return {"info": {"device": device}, "copy_GBps": 3000.0, "rows": rows}


def block_record(kind: str, device: str) -> dict:
    rows = [{"block": b, "width": 1152, "side": side, "batch": 1, "fwd_ms": ms * side, "fwd+bwd_ms": 3 * ms * side}
            for side in (512, 1024, 2048) for b, ms in (("cgspn", 1.0), ("attention", side / 1000))]
    return {"info": {"device": device, "kind": kind}, "speedups": bench_blocks.speedups(rows), "matmul_flops": 1e15}


def test_replot_draws_speedup_plots_and_a_roofline_only_for_a_gpu(tmp_path):
    for slug, kind, device in (("cpu", "cpu", "CPU x86_64 (2 cores)"), ("nvidia-h200", "cuda", "NVIDIA H200")):
        (tmp_path / f"blocks-{slug}.json").write_text(json.dumps(block_record(kind, device)))
        (tmp_path / f"kernel-{slug}.json").write_text(json.dumps(kernel_record(device)))
    bench_blocks.replot(tmp_path)
    for name in ("speedup-cpu.png", "speedup-nvidia-h200.png", "roofline-nvidia-h200.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert not (tmp_path / "roofline-cpu.png").exists()  # the interpreter's timings: no roofline


def test_training_and_resolution_plots_are_written(tmp_path):
    from cgspn.eval.figures import resolution_figure
    from cgspn.train.curves import plot_history, read_csv, write_csv

    history = [{"step": s, "loss": 10 / s, **{f"block{b}": b / s for b in range(12)}, "lr": 1e-3} for s in range(1, 9)]
    write_csv(tmp_path / "c.csv", history)
    assert read_csv(tmp_path / "c.csv") == history  # the replot reads back what the stage wrote
    val = [{"step": 0, "t/summary": 1.0, "t/patch_cosine": 0.5}, {"step": 8, "t/summary": 0.5, "t/patch_cosine": 0.8}]
    path = plot_history(history, val, tmp_path / "h.png", "stage")
    assert path.stat().st_size > 1000
    model = {"seg_miou": {"56": 0.2, "112": 0.25}, "fidelity": {"56": 0.9, "112": 0.8}, "knn_summary": 0.7,
             "knn_mean_patch": 0.69}
    path = resolution_figure({"teacher": model, "random": {**model, "knn_summary": 0.5}}, tmp_path / "r.png", 20)
    assert path.stat().st_size > 1000
