"""Test-wide settings: CPU Triton runs in its interpreter; quiet, offline embedded services."""
import os

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
}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """A root where shard -> teacher -> cache_teacher ran on the micro configuration (tests/micro.py),
    each through its command line, as children of one MLflow parent run."""
    import mlflow

    from micro import DATA_STAGES, run, write_params

    root = tmp_path_factory.mktemp("micro")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "CGSPN_EXPERIMENT": "micro"}
    saved = {k: os.environ.get(k) for k in [*env, "CGSPN_PARENT_RUN_ID"]}
    os.environ.update(env)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.set_experiment("micro").experiment_id
    parent = mlflow.MlflowClient().create_run(experiment, run_name="pipeline").info.run_id
    os.environ["CGSPN_PARENT_RUN_ID"] = parent
    params = write_params(root / "params.yaml")
    try:
        metrics = {stage: run(stage, params, root) for stage in DATA_STAGES}
    finally:
        del os.environ["CGSPN_PARENT_RUN_ID"]
    yield {"root": root, "params": params, "metrics": metrics, "parent": parent, "experiment": experiment}
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
    repository, twice: the first run runs every stage, the second should skip them all."""
    import mlflow

    from flows.pipeline import pipeline
    from micro import make_repo

    repo = make_repo(tmp_path_factory.mktemp("flow") / "repo")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "CGSPN_EXPERIMENT")}
    os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{repo.parent / 'mlflow.db'}", "CGSPN_EXPERIMENT": "flow"})
    try:
        first = pipeline(root=str(repo))
        second = pipeline(root=str(repo))
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        experiment = mlflow.get_experiment_by_name("flow").experiment_id
        yield {"root": repo, "first": first, "second": second, "experiment": experiment,
               "tracking_uri": os.environ["MLFLOW_TRACKING_URI"]}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
