"""Shared fixtures. One local Ray cluster per test session (tests/ray, tests/e2e); unit tests
never start Ray."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time

import pytest

from app.runtime import light_node_env

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here: its usage ping would stall MLflow calls
# Every cluster the tests start is on this machine, which nothing preempts: without Ray Train's
# preemption watcher (one more actor process per fit) a tiny fit starts ~3 s sooner on 2 cores.
# Ray Train reads it from the driver's environment; the e2e clusters' processes inherit it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Every Ray node the tests start (the embedded cluster below, the e2e `ray start` nodes) runs its
# log monitor and Serve controller as `python -m app` would: light on a machine where hundreds of
# workers come and go (app/runtime.py says why; ~190 CPU-s of a 44-minute suite went to log
# monitors without it, ~140 to Serve controllers).
os.environ.update(light_node_env())


def free_port() -> int:
    """A free TCP port on 127.0.0.1, below the kernel's ephemeral range (32768+ here).

    A port from bind(0) is an ephemeral one: Ray's own outgoing connections draw from the same
    range and can take it before Serve binds it ("Failed to bind to address" seen in CI).
    """
    low = 20000
    try:
        low_ephemeral = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low_ephemeral = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, max(low + 1000, low_ephemeral))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port found below the ephemeral range")


def wait_for(condition, what, deadline_s: float = 60.0, poke=None, interval_s: float = 0.25):
    """Poll `condition` until it returns something truthy (fail after `deadline_s`); `poke` runs
    between polls. A poll that errs (connection reset, a body that is not JSON) counts as "not
    yet"; the last such error is reported if the deadline passes. `what` may be a callable."""
    import httpx

    deadline, last_error = time.monotonic() + deadline_s, None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (httpx.HTTPError, ValueError, KeyError) as err:
            value, last_error = None, err
        if value:
            return value
        if poke is not None:
            try:
                poke()
            except httpx.HTTPError as err:
                last_error = err
        time.sleep(interval_s)
    what = what() if callable(what) else what
    pytest.fail(f"timed out waiting for {what}" + (f" (last error: {last_error!r})" if last_error else ""))


@contextlib.contextmanager
def running_two_at_a_time(tasks: dict):
    """Start every task (a key -> zero-argument callable) in the background, two at a time, and
    yield `result(key)`, which waits for that task. For Ray Train fits: one is mostly start-up
    and teardown, leaving a core idle a third of the time, so pairs (2 workers each on the
    4 logical CPUs) finish sooner than the same fits in a row. Leaving the block waits for
    running tasks and drops those not started."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bg")
    futures = {key: pool.submit(task) for key, task in tasks.items()}
    try:
        yield lambda key: futures[key].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def readme_permissions() -> dict[str, dict[str, bool]]:
    """The README's role x operation table as {operation: {role: allowed}}: the tests of
    enforcement (registry actor, HTTP) are generated from this text, not from the code's table."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- permissions table:.*?-->\n(.*?)\n<!-- end of permissions table -->", readme, re.S)
    assert block, "README.md lacks the permissions table"
    header, _, *rows = block.group(1).strip().splitlines()
    roles = [c.strip() for c in header.strip("|").split("|")][1:]
    table = {}
    for row in rows:
        op, *cells = [c.strip() for c in row.strip("|").split("|")]
        table[op.strip("`")] = {role: cell == "yes" for role, cell in zip(roles, cells)}
    return table


def serving(app_cfg):
    """Deploy `app_cfg` for a test module; yields its base URL. Afterwards the app is removed and
    Serve stopped: its HTTP host and port are fixed when Serve starts, so a later module can only
    pick its own once it is gone."""
    from ray import serve

    from serve.deploy import deploy, shutdown

    url = deploy(app_cfg)
    try:
        yield url
    finally:
        shutdown(app_cfg.serve.app_name)
        serve.shutdown()


GAUGE_EXPIRY_S = 40.0
"""Longer than Ray 2.60 keeps a gauge series on the Prometheus endpoint without a new value (~30 s at
the default 10 s export interval): a gauge still scraped this long after it was last changed was
kept alive by `telemetry.set_gauge`."""


