"""The Prefect flow over the DVC stages, on the micro configuration in a fresh git + DVC repository
(conftest.flow_run), under Prefect's test harness: every stage runs and writes its outputs, a second run
skips them all (tasks in a state named Skipped, no MLflow parent run left), MLflow holds one parent run per
run that ran something, named after the flow run, with a child per stage, the headline figures and the
student as a logged model; a run with overrides is one DVC experiment and leaves params.yaml as it was, and
names where its report is; a stage that rejects its input is not retried and fails the flow with its own line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

import pytest

from flows import pipeline as flow_module
from flows.pipeline import STAGES, pipeline
from micro import copy_repo, copy_tree

REPO = Path(__file__).resolve().parents[1]


def test_first_run_runs_every_stage_and_writes_its_outputs(flow_run):
    assert flow_run["first"]["stages"] == {s: "ran" for s in STAGES}
    root = flow_run["root"]
    for path in ["data/shards/dataset.json", "data/features/dinov2_vits14_imgfocus/phis.safetensors",
                 "models/teachers/teachers.json", "models/distill_stage1/student.safetensors",
                 "models/distill_stage2/adaptors.safetensors", "models/highres/student.safetensors",
                 "reports/metrics/evaluate.json", "reports/benchmarks/blocks.json", "reports/REPORT.md",
                 "reports/figures/pca_maps.png", "dvc.lock"]:
        assert (root / path).exists(), path
    report = (root / "reports/REPORT.md").read_text()
    assert "micro test run" in report and "student after stage 2" in report


def test_second_run_skips_every_stage(flow_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    assert flow_run["second"]["stages"] == {s: "skipped" for s in STAGES}
    assert flow_run["second"]["mlflow_parent_run"] is None  # nothing ran: no empty parent run
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[flow_run["second"]["flow_run"]])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_runs[0].id]}))
    # not plain "Completed" bars; the data listing runs every time and finds the same data
    states = {t.name: t.state.name for t in tasks}
    assert states == {"data_listing": "Completed", **{s: "Skipped" for s in STAGES}}, states


def test_mlflow_has_one_parent_run_per_run_that_ran_with_a_child_per_stage(flow_run):
    import mlflow

    client = mlflow.MlflowClient(flow_run["tracking_uri"])
    parent = client.get_run(flow_run["first"]["mlflow_parent_run"])
    children = client.search_runs([flow_run["experiment"]], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    assert flow_run["tracking_uri"].startswith("http://")  # a tracking server (conftest.flow_run)
    steps = yaml.safe_load((flow_run["root"] / "params.yaml").read_text())
    for child in (r for r in children if r.info.run_name in ("distill_stage1", "distill_stage2", "highres")):
        # logged by Ray Train's rank-0 worker, a process of its own, over HTTP like the stage itself
        losses = client.get_metric_history(child.info.run_id, "loss")
        assert len(losses) == steps[child.info.run_name]["steps"], (child.info.run_name, len(losses))
    assert parent.info.status == "FINISHED" and parent.info.run_name == flow_run["first"]["flow_run"]
    assert parent.data.tags["cgspn.prefect_flow_run"] == flow_run["first"]["flow_run"]
    assert parent.data.tags["cgspn.prefect_flow_run_id"] and parent.data.tags["mlflow.source.git.commit"]
    # every effective parameter, so that the runs view sets any two runs side by side
    from cgspn.pipeline.tracking import flatten

    params = flatten(yaml.safe_load((flow_run["root"] / "params.yaml").read_text()))
    assert parent.data.params == {k: str(v) for k, v in params.items()}
    # the headline figures, comparable across pipeline runs in the runs view
    assert 0 <= parent.data.metrics["knn/distill_stage2"] <= 1 and "knn/teacher" in parent.data.metrics
    assert any(k.startswith("miou_") and k.endswith("/highres") for k in parent.data.metrics)
    models = client.search_logged_models([flow_run["experiment"]])
    assert any(m.source_run_id == parent.info.run_id and m.name == "student" for m in models)
    deleted = client.search_runs([flow_run["experiment"]], "attributes.run_name != ''", run_view_type=2)
    assert all(r.info.run_id != flow_run["second"]["mlflow_parent_run"] for r in deleted)


def test_a_stage_with_bad_input_is_not_retried_and_fails_the_flow_with_its_line(flow_run, tmp_path, monkeypatch):
    import mlflow

    # without runs/ (gitignored: the training stages' Ray Train checkpoints, half the root's bytes), which
    # the teacher stage never reads
    repo = copy_tree(flow_run["root"], tmp_path / "repo", skip=("runs",))
    monkeypatch.setattr(flow_module, "run_stage", flow_module.run_stage.with_options(retry_delay_seconds=0))
    # The flow's own MLflow database and experiment: another session fixture (micro) may have pointed the
    # environment elsewhere since flow_run ran.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", flow_run["tracking_uri"])
    monkeypatch.setenv("CGSPN_EXPERIMENT", "flow")
    override = "teacher.names=[no_such_teacher]"
    params_before = (repo / "params.yaml").read_bytes()
    with pytest.raises(flow_module.StageInputError, match=r"^stage teacher: error: .*no_such_teacher"):
        pipeline(root=str(repo), overrides=[override], stages=["teacher"])
    assert (repo / "params.yaml").read_bytes() == params_before  # the override lasted the run only
    client = mlflow.MlflowClient(flow_run["tracking_uri"])
    parents = client.search_runs([flow_run["experiment"]], f"tags.`cgspn.overrides` = '{override}'")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    attempts = client.search_runs([flow_run["experiment"]], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert [r.info.run_name for r in attempts] == ["teacher"]  # the same input would fail the same way
    assert all(r.info.status == "FAILED" for r in attempts)
    assert (repo / "models/teachers/dinov2_vits14_imgfocus.safetensors").exists()  # the good output stays


def test_a_stage_that_fails_loses_no_earlier_output(flow_run, tmp_path, monkeypatch):
    """DVC deletes a stage's outputs before it runs its command (they are not `persist`, for the run-cache's
    sake). A distill_stage2 that fails under `dvc repro` names the one command that puts them back, and after
    it the model, metrics, plots and everything else are byte-identical; the flow puts them back itself."""
    import subprocess
    import sys

    import yaml

    from micro import digest

    repo = copy_repo(flow_run["root"], tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["distill_stage2"]["lr"] = float("nan")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    before = {part: digest(repo / part) for part in ("models", "reports", "data")}
    assert "metrics/distill_stage2.json" in before["reports"] and "plots/distill_stage2.png" in before["reports"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(Path(sys.executable).with_name("dvc")), "repro", "--single-item", "distill_stage2"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "params.yaml: distill_stage2.lr must be a finite number, got nan" in done.stdout + done.stderr
    hint = "put them back with: python -m cgspn.pipeline.restore distill_stage2"
    assert hint in done.stdout + done.stderr
    assert not (repo / "models/distill_stage2").exists()  # DVC removed it before running the stage
    subprocess.run([sys.executable, "-m", "cgspn.pipeline.restore", "distill_stage2"], cwd=repo, env=env,
                   check=True, capture_output=True, timeout=120)
    assert {part: digest(repo / part) for part in ("models", "reports", "data")} == before
    with pytest.raises(flow_module.StageInputError, match="distill_stage2.lr must be a finite number"):
        pipeline(root=str(repo), stages=["distill_stage2"])
    assert {part: digest(repo / part) for part in ("models", "reports", "data")} == before


def test_a_run_with_overrides_is_one_dvc_experiment_and_leaves_the_workspace_as_it_was(flow_run, tmp_path,
                                                                                         monkeypatch, capsys):
    """Two override runs of the report stage: `dvc exp show` has one row per run, named after its flow run,
    holding its parameters; params.yaml, dvc.lock and the report are byte-identical afterwards. Each run's
    report is in its experiment and its MLflow parent run, and the flow's last lines say so."""
    import subprocess
    import sys

    import mlflow
    import yaml

    from micro import digest

    repo = copy_tree(flow_run["root"], tmp_path / "repo", skip=("runs",))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = {p: (repo / p).read_bytes() for p in ("params.yaml", "dvc.lock", "reports/REPORT.md")}
    outputs = digest(repo / "models")
    results = [pipeline(root=str(repo), overrides=["report.title_note=run 1"], stages=["report"]),
               flow_module.main(["--root", str(repo), "--stages", "report", "-S", "report.title_note=run 2"])]
    assert {p: (repo / p).read_bytes() for p in before} == before and digest(repo / "models") == outputs
    dvc = str(Path(sys.executable).with_name("dvc"))
    shown = subprocess.run([dvc, "exp", "show", "--json"], cwd=repo, capture_output=True, text=True, check=True).stdout
    experiments = {e["name"]: e["revs"][0] for base in json.loads(shown) for e in base["experiments"] or []}
    assert sorted(experiments) == sorted(r["dvc_experiment"] for r in results)
    assert [r["dvc_experiment"] for r in results] == [r["flow_run"] for r in results]
    for i, r in enumerate(results, 1):
        exp = experiments[r["dvc_experiment"]]
        assert exp["data"]["params"]["params.yaml"]["data"]["report"]["title_note"] == f"run {i}"
        # DVC's metrics are the headline figures alone (the stages' own files are outputs): a narrow table
        assert set(exp["data"]["metrics"]) == {"reports/metrics/headline.json"}, exp["data"]["metrics"].keys()
        note = subprocess.run(["git", "show", f"{exp['rev']}:reports/REPORT.md"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout
        assert f"run {i}" in note  # the experiment holds the report that run wrote
        logged = mlflow.artifacts.download_artifacts(r["mlflow_report"], dst_path=str(tmp_path / f"report{i}"),
                                                     tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
        assert r["mlflow_report"] == f"runs:/{r['mlflow_parent_run']}/REPORT.md" and f"run {i}" in Path(logged).read_text()
    printed = capsys.readouterr().out
    assert f"dvc exp apply {results[1]['dvc_experiment']}" in printed and results[1]["mlflow_report"] in printed
    assert "holds the baseline's" in printed
    assert yaml.safe_load(before["params.yaml"])["report"]["title_note"] == "micro test run"


def test_a_successful_run_logs_no_traceback_and_no_error_line(flow_run):
    """Every line a stage printed reaches the Prefect log, but a run that succeeded shows no traceback, no
    error-level record and no error-level line of Ray's C++ core (known-benign noise is at debug level)."""
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[flow_run["first"]["flow_run"]])))[0]
        logs, offset = [], 0
        while batch := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                                        limit=200, offset=offset):
            logs += batch
            offset += len(batch)
    assert len(logs) > 100 and any("Running stage 'distill_stage2'" in r.message for r in logs)
    bad = [r.message for r in logs if r.level >= 40 or "Traceback" in r.message
           or re.search(r"\d E \d+ \d+\] ", r.message)]
    assert not bad, bad[:5]


