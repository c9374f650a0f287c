"""A real multi-node Ray cluster on one machine, for tests: every node is its own `ray start --block`.

Each node runs in a session of its own (start_new_session), so its processes are known by id: the session's
members plus every descendant of its `ray start` process, recorded whenever the test looks (`track`). The
nodes are stopped by those ids (SIGTERM to `ray start`, which stops its node; SIGKILL for whatever is left),
never with `ray stop`, which would stop every Ray on the machine, other tests' included.

Two raylets on one host must not compete for a port: every port that has a fixed default is given one that
was free a moment ago (the head's GCS, dashboard and Ray client server) or 0, which makes the component bind
a free port itself and report it through the session folder (the dashboard agent's HTTP port, whose default
52365 is what a plain `ray.init()` elsewhere on the machine takes; its gRPC port; the runtime env agent; the
metrics export; node and object managers; worker ports 0..0 = any free port, not the shared 10002-19999).
The dashboard is on (bound to 127.0.0.1) unless a test turns it off: Ray Train V2 and the state API use it. The nodes' environment
differs from the tests' in three variables (see RayCluster): RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (else a
second node refuses to join), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 (stop without a 30 s drain) and
RAY_ADDRESS = the head's address, fixed before it starts (so that Ray's own processes on the nodes find their
cluster when another Ray runs on the machine); with the dashboard off, a fourth, RAY_API_SERVER_ADDRESS, names a
port nothing listens on.

The nodes' temp dir (sessions, logs, sockets, the `ray_current_cluster` address file) lies under the test's
own folder, reached through a short symlink in /tmp: a Unix socket path may not exceed 107 bytes, and a
pytest folder plus Ray's session and socket names does. So /tmp/ray never changes: a `ray.init()` without an
address elsewhere on the machine reads /tmp/ray/ray_current_cluster to find a cluster to join, and never
finds this one; and the sessions go away with the test's temp folder (this project keeps only failed tests' ones).
"""
from __future__ import annotations

import os
import random
import signal
import socket
import string
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

RAY = Path(sys.executable).with_name("ray")
LINK_PREFIX = "raynodes-"  # /tmp/raynodes-XXXXXX -> <test folder>/ray


def free_port() -> int:
    """A TCP port that nothing listens on right now (Ray binds it a few seconds later)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def running(p: psutil.Process) -> bool:
    """Still a live process (the same one: psutil compares the start time, so a reused pid is not it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:160] or p.name()}"
    except psutil.Error:
        return str(p.pid)


def title(p: psutil.Process) -> str:
    """A Ray worker's title (`ray::<actor or task>`, set in its command line), else the program's name."""
    args = p.cmdline()
    return args[0].strip() if args and args[0].startswith("ray::") else p.name()


