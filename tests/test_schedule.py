"""A served deployment's schedule fires: against a real local Prefect server (`prefect server start`), the
deployment that `python -m flows.serve` serves on a 20-second interval gets a run created by the server's
scheduler (auto-scheduled, not started by hand), and the served process runs it to completion. With
SQLAlchemy 2.1 beside Prefect 3.8.8 the scheduler failed every loop and no run was ever created."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from servers import api, prefect_server, stop

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_for(what: str, check, timeout: float, logs) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if result := check():
                return result
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{logs()}")


def test_a_served_deployment_gets_scheduled_runs_and_runs_them(tmp_path):
    from micro import make_repo

    repo = make_repo(tmp_path / "repo")
    # default 60 s: the test would wait a minute more
    with prefect_server(tmp_path / "prefect", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5") as url:
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": url,
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
               "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        serve_log = tmp_path / "serve.log"

        def logs() -> str:
            return "\n".join(f"--- {f.name}\n{f.read_text()[-4000:]}" for f in (tmp_path / "prefect/server.log", serve_log)
                             if f.exists())

        with open(serve_log, "wb") as out:
            served = subprocess.Popen([sys.executable, "-m", "flows.serve", "--interval", "20", "--name", "often",
                                       "--root", str(repo), "--stages", "shard"],
                                      cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deployment = wait_for("the deployment cgspn-pipeline/often", lambda: api(
                url, "/deployments/filter", {"deployments": {"name": {"any_": ["often"]}}}), 90, logs)[0]
            assert deployment["schedules"] and deployment["schedules"][0]["schedule"]["interval"] == 20

            def runs():
                return api(url, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})

            scheduled = wait_for("a run created by the scheduler", lambda: [r for r in runs() if r["auto_scheduled"]],
                                 90, logs)
            assert all(r["state_type"] in ("SCHEDULED", "PENDING", "RUNNING", "COMPLETED") for r in scheduled)
            done = wait_for("a scheduled run completed by the served process", lambda: [
                r for r in runs() if r["auto_scheduled"] and r["state_type"] == "COMPLETED"], 150, logs)
            assert done[0]["parameters"] == {"root": str(repo), "stages": ["shard"]}
            assert (repo / "data/shards/dataset.json").exists()  # the run ran the stage
        finally:
            stop(served)
