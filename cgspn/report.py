"""reports/REPORT.md from the metrics and benchmark JSON the stages wrote: tables, plots, provenance."""
from __future__ import annotations

import json
from pathlib import Path

from .outputs import read_timings

MODEL_NAMES = {"teacher": "teacher (DINOv2 ViT-S/14, attention)", "random": "student, random init",
               "distill_stage1": "student after stage 1", "distill_stage2": "student after stage 2",
               "highres": "student after high-res"}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def evaluation_section(ev: dict) -> list[str]:
    models, used, missing = ev["models"], ev.get("splits", {}), ev.get("not_measured", {})
    sides = sorted({int(k) for r in models.values() for k in (r["seg_miou"] or r["fidelity"])})
    knn_on, seg_on = "knn" not in missing, "seg" not in missing
    rows, adapted_rows = [], []
    for name, r in models.items():
        knn = [_pct(r["knn_summary"]), _pct(r["knn_mean_patch"])] if knn_on else []
        seg = [_pct(r["seg_miou"].get(str(s), float("nan"))) for s in sides] if seg_on else []
        fidelity = [f"{r['fidelity'][str(s)]:.3f}" if str(s) in r["fidelity"] else "-" for s in sides]
        rows.append([MODEL_NAMES.get(name, name), f"{r['parameters'] / 1e6:.1f} M"] + knn + seg + fidelity)
        for k, seg_k in r.get("seg_miou_blocks", {}).items():  # the teacher's blocks that students also learn
            rows.append([f"{MODEL_NAMES.get(name, name)}, block {k}", "-"] + ["-"] * len(knn)
                        + [_pct(seg_k.get(str(s), float("nan"))) for s in sides] + ["-"] * len(sides))
        if r.get("knn_summary_adapted") is not None or r.get("seg_miou_adapted"):
            adapted_rows.append([MODEL_NAMES.get(name, name)]
                                + ([_pct(r["knn_summary_adapted"])] if knn_on else [])
                                + ([_pct(r["seg_miou_adapted"].get(str(s), float("nan"))) for s in sides]
                                   if seg_on else []))
    header = (["model", "parameters"]
              + (["kNN top-1, summary (%)", "kNN top-1, mean patch (%)"] if knn_on else [])
              + ([f"seg mIoU {s} px (%)" for s in sides] if seg_on else []) + [f"fidelity {s} px" for s in sides])
    text = []
    if knn_on:
        bank, query = used.get("knn") or ("train", "val")
        text.append(f"kNN: the `{query}` images classified against the `{bank}` images (k = {ev.get('knn_k', 20)}, "
                    f"votes weighted by exp(cosine / {ev.get('knn_temperature', 0.07)})) by the summary vector, and "
                    "by the mean of the patch features.")
    else:
        text.append(f"kNN: not measured: {missing['knn']}.")
    if seg_on:
        train, val = used.get("seg") or ("mosaic_train", "mosaic_val")
        text.append(f"Segmentation: a linear probe (BatchNorm + 1x1 conv, {ev.get('seg_steps', 600)} steps) on the "
                    f"frozen patch features, trained on `{train}` and scored on `{val}` at {', '.join(map(str, sides))} "
                    "px (the bigger `_x<s>` images where the data has them, else the same images at that size).")
    else:
        text.append(f"Segmentation: not measured: {missing['seg']}.")
    text.append("Fidelity: mean cosine similarity of the model's features, through its adaptor where it has one, to "
                "the teacher's patch features on the same images. A teacher block row is the probe on that "
                "intermediate block of the teacher (its patch tokens through the final norm): the students learn to "
                "predict it beside the teacher's output, so it is a target they saw.")
    out = ["## How good the features are", "", "Every model is scored on its own features. " + " ".join(text), "",
           _table(header, rows), ""]
    if adapted_rows and (knn_on or seg_on):
        out += ["The students' adaptor outputs (their predictions of the teacher's summary and patch features), "
                "scored the same way:", "",
                _table(["model"] + (["kNN top-1, adapted summary (%)"] if knn_on else [])
                       + ([f"seg mIoU {s} px, adapted (%)" for s in sides] if seg_on else []), adapted_rows), ""]
    out += ["![metrics against resolution](figures/evaluate_resolution.png)", "",
            "PCA of the patch features (first three components as RGB), teacher above the student:", "",
            "![PCA feature maps](figures/pca_maps.png)", ""]
    rows = verdicts(models, sides, knn_on, seg_on)
    if rows:
        out += ["### Targets", "", _table(["target", "measured", "verdict"], rows), ""]
    return out


