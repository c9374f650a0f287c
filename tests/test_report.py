"""The report's speed section from benchmark records laid out as `cgspn.bench_blocks` writes them: a device's
torch.compile run (`blocks-compiled-<device>.json`) is a table under that device, not a device of its own."""
import json
import random

from cgspn.bench_blocks import GOAL, PUBLISHED, speedups
from cgspn.report import benchmark_section


def row(block: str, fwd_ms: float, both_ms: float, side: int = 2048) -> dict:
    return {"block": block, "width": 1152, "side": side, "tokens": (side // 16) ** 2, "batch": 1, "fwd_ms": fwd_ms,
            "fwd_eager_ms": fwd_ms, "fwd+bwd_ms": both_ms, "fwd+bwd_eager_ms": both_ms}


def test_a_compiled_run_is_a_table_under_its_device(tmp_path):
    bench = tmp_path / "reports/benchmarks"
    bench.mkdir(parents=True)
    ms = {k: round(random.uniform(1, 9), 2) for k in ("c", "a", "cc", "ac")}
    eager = [row("cgspn", ms["c"], 3 * ms["c"]), row("attention", ms["a"], 3 * ms["a"])]
    info = {"device": "NVIDIA H100 80GB HBM3", "kind": "cuda"}
    record = {"info": info, "scope": "full set", "method": "median of 20", "published": PUBLISHED, "goal": GOAL,
              "blocks": eager, "speedups": speedups(eager), "speedups_eager": speedups(eager, "_eager"), "models": []}
    (bench / "blocks-nvidia-h100-80gb-hbm3.json").write_text(json.dumps(record))
    both = eager + [row("cgspn-compiled", ms["cc"], 3 * ms["cc"]), row("attention-compiled", ms["ac"], 3 * ms["ac"])]
    compiled = {**record, "scope": "width 1152, batch 1", "blocks": both + [{**row("cgspn-compiled", 0, 0, 4096),
                                                                            "error": "torch.compile failed: X"}],
                "speedups": speedups(both), "speedups_compiled": speedups(both, block="cgspn-compiled",
                                                                           baseline="attention-compiled"),
                "compiled_over_eager": {k: speedups(both, block=f"{k}-compiled", baseline=k)
                                        for k in ("cgspn", "attention")}}
    (bench / "blocks-compiled-nvidia-h100-80gb-hbm3.json").write_text(json.dumps(compiled))

    lines = benchmark_section(tmp_path)
    assert [line for line in lines if line.startswith("### ")] == ["### NVIDIA H100 80GB HBM3"]  # one device
    text = "\n".join(lines)
    assert "#### Both blocks under torch.compile (`blocks-compiled-nvidia-h100-80gb-hbm3.json`)" in text
    ratios = [ms["a"] / ms["c"], ms["ac"] / ms["cc"], ms["c"] / ms["cc"], ms["a"] / ms["ac"]]
    assert "| 2048 | fwd | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |" in text
    assert "Failed: cgspn-compiled at 4096 px: torch.compile failed: X." in text


def test_each_target_gets_a_verdict_met_or_missed_by_how_much():
    from cgspn.report import evaluation_section, verdicts

    def model(knn, miou):
        return {"knn_summary": knn, "knn_mean_patch": knn, "knn_summary_adapted": None, "parameters": 1e6,
                "seg_miou": {"56": miou, "224": miou}, "seg_miou_adapted": {}, "fidelity": {"56": 0.9, "224": 0.8}}

    models = {"teacher": model(0.744, 0.224), "random": model(0.597, 0.116), "distill_stage2": model(0.700, 0.20),
              "highres": model(0.70, 0.2251)}
    rows = verdicts(models, [56, 224], True, True)
    assert [r[2] for r in rows] == ["missed by 1.4 points", "met", "met"]  # 4.4 below the teacher; +10.3; +0.1
    models["distill_stage2"] = model(0.690, 0.2)
    assert verdicts(models, [56, 224], True, True)[1][2] == "missed by 0.7 points"  # 9.3 above random
    section = "\n".join(evaluation_section({"models": models, "resolution": 56, "not_measured": {}}))
    assert "### Targets" in section and "missed by" in section
    assert verdicts(models, [56, 224], False, False) == []  # nothing measured, nothing judged
