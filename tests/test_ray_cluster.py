"""The Ray stages on a real cluster (item 7 of issue 20): a head and a second node started with `ray start`,
one CPU each, on this machine; cache_teacher and distill_stage1 join it through RAY_ADDRESS, run two workers
of one CPU each, which only fit one per node, and report how many distinct Ray nodes their workers ran on.

The nodes are stopped by their process ids (tests/ray_nodes.py), never with `ray stop`, which would stop
every Ray on the machine; their temp dir is under this test's folder, so a `ray.init()` without an address
elsewhere (other tests, in parallel) never finds and joins this cluster. Besides the stages' own counts, the
test checks from outside Ray that each node's processes included workers of both stages. About 75 s here
(cluster start ~15 s, cache_teacher ~17 s, distill_stage1 ~40 s, stop ~3 s), plus the `micro` fixture when
this test runs alone.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from micro import MICRO, copy_root, write_params
from ray_nodes import ray_cluster, tail

REPO = Path(__file__).resolve().parents[1]
TEACHER = MICRO["distill_stage1"]["teacher"]
STAGE_TIMEOUT = 300  # seconds; each stage takes ~20-40 s here


def run_stage(stage: str, params: Path, root: Path, env: dict, cluster) -> float:
    """`python -m stages.<stage>` against the cluster; its output is in the failure message."""
    log = params.parent / f"{stage}.log"
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}", "--params", str(params), "--root", str(root)],
                                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        rc = None
        while rc is None:  # record the nodes' processes while the stage runs: its Ray workers come and go
            cluster.track()
            try:
                rc = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if time.perf_counter() - start > STAGE_TIMEOUT:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rc = f"killed after {STAGE_TIMEOUT} s"
    cluster.track()
    dead = [n.name for n in cluster.nodes if not n.alive()]
    assert rc == 0 and not dead, (f"stage {stage} on the two-node cluster: exit {rc}, dead nodes {dead}\n"
                                  f"--- {log}\n{tail(log, 60)}\n{cluster.logs()}")
    return time.perf_counter() - start


def test_stages_run_on_both_nodes_of_a_two_node_cluster(micro, tmp_path):
    root = copy_root(micro["root"], tmp_path / "root", parts=("data/shards", "models/teachers"))
    params = write_params(tmp_path / "params.yaml",
                          cache_teacher__workers=2, cache_teacher__cpus_per_worker=1,
                          distill_stage1__workers=2, distill_stage1__cpus_per_worker=1,
                          distill_stage1__steps=2, distill_stage1__checkpoint_every=2)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CGSPN_EXPERIMENT": "cluster"}
    env.pop("CGSPN_PARENT_RUN_ID", None)
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    with ray_cluster(tmp_path / "cluster", cpus=(1, 1), env=env) as cluster:
        assert len(cluster.alive_nodes()) == 2
        seconds = {"start": time.perf_counter() - start}
        env["RAY_ADDRESS"] = cluster.address  # the stages' drivers only: never this process's environment
        for stage in ("cache_teacher", "distill_stage1"):
            seconds[stage] = run_stage(stage, params, root, env, cluster)
        pids = cluster.pids()
        titles = {n.name: sorted(t for t in n.seen_titles() if t.startswith("ray::")) for n in cluster.nodes}
        stop = time.perf_counter()
    seconds["stop"] = time.perf_counter() - stop
    killed = {n.name: n.killed for n in cluster.nodes if n.killed}  # needed SIGKILL: worth a look, not a failure
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    print(f"two-node cluster at {cluster.address}: stage seconds {seconds}; processes per node "
          f"{ {name: len(p) for name, p in pids.items()} }; killed after the grace period {killed}; "
          f"Ray worker titles {titles}")

    assert cluster.leftovers == [], f"processes of the Ray nodes still running after the stop: {cluster.leftovers}"
    assert pids["head"] and pids["worker1"] and not pids["head"] & pids["worker1"], pids

    cache = json.loads((root / "reports/metrics/cache_teacher.json").read_text())
    assert cache[TEACHER]["workers"] == 2, cache
    nodes = json.loads((root / "reports/timings/cache_teacher.json").read_text())[TEACHER]["nodes"]  # untracked
    assert nodes == 2, f"cache_teacher's workers ran on {nodes} node(s): {cache}"
    teachers = json.loads((root / "models/teachers/teachers.json").read_text())["teachers"]
    for t in teachers:
        assert (root / "data/features" / Path(t["file"]).stem / "meta.json").is_file(), t

    distill = json.loads((root / "reports/metrics/distill_stage1.json").read_text())
    assert distill["workers"] == 2 and distill["steps"] == 2, distill
    assert distill["nodes"] == 2, f"distill_stage1's workers ran on {distill['nodes']} node(s): {distill}"
    assert (root / "models/distill_stage1/student.safetensors").is_file()

    for name, seen in titles.items():  # and seen from outside Ray: each node ran workers of both stages
        for worker in ("ray::TeacherWorker", "ray::RayTrainWorker"):
            assert any(t.startswith(worker) for t in seen), f"no {worker} process seen on node {name}: {titles}"