def verdict(margin: float) -> str:
    """`margin` in points by which the measure clears its target (negative: missed by that much)."""
    return "met" if margin >= 0 else f"missed by {-margin:.1f} points"


def verdicts(models: dict, sides: list[int], knn_on: bool, seg_on: bool) -> list[list[str]]:
    """One row per target the run can be judged on: kNN of the stage-2 student within 3 points of the
    teacher and 10 above the random student; the high-res student's mIoU at the largest side at least the
    teacher's."""
    t, s2, hr, rnd = (models.get(k) for k in ("teacher", "distill_stage2", "highres", "random"))
    rows = []
    if knn_on and t and s2:
        gap = 100 * (t["knn_summary"] - s2["knn_summary"])
        rows.append(["stage-2 student kNN (summary) within 3 points below the teacher",
                     f"{_pct(s2['knn_summary'])} against {_pct(t['knn_summary'])} ({gap:+.1f} below)",
                     verdict(3 - gap)])
        if rnd:
            lift = 100 * (s2["knn_summary"] - rnd["knn_summary"])
            rows.append(["stage-2 student kNN at least 10 points above the random student",
                         f"{_pct(s2['knn_summary'])} against {_pct(rnd['knn_summary'])} ({lift:+.1f})",
                         verdict(lift - 10)])
    if seg_on and t and hr and sides:
        big = str(max(sides))
        diff = 100 * (hr["seg_miou"][big] - t["seg_miou"][big])
        rows.append([f"high-res student segmentation mIoU at {big} px at least the teacher's",
                     f"{_pct(hr['seg_miou'][big])} against {_pct(t['seg_miou'][big])} ({diff:+.1f})", verdict(diff)])
    return rows


def _timing(root: Path, stage: str, key: str, fmt: str = "{}") -> str:
    """A figure of reports/timings/<stage>.json (not tracked: the machine's, of the run that made this page)."""
    value = read_timings(root, stage).get(key)
    return "-" if value is None else fmt.format(value)


def training_section(root: Path) -> list[str]:
    out = ["## Distillation", ""]
    s1 = _load(root / "reports/metrics/distill_stage1.json")
    s2 = _load(root / "reports/metrics/distill_stage2.json")
    hr = _load(root / "reports/metrics/highres.json")
    rows = []

    def times(stage: str) -> list[str]:
        return [_timing(root, stage, "images_per_s"), _timing(root, stage, "seconds")]

    if s1:
        rows.append(["stage 1 (module-wise)", "mean per-block validation loss",
                     f"{s1['val_start']['loss']:.3f} -> {s1['val_end']['loss']:.3f} "
                     f"({s1['val_start']['loss'] / s1['val_end']['loss']:.1f}x lower)", s1["steps"],
                     *times("distill_stage1")])
    if s2:
        for k in [k for k in s2["val_end"] if k.endswith("/patch_cosine")]:
            t = k.split("/")[0]
            rows.append(["stage 2 (end to end)", f"{t}: mean patch cosine on val",
                         f"stage-1 student {s2['val_start'][t + '/patch_cosine_raw']:.3f} -> stage-2 student "
                         f"{s2['val_end'][k]:.3f}", s2["steps"], *times("distill_stage2")])
    if hr:
        for k in [k for k in hr["val_end"] if "/patch_cosine/" in k]:
            rows.append(["high resolution", k.replace("/patch_cosine/", ": mean patch cosine at "),
                         f"{hr['val_start'][k]:.3f} -> {hr['val_end'][k]:.3f}", hr["steps"], *times("highres")])
    out += [_table(["stage", "figure", "start -> end", "steps", "images/s (median step)", "seconds"], rows), "",
            "images/s is the median over a stage's steps, seconds the stage's wall time including Ray's start; "
            "both are this machine's, in the run that wrote this page (they vary run to run; the losses do not).", ""]
    out += [f"![{s} curves](plots/{s}.png)" for s in ("distill_stage1", "distill_stage2", "highres")
            if (root / "reports/plots" / f"{s}.png").exists()]
    return out + [""]


