"""reports/REPORT.md from the metrics and benchmark JSON the stages wrote: tables, plots, provenance."""
from __future__ import annotations

import datetime
import json
import re
import subprocess
from pathlib import Path

import yaml

from cgspn.report.published import (GOAL, GOAL_BATCH, GOAL_SIDE, GOAL_SPEEDUP, GOAL_WIDTH, PUBLISHED, repetitions)
from cgspn.pipeline.names import TRAINING_STAGES
from cgspn.report.markdown import pct as _pct
from cgspn.report.markdown import table as _table
from cgspn.teachers.display import teacher_label, teacher_sentence

MODEL_NAMES = {"teacher": "teacher (attention)", "random": "student, random init",
               "distill_stage1": "student after stage 1", "distill_stage2": "student after stage 2",
               "highres": "student after high-res"}


def model_names(teacher: str | None) -> dict[str, str]:
    return {**MODEL_NAMES, "teacher": f"teacher: {teacher_label(teacher)}, attention" if teacher
            else MODEL_NAMES["teacher"]}


def _params(text: str) -> dict:
    """params.yaml as a mapping ({} when it is not one)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _setting(ev: dict, params: dict, key: str) -> str:
    """A parameter of the evaluate stage: as evaluate.json recorded it, else as params.yaml has it, else '?'."""
    value = ev.get(key, (params.get("evaluate") or {}).get(key))
    return "?" if value is None else str(value)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def evaluation_section(ev: dict, params: dict | None = None) -> list[str]:
    from cgspn.eval.protocol import protocols

    params = params or {}
    models, used, missing = ev["models"], ev.get("splits", {}), ev.get("not_measured", {})
    names = model_names(ev.get("teacher") or (params.get("evaluate") or {}).get("teacher"))
    sides = sorted({int(k) for r in models.values() for key in ("seg_miou", "fidelity", "fidelity_adapted")
                    for k in r.get(key) or {}})
    knn_on, seg_on = "knn" not in missing, "seg" not in missing

    def per_side(values: dict | None, fmt) -> list[str]:
        return [fmt(values[str(s)]) if values and str(s) in values else "-" for s in sides]

    rows, adapted_rows = [], []
    for name, r in models.items():
        knn = [_pct(r.get("knn_summary")), _pct(r.get("knn_mean_patch"))] if knn_on else []
        seg = per_side(r.get("seg_miou"), _pct) if seg_on else []
        rows.append([names.get(name, name), f"{r['parameters'] / 1e6:.1f} M"] + knn + seg
                    + per_side(r.get("fidelity"), lambda v: f"{v:.3f}"))
        for k, seg_k in r.get("seg_miou_blocks", {}).items():  # the teacher's blocks that students also learn
            rows.append([f"{names.get(name, name)}, block {k}", "-"] + ["-"] * len(knn)
                        + per_side(seg_k, _pct) + ["-"] * len(sides))
        if r.get("knn_summary_adapted") is not None or r.get("seg_miou_adapted") or r.get("fidelity_adapted"):
            adapted_rows.append([names.get(name, name)]
                                + ([_pct(r.get("knn_summary_adapted"))] if knn_on else [])
                                + (per_side(r.get("seg_miou_adapted"), _pct) if seg_on else [])
                                + per_side(r.get("fidelity_adapted"), lambda v: f"{v:.3f}"))
    header = (["model", "parameters"]
              + (["kNN top-1, summary (%)", "kNN top-1, mean patch (%)"] if knn_on else [])
              + ([f"seg mIoU {s} px (%)" for s in sides] if seg_on else [])
              + [f"fidelity, own tokens, {s} px" for s in sides])
    text = []
    if knn_on:
        bank, query = used.get("knn") or ("train", "val")
        text.append(f"kNN: the `{query}` images classified against the `{bank}` images (k = {_setting(ev, params, 'knn_k')}, "
                    f"votes weighted by exp(cosine / {_setting(ev, params, 'knn_temperature')})) by the summary vector, and "
                    "by the mean of the patch features.")
    else:
        text.append(f"kNN: not measured: {missing['knn']}.")
    if seg_on:
        train, val = used.get("seg") or ("mosaic_train", "mosaic_val")
        text.append(f"Segmentation: a linear probe (BatchNorm + 1x1 conv, {_setting(ev, params, 'seg_steps')} steps) on the "
                    f"frozen patch features, trained on `{train}` and scored on `{val}` at {', '.join(map(str, sides))} "
                    "px (the bigger `_x<s>` images where the data has them, else the same images at that size).")
    else:
        text.append(f"Segmentation: not measured: {missing['seg']}.")
    text.append("Fidelity, own tokens: mean cosine similarity of the model's own patch tokens to the teacher's patch "
                "features on the same images, the same measure for every model (like for like). A teacher block row "
                "is the probe on that intermediate block of the teacher (its patch tokens through the final norm): "
                "the students learn to predict it beside the teacher's output, so it is a target they saw.")
    out = ["## How good the features are", "", "Every model is scored on its own features. " + " ".join(text), "",
           _table(header, rows), ""]
    if adapted_rows:
        out += ["The students' adaptor outputs (their predictions of the teacher's summary and patch features), "
                "scored the same way; fidelity, adapted: the adaptor's patch features against the teacher's:", "",
                _table(["model"] + (["kNN top-1, adapted summary (%)"] if knn_on else [])
                       + ([f"seg mIoU {s} px, adapted (%)" for s in sides] if seg_on else [])
                       + [f"fidelity, adapted, {s} px" for s in sides], adapted_rows), ""]
    for protocol in protocols():  # every protocol's own section (per-teacher fidelity, the readout, yours)
        out += protocol.report_lines(ev, names)
    out += ["![metrics against resolution](figures/evaluate_resolution.png)", "",
            "PCA of the patch features (first three components as RGB), teacher above the student:", "",
            "![PCA feature maps](figures/pca_maps.png)", ""]
    rows = verdicts(models, sides, knn_on, seg_on, ev.get("imagenet_readout"))
    if rows:
        out += ["### Targets", "", "A target that compares a student with the teacher also has to be out of the "
                "random student's reach: where the randomly initialized student meets it too, it shows nothing "
                "about distillation, and the verdict says so.", "",
                _table(["target", "measured", "verdict"], rows), ""]
    return out


def verdict(margin: float) -> str:
    """`margin` in points by which the measure clears its target (negative: missed by that much)."""
    return "met" if margin >= 0 else f"missed by {-margin:.1f} points"


def verdicts(models: dict, sides: list[int], knn_on: bool, seg_on: bool, readout: dict | None = None) -> list[list[str]]:
    """One row per target the run can be judged on: kNN of the stage-2 student within 3 points of the
    teacher and 10 above the random student; the high-res student's mIoU at the largest side at least the
    teacher's; where the ImageNet readout was measured, the stage-2 student's top-1 agreement on the
    validation images at least twice the control's. A target against the teacher that the random student
    meets too is not met: it shows nothing about distillation."""
    t, s2, hr, rnd = (models.get(k) for k in ("teacher", "distill_stage2", "highres", "random"))
    rows = []

    def against_random(margin: float, random_margin: float | None, random_figure: str) -> str:
        if random_margin is not None and random_margin >= 0:
            return f"not shown: the random student meets it too ({random_figure})"
        return verdict(margin)

    if knn_on and t and s2 and s2.get("knn_summary") is not None:
        gap = 100 * (t["knn_summary"] - s2["knn_summary"])
        r_gap = 100 * (t["knn_summary"] - rnd["knn_summary"]) if rnd and rnd.get("knn_summary") is not None else None
        rows.append(["stage-2 student kNN (summary) within 3 points below the teacher",
                     f"{_pct(s2['knn_summary'])} against {_pct(t['knn_summary'])} ({abs(gap):.1f} "
                     f"{'below' if gap >= 0 else 'above'})"
                     + (f"; random student {_pct(rnd['knn_summary'])}" if r_gap is not None else ""),
                     against_random(3 - gap, None if r_gap is None else 3 - r_gap,
                                    "" if r_gap is None else _pct(rnd["knn_summary"]))])
        if r_gap is not None:
            lift = 100 * (s2["knn_summary"] - rnd["knn_summary"])
            rows.append(["stage-2 student kNN at least 10 points above the random student",
                         f"{_pct(s2['knn_summary'])} against {_pct(rnd['knn_summary'])} ({lift:+.1f})",
                         verdict(lift - 10)])
    if seg_on and t and hr and sides and hr.get("seg_miou") and t.get("seg_miou"):
        big = str(max(sides))
        diff = 100 * (hr["seg_miou"][big] - t["seg_miou"][big])
        r_diff = (100 * (rnd["seg_miou"][big] - t["seg_miou"][big])
                  if rnd and (rnd.get("seg_miou") or {}).get(big) is not None else None)
        rows.append([f"high-res student segmentation mIoU at {big} px at least the teacher's",
                     f"{_pct(hr['seg_miou'][big])} against {_pct(t['seg_miou'][big])} ({diff:+.1f})"
                     + (f"; random student {_pct(rnd['seg_miou'][big])}" if r_diff is not None else ""),
                     against_random(diff, r_diff, "" if r_diff is None else _pct(rnd["seg_miou"][big]))])
    agree = (readout or {}).get("agreement", {})
    if "distill_stage2" in agree and "control" in agree:
        student, control = (agree[m]["val"]["top1"] for m in ("distill_stage2", "control"))
        rows.append(["stage-2 student ImageNet top-1 agreement with the teacher (val) at least twice the control's",
                     f"{_pct(student)} against {_pct(control)} ({student / control:.1f}x)" if control else
                     f"{_pct(student)} against {_pct(control)}", verdict(100 * (student - 2 * control))])
    return rows


def images_trained(stage: str, metrics: dict, params: dict) -> float | None:
    """Images the stage's optimizer steps consumed: steps x batch per worker x workers (high-res alternates its
    scales' batch sizes), from its metrics and params.yaml; None where params.yaml lacks the batch size."""
    p = params.get(stage) or {}
    batch = p.get("batch_size") or (sum(p["batch_sizes"]) / len(p["batch_sizes"]) if p.get("batch_sizes") else None)
    workers = metrics.get("workers") or p.get("workers")
    return None if batch is None or workers is None else metrics["steps"] * batch * workers


