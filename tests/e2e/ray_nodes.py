"""Ray nodes started as an operator starts them: `ray start --head` and `ray start --address` as
separate processes on this machine, each its own process group, with Ray's token authentication on.

The head is started without `RAY_AUTH_MODE`: Ray 2.60's `ray start --head` turns token
authentication on by itself when a token exists. The token is a file of this cluster's own
(`RAY_AUTH_TOKEN_PATH`), so ~/.ray/auth_token, which other clusters on the machine use, is neither
read nor written. A worker node and every client (`ray job submit`, `ray list`) must ask for token
mode (`RAY_AUTH_MODE=token`) to send the token.

Stopping kills each node's process group by its id (never `ray stop`, which stops every Ray on the
machine, the test session's own cluster included).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.runtime import light_node_env
from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# Ray puts unix sockets under the temp folder (`<temp>/session_<date>_<pid>/sockets/plasma_store`,
# ~65 bytes below it); a socket path longer than 107 bytes cannot be bound.
MAX_TEMP_DIR_LEN = 40

STOP_GRACE_S = 3.0
"""How long a stopped node's processes get after SIGTERM before SIGKILL. The cluster is thrown away,
so nothing needs a clean exit: a raylet given SIGTERM drains for ~30 s before it exits."""


@dataclass
class RayNode:
    """One `ray start --block` process; the node's daemons and workers share its process group."""

    proc: subprocess.Popen
    log: Path

    def pids(self) -> list[int]:
        """Ids of the node's processes: the `ray start` process, its process group (GCS, raylet,
        agents) and every descendant (the raylet starts each worker in a process group of its own)."""
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,pgid="], capture_output=True, text=True, check=True).stdout
        rows = [tuple(map(int, line.split())) for line in out.splitlines()]
        found = {pid for pid, _, pgid in rows if pgid == self.proc.pid} | {self.proc.pid}
        while True:
            more = {pid for pid, ppid, _ in rows if ppid in found} - found
            if not more:
                return sorted(found)
            found |= more

    def kill(self) -> list[int]:
        """SIGKILL every process of the node at once (a machine lost), by id; returns the ids."""
        pids = self.pids()
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        self.proc.wait()
        return pids

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        stop_nodes([self], grace_s)


def stop_nodes(nodes: list[RayNode], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process of the nodes at once, SIGKILL those left after `grace_s`."""
    pids = [pid for node in nodes for pid in node.pids()]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(map(_running, pids)):
        for node in nodes:
            node.proc.poll()  # reaps `ray start` once it exits
        time.sleep(0.25)
    for pid in pids:
        if _running(pid):
            _signal(pid, signal.SIGKILL)
    for node in nodes:
        node.proc.wait()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _running(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@dataclass
class LocalCluster:
    """A head (and worker nodes) on 127.0.0.1 with its own ports, temp folder and token."""

    root: Path
    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    head: RayNode | None = None
    workers: list[RayNode] = field(default_factory=list)
    worker_temp_dirs: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    def node_env(self) -> dict[str, str]:
        """Environment of `ray start`: what a node's workers and a job's driver inherit.

        PATH starts with this interpreter's folder, as in a shell with the virtualenv activated:
        a job's `python ...` entrypoint is then the Python that has Temper's dependencies.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_TOKEN_PATH=str(self.token_path),
            OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
            # Ray Train's controller polls its workers every 2 s by default; a failed worker is seen sooner
            RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25", **light_node_env(),
        )
        return env

    def client_env(self) -> dict[str, str]:
        """Environment of a client command (`ray job submit`, `ray list`) that talks to this cluster."""
        return {**self.node_env(), "RAY_AUTH_MODE": "token"}

    def _start(self, args: list[str], env: dict[str, str], name: str, ready: str) -> RayNode:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=self.root, env=env, start_new_session=True)
        node = RayNode(proc, log)
        deadline = time.monotonic() + 180
        while ready.encode() not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                node.stop(grace_s=5)
                pytest.fail(f"`ray start` ({name}) did not come up (exit {proc.returncode}): "
                            f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        return node

    def start_head(self, num_cpus: int) -> None:
        env = self.node_env()
        # The GCS declares a node dead after `failure_threshold` missed health checks, 3 s apart by
        # default (15 s); a lost worker node is noticed in ~3 s here.
        env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
        self.head = self._start(
            ["--head", f"--num-cpus={num_cpus}", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
             "--ray-client-server-port", str(free_port()), f"--dashboard-agent-listen-port={free_port()}"],
            env, "head", "Ray runtime started")

    def add_worker(self, num_cpus: int, resources: dict[str, float]) -> RayNode:
        """`ray start --address` of a second node on this machine, with a custom resource that names it.

        The node gets a temp folder of its own, as a node on another machine has its own disk. A
        node started without one takes the head's, and then both nodes' runtime-env agents unpack
        a job's working directory into the same folder: Ray's working_dir plugin deletes the
        folder and unpacks it again when its node first needs it, so the second node to need it
        pulls the files from under the processes of the first (a job's driver failed with
        `No module named 'app.auth.tokens'`, a module it imports only when the registry starts)."""
        temp_dir = Path(tempfile.mkdtemp(prefix="tjw-", dir="/tmp"))  # short: Ray binds sockets below it
        self.worker_temp_dirs.append(temp_dir)
        node = self._start(
            [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
             "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}"],
            {**self.node_env(), "RAY_AUTH_MODE": "token"}, f"worker{len(self.workers)}", "Ray runtime started")
        self.workers.append(node)
        return node

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this cluster (fails the test on a non-zero exit)."""
        proc = subprocess.run([str(VENV_BIN / "ray"), *args], cwd=ROOT, env=self.client_env(),
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"ray {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def state(self, kind: str, *filters: str) -> list[dict]:
        """Ray's state API (`ray list nodes|actors ...`), dead entries included."""
        args = ["list", kind, f"--address={self.address}", "--format=json", "--detail", "--limit=1000"]
        for f in filters:
            args += ["--filter", f]
        return json.loads(self.ray(*args).stdout)

    def job_info(self, job_id: str) -> dict:
        """The Jobs REST API's record of a job (status, entrypoint, ...), asked with the token."""
        import httpx

        res = httpx.get(f"{self.dashboard_url}/api/jobs/{job_id}", timeout=30,
                        headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"})
        res.raise_for_status()
        return res.json()

    def stop(self) -> None:
        stop_nodes([node for node in [*self.workers, self.head] if node is not None])
        for folder in [self.temp_dir, *self.worker_temp_dirs]:
            shutil.rmtree(folder, ignore_errors=True)


def local_cluster(tmp_path: Path) -> LocalCluster:
    """A cluster description with free ports, a private token and a short temp folder (not started)."""
    short = tmp_path / "ray"
    if len(str(short)) > MAX_TEMP_DIR_LEN:
        short = Path(tempfile.mkdtemp(prefix="tjs-", dir="/tmp"))
    short.mkdir(exist_ok=True)
    cluster = LocalCluster(tmp_path, short, free_port(), free_port())
    write_token(cluster.token_path)
    return cluster


def write_token(path: Path) -> None:
    """A cluster's own Ray auth token (RAY_AUTH_TOKEN_PATH), readable by this user only."""
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)

