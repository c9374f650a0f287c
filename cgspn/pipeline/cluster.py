"""Ray connection shared by the stages that use it: start Ray locally, or join the cluster at RAY_ADDRESS.

    started = start_ray(local_cpus=4, stage="cache_teacher", shared=[staging, root / "data"])

Local (RAY_ADDRESS unset): Ray starts on this machine and its workers import the driver's own code.

A cluster (RAY_ADDRESS = `host:port` of the head's GCS, or `ray://host:10001`, Ray's client): the stage's
code goes to every node with the job (Ray's `py_modules`: the top-level packages of the stage's import
closure, from the driver's working tree). Before any work, one task per alive node checks that the node
imports that closure, that it is the driver's code file for file, and that every folder of `shared` is the
driver's own folder there (a file the driver just wrote in it is visible). Each node that fails is named in
one ClusterError line: the nodes need the project's Python dependencies installed (not its code), and local
paths need a file system every node sees; object storage (`s3://...`) needs neither. docs/cluster.md.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from cgspn.pipeline.errors import ClusterError

CHECK_TIMEOUT_S = 300  # a node's first worker starts Python, imports torch and unpacks the code


def start_ray(local_cpus: int, stage: str, shared: list[Path] = ()) -> bool:
    """Connect to the cluster at RAY_ADDRESS (then check its nodes), or start a local Ray with at least
    `local_cpus` CPUs. Returns True when this call started Ray (the caller then shuts it down), False when
    Ray was running already. ClusterError when a node cannot run `stages.<stage>` or see a `shared` folder."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(num_cpus=max(os.cpu_count() or 1, local_cpus), log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": local_setup_hook()})
        return True
    connect(address, stage)
    try:
        check_nodes(stage, shared)
    except BaseException:
        ray.shutdown()
        raise
    return True


def connect(address: str, stage: str, attempts: int = 3) -> None:
    """ray.init at the cluster's address; ClusterError (one line) when it fails `attempts` times. Ray's client
    server on the head sometimes exits as it starts ("Starting Ray client server failed"): a new connection
    gets a new one."""
    import ray

    check_reachable(address)
    for name in ("ray.client_builder", "ray._private.runtime_env.packaging"):  # what it packs and passes
        logging.getLogger(name).setLevel(logging.WARNING)
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, log_to_driver=True, runtime_env=cluster_runtime_env(stage))
            return
        except (ConnectionError, TimeoutError, RuntimeError) as e:
            text = " ".join(str(e).split())
            if attempt == attempts or "Starting Ray client server failed" not in text:
                raise ClusterError(f"RAY_ADDRESS={address}: cannot connect to a Ray cluster there: "
                                   f"{text[-300:]}") from None
            ray.shutdown()
            time.sleep(2.0 * attempt)


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """ClusterError when nothing accepts a connection at RAY_ADDRESS's host and port: Ray itself would try a
    GCS address for minutes. An address without a port ("auto") is left to Ray."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"RAY_ADDRESS={address}: nothing answers there ({e.strerror or e}); is the head "
                           f"running, and its port reachable from here?") from None


def cluster_runtime_env(stage: str) -> dict:
    """The job's runtime environment on a cluster: the top-level packages `stages.<stage>` imports, from this
    working tree, first on every worker's path; and the hook that pins RAY_ADDRESS (named by import path: it
    runs from that code). Packages, not the whole tree as `working_dir`: Ray's client server starts in a fresh
    working_dir that is then deleted under it, and torch's MKL cannot load from a deleted folder ("Intel
    oneMKL FATAL ERROR: Cannot load libtorch_cpu.so", Ray 2.60)."""
    from cgspn.pipeline.code_closure import REPO_ROOT, module_closure

    packages = sorted({path.split("/")[0] for path in module_closure(f"stages.{stage}")})
    return {"py_modules": [str(REPO_ROOT / name) for name in packages], "excludes": ["__pycache__", "*.pyc"],
            "worker_process_setup_hook": "cgspn.pipeline.cluster.pin_ray_address"}


def pin_ray_address() -> None:
    """Run in every worker of the job: RAY_ADDRESS = this cluster. Ray Train's helpers (its placement-group
    cleaner) look the cluster up by address; without one they search the machine and fail with "Found
    multiple active Ray instances" whenever another Ray runs there (a traceback in every stage's log).
    Self-contained (its own imports), so that local_setup_hook can ship it by value."""
    import os

    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def local_setup_hook():
    """pin_ray_address by value, for a local Ray: a hook named by import path would be imported in the worker
    before the driver's sys.path is in place (`cgspn` would then resolve to the installed copy instead of the
    code the stage runs). Ray's client cannot ship a function by value, hence the named hook on a cluster,
    where py_modules put the code first."""
    return by_value(pin_ray_address)


def code_files(stage: str) -> dict[str, str]:
    """{module: sha256 of its file} for every module of `stages.<stage>`'s import closure, from this tree."""
    import hashlib

    from cgspn.pipeline.code_closure import REPO_ROOT, module_closure

    return {path[:-3].replace("/", ".").removesuffix(".__init__"): hashlib.sha256((REPO_ROOT / path).read_bytes()).hexdigest()
            for path in sorted(module_closure(f"stages.{stage}"))}


