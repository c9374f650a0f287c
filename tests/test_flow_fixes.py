"""The flow's part of issue 29: the stages and the parent-run variable named in one place (cgspn.pipeline.names);
a stage that rejects its input (exit 2) is not retried and ends the flow with its one line; a crashing stage is
still retried; a run with overrides says where its report is (its DVC experiment, its MLflow parent run, which
holds REPORT.md); `python -m flows.pipeline` sets its own quiet, offline defaults before Prefect is imported.

The flow's own runs here are cheap: a micro repository (tests/micro.py) in which the first stage fails."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def with_flows(dest: Path) -> Path:
    """A micro git + DVC repository at `dest` that also holds the flows, so that `python -m flows.pipeline`
    run there treats it as its repository, as it treats this one."""
    from micro import make_repo

    make_repo(dest)
    shutil.copytree(REPO / "flows", dest / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def string_lists(path: Path):
    """(line, values) of every list or tuple literal made only of strings in the file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            yield node.lineno, [e.value for e in node.elts]


def test_the_flow_and_the_pipeline_package_name_no_stage_and_no_parent_run_variable_of_their_own():
    from cgspn.pipeline.names import PARENT_RUN_ENV, STAGES

    files = [p for folder in ("flows", "cgspn/pipeline") for p in sorted((REPO / folder).glob("*.py"))
             if p.name != "names.py"]
    found = []
    for path in files:
        rel = path.relative_to(REPO)
        found += [f"{rel}:{line} {values}" for line, values in string_lists(path)
                  if len(values) > 1 and set(values) <= set(STAGES)]
        found += [f"{rel}:{node.lineno} {node.value!r}" for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Constant) and node.value == PARENT_RUN_ENV]
    assert not found, found


