"""Test-wide settings: CPU Triton runs in its interpreter; quiet, offline embedded services."""
import json
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
    # Ray Train's controller polls its workers every 2 s and its preemption watcher every 5 s: a training
    # stage of a few steps spent ~4 s after its last step waiting for those polls. Polling more often
    # changes nothing else (it runs on the driver's side of a local Ray).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def micro(request, tmp_path_factory):
    """A root where shard -> teacher -> cache_teacher ran on the micro configuration (tests/micro.py),
    each through its command line, as children of one MLflow parent run.

    When this session also runs the Prefect flow (conftest.flow_run: every stage of the same configuration,
    each through `dvc repro` -> `python -m stages.<name>`, as children of the flow's parent run), these are
    the flow's own first three stages: running them a second time here costs about half a minute for the
    same outputs. Otherwise (the data-stage tests alone) the three stages run here, in this process, under
    a parent run of their own. Either way `tracking_uri` holds the parent run and its children, `stages`
    names those children, and the stages a test runs itself (bad input) log to this fixture's database
    (MLFLOW_TRACKING_URI for the rest of the session), never to the flow's."""
    import mlflow

    from micro import DATA_STAGES, run, write_params

    use_flow = any("flow_run" in item.fixturenames for item in request.session.items)
    flow = request.getfixturevalue("flow_run") if use_flow else None
    root = tmp_path_factory.mktemp("micro")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "CGSPN_EXPERIMENT": "micro"}
    saved = {k: os.environ.get(k) for k in [*env, "CGSPN_PARENT_RUN_ID"]}
    os.environ.update(env)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    if flow is not None:
        from flows.pipeline import STAGES

        metrics = {stage: json.loads((flow["root"] / "reports/metrics" / f"{stage}.json").read_text())
                   for stage in ("shard", "cache_teacher")}  # what the stages returned (teacher writes none)
        info = {"root": flow["root"], "params": flow["root"] / "params.yaml", "metrics": metrics,
                "parent": flow["first"]["mlflow_parent_run"], "experiment": flow["experiment"],
                "tracking_uri": flow["tracking_uri"], "stages": STAGES}
    else:
        from cgspn.tracking import experiment_id

        experiment = experiment_id("micro")
        parent = mlflow.MlflowClient().create_run(experiment, run_name="pipeline").info.run_id
        os.environ["CGSPN_PARENT_RUN_ID"] = parent
        params = write_params(root / "params.yaml")
        try:
            metrics = {stage: run(stage, params, root) for stage in DATA_STAGES}
        finally:
            del os.environ["CGSPN_PARENT_RUN_ID"]
        info = {"root": root, "params": params, "metrics": metrics, "parent": parent, "experiment": experiment,
                "tracking_uri": env["MLFLOW_TRACKING_URI"], "stages": DATA_STAGES}
    yield {**info, "stage_tracking_uri": env["MLFLOW_TRACKING_URI"]}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def two_teachers_cached(micro, tmp_path_factory):
    """A root where the teacher stage wrote both teachers of tests/two_teachers.py and cache_teacher cached
    both (micro's shards); once per session for every test file that needs it."""
    import time

    from micro import copy_root, run
    from two_teachers import two_teacher_params

    tmp = tmp_path_factory.mktemp("two")
    root = copy_root(micro["root"], tmp / "root", parts=("data/shards", "models/teachers"))
    params = two_teacher_params(tmp / "p.yaml")
    run("teacher", params, root)  # converts the EfficientNet; the ViT's files are micro's
    start = time.perf_counter()
    metrics = run("cache_teacher", params, root)
    timings = json.loads((root / "reports/timings/cache_teacher.json").read_text())
    print(f"\ncache_teacher, both teachers: {time.perf_counter() - start:.1f} s; "
          + "; ".join(f"{t}: {timings[t]['images_per_s']} img/s, {metrics[t]['bytes_per_image']} B/image"
                      for t in metrics))
    return {"root": root, "params": params, "metrics": metrics, "tmp": tmp}


@pytest.fixture(scope="session")
def two_teachers_stage2(two_teachers_cached):
    """distill_stage2 with both teachers in two_teachers_cached's root, from a stage-1 student that is the
    teacher's initialization. `params` (FAST steps for stage 2 and highres) is for the later stages too."""
    from micro import own_tracking, run
    from two_teachers import FAST, VIT, two_teacher_params

    from cgspn.distill import Stage1Task
    from cgspn.students import save_student

    root, tmp = two_teachers_cached["root"], two_teachers_cached["tmp"]
    torch.manual_seed(0)
    save_student(Stage1Task.build({"teacher_path": str(root / "models/teachers" / f"{VIT}.safetensors")}),
                 root / "models/distill_stage1/student.safetensors")
    params = two_teacher_params(tmp / "s2.yaml", **{f"distill_stage2__{k}": v for k, v in FAST.items()},
                                **{f"highres__{k}": v for k, v in FAST.items() if k != "val_count"})
    with own_tracking(tmp / "mlflow.db") as uri:  # its MLflow run alone there, whichever test builds it
        metrics = run("distill_stage2", params, root)
    return {"root": root, "params": params, "metrics": metrics, "tracking_uri": uri}



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


# `make test` runs `pytest -n 2 --dist loadgroup` (pytest-xdist): the tests that share the pipeline fixtures
# (the micro root, the Prefect flow run, the two-teacher setup) run in one worker, so each fixture is built
# once and no two local Ray instances run at once (every test that starts Ray uses them); the kernel, model
# and report tests run in the other. pytest is held below 9: pytest-xdist 3.8's groups do not take under
# pytest 9.2 (every test is its own unit). A plain `pytest` runs everything serially.
PIPELINE_FIXTURES = {"micro", "flow_run"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook turns the mark into the node id's @group
def pytest_collection_modifyitems(config, items):
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("pipeline"))