def metric_total(text: str, name: str, **labels: str) -> float | None:
    """Sum of a Prometheus sample over the series carrying `labels` (None when there is none)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{"):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total, found = total + float(value), True
    return total if found else None


@pytest.fixture(scope="session")
def ray_cluster():
    """An embedded local Ray cluster with 4 logical CPUs, shut down after the session."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls
        # (a stopped Tune trial's run would otherwise keep its CPUs); bound to 127.0.0.1.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        namespace="temper-tests",
        log_to_driver=True,
        # Ray Train's controller polls its workers every 2 s by default, so a run's start, each
        # report and its end are noticed up to 2 s late; a tiny 20-step fit measured ~4 s shorter
        # at 0.25 s on this 2-core machine, and the suite runs well over a hundred fits.
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}},
    )
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


# ----------------------------------------------------------------------------- PostgreSQL
# The registry must behave the same on SQLite and PostgreSQL, so its tests run against both
# (`registry_db_url`). The server is a real one from Debian's `postgresql` package, started
# here on 127.0.0.1 for the session and stopped by pid; tests skip (saying why) only where
# its binaries are not installed.


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1 (trust auth, superuser `temper`)."""

    user = "temper"

    def __init__(self, port: int):
        self.port = port

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def _admin(self):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                               autocommit=True, connect_timeout=5)

    def create_database(self) -> str:
        import uuid

        name = f"t_{uuid.uuid4().hex[:12]}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _postgres_bindir():
    """The folder holding initdb and postgres: on PATH, else Debian's /usr/lib/postgresql/N/bin (newest)."""
    import glob
    import shutil
    from pathlib import Path

    candidates = [shutil.which("initdb")] + sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    for initdb in filter(None, candidates):
        bindir = Path(initdb).resolve().parent
        if (bindir / "postgres").is_file():
            return bindir
    return None


def _server_account() -> dict:
    """Popen arguments that run the server as an unprivileged user: PostgreSQL refuses to run as root.

    Debian's package creates the `postgres` account; without it a system user `temper-pg` is added.
    """
    import pwd
    import subprocess

    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "temper-pg"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "temper-pg"],
                   check=True, capture_output=True)
    entry = pwd.getpwnam("temper-pg")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server started for this test session (initdb into a temporary folder)."""
    import shutil
    import signal
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    import psycopg

    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed: "
                    "`apt-get install -y postgresql` (.ci/run does this) to run the PostgreSQL half of the registry tests")
    account = _server_account()
    # Not under pytest's tmp folder: that is private to root (0700), and the server user must reach it.
    root = Path(tempfile.mkdtemp(prefix="temper-pg-"))
    if account:
        os.chown(root, account["user"], account["group"])
    data = root / "data"
    init = subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", PostgresServer.user, "--auth=trust", "-E", "UTF8",
         "--locale=C", "--no-sync"],
        capture_output=True, text=True, **account,
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed ({init.returncode}): {init.stdout[-2000:]}{init.stderr[-2000:]}")
    port = free_port()
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(root),
             "-c", "fsync=off"],  # test data: durability against a crashed OS is not what is tested here
            stdout=log_file, stderr=subprocess.STDOUT, **account,
        )
    server = PostgresServer(port)
    try:
        end = time.monotonic() + 60.0
        while True:  # until the server accepts connections (or exits, or a minute passes)
            try:
                server._admin().close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > end:
                    raise
            try:  # waits a little for the server to exit, which would mean it failed to start
                proc.wait(timeout=0.1)
                pytest.fail(f"postgres exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            except subprocess.TimeoutExpired:
                pass
        yield server
    finally:
        proc.send_signal(signal.SIGINT)  # "fast shutdown": roll back, disconnect clients, stop
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_db_url(request, tmp_path):
    """A fresh, empty registry database URL: a SQLite file, then a database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    name = server.create_database()
    yield server.url(name)
    server.drop_database(name)
