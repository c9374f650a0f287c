"""The team's servers for tests, each a real process on a free local port, stopped by PID (its process group):
a Prefect server with its own PREFECT_HOME, and an MLflow tracking server with a SQLite backend and an
artifact destination, as docs/team.md starts them.

    with prefect_server(tmp / "prefect") as api_url, mlflow_server(tmp / "mlflow") as tracking_uri:
        ...  # PREFECT_API_URL=api_url, MLFLOW_TRACKING_URI=tracking_uri
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    """GET (or POST `body` as JSON to) a server's REST API -> the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


@contextlib.contextmanager
def server(cmd: list[str], url: str, log: Path, env: dict, timeout: float = 120):
    """Run `cmd` in a process group of its own until the block ends; wait until `url` answers."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                start_new_session=True)
    try:
        wait_for(url, proc, log, timeout)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session), SIGKILL after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bin_path(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@contextlib.contextmanager
def prefect_server(home: Path, **settings: str):
    """`prefect server start` on a free port with PREFECT_HOME=home (and `settings`, PREFECT_... variables)
    -> its API URL."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": "", **settings}
    api = f"http://127.0.0.1:{port}/api"
    with server([bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                f"{api}/health", home / "server.log", env):
        yield api


@contextlib.contextmanager
def mlflow_server(folder: Path):
    """`mlflow server` on a free port, runs in <folder>/mlflow.db, artifacts under <folder>/artifacts -> its URI."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [bin_path("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts")]
    uri = f"http://127.0.0.1:{port}"
    with server(cmd, f"{uri}/health", folder / "server.log", {**os.environ, "MLFLOW_TRACKING_URI": ""}):
        yield uri