def training_section(root: Path, params: dict | None = None) -> list[str]:
    params = params or {}
    out = ["## Distillation", ""]
    s1 = _load(root / "reports/metrics/distill_stage1.json")
    s2 = _load(root / "reports/metrics/distill_stage2.json")
    hr = _load(root / "reports/metrics/highres.json")
    rows = []

    def times(stage: str, metrics: dict) -> list:
        images = images_trained(stage, metrics, params)
        return [metrics["steps"], "-" if images is None else f"{images:.0f}"]

    if s1:
        rows.append(["stage 1 (module-wise)", "mean per-block validation loss",
                     f"{s1['val_start']['loss']:.3f} -> {s1['val_end']['loss']:.3f} "
                     f"({s1['val_start']['loss'] / s1['val_end']['loss']:.1f}x lower)", *times("distill_stage1", s1)])
    if s2:
        for k in [k for k in s2["val_end"] if k.endswith("/patch_cosine")]:
            t = k.split("/")[0]
            # the stage-1 student's own tokens where they have the teacher's width, else the fresh adaptor's
            start = s2["val_start"].get(t + "/patch_cosine_raw")
            before = (f"stage-1 student {start:.3f}" if start is not None
                      else f"fresh adaptor {s2['val_start'][k]:.3f}")
            rows.append(["stage 2 (end to end)", f"{teacher_label(t)}: mean patch cosine on val",
                         f"{before} -> stage-2 student {s2['val_end'][k]:.3f}", *times("distill_stage2", s2)])
            z = t + "/summary_cosine_z"  # the summary adaptor, in the teacher's PHI-S space
            if z in s2["val_end"] and z in s2["val_start"]:
                rows.append(["stage 2 (end to end)", f"{teacher_label(t)}: summary cosine in PHI-S space on val",
                             f"fresh adaptor {s2['val_start'][z]:.3f} -> stage-2 student {s2['val_end'][z]:.3f}",
                             *times("distill_stage2", s2)])
    if hr:
        for k in [k for k in hr["val_end"] if "/patch_cosine/" in k]:
            t, side = k.split("/patch_cosine/")
            rows.append(["high resolution", f"{teacher_label(t)}: mean patch cosine at {side}",
                         f"{hr['val_start'][k]:.3f} -> {hr['val_end'][k]:.3f}", *times("highres", hr)])
    out += [_table(["stage", "figure", "start -> end", "steps", "images trained"], rows), "",
            "Images trained: optimizer steps x batch per worker x workers (`params.yaml`). The stages' times are "
            "not on this page, so that a rerun that computes the same figures writes the same page: they are this "
            "machine's, in `reports/timings/` (not tracked) and in each stage's MLflow run.", ""]
    out += [f"![{s} curves](plots/{s}.png)" for s in TRAINING_STAGES if (root / "reports/plots" / f"{s}.png").exists()]
    return out + [""]