def test_dvc_plots_show_draws_offline_with_the_vendored_vega(flow_run, tmp_path):
    """The template .dvc/config names (made by `make venv`: scripts/vendor_vega.py) carries Vega itself, so the
    loss curves of `dvc plots show` draw without a network: no script is loaded from anywhere."""
    import configparser
    import re
    import subprocess
    import sys

    config = configparser.ConfigParser()
    config.read(REPO / ".dvc/config")
    template = (REPO / ".dvc" / config["plots"]["html_template"]).resolve()
    assert template.is_file(), f"{template} is missing: `make venv` writes it (scripts/vendor_vega.py)"
    repo = copy_tree(flow_run["root"], tmp_path / "repo", skip=("runs", "data", "models", ".dvc/cache"))
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "config", "plots.html_template", str(template)], cwd=repo, check=True)
    subprocess.run([dvc, "plots", "show", "-o", str(tmp_path / "plots")], cwd=repo, check=True, capture_output=True)
    page = (tmp_path / "plots/index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page), "a script is loaded from elsewhere"
    assert all(f"/* {name} " in page for name in ("vega", "vega-lite", "vega-embed"))
    curves = sorted((repo / "reports/plots").glob("*.csv"))
    assert curves and page.count("vegaEmbed('#") == len(curves)
