"""The MLflow parent run of one pipeline run (a Prefect flow run): what the MLflow runs view compares.

    with ParentRun("granite-hyena", ["distill_stage2.steps=300"], root) as parent:
        ... stages log their own runs as children of parent.id ...
        parent.finish(dvc_experiment, prefect_flow_run_id)   # headline metrics, tags, the report, the student
    # or parent.discard() when DVC skipped every stage: no empty parent run is left behind
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from cgspn.pipeline.names import TRAINING_STAGES
from cgspn.report.build import headline
from cgspn.pipeline.tracking import (DEFAULT_EXPERIMENT, EXPERIMENT_ENV, experiment_id, git_commit, metric_name, tracking_uri)

HOST_TAG, PID_TAG = "cgspn.host", "cgspn.pid"  # where the flow process runs: a dead one's parent run is closed
RUNS_VIEW = "#/experiments/{experiment}/runs?workflowType=machine_learning"  # MLflow 3 opens GenAI traces otherwise


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def ui_base() -> str | None:
    """The MLflow UI's address: the tracking server itself when it is one (http), else None."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith("http") else None


def runs_hint(parent_id: str | None) -> str:
    uri = tracking_uri()
    if ui_base():
        return f"MLflow:   {ui_base()}/{RUNS_VIEW.format(experiment=ParentRun.experiment())}"
    return (f"MLflow:   {uri}" + (f"  (parent run {parent_id})" if parent_id else "") +
            f"\n  see it: .venv/bin/mlflow ui --backend-store-uri {uri}   then open "
            f"http://127.0.0.1:5000/{RUNS_VIEW.format(experiment=ParentRun.experiment())}")


def report_lines(root: Path, dvc_experiment: str | None, report_uri: str | None) -> list[str]:
    """Where a run's report is: reports/REPORT.md, or for a run with overrides (after which the workspace holds
    the baseline's report again) its DVC experiment and its MLflow parent run's copy."""
    report = Path(root) / "reports/REPORT.md"
    if not dvc_experiment:
        return [f"Report:   {report}"]
    lines = [f"Report:   {report} holds the baseline's again; this run's is in",
             f"          DVC experiment {dvc_experiment} (dvc exp apply {dvc_experiment} puts it back there)"]
    if report_uri:
        lines.append(f"          MLflow {report_uri} (mlflow artifacts download -u {report_uri})")
    return lines


