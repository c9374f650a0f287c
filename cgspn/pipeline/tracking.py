"""MLflow tracking for stages: one run per stage, a child of the pipeline's run when one is given.

    with stage_run("shard", params) as run:     # params logged flat, the resolved config as config.json
        run.log_metrics({"images_per_s": 1234.0})
        run.log_artifact("reports/metrics/shard.json")

Tracking URI: `MLFLOW_TRACKING_URI`, else `sqlite:///<repo>/mlflow.db`. Experiment: `CGSPN_EXPERIMENT`
(default "cgspn"). When `CGSPN_PARENT_RUN_ID` holds a run id (the Prefect flow sets it), the stage run
goes into that run's experiment with the tag `mlflow.parentRunId`, so MLflow shows it as a child. A stage run
without one (`dvc repro`, `python -m stages.<name>`) goes into "<experiment>-stages", so that the flow's
experiment holds pipeline runs only.
mlflow is imported lazily: the models never need it.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

from cgspn.pipeline.names import PARENT_RUN_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT_ENV = "CGSPN_EXPERIMENT"
DEFAULT_EXPERIMENT = "cgspn"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the database for a `sqlite:///` store
    (`<folder of the .db>/mlartifacts/`), so that a run tracked into a temporary database never writes into
    the current directory's `mlruns/` (MLflow's default); None (the server's choice) for a tracking server."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def experiment_id(name: str) -> str:
    """The id of the experiment `name` at the current tracking URI, created (artifacts per `artifact_root`)
    when it does not exist yet."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = artifact_root(mlflow.get_tracking_uri())
    return mlflow.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def metric_name(name: str) -> str:
    """MLflow accepts letters, digits, '_', '-', '.', ' ', ':' and '/' in metric names; others become '_'."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def flatten(params: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1, 2]"}."""
    flat: dict[str, object] = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class StageRun:
    """A thin handle on the active MLflow run; numbers only go to metrics, nested dicts are flattened."""

    def __init__(self, run):
        self.run = run
        self.id = run.info.run_id

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import mlflow

        numeric = {metric_name(k): float(v) for k, v in flatten(metrics).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=folder)

    def set_tag(self, key: str, value: str) -> None:
        import mlflow

        mlflow.set_tag(key, value)

    def log_dict(self, data: dict, name: str) -> None:
        import mlflow

        mlflow.log_dict(data, name)


RUN_KEY_TAG = "cgspn.ray_run"
STANDALONE_SUFFIX = "-stages"  # the experiment of stage runs outside a pipeline run: "cgspn-stages"


def supersede_attempts(run: StageRun, key: str) -> str | None:
    """Tag `run` with the Ray run `key` it trains. Earlier MLflow runs of the same key that are still
    RUNNING belong to attempts that were killed (a finished or failed attempt closes its run): they are
    marked FAILED, naming `run` as their successor. Returns the newest earlier run of the key, or None."""
    import mlflow

    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    earlier = [r for r in client.search_runs(experiments, f"tags.`{RUN_KEY_TAG}` = '{key}'",
                                             order_by=["attributes.start_time DESC"])
               if r.info.run_id != run.id]
    for r in earlier:
        if r.info.status == "RUNNING":
            client.set_tag(r.info.run_id, "cgspn.outcome", f"interrupted; continued by run {run.id}")
            client.set_terminated(r.info.run_id, "FAILED")
    run.set_tag(RUN_KEY_TAG, key)
    return earlier[0].info.run_id if earlier else None


@contextlib.contextmanager
def stage_run(stage: str, params: dict, extra_tags: dict | None = None) -> Iterator[StageRun]:
    """An MLflow run named after the stage; FAILED if the body raises, FINISHED otherwise."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {"cgspn.stage": stage, **(extra_tags or {})}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    if parent:
        experiment = mlflow.MlflowClient().get_run(parent).info.experiment_id
        tags["mlflow.parentRunId"] = parent
    else:
        experiment = experiment_id((os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT) + STANDALONE_SUFFIX)
    with mlflow.start_run(run_name=stage, experiment_id=experiment, tags=tags) as run:
        handle = StageRun(run)
        mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        handle.log_dict(params, "config.json")
        yield handle
