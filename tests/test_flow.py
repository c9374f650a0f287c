"""The Prefect flow over the DVC stages, on the micro configuration in a fresh git + DVC repository
(conftest.flow_run), under Prefect's test harness: every stage runs and writes its outputs, a second run
skips them all, MLflow holds one parent run with a child per stage, and a failing stage is retried and
fails the flow with its own error."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows import pipeline as flow_module
from flows.pipeline import STAGES, pipeline
from micro import copy_tree


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
    assert flow_run["second"]["stages"] == {s: "skipped" for s in STAGES}


def test_mlflow_has_one_parent_run_with_a_child_per_stage(flow_run):
    import mlflow

    client = mlflow.MlflowClient(flow_run["tracking_uri"])
    parent = flow_run["first"]["mlflow_parent_run"]
    children = client.search_runs([flow_run["experiment"]], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    assert client.get_run(parent).info.status == "FINISHED"
    skipped_parent = flow_run["second"]["mlflow_parent_run"]
    assert client.search_runs([flow_run["experiment"]], f"tags.mlflow.parentRunId = '{skipped_parent}'") == []


def test_a_failing_stage_is_retried_and_fails_the_flow_with_its_error(flow_run, tmp_path, monkeypatch):
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
    with pytest.raises(flow_module.StageFailed, match=r"(?s)stage teacher failed.*no_such_teacher"):
        pipeline(root=str(repo), overrides=[override], stages=["teacher"])
    client = mlflow.MlflowClient(flow_run["tracking_uri"])
    parents = client.search_runs([flow_run["experiment"]], f"tags.`cgspn.overrides` = '{override}'")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    attempts = client.search_runs([flow_run["experiment"]], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert [r.info.run_name for r in attempts] == ["teacher"] * 3  # the first try and two retries
    assert all(r.info.status == "FAILED" for r in attempts)
    assert (repo / "models/teachers/dinov2_vits14_imgfocus.safetensors").exists()  # the good output stays


def test_a_stage_that_fails_under_dvc_repro_loses_no_earlier_output(flow_run, tmp_path):
    """DVC deletes a stage's outputs before it runs its command, unless they are `persist`: a failed
    distill_stage2 must leave its model, metrics, plots and everything else byte-identical."""
    import subprocess
    import sys

    import yaml

    from micro import digest

    repo = copy_tree(flow_run["root"], tmp_path / "repo", skip=("runs", ".dvc/cache"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["distill_stage2"]["lr"] = float("nan")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    before = {part: digest(repo / part) for part in ("models", "reports", "data")}
    assert "metrics/distill_stage2.json" in before["reports"] and "plots/distill_stage2.png" in before["reports"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(Path(sys.executable).with_name("dvc")), "repro", "--single-item", "distill_stage2"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "params.yaml: distill_stage2.lr must be a finite number, got nan" in done.stdout + done.stderr
    assert {part: digest(repo / part) for part in ("models", "reports", "data")} == before
