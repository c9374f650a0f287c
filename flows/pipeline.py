"""The pipeline as a Prefect flow: every DVC stage in order, each a task that asks DVC to run that one
stage (DVC skips it when nothing it depends on changed), streams the stage's output into the Prefect log,
and retries with backoff. One MLflow parent run per flow run; each stage's run is its child.

    python -m flows.pipeline                               # the whole pipeline on params.yaml
    python -m flows.pipeline -S distill_stage2.steps=300   # overrides go through `dvc exp run --set-param`

Parameter overrides never edit params.yaml behind DVC's back: with overrides every stage runs as
`dvc exp run --single-item <stage> --set-param ...`, so DVC writes them and records the experiment.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

REPO = Path(__file__).resolve().parents[1]
STAGES = ["shard", "teacher", "cache_teacher", "distill_stage1", "distill_stage2", "highres", "evaluate",
          "benchmark", "report"]
PARENT_RUN_ENV = "CGSPN_PARENT_RUN_ID"  # read by cgspn.tracking in every stage


class StageFailed(RuntimeError):
    pass


def dvc_command(stage: str, overrides: list[str]) -> list[str]:
    dvc = str(Path(sys.executable).with_name("dvc"))
    if overrides:
        return [dvc, "exp", "run", "--single-item", stage, *[a for o in overrides for a in ("--set-param", o)]]
    return [dvc, "repro", "--single-item", stage]


@task(retries=2, retry_delay_seconds=[5, 20], task_run_name="{stage}")
def run_stage(stage: str, root: str, overrides: list[str], parent_run_id: str | None) -> str:
    """One DVC stage; its output goes line by line to the Prefect log. Returns 'ran' or 'skipped'."""
    logger = get_run_logger()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    cmd = dvc_command(stage, overrides)
    logger.info("$ dvc %s", " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info("%s", line)
            tail = (tail + [line])[-15:]
    if proc.wait() != 0:
        raise StageFailed(f"stage {stage} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return "skipped" if any("didn't change, skipping" in t for t in tail) else "ran"


def metrics_table(root: Path) -> str:
    """The stages' headline figures as one markdown table."""
    rows = []
    for f in sorted((root / "reports/metrics").glob("*.json")):
        m = json.loads(f.read_text())
        flat = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key in ("val_end", "final"):
            if isinstance(m.get(key), dict):
                flat.update({f"{key}/{k}": v for k, v in m[key].items() if isinstance(v, (int, float)) and k != "step"})
        if "models" in m:
            for name, r in m["models"].items():
                if r.get("knn_summary") is not None:
                    flat.update({f"{name}/knn_summary": r["knn_summary"]})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(flat.items())[:8])
        rows.append(f"| {f.stem} | {shown} |")
    return "| stage | figures |\n| --- | --- |\n" + "\n".join(rows)


@flow(name="cgspn-pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, root: str = str(REPO), stages: list[str] | None = None) -> dict:
    """Run the DVC stages in order under one MLflow parent run; publish a metrics table and links."""
    import mlflow

    from cgspn.tracking import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, tracking_uri

    overrides, stages = list(overrides or []), list(stages or STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown {unknown}; the pipeline's stages are {STAGES}")
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.set_experiment(os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT)
    client = mlflow.MlflowClient()
    parent = client.create_run(experiment.experiment_id, run_name="pipeline",
                               tags={"cgspn.overrides": " ".join(overrides) or "(none)"})
    parent_id = parent.info.run_id
    outcome = {}
    try:
        for stage in stages:
            outcome[stage] = run_stage(stage, root, overrides, parent_id)
        client.set_terminated(parent_id, "FINISHED")
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    rootp = Path(root)
    create_markdown_artifact(key="stage-metrics", markdown=metrics_table(rootp),
                             description="Headline figures of every stage (reports/metrics/*.json)")
    uri = tracking_uri()
    mlflow_link = (f"{uri.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs/{parent_id}"
                   if uri.startswith("http") else f"{uri} (run {parent_id}; open with `mlflow ui --backend-store-uri {uri}`)")
    create_link_artifact(key="mlflow-run", link=mlflow_link, link_text="MLflow parent run")
    create_link_artifact(key="report", link=(rootp / "reports/REPORT.md").resolve().as_uri(), link_text="REPORT.md")
    return {"stages": outcome, "mlflow_parent_run": parent_id}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter override, passed to `dvc exp run --set-param` (repeatable)")
    parser.add_argument("--stages", nargs="+", default=None, help=f"a subset of {STAGES}, in pipeline order")
    args = parser.parse_args(argv)
    result = pipeline(overrides=args.set_param, stages=args.stages)
    from cgspn.tracking import tracking_uri

    print(f"\nDone: {result['stages']}")
    print(f"Report:   {REPO / 'reports/REPORT.md'}")
    print(f"MLflow:   {tracking_uri()}  (parent run {result['mlflow_parent_run']})")
    print(f"  see it: .venv/bin/mlflow ui --backend-store-uri {tracking_uri()}   then open http://127.0.0.1:5000")
    print("Prefect:  .venv/bin/prefect server start   then open http://127.0.0.1:4200 (flow runs, logs, artifacts)")
    return result


if __name__ == "__main__":
    main()