def data_section(root: Path) -> list[str]:
    shard, cache = _load(root / "reports/metrics/shard.json"), _load(root / "reports/metrics/cache_teacher.json")
    out = ["## Data", ""]
    if shard:
        out += [_table(["split", "images", "shards", "MB"], [[s, v["count"], v["shards"], f"{v['bytes'] / 1e6:.1f}"]
                                                             for s, v in shard["splits"].items()]), "",
                f"Sharding: {shard['images']} images at {_timing(root, 'shard', 'images_per_s')} images/s."]
    if cache:
        cache_times = read_timings(root, "cache_teacher")
        for t, m in cache.items():
            tm = cache_times.get(t, {})
            out.append(f"Teacher-feature cache ({t}): {m['images']} images at {tm.get('images_per_s', '-')} images/s "
                       f"with {m['workers']} Ray workers ({tm.get('images_per_s_per_worker', '-')} per worker), "
                       f"{m['bytes_per_image'] / 1e3:.1f} kB per image.")
    return out + [""]


def device_benchmarks(root: Path) -> list[tuple[str, dict]]:
    """(slug, block report) of every device with a record in reports/benchmarks/, GPUs first."""
    found = []
    for path in sorted((root / "reports/benchmarks").glob("blocks-*.json")):
        if path.stem.startswith("blocks-compiled-"):  # a device's torch.compile run: see compiled_lines
            continue
        record = _load(path)
        if record:
            found.append((path.stem.removeprefix("blocks-"), record))
    return sorted(found, key=lambda item: item[1]["info"].get("kind") == "cpu")


def compiled_lines(bench: Path, slug: str) -> list[str]:
    """The torch.compile runs of one device (`bench_blocks --compiled`, one file per compile mode), if any:
    both blocks eager and compiled in one run."""
    out = []
    for path in sorted(bench.glob(f"blocks-compiled-{slug}*.json")):
        record = _load(path)
        if not record:
            continue
        gains = {kind: {(s["side"], s["mode"]): s["speedup"] for s in found}
                 for kind, found in record["compiled_over_eager"].items()}
        eager = {(s["side"], s["mode"]): s["speedup"] for s in record["speedups"]}
        rows = [[s["side"], s["mode"], f"{eager[k]:.2f}x" if (k := (s["side"], s["mode"])) in eager else "-",
                 f"{s['speedup']:.2f}x", *(f"{gains[kind][k]:.2f}x" if k in gains[kind] else "-"
                                           for kind in ("cgspn", "attention"))]
                for s in record["speedups_compiled"]]
        errors = [f"{b['block']} at {b['side']} px: {b['error']}" for b in record["blocks"] if "error" in b]
        plot = path.with_name(path.stem.replace("blocks", "speedup") + ".png")
        out += [f"#### Both blocks under torch.compile (`{path.name}`)", "",
                f"{record['scope']}; {record['method']}.", "",
                _table(["side (px)", "mode", "attention / C-GSPN, eager", "both compiled", "C-GSPN compiled / eager",
                        "attention compiled / eager"], rows), ""]
        out += ([f"Failed: {'; '.join(errors)}.", ""] if errors else [])
        out += ([f"![{plot.name}](benchmarks/{plot.name})", ""] if plot.exists() else [])
    return out


