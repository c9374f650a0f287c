"""A served deployment's schedule fires: against a real local Prefect server (`prefect server start`), the
deployment that `python -m flows.serve` serves on a 20-second interval gets a run created by the server's
scheduler (auto-scheduled, not started by hand), and the served process runs it to completion. With
SQLAlchemy 2.1 beside Prefect 3.8.8 the scheduler failed every loop and no run was ever created."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


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


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_served_deployment_gets_scheduled_runs_and_runs_them(tmp_path):
    from micro import make_repo

    repo = make_repo(tmp_path / "repo")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",  # default 60: the test would wait a minute more
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    with open(server_log, "wb") as out:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    served = None

    def logs() -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-4000:]}" for f in (server_log, serve_log) if f.exists())

    try:
        wait_for("the Prefect server's health check", lambda: api(url, "/health") is True, 120, logs)
        with open(serve_log, "wb") as out:
            served = subprocess.Popen([sys.executable, "-m", "flows.serve", "--interval", "20", "--name", "often",
                                       "--root", str(repo), "--stages", "shard"],
                                      cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
        for proc in (served, server):
            if proc is not None:
                stop(proc)
