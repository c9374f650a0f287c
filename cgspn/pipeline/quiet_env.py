"""Quiet, offline-friendly defaults for the embedded services (Prefect's temporary server, MLflow, DVC, Ray) of
a stage or flow started outside the Makefile (../shared/ENVIRONMENT.md); a value already in the environment wins.

    set_defaults()                                         # a stage (cgspn.pipeline.cli)
    set_defaults({"PREFECT_HOME": str(repo / ".prefect")}) # the flow, before it imports Prefect

Imports nothing but the standard library, so that it can run before Prefect or Ray is imported.
"""
from __future__ import annotations

import os

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # else telemetry errors and 'database is locked'
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the temporary server needs ~11 s here
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps a local Ray on 127.0.0.1
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",  # else every print of a worker shows twice
    "TQDM_MININTERVAL": "2",
}


def set_defaults(extra: dict[str, str] | None = None) -> None:
    """Put QUIET_ENV (and `extra`) into os.environ where a variable is not set yet."""
    for key, value in {**QUIET_ENV, **(extra or {})}.items():
        os.environ.setdefault(key, value)
