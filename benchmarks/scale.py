"""Scale benchmark (not a test): does a growing data set cost the same per image, in the same memory?

    python -m benchmarks.scale                         # 1k, 10k, 100k samples; reports/benchmarks/scale-cpu.json
    python -m benchmarks.scale --sizes 1000 10000      # fewer

For each size: synthetic img2dataset shards (benchmarks/img2dataset_shards.py, 64 px JPEGs, 1 in 50 failed,
1000 samples a shard) are written once into --work, then three stages run as a user runs them, each its own
process with the webdataset source reading the shards in place: `shard` (indexing), `cache_teacher` (the
DINOv2 teacher at 28 px over every image, 2 Ray actors) and `distill_stage1` (a fixed number of steps,
images read by byte range). Per stage: wall seconds, images/s, CPU-seconds per image and peak RSS, the
latter two over the stage's whole process tree (Ray's processes included), sampled every 0.2 s with psutil.
A stage whose work is fixed (training's steps) counts the images its steps read. The target: CPU-seconds
per image and peak RSS flat within 20% from 10k to 100k. One run per size on a shared machine (timings vary
up to 2x between runs); the figure is reports/benchmarks/scale-cpu.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

from benchmarks.img2dataset_shards import write_shards
from kernels.bench import provenance

REPO = Path(__file__).resolve().parents[1]
TEACHER = "dinov2_vits14_imgfocus"
PER_SHARD = 1000
TRAIN_STEPS, TRAIN_BATCH = 30, 16


class TreeMonitor:
    """Peak RSS (sum over a process and its descendants) and their CPU seconds, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2):
        self.root, self.every = psutil.Process(pid), every
        self.peak_rss, self.cpu = 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    self.cpu[p.pid] = max(self.cpu.get(p.pid, 0.0), t.user + t.system)
                except psutil.NoSuchProcess:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self.every)

    def stop(self) -> tuple[float, float]:
        """(peak RSS in MB, CPU seconds)."""
        self._stop.set()
        self._thread.join()
        return self.peak_rss / 2**20, sum(self.cpu.values())