def test_bad_input_is_not_retried_and_ends_the_flow_with_its_one_line(tmp_path):
    """The README's override command, run from a shell on a micro repository: the first stage to read the
    shard section, data_listing, rejects the source (exit 2); it runs once, shard never, and the flow ends with
    that stage's line, exit status 2, no traceback."""
    repo = with_flows(tmp_path / "repo")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    params = (repo / "params.yaml").read_bytes()
    done = subprocess.run([sys.executable, "-m", "flows.pipeline", "-S", "shard.source=no_such_source"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    error = "stage data_listing: error: params.yaml: shard.source must be one of"
    assert done.returncode == 2, output[-4000:]
    assert output.count("Running stage 'data_listing'") == 1, output[-4000:]  # no retry
    assert "Running stage 'shard'" not in output, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    # what the flow printed itself, besides Prefect's log records ("12:34:56.789 | INFO | ..."), ends with the line
    own = [line for line in output.splitlines() if line.strip() and not re.match(r"\d\d:\d\d:\d\d\.\d+ \| ", line)]
    assert own[-1].startswith(error), output[-2000:]
    assert (repo / "params.yaml").read_bytes() == params


def test_a_crashing_stage_is_retried(tmp_path, prefect_harness, monkeypatch):
    """Anything but bad input may be transient: a stage that exits 1 is tried three times."""
    import pytest

    from flows import pipeline as flow_module

    repo = with_flows(tmp_path / "repo")
    attempts = tmp_path / "attempts"
    (repo / "stages/shard.py").write_text(f"import sys\nopen({str(attempts)!r}, 'a').write('x')\nsys.exit(1)\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(flow_module, "run_stage", flow_module.run_stage.with_options(retry_delay_seconds=0))
    with pytest.raises(flow_module.StageFailed, match="stage shard failed"):
        flow_module.pipeline(root=str(repo), stages=["shard"])
    assert attempts.read_text() == "xxx"


def test_an_override_runs_report_is_named_where_it_is_kept(tmp_path, monkeypatch):
    """After an override run the workspace's REPORT.md is the baseline's again: the flow's last lines name the
    run's DVC experiment and MLflow parent run instead, and the parent run holds the report as an artifact."""
    import mlflow

    from flows.tracking import ParentRun, report_lines

    root = tmp_path / "root"
    (root / "reports").mkdir(parents=True)
    (root / "reports/REPORT.md").write_text("# the override run's report\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with ParentRun("granite-hyena", ["report.title_note=x"], root) as parent:
        parent.finish("granite-hyena", None)
    assert parent.report_uri == f"runs:/{parent.id}/REPORT.md"
    local = mlflow.artifacts.download_artifacts(parent.report_uri, dst_path=str(tmp_path / "down"),
                                                tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    assert Path(local).read_text() == "# the override run's report\n"

    text = "\n".join(report_lines(root, "granite-hyena", parent.report_uri))
    assert "dvc exp apply granite-hyena" in text and parent.report_uri in text
    assert f"Report:   {root / 'reports/REPORT.md'}" in text and "holds the baseline's" in text
    assert report_lines(root, None, parent.report_uri) == [f"Report:   {root / 'reports/REPORT.md'}"]


QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
         "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
         "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
CHILD = """import json, os
import flows.pipeline
from prefect.settings import get_current_settings
s = get_current_settings()
print(json.dumps({"env": dict(os.environ), "home": str(s.home), "analytics": s.server.analytics_enabled,
                  "startup": s.server.ephemeral.startup_timeout_seconds}))
"""


def test_the_flow_sets_quiet_offline_defaults_before_prefect_is_imported(tmp_path):
    """Run from a shell without the Makefile's settings: importing the flow module sets them (PREFECT_HOME in
    the flow's repository), early enough that Prefect's settings see them; a value already set wins."""
    root = tmp_path / "root"
    for part in ("flows", "cgspn"):
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in QUIET and not k.startswith(("PREFECT_", "RAY_"))}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "200"  # the user's own value
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {**QUIET, "PREFECT_HOME": str(root / ".prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "200"}
    assert {k: child["env"].get(k) for k in expected} == expected
    assert child["home"] == str(root / ".prefect") and child["analytics"] is False and child["startup"] == 200


def test_dvc_stopping_before_the_stage_ran_is_bad_input_but_its_lock_is_not():
    """A shard.path that does not exist stops DVC before the stage runs (exit 255, 'ERROR: failed to
    reproduce'): the same on every try, so not retried; a stage that ran and crashed, or DVC's lock, is."""
    from flows.pipeline import StageInputError, stage_error

    missing = ["ERROR: failed to reproduce 'shard': [Errno 2] No such file or directory: '/data/x'"]
    error = stage_error("shard", 255, missing, ran=False)
    assert isinstance(error, StageInputError)
    assert str(error) == "stage shard: error: failed to reproduce 'shard': [Errno 2] No such file or directory: '/data/x'"
    assert not isinstance(stage_error("shard", 255, missing, ran=True), StageInputError)
    locked = ["ERROR: Unable to acquire lock. Most likely another DVC process is running"]
    assert not isinstance(stage_error("shard", 255, locked, ran=False), StageInputError)


def test_the_closing_line_names_the_configured_prefect_server_or_the_history_the_run_kept(monkeypatch):
    from flows.pipeline import prefect_hint

    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    assert prefect_hint().startswith("Prefect:  http://prefect.example:4200 ")
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_HOME", "/somewhere/.prefect")  # the temporary server's database is there
    assert "PREFECT_HOME=/somewhere/.prefect .venv/bin/prefect server start" in prefect_hint()


def test_a_key_overridden_twice_is_logged_with_its_last_value(tmp_path, monkeypatch):
    """`-S shard.path=a -S shard.path=b` sets b (the later wins); the parent run logs b instead of failing
    with MLflow's "Changing param values is not allowed"."""
    import mlflow

    from flows.tracking import ParentRun

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with ParentRun("twice", ["shard.path=/a", "shard.path=/b", "teacher.names=[x]"], tmp_path) as parent:
        pass
    params = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(parent.id).data.params
    assert params == {"shard.path": "/b", "teacher.names": "[x]"}


def test_a_parent_run_left_running_by_a_dead_flow_process_is_closed_by_the_next_flow_run(tmp_path, monkeypatch):
    """A flow process that was killed leaves its MLflow parent run (and the stage run it was in) RUNNING: the
    next flow run on the machine marks them FAILED, saying so; a live process's run is left alone. A stage run
    outside a flow run goes to the "-stages" experiment, beside the flow's, not among its pipeline runs."""
    import socket

    import mlflow

    from cgspn.pipeline.tracking import stage_run
    from flows.tracking import HOST_TAG, PID_TAG, ParentRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CGSPN_EXPERIMENT", "abandoned")
    monkeypatch.delenv("CGSPN_PARENT_RUN_ID", raising=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no process now
    client = mlflow.MlflowClient(uri)
    experiment = ParentRun.experiment()
    host = socket.gethostname()
    killed = client.create_run(experiment, run_name="killed", tags={HOST_TAG: host, PID_TAG: str(dead.pid)})
    child = client.create_run(experiment, run_name="shard", tags={"mlflow.parentRunId": killed.info.run_id})
    live = client.create_run(experiment, run_name="live", tags={HOST_TAG: host, PID_TAG: str(os.getpid())})
    with ParentRun("next", [], tmp_path) as parent:
        parent.discard()
    status = {r: client.get_run(r.info.run_id) for r in (killed, child, live)}
    assert [status[r].info.status for r in (killed, child, live)] == ["FAILED", "FAILED", "RUNNING"]
    assert status[killed].data.tags["cgspn.outcome"].startswith(f"abandoned: flow process {dead.pid} on {host}")

    with stage_run("shard", {"seed": 0}) as run:
        pass
    assert client.get_experiment(client.get_run(run.id).info.experiment_id).name == "abandoned-stages"