def benchmark_section(root: Path) -> list[str]:
    out = ["## Speed", ""]
    records = device_benchmarks(root)
    if not records:
        return out + ["No block benchmark yet (`python -m cgspn.bench_blocks`).", ""]
    out += ["One subsection per device that has a record in `reports/benchmarks/` (files named by device). "
            "A CPU run of the `benchmark` stage never replaces a GPU record.", ""]
    bench = root / "reports/benchmarks"
    for slug, blocks in records:
        eager = {(s["width"], s["batch"], s["side"], s["mode"]): s["speedup"] for s in blocks.get("speedups_eager", [])}
        out += [f"### {blocks['info']['device']}", "", f"{blocks['scope']}; {blocks['method']}.", ""]
        rows = [[b["block"], b["width"], b["batch"], b["side"], b["tokens"],
                 f"{b['fwd_ms']:.2f}" if "fwd_ms" in b else b.get("error"),
                 f"{b['fwd+bwd_ms']:.2f}" if "fwd+bwd_ms" in b else "-"] for b in blocks["blocks"]]
        out += [_table(["block", "width", "batch", "side (px)", "tokens", "fwd ms", "fwd+bwd ms"], rows), ""]
        speed_rows = [[s["width"], s["batch"], s["side"], s["mode"], f"{s['speedup']:.2f}x"]
                      + ([f"{eager[k]:.2f}x"] if (k := (s["width"], s["batch"], s["side"], s["mode"])) in eager else [])
                      for s in blocks["speedups"]]
        out += [_table(["width", "batch", "side (px)", "mode", "attention / C-GSPN"] + (["eager"] if eager else []),
                       speed_rows),
                "", f"For comparison, the {blocks['published']}. {blocks['goal'][0].upper() + blocks['goal'][1:]}.", ""]
        out += [_table(["model", "side (px)", "images/s"],
                       [[m["model"], m["side"], f"{m['images_per_s']:.1f}" if "images_per_s" in m else m.get("error")]
                        for m in blocks["models"]]), ""]
        out += [f"![{name}](benchmarks/{name})" for name in (f"speedup-{slug}.png", f"roofline-{slug}.png",
                                                            f"kernel-{slug}.png") if (bench / name).exists()]
        out += [""] + compiled_lines(bench, slug)
        kernel_md = bench / f"kernel-{slug}.md"
        if kernel_md.exists():
            out += ["", f"#### The GSPN scan kernel ({blocks['info']['device']})", "",
                    kernel_md.read_text().split("\n", 2)[-1].strip()]
        checks = bench / f"gpu-checks-{slug}.md"
        if checks.exists():
            out += ["", f"Correctness on this GPU, compute-sanitizer and a profile of one block: "
                        f"[`benchmarks/{checks.name}`](benchmarks/{checks.name}).", ""]
        out.append("")
    return out


def traffic_section(root: Path) -> list[str]:
    """The counted bytes of one C-GSPN block's PyTorch ops around the scan, per mixer layout."""
    t = _load(root / "reports/benchmarks/block-traffic.json")
    if not t:
        return []
    rows = [[layout, mode, f"{m['glue_MB']:.0f}", f"{m['glue_floor_ms']:.3f}", f"{m['all_MB']:.0f}"]
            for layout, modes in t["layouts"].items() for mode, m in modes.items()]
    return ["### Memory traffic around the scan (counted, not timed)", "",
            f"One C-GSPN block, width {t['width']}, {t['side']} px, batch {t['batch']}, {t['dtype']}: {t['method']}. "
            "`packed` is the mixer's layout on the triton backend (heads as one matmul in the scan's LINES order), "
            "`unpacked` the layout before it (1x1 conv heads, copies into the LINES layout). The floor is the "
            f"memory-bound bytes at {t['copy_GBps']:.0f} GB/s (the H100's measured copy bandwidth).", "",
            _table(["layout", "mode", "MB without matmuls", "floor ms", "MB, all ops"], rows), ""]


