"""The Ray stages on a real cluster (issue 31): a head and a worker node started with `ray start`, one CPU
each, on this machine (tests/ray_nodes.py), joined through Ray's client (`ray://`) or the GCS address.

- `test_the_stages_through_ray_client_survive_a_lost_node`: cache_teacher and distill_stage1 through
  `ray://`, the training's checkpoints on the S3 test server (tests/object_store.py); each runs once
  undisturbed and once with the worker node killed (SIGKILL to all its processes) mid-stage and a new node
  joining, and both give the same bytes.
- `test_a_node_that_cannot_run_the_stage_is_named`: a worker node that lacks a package and does not see the
  driver's folders, MLflow's SQLite database among them (its own mount namespace), is refused in one line
  naming it and each fault, through `host:port`, with the
  dashboard off; without it, cache_teacher runs two actors on half a GPU each and a training stage runs,
  with no traceback.
- `test_gpus_this_machine_lacks_are_refused_in_one_line`: a local Ray asked for a GPU it does not have;
  `test_an_address_where_nothing_answers_is_one_line`: a RAY_ADDRESS where no head listens.

The nodes are stopped by their process ids, never with `ray stop`, which would stop every Ray on the
machine; their temp dir is under the test's folder, so a `ray.init()` without an address elsewhere (other
tests, in parallel) never finds this cluster.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from micro import copy_root, digest, error_line, write_params
from ray_nodes import ray_cluster, title

REPO = Path(__file__).resolve().parents[1]
STAGE_TIMEOUT = 400  # seconds; each stage takes ~20-60 s here


def run_stage(stage: str, params: Path, root: Path, env: dict, cluster, watch=None) -> tuple[int, str, float]:
    """`python -m stages.<stage> --root .` in `root`, as `dvc repro` runs it, against the cluster; `watch(log
    text)` is called every 0.1 s while it runs (a test kills a node from there). Returns (exit status, output,
    seconds)."""
    log = params.parent / f"{stage}-{params.stem}.log"
    start = time.perf_counter()
    env = {**env, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}", "--params", str(params), "--root", "."],
                                cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        rc = None
        while rc is None:  # record the nodes' processes while the stage runs: its Ray workers come and go
            cluster.track()
            if watch:
                watch(log.read_text(errors="replace"))
            try:
                rc = proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                if time.perf_counter() - start > STAGE_TIMEOUT:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rc = -9
    return rc, log.read_text(errors="replace"), time.perf_counter() - start


def succeeded(stage: str, result: tuple[int, str, float], cluster, node_lost: bool = False) -> float:
    """The stage's seconds, once it is seen to have exited 0 with no traceback. With `node_lost`, Ray's own
    lines (they start "(RayTrainWorker pid=...)") may hold one: when a node dies, the worker that survives
    it loses its peer ("Connection closed by peer") and Ray Train says so before it restarts them."""
    rc, output, seconds = result
    assert rc == 0, f"stage {stage} on the cluster: exit {rc}\n{output[-6000:]}\n{cluster.logs()}"
    lines = output.splitlines()
    if node_lost:
        lines = [line for line in lines if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=\d+", line)]
    assert not [line for line in lines if "Traceback" in line], output[-6000:]
    return seconds


class NodeLoss:
    """Kills the cluster's current worker node once `ready(log)` holds, then starts a new one (as a cluster
    replaces a lost machine); records when."""

    def __init__(self, cluster, ready):
        self.cluster, self.ready = cluster, ready
        self.killed_at, self.victim, self.titles, self.replacement = None, None, [], None
        self.resumed_after = None  # seconds from the kill to the training's "resumed from the checkpoint"

    def __call__(self, log: str) -> None:
        if self.killed_at is not None:
            if self.resumed_after is None and "resumed from the checkpoint" in log:
                self.resumed_after = time.perf_counter() - self.killed_at
            return
        if not self.ready(log):
            return
        self.victim = [n for n in self.cluster.nodes if n.name != "head" and not n.killed_by_test][-1]
        self.titles = self.victim.kill()
        self.killed_at = time.perf_counter()
        self.replacement = self.cluster.add_worker(1)


def title_seen(node, prefix: str) -> bool:
    """Whether a process of the node now has a title that starts with `prefix`."""
    return any(title(p).startswith(prefix) for p in node.current())


def test_the_stages_through_ray_client_survive_a_lost_node(micro, tmp_path):
    from object_store import s3_server

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CGSPN_EXPERIMENT": "cluster"}
    for k in ("CGSPN_PARENT_RUN_ID", "RAY_ADDRESS"):
        env.pop(k, None)
    seconds = {}
    with s3_server() as s3:
        env.update(s3.env)  # the nodes get the credentials as a cloud's nodes do: from their own environment
        with ray_cluster(tmp_path / "cluster", cpus=(1, 1), env=env) as cluster:
            env["RAY_ADDRESS"] = cluster.client_address  # the stages' drivers only
            # cache_teacher at 168 px: about a second a shard, so that the node dies while its actor works
            caching = {"cache_teacher__workers": 2, "cache_teacher__cpus_per_worker": 1,
                       "cache_teacher__resolution": 168, "cache_teacher__layers": {}}
            features = {}
            for run in ("calm", "lost"):
                root = copy_root(micro["root"], tmp_path / f"cache-{run}", parts=("data/shards", "models/teachers"))
                params = write_params(tmp_path / f"cache-{run}.yaml", **caching)
                worker = cluster.nodes[-1]
                loss = NodeLoss(cluster, lambda log, w=worker: title_seen(w, "ray::TeacherWorker.cache"))
                result = run_stage("cache_teacher", params, root, env, cluster, loss if run == "lost" else None)
                seconds[f"cache_teacher {run}"] = succeeded("cache_teacher", result, cluster, run == "lost")
                features[run] = digest(root / "data/features")
                timings = json.loads((root / "reports/timings/cache_teacher.json").read_text())
                if run == "lost":
                    assert loss.killed_at is not None, "the worker node's actor never started a shard"
                    assert "ray::TeacherWorker.cache" in " ".join(loss.titles), loss.titles
                    # the shard of the actor that died ran again (on whichever actor was free first)
                    assert timings["dinov2_vits14_imgfocus"]["shards_redone"] >= 1, timings
                    assert "the shard runs again" in result[1], result[1][-3000:]
            assert features["lost"] == features["calm"]
            assert any(name.endswith(".tar") for name in features["calm"])

            # distill_stage1 on both nodes, checkpoints in the bucket; a node killed after the first checkpoint
            training = {"distill_stage1__workers": 2, "distill_stage1__cpus_per_worker": 1,
                        "distill_stage1__steps": 12, "distill_stage1__checkpoint_every": 4,
                        "distill_stage1__max_failures": 2}
            students, resumed = {}, None
            for run in ("calm", "lost"):
                root = copy_root(micro["root"], tmp_path / f"train-{run}")
                params = write_params(tmp_path / f"train-{run}.yaml", **training,
                                      distill_stage1__storage_path=f"s3://{s3.bucket}/ray-{run}")
                # once Ray Train holds a checkpoint: its manager's record of them is in the bucket
                loss = NodeLoss(cluster, lambda log, prefix=f"ray-{run}/": any(
                    o["Key"].endswith("checkpoint_manager_snapshot.json")
                    for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])))
                result = run_stage("distill_stage1", params, root, env, cluster, loss if run == "lost" else None)
                seconds[f"distill_stage1 {run}"] = succeeded("distill_stage1", result, cluster, run == "lost")
                students[run] = (root / "models/distill_stage1/student.safetensors").read_bytes()
                metrics = json.loads((root / "reports/metrics/distill_stage1.json").read_text())
                assert metrics["workers"] == 2 and metrics["steps"] == 12, metrics
                if run == "calm":  # one worker a node (one CPU each); where they ran is a timing, not a metric
                    assert json.loads((root / "reports/timings/distill_stage1.json").read_text())["nodes"] == 2
                keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"ray-{run}/")
                        .get("Contents", [])]
                assert any("/checkpoint_" in k and k.endswith("state.pt") for k in keys), keys
                if run == "lost":
                    assert loss.killed_at is not None, "the training finished before its first checkpoint was seen"
                    assert "ray::RayTrainWorker" in " ".join(loss.titles), loss.titles
                    line = next(t for t in result[1].splitlines() if "resumed from the checkpoint at step" in t)
                    resumed = line.split("resumed from the checkpoint at step")[1].split()[0]
                    seconds["node lost -> training resumed"] = loss.resumed_after
            assert int(resumed) >= 4
            assert students["lost"] == students["calm"]
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    print(f"two-node cluster through {cluster.address} (client): stage seconds {seconds}")
    assert cluster.leftovers == [], f"processes of the Ray nodes still running after the stop: {cluster.leftovers}"


def test_a_node_that_cannot_run_the_stage_is_named(micro, tmp_path):
    root = copy_root(micro["root"], tmp_path / "root")
    params = write_params(tmp_path / "params.yaml", cache_teacher__workers=1, distill_stage1__workers=1,
                          distill_stage1__steps=2, distill_stage1__checkpoint_every=2)
    # MLflow's database in the folder the node does not see: its workers would log into one of their own
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "CGSPN_EXPERIMENT": "cluster"}
    for k in ("CGSPN_PARENT_RUN_ID", "RAY_ADDRESS"):
        env.pop(k, None)
    # A node without safetensors (a package that shadows it and fails to import) that does not see the
    # driver's folder: its `ray start` runs in a mount namespace of its own with an empty tmpfs over it.
    broken = tmp_path / "broken"
    (broken / "safetensors").mkdir(parents=True)
    (broken / "safetensors/__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'safetensors'\")\n")
    hide = ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f"mount -t tmpfs none {root} && exec \"$@\"", "node")
    with ray_cluster(tmp_path / "cluster", cpus=(2,), env=env, dashboard=False, head_gpus=1) as cluster:
        node = cluster.add_worker(1, env={"PYTHONPATH": str(broken)}, prefix=hide)
        cluster.wait_for_nodes(2, 90)
        env["RAY_ADDRESS"] = cluster.address
        rc, output, _ = run_stage("cache_teacher", params, root, env, cluster)
        assert rc == 2, output[-4000:]
        line = error_line(output, "cache_teacher")
        ip = cluster.ip
        assert f"Ray node {ip}" in line and "cannot import the code of stage cache_teacher" in line, line
        assert "No module named 'safetensors'" in line, line
        assert f"does not see {root}" in line, line
        assert f"does not see {root}, where MLflow's tracking database is (MLFLOW_TRACKING_URI)" in line, line
        assert not (root / "data/features").exists() or not any((root / "data").glob(".features.partial*"))

        node.kill()  # without it the stages run, and Ray Train says nothing of the missing dashboard
        deadline = time.monotonic() + 60
        while len(cluster.alive_nodes()) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        # two actors on the head's one (logical) GPU, half each; they compute on the CPU (no CUDA here)
        shared_gpu = write_params(tmp_path / "gpu.yaml", cache_teacher__workers=2, cache_teacher__gpus_per_worker=0.5)
        succeeded("cache_teacher", run_stage("cache_teacher", shared_gpu, root, env, cluster), cluster)
        assert json.loads((root / "reports/metrics/cache_teacher.json").read_text())["dinov2_vits14_imgfocus"][
            "workers"] == 2
        succeeded("distill_stage1", run_stage("distill_stage1", params, root, env, cluster), cluster)
    assert cluster.leftovers == [], cluster.leftovers


def test_gpus_this_machine_lacks_are_refused_in_one_line(micro, tmp_path, capsys, monkeypatch):
    import pytest

    from micro import run

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = copy_root(micro["root"], tmp_path / "root", parts=("data/shards", "models/teachers"))
    params = write_params(tmp_path / "params.yaml", cache_teacher__gpus_per_worker=1, cache_teacher__workers=1)
    with pytest.raises(SystemExit) as exit_:
        run("cache_teacher", params, root)
    assert exit_.value.code == 2
    line = error_line(capsys.readouterr().err, "cache_teacher")
    assert "cache_teacher's 1 workers need 1 GPU (1 per worker); Ray has 0 on this machine" in line, line
    assert not (root / "data/features").exists()


def test_an_address_where_nothing_answers_is_one_line(micro, tmp_path, capsys, monkeypatch):
    """Ray would try a GCS address where nothing listens for minutes; the stage says so at once."""
    import pytest

    from micro import run
    from ray_nodes import free_port

    root = copy_root(micro["root"], tmp_path / "root", parts=("data/shards", "models/teachers"))
    params = write_params(tmp_path / "params.yaml")
    for address in (f"127.0.0.1:{free_port()}", f"ray://127.0.0.1:{free_port()}"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(SystemExit) as exit_:
            run("cache_teacher", params, root)
        assert exit_.value.code == 2
        line = error_line(capsys.readouterr().err, "cache_teacher")
        assert f"error: RAY_ADDRESS={address}: nothing answers there (Connection refused)" in line, line