def data_section(root: Path) -> list[str]:
    shard, cache = _load(root / "reports/metrics/shard.json"), _load(root / "reports/metrics/cache_teacher.json")
    out = ["## Data", ""]
    if shard:
        out += [_table(["split", "images", "shards", "MB"], [[s, v["count"], v["shards"], f"{v['bytes'] / 1e6:.1f}"]
                                                             for s, v in shard["splits"].items()]), ""]
        notes = shard.get("notes") or []
        out.append(f"Sharding: {shard['images']} images. "
                   + ("Changed on the way in: " + "; ".join(notes) + "." if notes else "No image was changed on the way in."))
    if cache:
        for t, m in cache.items():
            out.append(f"Teacher-feature cache (`{t}`, {teacher_label(t)}): {m['images']} images, "
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


# The operator and the model files a benchmark record times (not the harness, not other teachers' models).
CODE = ("kernels/gspn", *(f"cgspn/models/{m}.py" for m in ("attention", "cgspn", "gspn_mixer", "layers", "vit")))


# What a pipeline run or a session writes beside the code: the figures a report shows do not come from these.
NOT_CODE = (":(exclude)reports", ":(exclude)dvc.lock", ":(exclude)*.md", ":(exclude)tests")


def code_commit(root: Path) -> str | None:
    """The last commit that changed the code or the parameters (anything but reports/, dvc.lock, prose and
    tests): what a report's figures come from. Committing the regenerated report does not change it, so the
    committed report names the commit it was made at; '(with uncommitted changes)' where the tree differs."""
    try:
        sha = subprocess.run(["git", "log", "-1", "--format=%h", "--", ".", *NOT_CODE], cwd=root,
                             capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *NOT_CODE],
                               cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return None if not sha else sha + (" (with uncommitted changes)" if dirty else "")


def commits_since(root: Path, commit: str) -> int | None:
    """How many commits after `commit` changed the code the benchmarks time (None without git or that commit)."""
    try:
        out = subprocess.run(["git", "rev-list", "--count", f"{commit}..HEAD", "--", *CODE], cwd=root,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out.stdout) if out.returncode == 0 and out.stdout.strip().isdigit() else None


def measured(root: Path, record: dict, name: str, verb: str = "measured") -> str:
    """"Measured <date> at commit <sha> on <device>", how that is known, and whether the code changed since."""
    if "date" not in record:
        return f"`{name}`: no date or commit recorded."
    when = datetime.datetime.fromisoformat(record["date"].replace("Z", "+00:00"))
    commit = record.get("commit", "unknown")
    short = commit[:7] if commit != "unknown" else "unknown"
    text = f"`{name}`: {verb} {when:%Y-%m-%d %H:%M} UTC at commit `{short}` on {record.get('device', '?')}"
    if record.get("provenance") == "from git history":
        text += (" (the record predates these fields: date and commit are those of the git commit that last "
                 "changed the file)")
    later = commits_since(root, commit) if commit != "unknown" else None
    if later:
        text += (f". {later} later commit{'s' if later > 1 else ''} changed the code it times (the operator, "
                 "`kernels/gspn/`, or the block and model files in `cgspn/models/`): these are that commit's figures, "
                 "which need not be the current code's")
    elif later == 0:
        text += ". No later commit changed the code it times (`kernels/gspn/` and the block and model files)"
    return text + "."


def method_text(record: dict) -> str:
    """The record's timing method. Records written before `repetitions` said "median of N (at least 5, about
    3 s per timing)", which contradicts itself for N < 5: the same facts in the current words."""
    old = re.match(r"median of (\d+) \(at least 5, about (\d+) s per timing\)", record["method"])
    if old:
        return repetitions(int(old[1]), float(old[2])) + record["method"][old.end():]
    return record["method"]


def compiled_lines(root: Path, bench: Path, slug: str) -> list[str]:
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
        out += [f"#### Both blocks under torch.compile (`{path.name}`)", "", measured(root, record, path.name), "",
                f"{record['scope']}; {method_text(record)}.", "",
                _table(["side (px)", "mode", "attention / C-GSPN, eager", "both compiled", "C-GSPN compiled / eager",
                        "attention compiled / eager"], rows), ""]
        out += ([f"Failed: {'; '.join(errors)}.", ""] if errors else [])
        out += ([f"![{plot.name}](benchmarks/{plot.name})", ""] if plot.exists() else [])
    return out


def goal_verdict(blocks: dict) -> str | None:
    """The block goal (GOAL in cgspn.report.published: GOAL_WIDTH, GOAL_BATCH, forward, GOAL_SIDE) judged on a GPU record."""
    if blocks["info"].get("kind") != "cuda":
        return None
    found = next((s for s in blocks["speedups"] if (s["width"], s["batch"], s["side"], s["mode"])
                  == (GOAL_WIDTH, GOAL_BATCH, GOAL_SIDE, "fwd")), None)
    if found is None:
        return None
    x = found["speedup"]
    verdict = "met" if x >= GOAL_SPEEDUP else f"missed by {GOAL_SPEEDUP - x:.2f}x"
    return (f"{blocks['info']['device']}, width {GOAL_WIDTH}, batch {GOAL_BATCH}, {GOAL_SIDE} px, forward: {x:.2f}x against "
            f"{GOAL_SPEEDUP:g}x, **{verdict}** (record of {blocks.get('date', '?')[:10]})")


def kernel_lines(root: Path, bench: Path, slug: str, device: str) -> list[str]:
    """The GSPN scan kernel's table of one device (kernel-<device>.md, written with the JSON record), under
    the record's date, commit and device."""
    record, md = _load(bench / f"kernel-{slug}.json"), bench / f"kernel-{slug}.md"
    if not md.exists():
        return []
    return (["", f"#### The GSPN scan kernel ({device})", ""]
            + ([measured(root, record, f"kernel-{slug}.json"), ""] if record else [])
            + [md.read_text().split("\n", 2)[-1].strip()])


def models_lines(root: Path, bench: Path) -> list[str]:
    """`benchmarks.models`'s record: teacher and student forward time on this CPU."""
    record = _load(bench / "models_cpu.json")
    if not record:
        return []
    rows = [[r["model"], r["side"], f"{r['ms']:.1f}", f"{r['speedup_vs_teacher']:.2f}x" if "speedup_vs_teacher" in r
             else "-"] for r in record["rows"]]
    return ["#### Teacher and student forward time (`models_cpu.json`)", "", measured(root, record, "models_cpu.json"),
            "", f"{record['method']}; teacher: {teacher_label(record.get('teacher'))}.", "",
            _table(["model", "side (px)", "ms", "teacher / student"], rows), ""]


def benchmark_section(root: Path) -> list[str]:
    out = ["## Speed", ""]
    records = device_benchmarks(root)
    if not records:
        return out + ["No block benchmark yet (`python -m benchmarks.blocks`).", ""]
    out += ["One subsection per device that has a record in `reports/benchmarks/` (files named by device; a CPU "
            "run of the `benchmark` stage never replaces a GPU record). Each record says when, at which commit and "
            "on which device it was measured: its figures are the code's at that commit, which may be older than "
            "this page.", "",
            f"For comparison, the {PUBLISHED}. {GOAL[0].upper() + GOAL[1:]}."]
    verdicts_ = [v for _, blocks in records if (v := goal_verdict(blocks))]
    out += ([f"Goal: {'; '.join(verdicts_)}."] if verdicts_ else
            [f"Goal: not judged (no GPU record at width {GOAL_WIDTH}, batch {GOAL_BATCH}, {GOAL_SIDE} px)."]) + [""]
    bench = root / "reports/benchmarks"
    for slug, blocks in records:
        eager = {(s["width"], s["batch"], s["side"], s["mode"]): s["speedup"] for s in blocks.get("speedups_eager", [])}
        # an eager column only where the record timed eager apart (a GPU: graph replays and eager launches)
        separate = any(abs(eager.get((s["width"], s["batch"], s["side"], s["mode"]), s["speedup"]) - s["speedup"])
                       > 1e-9 for s in blocks["speedups"])
        out += [f"### {blocks['info']['device']}", "", measured(root, blocks, f"blocks-{slug}.json"), "",
                f"{blocks['scope']}; {method_text(blocks)}.", ""]
        rows = [[b["block"], b["width"], b["batch"], b["side"], b["tokens"],
                 f"{b['fwd_ms']:.2f}" if "fwd_ms" in b else b.get("error"),
                 f"{b['fwd+bwd_ms']:.2f}" if "fwd+bwd_ms" in b else "-"] for b in blocks["blocks"]]
        out += [_table(["block", "width", "batch", "side (px)", "tokens", "fwd ms", "fwd+bwd ms"], rows), ""]
        speed_rows = [[s["width"], s["batch"], s["side"], s["mode"], f"{s['speedup']:.2f}x"]
                      + ([f"{eager[k]:.2f}x" if (k := (s["width"], s["batch"], s["side"], s["mode"])) in eager else "-"]
                         if separate else [])
                      for s in blocks["speedups"]]
        out += [_table(["width", "batch", "side (px)", "mode", "attention / C-GSPN"]
                       + (["attention / C-GSPN, eager"] if separate else []), speed_rows), ""]
        if blocks.get("models"):
            out += [_table(["model", "side (px)", "images/s"],
                           [[m["model"], m["side"], f"{m['images_per_s']:.1f}" if "images_per_s" in m else m.get("error")]
                            for m in blocks["models"]]), ""]
        # no roofline for a CPU: its kernel rows time Triton's interpreter, which says nothing about the kernel
        plots = [f"speedup-{slug}.png"] + ([f"roofline-{slug}.png"] if blocks["info"].get("kind") == "cuda" else [])
        out += [f"![{name}](benchmarks/{name})" for name in plots + [f"kernel-{slug}.png"] if (bench / name).exists()]
        out += [""] + compiled_lines(root, bench, slug)
        out += kernel_lines(root, bench, slug, blocks["info"]["device"])
        checks = bench / f"gpu-checks-{slug}.md"
        if checks.exists():
            out += ["", f"Correctness on this GPU, compute-sanitizer and a profile of one block: "
                        f"[`benchmarks/{checks.name}`](benchmarks/{checks.name}).", ""]
        if slug == "cpu":
            out += [""] + models_lines(root, bench)
        out.append("")
    return out


def copy_device(root: Path, t: dict) -> str:
    """Whose copy bandwidth block-traffic.json turned bytes into time with: as recorded, else the kernel record
    whose measured copy bandwidth it is (within 1%)."""
    if t.get("copy_GBps_device"):
        return f"{t['copy_GBps_device']}'s measured copy bandwidth"
    for path in sorted((root / "reports/benchmarks").glob("kernel-*.json")):
        k = _load(path)
        if k and abs(k["copy_GBps"] - t["copy_GBps"]) <= 0.01 * t["copy_GBps"]:
            return f"the copy bandwidth of `{path.name}`, {k['info']['device']}"
    return "the copy bandwidth the record was computed with"


def traffic_section(root: Path) -> list[str]:
    """The counted bytes of one C-GSPN block's PyTorch ops around the scan, per mixer layout."""
    t = _load(root / "reports/benchmarks/block-traffic.json")
    if not t:
        return []
    rows = [[layout, mode, f"{m['glue_MB']:.0f}", f"{m['glue_floor_ms']:.3f}", f"{m['all_MB']:.0f}"]
            for layout, modes in t["layouts"].items() for mode, m in modes.items()]
    return ["### Memory traffic around the scan (counted, not timed)", "",
            measured(root, t, "block-traffic.json", verb="counted"), "",
            f"One C-GSPN block, width {t['width']}, {t['side']} px, batch {t['batch']}, {t['dtype']}: {t['method']}. "
            "`packed` is the mixer's layout on the triton backend (heads as one matmul in the scan's LINES order), "
            "`unpacked` the layout before it (1x1 conv heads, copies into the LINES layout). The floor is the "
            f"memory-bound bytes at {t['copy_GBps']:.0f} GB/s ({copy_device(root, t)}).", "",
            _table(["layout", "mode", "MB without matmuls", "floor ms", "MB, all ops"], rows), ""]


def data_sentence(root: Path, ev: dict | None, params: dict | None = None) -> str:
    """What this run was trained and scored on, from reports/metrics (shard's record of the data set, the
    training stages' steps) and params.yaml (batch sizes)."""
    params = params or {}
    shard = _load(root / "reports/metrics/shard.json") or {}
    dataset = shard.get("data", {})
    source, path = dataset.get("source", "?"), dataset.get("path")
    where = f" from `{path}`" if path else ""
    what = {"fashion_mnist": f"Fashion-MNIST garments (28 px){where} and mosaics of them with label maps",
            "folder": f"an image folder, `{path}`", "table": f"a table, `{path}`",
            "segmentation": f"a segmentation data set, `{path}`",
            "webdataset": f"webdataset shards read in place, `{path}`"}.get(source, f"source `{source}`{where}")
    if shard.get("skipped"):
        reasons = ", ".join(f"{n} {why}" for why, n in shard["skipped"].items())
        what += f" ({shard['samples_seen']} samples, {sum(shard['skipped'].values())} skipped: {reasons})"
    splits = shard.get("splits", {})
    sizes = ", ".join(f"{s} {v['count']}" for s, v in splits.items())
    stages = {s: m for s in TRAINING_STAGES if (m := _load(root / "reports/metrics" / f"{s}.json"))}
    labels = {"distill_stage1": "stage 1", "distill_stage2": "stage 2", "highres": "high-res"}
    steps = ", ".join(f"{labels[s]} {m['steps']}" for s, m in stages.items())
    images = [images_trained(s, m, params) for s, m in stages.items()]
    seen = ""
    if stages and None not in images:
        seen = f", {sum(images):.0f} training images in all"
        train = splits.get("train", {}).get("count")
        if train:
            seen += f" ({sum(images) / train:.1f} passes over the {train} `train` images)"
    return (f"{what}; images per split: {sizes or 'unknown'}; training resolution "
            f"{ev['resolution'] if ev else '?'} px; "
            + (f"optimizer steps: {steps} ({sum(m['steps'] for m in stages.values())} in all){seen}."
               if stages else "no training stage has run."))


def build_report(root: Path, commit: str | None, params_text: str) -> str:
    """REPORT.md's text. Nothing in it depends on when or on which machine it was made (no dates, no timings
    of this machine): a rerun that computes the same figures writes the same page."""
    ev = _load(root / "reports/metrics/evaluate.json")
    params = _params(params_text)
    teachers = list(dict.fromkeys((params.get("teacher") or {}).get("names") or []))
    parts = ["# C-GSPN: pipeline report", "",
             f"Generated by the `report` stage of the pipeline from the code of commit `{commit or 'unknown'}` and "
             "the parameters at the end of this page.", "",
             "C-GSPN is a vision encoder whose token mixer is 2D spatial propagation (four-direction GSPN line "
             "scans in a compressed channel space) instead of self-attention. It is distilled from an attention "
             "teacher in two stages (each mixer imitates its block's attention output, then the whole network "
             "matches the teacher's final features through adaptor heads) and then trained briefly at higher "
             f"resolution. This run: {data_sentence(root, ev, params)}"
             + (f" Teacher{'s' if len(teachers) > 1 else ''}: {'; '.join(map(teacher_sentence, teachers))}."
                if teachers else ""), ""]
    if ev:
        parts += evaluation_section(ev, params)
    parts += training_section(root, params) + data_section(root) + benchmark_section(root) + traffic_section(root)
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
                out.update({f"miou_{px}px/{name}": v for px, v in (r.get("seg_miou") or {}).items()})
        hr = ev["models"].get("highres", {})
        out.update({f"fidelity_{px}px/highres": v for px, v in hr.get("fidelity", {}).items()})  # own tokens
        out.update({f"fidelity_adapted_{px}px/highres": v for px, v in hr.get("fidelity_adapted", {}).items()})
        for name, per in (ev.get("imagenet_readout") or {}).get("agreement", {}).items():  # with a classifier teacher
            out[f"imagenet_top1_val/{name}"] = per["val"]["top1"]
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