def node_check(modules: dict[str, str], markers: list[str]) -> dict:
    """On one node: import every module of `modules` ({name: sha256 of the driver's file}); which of them
    are other code than the driver's; which `markers` (files the driver wrote) this node does not see.
    Shipped by value (by_value), so that a node without the code can still run it and say so."""
    import hashlib
    import importlib
    import os
    import platform

    result = {"host": platform.node(), "error": None, "differ": [],
              "unseen": [m for m in markers if not os.path.exists(m)]}
    for name, digest in modules.items():
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported, with the node's name, by the driver
            result["error"] = f"{type(e).__name__}: {e}"
            break
        with open(module.__file__, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                result["differ"].append(name)
    return result


@contextmanager
def markers_in(folders: list[Path]):
    """A uniquely named empty file in each folder (created where missing) for the duration of the block."""
    token = f".cgspn-node-check-{uuid.uuid4().hex}"
    files = []
    try:
        for folder in folders:
            folder = Path(folder).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            (folder / token).touch()
            files.append(folder / token)
        yield [str(f) for f in files]
    finally:
        for f in files:
            f.unlink(missing_ok=True)


def tracking_folder() -> Path | None:
    """The folder of MLflow's tracking store when it is local (sqlite:///<file> or a path), else None. The
    training workers log their metrics there, so on a cluster every node must see it (or it is a server)."""
    from cgspn.pipeline.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent
    if uri.startswith("file:") or "://" not in uri:
        return Path(uri.removeprefix("file://").removeprefix("file:")).resolve()
    return None


def check_nodes(stage: str, shared: list[Path]) -> None:
    """Run node_check on every alive node of the cluster; one ClusterError naming each node that fails. The
    folders checked: `shared` and that of a local MLflow tracking store."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    modules = code_files(stage)
    tracking = tracking_folder()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    check = ray.remote(num_cpus=0, max_retries=0)(by_value(node_check))
    with markers_in([*shared, *filter(None, [tracking])]) as markers:
        refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            modules, markers) for n in nodes]
        deadline, results = time.monotonic() + CHECK_TIMEOUT_S, []
        for node, ref in zip(nodes, refs):
            try:
                results.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
            except ray.exceptions.GetTimeoutError:
                raise ClusterError(f"Ray node {node['NodeManagerAddress']} (id {node['NodeID'][:8]}) did not run the "
                                   f"code check within {CHECK_TIMEOUT_S} s (no free memory there, or it hangs)") from None
            except ray.exceptions.RayError:  # the node left the cluster meanwhile: nothing will run there
                results.append(None)
    problems = []
    for node, r in zip(nodes, results):
        if r is None:
            continue
        name = f"Ray node {node['NodeManagerAddress']} ({r['host']}, id {node['NodeID'][:8]})"
        if r["error"]:
            problems.append(f"{name} cannot import the code of stage {stage}: {r['error']} (install the "
                            "project's dependencies on every node: README, At scale)")
        elif r["differ"]:
            problems.append(f"{name} runs other code for stage {stage} than this driver's working tree "
                            f"({', '.join(r['differ'][:3])}: an installed copy of the project comes first there)")
        unseen = {Path(m).parent for m in r["unseen"]}
        if tracking in unseen:
            unseen.discard(tracking)
            problems.append(f"{name} does not see {tracking}, where MLflow's tracking database is "
                            "(MLFLOW_TRACKING_URI): its workers would log to a database of their own; give "
                            "MLFLOW_TRACKING_URI=http://<host>:5000, a tracking server every node reaches "
                            "(docs/team.md)")
        if unseen:
            folders = ", ".join(sorted(map(str, unseen)))
            problems.append(f"{name} does not see {folders}: local paths on a cluster need a file system every "
                            "node shares; give s3://... URIs (shard.path, cache_teacher.store, storage_path) "
                            "or run from a shared folder")
    if problems:
        raise ClusterError("; ".join(problems))


def check_resources(per_worker: dict[str, float], workers: int, what: str) -> None:
    """Whether Ray has `workers` x `per_worker` ({"CPU": 1, "GPU": 0.5}) in total. A local Ray that lacks
    them is a ClusterError (Ray would wait for them for ever); a cluster may yet grow (an autoscaler), so
    there it is a line that says what the run waits for."""
    import ray

    total = ray.cluster_resources()
    for kind, each in per_worker.items():
        need, have = each * workers, total.get(kind, 0)
        if need <= have:
            continue
        text = f"{what} need {need:g} {kind} ({each:g} per worker); Ray has {have:g}"
        if not os.environ.get("RAY_ADDRESS"):
            raise ClusterError(f"{text} on this machine (set gpus_per_worker: 0 to run on CPUs)")
        print(f"{text} now: waiting for the cluster to add them", flush=True)


def by_value(fn):
    """A copy of module-level `fn` that Ray (cloudpickle) ships by value, not as an import of its module."""
    import types

    return types.FunctionType(fn.__code__, {"__builtins__": __builtins__}, fn.__name__, fn.__defaults__)
