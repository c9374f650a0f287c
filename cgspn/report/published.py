"""What the block benchmark aims at and how it times, in words and numbers: shared by the benchmark
(`benchmarks.blocks`) and the report (`cgspn.report.build`), which must not import the models or the kernels."""
from __future__ import annotations

PUBLISHED = "published C-GSPN: block 2x faster than FlashAttention at 1024 px (batch 32, width 1152), 4x at 2048 px"
GOAL = "our goal on an H100/H200: at least 4x at 2048 px with batch 1 and width 1152, growing with resolution"
GOAL_SPEEDUP, GOAL_SIDE, GOAL_WIDTH, GOAL_BATCH = 4.0, 2048, 1152, 1  # GOAL in numbers (forward)
# Slow timings get fewer reps (at least 5) so that each takes about this long.
BUDGET_S = 3.0


def repetitions(reps: int, budget_s: float = BUDGET_S) -> str:
    """What `kernels.bench.median_ms(..., reps, budget_s=budget_s)` does, in words: a slow function gets fewer
    repetitions, but never fewer than min(reps, 5)."""
    if reps <= 5:
        return f"median of {reps} repetitions per timing after one warm-up"
    return (f"median of up to {reps} repetitions per timing after one warm-up (a slow timing gets fewer, down to 5, "
            f"so that it takes about {budget_s:.0f} s)")