def run_stage(stage: str, params: Path, root: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", f"stages.{stage}", "--params", str(params), "--root", str(root)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    monitor = TreeMonitor(proc.pid)
    out = proc.communicate()[0]
    seconds = time.perf_counter() - start
    rss, cpu = monitor.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed (exit {proc.returncode}):\n{out[-3000:]}")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 1), "peak_rss_mb": round(rss, 1)}


def bench_params(base: dict, pattern: str) -> dict:
    p = json.loads(json.dumps(base))
    p["shard"].update(source="webdataset", path=pattern, val_fraction=0.01, seed=0)
    p["teacher"]["names"] = [TEACHER]
    p["cache_teacher"].update(resolution=28, layers={}, workers=2, batch_size=64, splits="auto", phis_splits="auto")
    p["distill_stage1"].update(teacher=TEACHER, resolution=28, steps=TRAIN_STEPS, batch_size=TRAIN_BATCH, workers=1,
                               val_count=16, checkpoint_every=TRAIN_STEPS, log_every=TRAIN_STEPS, warmup_steps=1)
    return p


def measure(n: int, work: Path, teachers: Path, base: dict, env: dict) -> list[dict]:
    data = work / f"shards-{n}"
    if not (data / "done").exists():
        shutil.rmtree(data, ignore_errors=True)
        t = time.perf_counter()
        write_shards(data, n, PER_SHARD, side=64, labels=True, failed_every=50)
        (data / "done").write_text("")
        print(f"scale: wrote {n} samples in {time.perf_counter() - t:.0f} s", flush=True)
    shards = len(list(data.glob("*.tar")))
    root = work / f"root-{n}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "models/teachers").mkdir(parents=True)
    for suffix in (".safetensors", ".json"):  # the ViT alone (the teacher stage's output, filtered)
        shutil.copy(teachers / f"{TEACHER}{suffix}", root / "models/teachers")
    index = json.loads((teachers / "teachers.json").read_text())
    index["teachers"] = [t for t in index["teachers"] if t["name"] == TEACHER]
    (root / "models/teachers/teachers.json").write_text(json.dumps(index, indent=2))
    params = work / f"params-{n}.yaml"
    params.write_text(yaml.safe_dump(bench_params(base, f"{data}/{{00000..{shards - 1:05d}}}.tar")))
    rows = []
    for stage in ("shard", "cache_teacher", "distill_stage1"):
        r = run_stage(stage, params, root, env)
        images = (TRAIN_STEPS * TRAIN_BATCH if stage == "distill_stage1"
                  else json.loads((root / "reports/metrics/shard.json").read_text())["images"])
        row = {"samples": n, "stage": stage, "images": images, **r,
               "images_per_s": round(images / r["seconds"], 1),
               "cpu_ms_per_image": round(1000 * r["cpu_seconds"] / images, 3)}
        rows.append(row)
        print(f"scale: {n} samples, {stage}: {row}", flush=True)
    shutil.rmtree(root / "data/features", ignore_errors=True)
    return rows


def flatness(rows: list[dict], small: int, large: int) -> dict:
    """Per stage, from `small` to `large` samples: the ratio of CPU per image (fixed costs such as Ray's start
    included, so it falls as they spread over more images), of the marginal CPU per image (the CPU the extra
    images cost, against the smaller run's whole cost per image: what growth would show), and of peak RSS;
    `flat_within_20pct` when none of marginal cost and RSS grows by more than 20%."""
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        a = next((r for r in rows if r["stage"] == stage and r["samples"] == small), None)
        b = next((r for r in rows if r["stage"] == stage and r["samples"] == large), None)
        if not (a and b):
            continue
        cost, rss = b["cpu_ms_per_image"] / a["cpu_ms_per_image"], b["peak_rss_mb"] / a["peak_rss_mb"]
        marginal = cost  # a fixed number of images (training's steps): the per-image cost is the marginal one
        if b["images"] > a["images"]:
            extra = 1000 * (b["cpu_seconds"] - a["cpu_seconds"]) / (b["images"] - a["images"])
            marginal = extra / a["cpu_ms_per_image"]
        out[stage] = {"cpu_per_image_ratio": round(cost, 3), "marginal_cpu_per_image_ratio": round(marginal, 3),
                      "peak_rss_ratio": round(rss, 3),
                      "flat_within_20pct": bool(marginal <= 1.2 and abs(rss - 1) <= 0.2)}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage]
        n = [r["samples"] for r in mine]
        axes[0].plot(n, [r["cpu_ms_per_image"] for r in mine], "o-", label=stage)
        axes[1].plot(n, [r["peak_rss_mb"] for r in mine], "o-", label=stage)
    for ax, title in zip(axes, ["CPU ms per image (process tree)", "peak RSS, MB (process tree)"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("samples in the data set")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle("Scale: webdataset shards read in place (CPU, one run per size)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--work", type=Path, default=Path("runs/scale"), help="shards and stage roots (kept)")
    parser.add_argument("--teachers", type=Path, default=Path("models/teachers"),
                        help="the teacher stage's output (run `dvc repro teacher` first)")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/scale-cpu.json"))
    args = parser.parse_args(argv)
    if not (args.teachers / f"{TEACHER}.safetensors").exists():
        raise SystemExit(f"{args.teachers / TEACHER}.safetensors: missing (run `dvc repro teacher` first)")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{(args.work / 'mlflow.db').resolve()}"}
    env.pop("RAY_ADDRESS", None)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [row for n in args.sizes for row in measure(n, args.work.resolve(), args.teachers.resolve(), base, env)]
    sizes = sorted(args.sizes)
    report = {**provenance(f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"),
              "method": __doc__.split("\n\n", 2)[2].strip().replace("\n", " "),
              "rows": rows,
              "flat_10k_to_100k": flatness(rows, 10000, 100000) if {10000, 100000} <= set(sizes) else None,
              "flat_smallest_to_largest": flatness(rows, sizes[0], sizes[-1])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"scale: wrote {args.out} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