def data_sentence(root: Path, ev: dict | None) -> str:
    """What this run was trained and scored on, from data/shards' dataset.json and the stages' metrics."""
    shard = _load(root / "reports/metrics/shard.json") or {}
    dataset = shard.get("data", {})
    source = dataset.get("source", "?")
    what = {"fashion_mnist": "the embedded Fashion-MNIST garments and garment mosaics (a demo sized for a 2-core "
                             "CPU: its figures show that the pipeline works end to end, not what a full run reaches)",
            "folder": f"an image folder, `{dataset.get('path')}`", "table": f"a table, `{dataset.get('path')}`",
            "segmentation": f"a segmentation data set, `{dataset.get('path')}`"}.get(source, f"source `{source}`")
    sizes = ", ".join(f"{s} {v['count']}" for s, v in shard.get("splits", {}).items())
    steps = [_load(root / "reports/metrics" / f"{s}.json") for s in ("distill_stage1", "distill_stage2", "highres")]
    total = sum(m["steps"] for m in steps if m)
    return (f"{what}; images per split: {sizes or 'unknown'}; training resolution "
            f"{ev['resolution'] if ev else '?'} px; {total} training steps over the three stages.")


def build_report(root: Path, commit: str | None, params_text: str, when: str) -> str:
    ev = _load(root / "reports/metrics/evaluate.json")
    parts = ["# C-GSPN: pipeline report", "",
             f"Generated {when} by the `report` stage of `dvc repro`, from commit `{commit or 'unknown'}` with "
             "the parameters at the end of this page.", "",
             "C-GSPN is a vision encoder whose token mixer is 2D spatial propagation (four-direction GSPN line "
             "scans in a compressed channel space) instead of self-attention. It is distilled from an attention "
             "teacher in two stages (each mixer imitates its block's attention output, then the whole network "
             "matches the teacher's final features through adaptor heads) and then trained briefly at higher "
             f"resolution. This run: {data_sentence(root, ev)}", ""]
    if ev:
        parts += evaluation_section(ev)
    parts += training_section(root) + data_section(root) + benchmark_section(root) + traffic_section(root)
    parts += ["## Parameters", "", "```yaml", params_text.strip(), "```", ""]
    return "\n".join(parts)


def headline(root: Path) -> dict[str, float]:
    """The figures a pipeline run is compared by (the MLflow parent run's metrics, the flow's table): kNN
    top-1 and segmentation mIoU per scale of the teacher, the stage-2 and high-res students (what the data
    allowed), the high-res student's fidelity, parameter counts, and the block speedup over attention at the
    largest side benchmarked on this run's device (forward). Percentages as fractions, as the stages write."""
    out: dict[str, float] = {}
    ev = _load(root / "reports/metrics/evaluate.json")
    if ev:
        for name in ("teacher", "distill_stage2", "highres", "random"):
            r = ev["models"].get(name)
            if not r:
                continue
            if r.get("knn_summary") is not None:
                out[f"knn/{name}"] = r["knn_summary"]
            if name != "random":
                out.update({f"miou_{px}px/{name}": v for px, v in r["seg_miou"].items()})
        hr = ev["models"].get("highres", {})
        out.update({f"fidelity_{px}px/highres": v for px, v in hr.get("fidelity", {}).items()})
        for name in ("teacher", "highres"):
            if name in ev["models"]:
                out[f"parameters_M/{name}"] = round(ev["models"][name]["parameters"] / 1e6, 2)
    blocks = _load(root / "reports/benchmarks/blocks.json")
    if blocks and blocks.get("speedups"):
        forward = [s for s in blocks["speedups"] if s["mode"] == "fwd"]
        top = max(forward, key=lambda s: (s["side"], s["width"], -s["batch"]), default=None)
        if top:
            out[f"block_speedup/w{top['width']}_b{top['batch']}_{top['side']}px_{blocks['info']['kind']}"] = top["speedup"]
    return out
