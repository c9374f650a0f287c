"""Stage `report`: reports/REPORT.md from the metrics, plots and benchmark records of the other stages,
with the commit and the parameters that produced them, and reports/metrics/headline.json, the few figures a
run is compared by (`dvc metrics show reports/metrics/headline.json`). The last stage of the pipeline."""
from __future__ import annotations

from pathlib import Path

from cgspn.pipeline.outputs import atomic_write, write_json
from cgspn.pipeline.params import Param
from cgspn.report.build import build_report, code_commit, headline
from cgspn.pipeline.cli import run_stage

SCHEMA = {"title_note": Param(str)}
OUT = Path("reports/REPORT.md")
HEADLINE = Path("reports/metrics/headline.json")


def main(p: dict, root: Path, run) -> dict:
    """Write the report."""
    params_file = root / "params.yaml"
    params_text = params_file.read_text() if params_file.exists() else "(params.yaml not found)"
    text = build_report(root, code_commit(root), params_text)
    if p["title_note"]:
        text = text.replace("\n\n", f"\n\n{p['title_note']}\n\n", 1)
    atomic_write(root / OUT, lambda tmp: tmp.write_text(text))
    figures = headline(root)  # the short table `dvc metrics show reports/metrics/headline.json` gives
    write_json(root / HEADLINE, figures)
    run.log_metrics(figures)
    run.log_artifact(root / OUT)
    print(f"report: wrote {OUT} ({len(text.splitlines())} lines)")
    return {"lines": len(text.splitlines())}


if __name__ == "__main__":
    run_stage("report", SCHEMA, main)
