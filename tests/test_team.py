"""A team's workflow on the Prefect flow's micro run (conftest.flow_run), with real servers started here:

- DVC's run-cache: parameters A, B, A restore A's outputs ("is cached - skipping run"); the same override run
  through the flow restores its stages; a failed stage loses nothing (tests/test_flow.py).
- A local-folder DVC remote: push from one clone, `python -m flows.remote pull` in another, `dvc status`
  up to date, the flow skips every stage.
- The deployment in prefect.yaml on a process work pool: a Prefect server, an MLflow tracking server and a
  DVC remote in S3 (moto); `prefect worker start --run-once` clones the repository at the deployed commit,
  pulls (the remote lacks one stage's outputs: named, then computed), runs, pushes; a second clone pulls
  everything. The stage's run, the parent run and the logged model are on the MLflow server (the Ray Train
  workers' metrics on one: tests/test_flow.py, whose flow run tracks into a server).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from flows.pipeline import STAGES, pipeline
from micro import copy_repo, digest
from object_store import s3_server
from servers import api, bin_path, mlflow_server, prefect_server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 600):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def dvc(*args: str, cwd: Path, **kw):
    return run([bin_path("dvc"), *args], cwd, **kw)


def git(*args: str, cwd: Path, **kw):
    return run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd, **kw)


def team_copy(flow_run, dest: Path, commit: bool = False) -> Path:
    """The flow's repository copied to `dest` (micro.copy_repo); `commit`: its results committed, as the
    researcher who ran the pipeline would before sharing it."""
    repo = copy_repo(flow_run["root"], dest)
    if commit:
        git("add", "-A", cwd=repo)
        git("commit", "-qm", "pipeline results", cwd=repo)
    return repo


def run_cache_keys(repo: Path) -> set[str]:
    return {p.parent.name for p in (repo / ".dvc/cache/runs").rglob("*") if p.is_file()}


def results(repo: Path) -> dict[str, str]:
    """Every output's digest, keyed by path (not reports/timings/: untracked, each run's own)."""
    return {f"{part}/{k}": v for part in ("models", "reports", "data") for k, v in digest(repo / part).items()
            if not k.startswith("timings/")}


def status(repo: Path) -> dict:
    return json.loads(dvc("status", "--json", cwd=repo).stdout)


UP_TO_DATE = {"data_listing": ["always changed"]}  # it lists shard.path on every repro: never "up to date"


def test_parameters_a_b_a_restore_from_the_run_cache(flow_run, tmp_path, monkeypatch):
    """A, then B (highres.seed: highres, evaluate and report rerun), then A again: DVC restores highres and
    evaluate from its run-cache instead of running them, and the workspace is A's byte for byte. The flow
    run with B as an override then restores them too, and leaves A in place."""
    repo = team_copy(flow_run, tmp_path / "repo")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    a = (repo / "params.yaml").read_text()
    before = results(repo)
    params = yaml.safe_load(a)
    params["highres"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    b_run = dvc("repro", cwd=repo).stdout
    assert "Running stage 'highres'" in b_run and "Running stage 'evaluate'" in b_run and "is cached" not in b_run
    (repo / "params.yaml").write_text(a)
    started = time.monotonic()
    a_again = dvc("repro", cwd=repo).stdout
    print(f"A again: {time.monotonic() - started:.1f} s")
    for stage in ("highres", "evaluate"):
        assert f"Stage '{stage}' is cached - skipping run" in a_again, a_again
    assert results(repo) == before
    assert status(repo) == UP_TO_DATE

    result = pipeline(root=str(repo), overrides=["highres.seed=1"])
    assert result["stages"] == {**{s: "skipped" for s in STAGES}, "highres": "restored", "evaluate": "restored",
                                "report": "ran"}, result["stages"]
    assert results(repo) == before
    assert (repo / "params.yaml").read_text() == a


def test_a_team_member_pulls_from_a_local_remote_and_the_pipeline_skips_every_stage(flow_run, tmp_path,
                                                                                   monkeypatch):
    repo = team_copy(flow_run, tmp_path / "repo", commit=True)
    no_remote = run([sys.executable, "-m", "flows.remote", "pull"], repo, check=False)
    assert no_remote.returncode == 2 and "no default DVC remote" in no_remote.stderr, no_remote.stderr
    dvc("remote", "add", "-d", "team", str(tmp_path / "remote"), cwd=repo)
    git("commit", "-qam", "the team's DVC remote", cwd=repo)
    pushed = run([sys.executable, "-m", "flows.remote", "push"], repo)
    assert "to remote 'team'" in pushed.stdout

    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    pulled = run([sys.executable, "-m", "flows.remote", "pull"], clone)
    assert "every output dvc.lock names came from remote 'team'" in pulled.stdout, pulled.stdout
    assert status(clone) == UP_TO_DATE
    assert run_cache_keys(clone) == run_cache_keys(repo) != set()  # the run-cache travelled too
    assert digest(clone / "models") == digest(repo / "models")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert pipeline(root=str(clone))["stages"] == {s: "skipped" for s in STAGES}
    assert git("status", "--porcelain", cwd=clone).stdout == ""


def test_the_deployment_clones_pulls_runs_and_pushes_on_a_work_pool(flow_run, tmp_path):
    """prefect.yaml's deployment `team`, deployed from a clone whose origin is a bare repository, run by a
    process worker: the remote (S3) lacks shard's outputs, so the run names them, computes them (the same
    bytes: the rest is skipped), then pushes; a second clone pulls every output. MLflow is a tracking server."""
    repo = team_copy(flow_run, tmp_path / "repo")
    shutil.copy(REPO / "prefect.yaml", repo / "prefect.yaml")
    shutil.copytree(REPO / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    with s3_server() as s3, prefect_server(tmp_path / "prefect-server") as prefect_api, \
            mlflow_server(tmp_path / "mlflow") as tracking:
        env = {**s3.env, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect-client"),
               "MLFLOW_TRACKING_URI": tracking, "CGSPN_EXPERIMENT": "team"}
        dvc("remote", "add", "-d", "team", f"s3://{s3.bucket}/dvc", cwd=repo)
        dvc("remote", "modify", "team", "endpointurl", s3.endpoint, cwd=repo)
        git("add", "-A", cwd=repo)
        git("commit", "-qm", "results, the team's remote and the deployment", cwd=repo)
        origin = tmp_path / "origin.git"
        git("clone", "-q", "--bare", str(repo), str(origin), cwd=tmp_path)
        git("remote", "add", "origin", str(origin), cwd=repo)
        # everything but shard's outputs (and no run-cache): what a push from an older clone left
        others = [s for s in STAGES if s != "shard"]
        dvc("push", *others, cwd=repo, env=env)

        run([bin_path("prefect"), "work-pool", "create", "team-pool", "--type", "process"], repo, env)
        run([bin_path("prefect"), "--no-prompt", "deploy", "--name", "team", "--pool", "team-pool"], repo, env)
        run([bin_path("prefect"), "deployment", "run", "cgspn-pipeline/team"], repo, env)
        worker = run([bin_path("prefect"), "worker", "start", "--pool", "team-pool", "--type", "process",
                      "--run-once"], tmp_path, env, timeout=900)
        runs = api(prefect_api, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [
            api(prefect_api, "/deployments/name/cgspn-pipeline/team")["id"]]}}})
        assert [r["state_type"] for r in runs] == ["COMPLETED"], worker.stdout[-5000:] + worker.stderr[-5000:]
        logs = api(prefect_api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [runs[0]["id"]]}}, "limit": 200})
        text = "\n".join(r["message"] for r in logs)
        pull_step = worker.stdout + worker.stderr  # a shell step's output goes to the worker's, not to the API
        assert "lacks data/shards" in pull_step and "(stage shard)" in pull_step, pull_step[-3000:]
        assert "the workspace lacks data/shards" in text  # the gap in the run's own log, for the UI
        assert "Running stage 'shard'" in text and "dvc push --run-cache to remote 'team'" in text
        assert "Running stage 'teacher'" not in text  # the same shards: nothing after shard reran

        clone = tmp_path / "clone"
        git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
        pulled = run([sys.executable, "-m", "flows.remote", "pull"], clone, env)
        assert "every output dvc.lock names came from remote 'team'" in pulled.stdout, pulled.stdout
        assert status(clone) == UP_TO_DATE
        assert digest(clone / "models") == digest(repo / "models")
        assert run_cache_keys(clone)  # the worker pushed its run-cache

        import mlflow

        client = mlflow.MlflowClient(tracking)
        experiment = client.get_experiment_by_name("team").experiment_id
        parents = client.search_runs([experiment], "tags.`cgspn.prefect_flow_run` != ''")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
        assert [c.info.run_name for c in children] == ["shard"] and children[0].data.metrics
        models = client.search_logged_models([experiment])
        assert any(m.source_run_id == parents[0].info.run_id and m.name == "student" for m in models)
        stored = [p for p in (tmp_path / "mlflow/artifacts").rglob("*") if p.is_file()]
        assert any(p.name == "REPORT.md" for p in stored) and any(p.name == "MLmodel" for p in stored)
