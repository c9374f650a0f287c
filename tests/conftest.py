"""Test-wide settings: CPU Triton runs in its interpreter; quiet, offline embedded services."""
import atexit
import json
import os
import shutil
import tempfile

# Must be set before anything imports triton (the kernels pick the interpreter at definition time).
# CGSPN_TEST_DEVICE=cuda runs the kernel tests on a GPU instead (see tests/test_gspn_kernels.py).
if os.environ.get("CGSPN_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")
for key, value in {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    # Ray Train's controller polls its workers every 2 s and its preemption watcher every 5 s: a training
    # stage of a few steps spent ~4 s after its last step waiting for those polls. Polling more often
    # changes nothing else (it runs on the driver's side of a local Ray).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
}.items():
    os.environ.setdefault(key, value)
# Importing the flow defaults PREFECT_HOME to the checkout's .prefect/ (make's too): tests keep theirs apart.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cgspn-test-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)  # each pytest process made one

import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """A root where shard -> teacher -> cache_teacher ran on the micro configuration (tests/micro.py), in this
    process, each through its command line, as children of one MLflow parent run.

    It is built apart from the Prefect flow's run of the same stages (conftest.flow_run) so that the tests
    that need data and a teacher, but no flow, run in the other pytest-xdist worker while the flow runs
    (about half a minute of stages twice over, for some three minutes of parallel work). `tracking_uri` holds
    the parent run and its children, `stages` names those children; the stages a test runs itself (bad input)
    log to the same database (MLFLOW_TRACKING_URI for the rest of the session)."""
    import mlflow

    from cgspn.pipeline.tracking import experiment_id
    from micro import DATA_STAGES, run, write_params

    root = tmp_path_factory.mktemp("micro")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "CGSPN_EXPERIMENT": "micro"}
    saved = {k: os.environ.get(k) for k in [*env, "CGSPN_PARENT_RUN_ID"]}
    os.environ.update(env)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    experiment = experiment_id("micro")
    parent = mlflow.MlflowClient().create_run(experiment, run_name="pipeline").info.run_id
    os.environ["CGSPN_PARENT_RUN_ID"] = parent
    params = write_params(root / "params.yaml")
    try:
        metrics = {stage: run(stage, params, root) for stage in DATA_STAGES}
    finally:
        del os.environ["CGSPN_PARENT_RUN_ID"]
    yield {"root": root, "params": params, "metrics": metrics, "parent": parent, "experiment": experiment,
           "tracking_uri": env["MLFLOW_TRACKING_URI"], "stages": DATA_STAGES}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def flow_run(tmp_path_factory, prefect_harness):
    """The whole pipeline on the micro configuration through the Prefect flow, in a fresh git + DVC
    repository, twice: the first run runs every stage, the second should skip them all. MLflow is a tracking
    server (tests/servers.py), as a team's would be: every stage's run, the Ray Train workers' metrics, the
    parent run and the logged model go to it over HTTP."""
    import mlflow

    from flows.pipeline import pipeline
    from micro import make_repo
    from servers import mlflow_server

    repo = make_repo(tmp_path_factory.mktemp("flow") / "repo")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "CGSPN_EXPERIMENT")}
    with mlflow_server(repo.parent / "mlflow") as tracking:
        os.environ.update({"MLFLOW_TRACKING_URI": tracking, "CGSPN_EXPERIMENT": "flow"})
        try:
            first = pipeline(root=str(repo))
            second = pipeline(root=str(repo))
            mlflow.set_tracking_uri(tracking)
            experiment = mlflow.get_experiment_by_name("flow").experiment_id
            yield {"root": repo, "first": first, "second": second, "experiment": experiment, "tracking_uri": tracking}
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="session")
def trained(flow_run):
    """The micro pipeline with both teachers that the Prefect flow ran (flow_run): its root, parameters file,
    the training stages' and evaluate's metrics, its MLflow database and the first run's parent run."""
    import mlflow

    from micro import TRAIN_STAGES

    mlflow.set_tracking_uri(flow_run["tracking_uri"])
    root = flow_run["root"]
    metrics = {s: json.loads((root / "reports/metrics" / f"{s}.json").read_text()) for s in [*TRAIN_STAGES, "evaluate"]}
    return {"root": root, "params": root / "params.yaml", "metrics": metrics, "experiment": flow_run["experiment"],
            "tracking_uri": flow_run["tracking_uri"], "parent": flow_run["first"]["mlflow_parent_run"]}


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_checkout():
    """Tests write only into temporary folders: no MLflow artifact store (mlruns/, mlartifacts/) or database
    appears in the checkout during the session (MLflow's default artifact root is the working directory)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    watched = [repo / name for name in ("mlruns", "mlartifacts", "mlflow.db")]
    before = {p for p in watched if p.exists()}
    yield
    appeared = sorted(str(p) for p in watched if p.exists() and p not in before)
    assert not appeared, f"the test session wrote into the checkout: {appeared}"


# `make test` runs `pytest -n 2 --dist loadgroup` (pytest-xdist). The tests of the Prefect flow's run with both
# teachers (fixture flow_run, group "flow": some three minutes to build) run in one worker, so that it is built
# once; every other test goes to whichever worker is free, and each worker builds the one-teacher micro root
# (fixture micro, ~15 s) the first time one of its tests needs it. Local Ray instances of the two workers start
# at the same time: a second local Ray on a machine finds the dashboard agent's HTTP port (52365) taken and
# runs without that server, which nothing here uses. pytest is held below 9: pytest-xdist 3.8's groups do not
# take under pytest 9.2 (every test is its own unit). A plain `pytest` runs everything serially.
FIXTURE_GROUPS = {"flow_run": "flow"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook turns the mark into the node id's @group
def pytest_collection_modifyitems(config, items):
    for item in items:
        groups = {g for name, g in FIXTURE_GROUPS.items() if name in getattr(item, "fixturenames", ())}
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} uses the fixtures of groups {sorted(groups)}: one test, one group")
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups.pop()))