NOISE = ("[state-dump]", "Execution time:", "Queueing time:", "Global stats:", "Event stats:")  # periodic dumps


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log, without the raylet's and GCS's periodic statistics."""
    try:
        text = path.read_text(errors="replace").splitlines()
        return "\n".join([line for line in text if line.strip() and not any(n in line for n in NOISE)][-lines:])
    except OSError as e:
        return f"({e})"


class RayNode:
    """One `ray start --block ...` in a session of its own; knows every process of the node."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict, prefix: tuple[str, ...] = ()):
        """`prefix`: a command that runs the node's `ray start` as its last argument (a shell that ends in
        `exec "$@"`, say), to start the node in other circumstances (a mount namespace)."""
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([*prefix, str(RAY), "start", "--block", *args], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.sid = self.proc.pid  # session leader: the session's id is its pid
        self.seen: dict[tuple[int, float], psutil.Process] = {}  # (pid, start time) -> process
        self.titles: dict[tuple[int, float], set[str]] = {}
        self.killed: list[str] = []
        self.stop_seconds: float | None = None
        self.killed_by_test = False  # kill(): the test took the node down, as when its machine dies
        self.track()

    def current(self) -> list[psutil.Process]:
        """The node's processes now: its session's members and the descendants of its `ray start`."""
        found = {}
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.sid:
                    found[p.pid] = p
            except (OSError, psutil.Error):
                pass
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                found.setdefault(p.pid, p)
        except psutil.Error:
            pass
        return [p for p in found.values() if running(p)]

    def track(self) -> list[psutil.Process]:
        """Record the node's processes and their titles (workers come and go, and a Ray worker's title
        says what it runs: call it while the node works, too)."""
        now = self.current()
        for p in now:
            try:
                key = (p.pid, p.create_time())
                self.seen.setdefault(key, p)
                self.titles.setdefault(key, set()).add(title(p))
            except psutil.Error:
                pass
        return now

    def pids(self) -> set[int]:
        return {pid for pid, _ in self.seen}

    def seen_titles(self) -> set[str]:
        """Every title a recorded process had (e.g. raylet, ray::IDLE, ray::RayTrainWorker.train_fn)."""
        return set().union(*self.titles.values())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def left(self) -> list[psutil.Process]:
        """Every process of the node ever recorded, or in its session now, that still runs."""
        self.track()
        return [p for p in self.seen.values() if running(p)]

    def kill(self) -> list[str]:
        """SIGKILL to every process of the node at once, as when its machine dies; returns their titles."""
        self.killed_by_test = True
        victims, titles = self.track(), set()
        for p in victims:
            try:
                titles.add(title(p))
                p.kill()
            except psutil.Error:
                pass
        return sorted(titles)

    def stop(self, grace: float = 20.0) -> list[str]:
        """SIGTERM to `ray start` (it stops its node), SIGKILL to whatever is left after `grace` seconds.
        Returns the processes that still run after that (none, normally)."""
        start = time.monotonic()
        self.track()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        for wait, kill in ((grace, True), (10.0, False)):
            deadline = time.monotonic() + wait
            while self.left() and time.monotonic() < deadline:
                time.sleep(0.2)
            if kill:
                self.killed = [describe(p) for p in self.left()]  # still there after the grace period
                for p in self.left():
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.stop_seconds = round(time.monotonic() - start, 1)
        return [f"{self.name}: {describe(p)}" for p in self.left()]


class RayCluster:
    """A head and `len(cpus) - 1` worker nodes on this machine (see the module's doc)."""

    def __init__(self, folder: Path, env: dict | None = None, dashboard: bool = True):
        self.folder, self.dashboard = folder, dashboard
        self.folder.mkdir(parents=True, exist_ok=True)
        self.real_temp = folder / "ray"
        self.real_temp.mkdir(exist_ok=True)
        self.temp_dir = short_link(self.real_temp)
        self.env = {**(env if env is not None else os.environ)}
        # The project's quiet setting RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a local Ray on 127.0.0.1, and
        # also makes `ray start --address` refuse to join ("Multi-node Ray clusters are not supported"). The
        # nodes then listen on the host's address; the drivers may keep 0 (a driver joining a cluster finds
        # its node by the raylets running on this machine, not by IP).
        self.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        # On SIGTERM a node first drains for up to 30 s, until its worker leases are returned; after a Ray
        # Train run the head waited out the whole 30 s (some of Train's actors keep theirs). Stop at once.
        self.env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        # The address is fixed before the head starts (the host's IP, as `ray start` picks it, and a free port)
        # so that the nodes' own processes get it as RAY_ADDRESS: Ray Train V2's PlacementGroupCleaner queries
        # the state API with no address, which otherwise looks for gcs_server processes on the machine and
        # fails ("Found multiple active Ray instances") whenever another Ray runs here.
        from ray._common.network_utils import build_address, node_ip_address_from_perspective

        self.ip = node_ip_address_from_perspective(None)
        self.port = free_port()
        self.address = build_address(self.ip, self.port)
        self.env["RAY_ADDRESS"] = self.address
        if not dashboard:
            # Without a dashboard the state API has no server, and Train's PlacementGroupCleaner (whose stop is
            # given 12 s) must find that out at once, as on a machine where nothing holds the dashboard's
            # default port 8265. Here other tests' local Ray holds it: the head's minimal dashboard then writes
            # no address, and each state query retries for some 40 s (internal_kv_get_with_retry), so the
            # stop timed out and printed a traceback. A port nothing listens on answers at once.
            self.env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{free_port()}"
        self.nodes: list[RayNode] = []

    def common_args(self, cpus: int, gpus: int = 0) -> list[str]:
        """`gpus`: logical GPUs (a CPU machine's node can offer them; Ray schedules by the count alone)."""
        return ["--node-ip-address", self.ip, "--num-cpus", str(cpus), "--num-gpus", str(gpus),
                "--object-store-memory", str(256 * 2**20), "--temp-dir", str(self.temp_dir), "--disable-usage-stats",
                "--node-manager-port", "0", "--object-manager-port", "0", "--metrics-export-port", "0",
                "--dashboard-agent-listen-port", "0", "--dashboard-agent-grpc-port", "0",
                "--runtime-env-agent-port", "0", "--min-worker-port", "0", "--max-worker-port", "0"]

    def start_head(self, cpus: int, timeout: float, gpus: int = 0) -> str:
        dashboard = (["--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port())] if self.dashboard
                     else ["--include-dashboard", "false"])
        head = RayNode("head", ["--head", "--port", str(self.port), *dashboard,
                                "--ray-client-server-port", str(free_port()), *self.common_args(cpus, gpus)],
                       self.folder / "head.log", self.env)
        self.nodes.append(head)
        address_file = self.temp_dir / "ray_current_cluster"  # written once the head is up
        deadline = time.monotonic() + timeout
        while not address_file.exists():
            if not head.alive():
                raise AssertionError(f"the Ray head exited ({head.proc.returncode})\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the Ray head did not start in {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.2)
        head.track()
        written = address_file.read_text().strip()
        assert written == self.address, f"the head says its address is {written}, not {self.address}"
        return self.address

    @property
    def client_address(self) -> str:
        """The head's Ray client server: ray://<ip>:<port>."""
        args = self.nodes[0].proc.args
        return f"ray://{self.ip}:{args[args.index('--ray-client-server-port') + 1]}"

    def add_worker(self, cpus: int, env: dict | None = None, prefix: tuple[str, ...] = ()) -> RayNode:
        """A worker node of `cpus` CPUs joining the head (`env`: variables of its own, over the cluster's)."""
        # One log monitor per host (the head's): the nodes share the session's log folder, and a second
        # monitor sends every worker's output to the drivers twice.
        node = RayNode(f"worker{len(self.nodes)}", ["--address", self.address, "--include-log-monitor", "false",
                                                    *self.common_args(cpus)],
                       self.folder / f"worker{len(self.nodes)}.log", {**self.env, **(env or {})}, prefix)
        self.nodes.append(node)
        return node

    def alive_nodes(self) -> list[dict]:
        """The nodes the GCS knows as alive (a gRPC query; this process does not become a Ray driver)."""
        from ray._raylet import GcsClient
        from ray.core.generated import gcs_pb2

        infos = GcsClient(address=self.address).get_all_node_info(timeout=5)
        return [{"id": i.node_id.hex(), "address": f"{i.node_manager_address}:{i.node_manager_port}"}
                for i in infos.values() if i.state == gcs_pb2.GcsNodeInfo.ALIVE]

    def wait_for_nodes(self, count: int, timeout: float) -> list[dict]:
        deadline, alive, error = time.monotonic() + timeout, [], None
        while time.monotonic() < deadline:
            dead = [n.name for n in self.nodes if not n.alive() and not n.killed_by_test]
            if dead:
                raise AssertionError(f"Ray node(s) {dead} exited while the cluster started\n{self.logs()}")
            try:
                alive, error = self.alive_nodes(), None
            except Exception as e:  # noqa: BLE001 - the GCS may not answer yet
                error = e
            if len(alive) >= count:
                for n in self.nodes:
                    n.track()
                return alive
            time.sleep(0.5)
        raise AssertionError(f"{len(alive)} of {count} Ray nodes registered with the head at {self.address} "
                             f"within {timeout:.0f} s (last GCS error: {error!r})\n{self.logs()}")

    def track(self) -> None:
        for n in self.nodes:
            n.track()

    def pids(self) -> dict[str, set[int]]:
        return {n.name: n.pids() for n in self.nodes}

    def logs(self) -> str:
        """The tails of each node's `ray start` output and of the session's raylet/GCS logs."""
        parts = [f"--- {n.name} (ray start, pid {n.proc.pid}): {n.log}\n{tail(n.log)}" for n in self.nodes]
        for logs in sorted(self.real_temp.glob("session_2*/logs")):  # not session_latest: it links via /tmp
            for f in sorted(logs.iterdir()):
                if f.is_file() and f.name.startswith(("raylet", "gcs_server", "ray_process_exit")):
                    parts.append(f"--- {f}\n{tail(f, 15)}")
        return "\n".join(parts)

    def stop(self) -> list[str]:
        """Stop every node (workers first) by its process ids; returns what still runs (nothing, normally)."""
        left = []
        for n in reversed(self.nodes):
            left += n.stop()
        try:
            self.temp_dir.unlink()
        except OSError:
            pass
        return left


def short_link(target: Path) -> Path:
    """/tmp/raynodes-XXXXXX -> target. Links whose target is gone (a killed run's, since removed by pytest's
    temp-folder retention) are removed first; a link to an existing folder is never touched."""
    for old in Path("/tmp").glob(f"{LINK_PREFIX}*"):
        try:
            if old.is_symlink() and not old.exists():
                old.unlink()
        except OSError:
            pass
    while True:
        link = Path("/tmp") / (LINK_PREFIX + "".join(random.choices(string.ascii_lowercase + string.digits, k=8)))
        try:
            link.symlink_to(target.resolve(), target_is_directory=True)
            return link
        except FileExistsError:
            continue


@contextmanager
def ray_cluster(folder: Path, cpus: tuple[int, ...] = (1, 1), env: dict | None = None, timeout: float = 90.0,
                dashboard: bool = True, head_gpus: int = 0):
    """A started cluster of len(cpus) nodes (cpus[0] on the head, with `head_gpus` logical GPUs), every node
    registered; stopped on exit. After the block, `cluster.leftovers` lists the nodes' processes that survived
    the stop (should be [])."""
    cluster = RayCluster(folder, env, dashboard)
    cluster.leftovers = None
    try:
        cluster.start_head(cpus[0], timeout, head_gpus)
        for c in cpus[1:]:
            cluster.add_worker(c)
        cluster.wait_for_nodes(len(cpus), timeout)
        yield cluster
    finally:
        cluster.leftovers = cluster.stop()