class ParentRun:
    def __init__(self, name: str, overrides: list[str], root: Path):
        self.name, self.overrides, self.root = name, overrides, Path(root)
        self.id: str | None = None
        self.figures: dict[str, float] | None = None
        self.report_uri: str | None = None  # runs:/<id>/REPORT.md once the report is logged

    @staticmethod
    def experiment() -> str:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        return experiment_id(os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT)

    def __enter__(self) -> "ParentRun":
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri())
        self.close_abandoned()
        tags = {"cgspn.overrides": " ".join(self.overrides) or "(none)", "cgspn.prefect_flow_run": self.name,
                HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        run = self.client.create_run(self.experiment(), run_name=self.name, tags=tags)
        self.id = run.info.run_id
        # a key given twice is set to its last value (flows.experiment.apply_overrides): log that one
        given = dict((k.strip(), v.strip()) for k, _, v in (text.partition("=") for text in self.overrides))
        for key, value in given.items():
            self.client.log_param(self.id, key, value[:6000])
        return self

    def close_abandoned(self) -> list[str]:
        """Parent runs (and their children) left RUNNING by a flow process of this machine that no longer
        exists (killed, or the machine restarted) -> FAILED, tagged with what happened; their ids."""
        host, closed = socket.gethostname(), []
        for run in self.client.search_runs([self.experiment()], f"attributes.status = 'RUNNING' and "
                                           f"tags.`{HOST_TAG}` = '{host}'"):
            pid = int(run.data.tags.get(PID_TAG, "0"))
            if pid and not process_exists(pid):
                children = self.client.search_runs([self.experiment()], "attributes.status = 'RUNNING' and "
                                                   f"tags.mlflow.parentRunId = '{run.info.run_id}'")
                for r in [run, *children]:
                    self.client.set_tag(r.info.run_id, "cgspn.outcome", f"abandoned: flow process {pid} on {host} "
                                        "ended without closing this run")
                    self.client.set_terminated(r.info.run_id, "FAILED")
                closed.append(run.info.run_id)
        return closed

    def log_params(self, params_file: Path) -> None:
        """Every effective parameter (params.yaml as this run has it, overrides applied) as `section.key`, so
        that the runs view compares any two runs, an override beside a default run, key by key."""
        import yaml
        from mlflow.entities import Param

        from cgspn.pipeline.tracking import flatten, metric_name

        given = {text.partition("=")[0].strip() for text in self.overrides}  # logged on entry, as written
        flat = flatten(yaml.safe_load(params_file.read_text()) or {})
        params = [Param(metric_name(k), str(v)[:6000]) for k, v in sorted(flat.items()) if k not in given]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.id, params=params[start:start + 100])

    def finish(self, dvc_experiment: str | None, prefect_flow_run_id: str | None) -> None:
        """Tags, the headline figures as metrics, the report as an artifact, the final student as a logged model."""
        from mlflow.entities import Metric

        if dvc_experiment:
            self.client.set_tag(self.id, "cgspn.dvc_experiment", dvc_experiment)
        if prefect_flow_run_id:
            from prefect.settings import PREFECT_UI_URL

            ui = PREFECT_UI_URL.value()
            self.client.set_tag(self.id, "cgspn.prefect_flow_run_id", prefect_flow_run_id)
            if ui:
                self.client.set_tag(self.id, "cgspn.prefect_flow_run_url", f"{ui}/runs/flow-run/{prefect_flow_run_id}")
        self.figures = headline(self.root)
        if self.figures:
            self.client.log_batch(self.id, metrics=[Metric(metric_name(k), float(v), 0, 0)
                                                    for k, v in self.figures.items()])
        self.log_report()
        self.log_student()

    def log_report(self) -> None:
        """reports/REPORT.md as it is at the end of the run: after a run with overrides the workspace's copy is
        the baseline's again, this one stays with the run."""
        report = self.root / "reports/REPORT.md"
        if report.exists():
            self.client.log_artifact(self.id, str(report))
            self.report_uri = f"runs:/{self.id}/{report.name}"

    def log_student(self) -> None:
        """The final student (the last training stage that wrote one) as a logged model of this run."""
        for stage in reversed(TRAINING_STAGES):
            weights = self.root / "models" / stage / "student.safetensors"
            if weights.exists():
                break
        else:
            return
        import mlflow

        from cgspn.models.students import load_student

        with mlflow.start_run(run_id=self.id):
            # pickle, not MLflow 3's default torch.export format (the student's scan is a custom op); the code
            # that unpickles it goes with it, and the requirements are given (inferring them loads the model)
            mlflow.pytorch.log_model(load_student(weights).eval(), name="student", serialization_format="pickle",
                                     code_paths=[str(self.root / "cgspn"), str(self.root / "kernels")],
                                     pip_requirements=["torch", "triton", "numpy", "safetensors"])
            mlflow.set_tag("cgspn.student_from", stage)

    def discard(self) -> None:
        """Nothing ran: the parent run would be an empty row in the runs view."""
        self.client.delete_run(self.id)

    def __exit__(self, kind, error, trace) -> None:
        run = self.client.get_run(self.id) if self.id else None
        if run is not None and run.info.lifecycle_stage != "deleted":
            self.client.set_terminated(self.id, "FAILED" if kind else "FINISHED")

    def summary_markdown(self, outcome: dict[str, str], dvc_experiment: str | None) -> str:
        """Stages and what became of them, the headline figures, and where to look."""
        figures = self.figures if self.figures is not None else headline(self.root)
        lines = ["| stage | status |", "| --- | --- |"] + [f"| {s} | {v} |" for s, v in outcome.items()]
        if figures:
            lines += ["", "| figure | value |", "| --- | --- |"]
            lines += [f"| {k} | {100 * v:.1f}% |" if k.startswith(("knn", "miou")) else f"| {k} | {v:.3f} |"
                      for k, v in figures.items()]
        lines += [""] + report_lines(self.root, dvc_experiment, self.report_uri)
        if dvc_experiment:
            lines.append(f"DVC experiment: `{dvc_experiment}` (`dvc exp show`, `dvc exp apply {dvc_experiment}`)")
        base = ui_base()
        view = RUNS_VIEW.format(experiment=self.experiment())
        lines.append(f"MLflow: [{base}/{view}]({base}/{view})" if base else
                     f"MLflow: `mlflow ui --backend-store-uri {tracking_uri()}`, then "
                     f"http://127.0.0.1:5000/{view}")
        return "\n".join(lines)
