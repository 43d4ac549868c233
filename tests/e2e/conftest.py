"""End-to-end fixtures: one Ray cluster for this folder's tests and one quickstart run on it.

Every test here drives the real CLI (`python -m app ...` in a subprocess) the way a user does,
from a scratch folder that holds a copy of `configs/` (a user's checkout): the shipped configs'
relative `temper_runs/...` storage and registry paths then point into that folder, so the
README's commands run verbatim against what the quickstart made there.

The cluster is a `ray start --head --block` process rather than an embedded Ray per command:
the commands then share one registry actor and one Serve instance, `serve status` / `shutdown`
have a cluster to talk to, `run --keep-serving` returns (the app stays up on the cluster), and
each command connects in a second or two instead of starting Ray (~10 s each on 2 cores). Its
private temp folder keeps it apart from tests/ray's embedded cluster, which `make test` runs at the
same time in another pytest process (`tests/parallel_suites.py`). It is stopped, by its process
group, when the last test of this folder has run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.runtime import direct_ingress_env
from conftest import free_port

from .ray_nodes import RayNode, write_token

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 900
TOKEN_FILE = "auth_token"  # in the head's temp folder


@dataclass
class RayHead:
    """A local cluster started with `ray start --head --block` in a private temp folder."""

    proc: subprocess.Popen
    temp_dir: Path
    address: str
    dashboard_url: str

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses that should use this cluster.

        The head runs with Ray's token authentication on, with a token file of its own
        (`RAY_AUTH_TOKEN_PATH`); a client must ask for token mode to send it. The private temp
        folder keeps this cluster out of Ray's default current-cluster file, so `address="auto"` in
        other processes on the machine does not find it; RAY_ADDRESS points our own commands at it.
        """
        env = dict(os.environ)
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path),
                   RAY_DASHBOARD_ADDRESS=self.dashboard_url, RAY_DEDUP_LOGS="0", OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")
        return env

    @property
    def token_path(self) -> Path:
        return self.temp_dir / TOKEN_FILE

    def stop(self) -> None:
        """Stop the head's processes (`ray start`, its daemons and their workers), then remove its temp folder."""
        if self.proc.poll() is None:
            RayNode(self.proc, self.temp_dir / "head.log").stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(num_cpus: int = 4) -> RayHead:
    # Ray's unix socket paths live under the temp folder and must stay short (107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="te2e-", dir="/tmp"))
    gcs_port, dash_port = free_port(), free_port()
    log = open(temp_dir / "head.log", "wb")
    # Ray 2.60's `ray start --head` turns token authentication on only when a token exists: by
    # default ~/.ray/auth_token, which a fresh machine lacks (clients asking for token mode then
    # fail). This cluster's own token file makes it the same on every machine and leaves
    # ~/.ray alone.
    token = temp_dir / TOKEN_FILE
    write_token(token)
    # Started as `serve.direct_ingress` asks a cluster to be started (Ray Serve's throughput-
    # optimized mode): every command here then serves through Serve's proxy in that mode, and
    # test_cli_verbs also through the ingress replica's own port. tests/ray covers the default mode.
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0", RAY_AUTH_TOKEN_PATH=str(token), **direct_ingress_env())
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
         f"--port={gcs_port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True,
    )
    head = RayHead(proc, temp_dir, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}")
    deadline = time.monotonic() + 180
    while b"Ray runtime started" not in (temp_dir / "head.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            text = (temp_dir / "head.log").read_text(errors="replace")[-3000:]
            head.stop()
            pytest.fail(f"`ray start --head` did not come up (exit {proc.returncode}): {text}")
        time.sleep(0.5)
    return head


@dataclass
class Workspace:
    """A scratch folder with a copy of `configs/` (every `port: 8000` replaced by a free port),
    where CLI commands run against one cluster."""

    path: Path
    head: RayHead
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
        """`python -m app ARGS...` in this folder; fails the test (with the output's tail) on a non-zero exit when `check`."""
        return self.shell([sys.executable, "-m", "app", *args], timeout=timeout, check=check)

    def shell(self, cmd: list[str] | str, timeout: float = CLI_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
        """A command (a list, or a string for `bash -c`) in this folder, on this cluster."""
        if isinstance(cmd, str):
            cmd = ["bash", "-c", cmd]
        # `python` in a README command is this interpreter
        env = self.head.env
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        proc = subprocess.run(cmd, cwd=self.path, env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
        return proc


def make_workspace(path: Path, head: RayHead, port: int) -> Workspace:
    shutil.copytree(ROOT / "configs", path / "configs")
    for config in (path / "configs").rglob("*.yaml"):
        config.write_text(re.sub(r"(?m)^(\s*port:\s*)8000\b", rf"\g<1>{port}", config.read_text()))
    return Workspace(path, head, port)


@dataclass
class QuickstartRun:
    """`python -m app run configs/quickstart.yaml --keep-serving --json` (shortened) in a workspace."""

    ws: Workspace
    proc: subprocess.CompletedProcess
    summary: dict = field(default_factory=dict)
    model: str = "quickstart-digits"
    # 100 steps at lr 0.004 reach ~0.9 validation accuracy on digits: enough to tell right from wrong answers
    overrides: tuple[str, ...] = ("train.steps=100", "train.eval_every=50", "train.checkpoint_every=100",
                                  "train.lr=0.004", "compress.latency_iters=10")


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    """The run's JSON summary: the last stdout line that is a JSON object with `versions`."""
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{") and '"versions"' in ln][-1]
    return json.loads(line)


def run_quickstart(ws: Workspace, *extra: str) -> QuickstartRun:
    run = QuickstartRun(ws, None)  # type: ignore[arg-type]
    run.proc = ws.cli("run", "configs/quickstart.yaml", *run.overrides, *extra, "--keep-serving", "--json")
    run.summary = summary_of(run.proc)
    return run


@pytest.fixture(scope="package")
def ray_head():
    head = start_ray_head()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="package")
def workspace(ray_head, tmp_path_factory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("user"), ray_head, free_port())


@pytest.fixture(scope="package")
def quickstart(workspace) -> QuickstartRun:
    """One quickstart run per session, left serving on the package's cluster."""
    return run_quickstart(workspace)


def last_json(stdout: str):
    """The JSON document at the end of a command's stdout (after any progress lines); a
    top-level document starts at the beginning of a line."""
    starts = [0] + [i + 1 for i, ch in enumerate(stdout) if ch == "\n"]
    for start in reversed(starts):
        if stdout[start:start + 1] in ("{", "["):
            try:
                return json.loads(stdout[start:])
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON at the end of the output: {stdout[-2000:]}")


def served_digits_accuracy(base_url: str, model: str, record: dict) -> tuple[float, set[int]]:
    """Accuracy of a served digits model over its whole held-out split (the `data` section of the
    version's own config decides the split), sent 32 images per request through the Python
    client; also the versions that answered."""
    from types import SimpleNamespace

    import numpy as np

    from app.data import DigitsData
    from serve.client import TemperClient

    data = DigitsData(SimpleNamespace(**record["config"]["data"]))
    predicted, versions = [], set()
    with TemperClient(base_url, timeout=30.0) as client:
        for start in range(0, len(data.y_val), 32):
            res = client.predict(model, data.x_val[start:start + 32].tolist(), top_k=1)
            predicted += res.labels
            versions.add(res.version)
    assert len(predicted) == len(data.y_val) >= 100
    return float(np.mean(np.array(predicted) == data.y_val)), versions
