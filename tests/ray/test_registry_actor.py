"""The ModelRegistry actor on the shared local Ray cluster: it persists across kills, restarts
and whole-cluster restarts, takes many concurrent writers, and mirrors to MLflow.

Tests taking `registry_cfg` run twice: on a SQLite file and on a database of a real PostgreSQL
server (tests/conftest.py). `sqlite_registry_cfg` is for what only concerns SQLite files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from actors.registry.client import get_or_create_registry
from actors.registry.errors import RegistryConflict, RegistryNotFound
from actors.registry.store import RegistryStore
from app.config.registry import MlflowMirrorConfig, RegistryConfig

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def _config(db_url: str, **kw) -> RegistryConfig:
    return RegistryConfig(actor_name=f"registry-test-{uuid.uuid4().hex[:8]}", namespace="temper-tests", db_url=db_url, **kw)


def _kill_actor(cfg: RegistryConfig) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(cfg.actor_name, namespace=cfg.namespace), no_restart=True)
    except ValueError:  # no actor of that name (already killed by the test, or never started)
        pass


@pytest.fixture
def registry_cfg(ray_cluster, registry_db_url):
    """A registry config with its own fresh database and a unique actor name; kills the actor afterwards."""
    cfg = _config(registry_db_url)
    yield cfg
    _kill_actor(cfg)


@pytest.fixture
def sqlite_registry_cfg(ray_cluster, tmp_path):
    cfg = _config(f"sqlite:///{tmp_path / 'registry.db'}")
    yield cfg
    _kill_actor(cfg)


def _populate(ray, handle) -> None:
    trained = ray.get(handle.register_version.remote(
        "gpt", "/runs/gpt/checkpoint_000010", "torch_fp32",
        config={"train": {"lr": 0.003}}, metrics={"val_loss": 2.4},
    ))
    assert trained["version"] == 1 and trained["parent"] is None
    assert ray.get(handle.log_metrics.remote("gpt", 1, {"val_loss": 2.1, "tokens_per_s": 900.0}, step=20)) == 2
    quantized = ray.get(handle.register_version.remote(
        "gpt", "/runs/gpt/int8", "torch_int8",
        parent={"model": "gpt", "version": 1}, transformation="quantized", metrics={"val_loss": 2.15},
        tags={"method": "torch_int8"},
    ))
    assert quantized["version"] == 2
    assert quantized["parent"] == {"model": "gpt", "version": 1}
    assert quantized["transformation"] == "quantized"
    ray.get(handle.set_alias.remote("gpt", "production", 1, reason="baseline"))
    moved = ray.get(handle.set_alias.remote("gpt", "production", 2, reason="int8 within budget", actor="test"))
    assert (moved["from_version"], moved["version"]) == (1, 2)


# Runs inside the actor through __ray_call__. A lambda travels by value; a module-level def would
# be pickled by reference to this test module, which the actor process cannot import.
_pid = lambda self: os.getpid()  # noqa: E731


def _wait_for_new_process(ray, handle, old_pid: int, deadline_s: float = 120.0) -> int:
    """ray.kill returns before the old process is gone: poll until a new process answers."""
    pid_of = handle.__ray_call__.options(max_task_retries=-1)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            pid = ray.get(pid_of.remote(_pid))
        except ray.exceptions.ActorUnavailableError:  # restarting right now
            continue
        if pid != old_pid:
            return pid
    pytest.fail(f"the registry actor was not restarted within {deadline_s}s")


def _snapshot(ray, handle) -> tuple:
    return (
        ray.get(handle.list_versions.remote("gpt")),
        ray.get(handle.list_models.remote()),
        ray.get(handle.aliases.remote("gpt")),
        ray.get(handle.alias_history.remote("gpt")),
    )


def test_register_through_the_actor(ray_cluster, registry_cfg):
    ray = ray_cluster
    handle = get_or_create_registry(registry_cfg)
    assert ray.get(handle.ping.remote()) == "ok"
    _populate(ray, handle)

    prod = ray.get(handle.get_version.remote("gpt", "production"))
    assert prod["version"] == 2 and prod["format"] == "torch_int8" and prod["aliases"] == ["production"]
    assert ray.get(handle.get_version.remote("gpt", "1"))["metrics"] == {"val_loss": 2.1, "tokens_per_s": 900.0}
    [summary] = ray.get(handle.list_models.remote())
    assert (summary["name"], summary["versions"], summary["latest"], summary["aliases"]) == ("gpt", 2, 2, {"production": 2})
    # errors raised in the actor reach the caller with their type and a message naming the culprit
    with pytest.raises(RegistryNotFound, match="no alias 'staging'"):
        ray.get(handle.get_version.remote("gpt", "staging"))
    with pytest.raises(ValueError, match="parent"):
        ray.get(handle.register_version.remote("gpt", "/x", "torch_int8", parent={"model": "gpt", "version": 5}))
    with pytest.raises(ValueError, match="metric 'val_loss' must be finite"):
        ray.get(handle.log_metrics.remote("gpt", 1, {"val_loss": float("nan")}))

    # the database is the source of truth: another process reading it sees the same rows
    engine = create_engine(registry_cfg.db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT version, format FROM versions ORDER BY version")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [(1, "torch_fp32"), (2, "torch_int8")]


def test_everything_survives_killing_the_actor(ray_cluster, registry_cfg):
    ray = ray_cluster
    handle = get_or_create_registry(registry_cfg)
    _populate(ray, handle)
    before = _snapshot(ray, handle)

    ray.kill(handle, no_restart=True)  # asynchronous: a call made right after may still be answered
    deadline = time.time() + 30
    with pytest.raises(ray.exceptions.RayActorError):
        while time.time() < deadline:
            ray.get(handle.ping.remote())
            time.sleep(0.1)

    fresh = get_or_create_registry(registry_cfg)
    assert fresh._actor_id != handle._actor_id  # a new actor, with nothing in memory
    assert _snapshot(ray, fresh) == before
    assert ray.get(fresh.get_version.remote("gpt", "production"))["metrics"] == {"val_loss": 2.15}
    # numbering continues from the database, not from actor memory
    assert ray.get(fresh.register_version.remote("gpt", "/runs/gpt/pruned", "torch_fp32",
                                                 parent={"model": "gpt", "version": 1},
                                                 transformation="pruned"))["version"] == 3


def test_restarted_actor_answers_with_everything_intact(ray_cluster, registry_cfg):
    ray = ray_cluster
    handle = get_or_create_registry(registry_cfg)
    _populate(ray, handle)
    before = _snapshot(ray, handle)
    pid_before = ray.get(handle.__ray_call__.remote(_pid))

    ray.kill(handle, no_restart=False)  # max_restarts=-1: Ray starts a new process for the same handle
    _wait_for_new_process(ray, handle, pid_before)

    assert _snapshot(ray, handle) == before
    assert ray.get(handle.register_version.remote("gpt", "/runs/gpt/onnx", "onnx_int8"))["version"] == 3


def test_same_name_other_database_is_refused(ray_cluster, sqlite_registry_cfg, tmp_path):
    ray = ray_cluster
    registry_cfg = sqlite_registry_cfg
    handle = get_or_create_registry(registry_cfg)
    other = registry_cfg.model_copy(update={"db_url": f"sqlite:///{tmp_path / 'other.db'}"})
    with pytest.raises(ValueError, match=r"already runs on database sqlite:///.*registry\.db, not sqlite:///.*other\.db"):
        get_or_create_registry(other)
    assert ray.get(handle.ping.remote()) == "ok"  # the existing actor is left alone
    # asking again with the original URL returns the same actor
    assert get_or_create_registry(registry_cfg)._actor_id == handle._actor_id


def test_relative_sqlite_path_resolves_against_the_callers_cwd(ray_cluster, sqlite_registry_cfg, tmp_path, monkeypatch):
    ray = ray_cluster
    monkeypatch.chdir(tmp_path)
    cfg = sqlite_registry_cfg.model_copy(update={"db_url": "sqlite:///relative/registry.db"})
    handle = get_or_create_registry(cfg)
    assert ray.get(handle.db_url.remote()) == f"sqlite:///{tmp_path / 'relative' / 'registry.db'}"
    ray.get(handle.register_version.remote("gpt", "/runs/gpt/1", "torch_fp32"))
    assert (tmp_path / "relative" / "registry.db").is_file()


def test_database_with_unknown_schema_fails_clearly(ray_cluster, registry_cfg):
    engine = create_engine(registry_cfg.db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE schema_info (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)"))
        conn.execute(text("INSERT INTO schema_info VALUES (1, 99)"))
    engine.dispose()
    with pytest.raises(RuntimeError, match=r"failed to start(.|\n)*schema version 99, newer than this Temper build"):
        get_or_create_registry(registry_cfg)


# ----------------------------------------------------------------------------- durability


def test_every_write_that_returned_survives_a_kill_mid_stream(ray_cluster, registry_cfg):
    """A writer keeps 4 writes in flight (versions, metric points, alias moves) while the actor is
    killed under it. Every write whose call returned must be in the database afterwards, as seen
    by a freshly created actor and by a plain store reading the database."""
    ray = ray_cluster
    handle = get_or_create_registry(registry_cfg)
    ray.get(handle.register_version.remote("gpt", "/runs/gpt/base", "torch_fp32"))
    acked: list[tuple[str, int, object]] = []
    failed: list[tuple[str, int]] = []
    enough = threading.Event()

    def submit(i: int):
        if i % 3 == 0:
            return ("version", i), handle.register_version.remote("gpt", f"/runs/gpt/{i}", "torch_fp32", tags={"seq": str(i)})
        if i % 3 == 1:
            return ("metric", i), handle.log_metrics.remote("gpt", 1, {"seq": float(i)}, step=i)
        return ("alias", i), handle.set_alias.remote("gpt", f"stream-{i}", 1, reason=f"write {i}")

    def writer() -> None:
        pending, i, broken = {}, 0, False
        while pending or not broken:
            while not broken and len(pending) < 4 and i < 2000:
                i += 1
                what, ref = submit(i)
                pending[ref] = what
            done, _ = ray.wait(list(pending), num_returns=1)
            what = pending.pop(done[0])
            try:
                acked.append((*what, ray.get(done[0])))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                failed.append(what)
                broken = True  # stop submitting; drain what is in flight
            if len(acked) >= 30:
                enough.set()
            if i >= 2000 and not pending:
                break

    thread = threading.Thread(target=writer)
    thread.start()
    assert enough.wait(timeout=120), "the writer did not get 30 writes acknowledged"
    ray.kill(handle, no_restart=True)
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert failed, "the kill should have hit writes in flight"

    fresh = get_or_create_registry(registry_cfg)
    assert fresh._actor_id != handle._actor_id
    versions = {v["tags"].get("seq") for v in ray.get(fresh.list_versions.remote("gpt"))}
    steps = {h["step"] for h in ray.get(fresh.metric_history.remote("gpt", 1, "seq"))}
    aliases = ray.get(fresh.aliases.remote("gpt"))
    for kind, i, result in acked:
        if kind == "version":
            assert str(i) in versions and ray.get(fresh.get_version.remote("gpt", result["version"]))["tags"] == {"seq": str(i)}
        elif kind == "metric":
            assert i in steps
        else:
            assert aliases.get(f"stream-{i}") == 1
    store = RegistryStore(registry_cfg.db_url)  # the database itself, without any actor
    try:
        assert {v["tags"].get("seq") for v in store.list_versions("gpt")} == versions
    finally:
        store.close()


_CLUSTER_SCRIPT = r"""
import json, sys
import ray
from actors.registry.client import get_or_create_registry
from app.config.registry import RegistryConfig

cfg = RegistryConfig.model_validate_json(sys.argv[1])
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
reg = get_or_create_registry(cfg)
get = lambda ref: ray.get(ref)
get(reg.register_version.remote("gpt", "/runs/gpt/1", "torch_fp32", config={"train": {"lr": 0.003}},
                                params={"lr": 0.003}, metrics={"val_loss": 2.4}, dataset_fingerprint="d:1", label="1.0.0"))
get(reg.log_metrics_batch.remote("gpt", 1, [{"step": s, "metrics": {"train_loss": 3.0 - s / 100}} for s in range(5)]))
get(reg.register_version.remote("gpt", "/runs/gpt/2", "torch_int8", parent={"model": "gpt", "version": 1},
                                transformation="quantized"))
get(reg.register_version.remote("gpt", "/runs/gpt/3", "onnx_int8", parent={"model": "gpt", "version": 1},
                                transformation="quantized"))
get(reg.set_alias.remote("gpt", "production", 1, reason="baseline"))
get(reg.set_alias.remote("gpt", "production", 2, reason="int8"))
get(reg.rollback_alias.remote("gpt", "production", reason="regression"))
get(reg.delete_version.remote("gpt", 3, reason="broken export"))
snapshot = {
    "versions": get(reg.list_versions.remote("gpt", include_deleted=True)),
    "models": get(reg.list_models.remote()),
    "history": get(reg.alias_history.remote("gpt")),
    "curve": get(reg.metric_history.remote("gpt", 1)),
    "node": ray.get_runtime_context().get_node_id(),
}
ray.shutdown()
print("SNAPSHOT " + json.dumps(snapshot))
"""


def test_everything_survives_a_whole_cluster_restart(ray_cluster, registry_cfg):
    """ray.init -> writes -> ray.shutdown in one process, then a new Ray on the same database.

    The test session shares one Ray cluster that must keep running, so the first cluster is a
    subprocess with its own `ray.init(address="local")`, which writes through its own registry
    actor and shuts its cluster down (the detached actor dies with it). The session's cluster,
    another Ray instance, then starts a new actor on the same database and must see everything.
    """
    ray = ray_cluster
    proc = subprocess.run([sys.executable, "-c", _CLUSTER_SCRIPT, registry_cfg.model_dump_json()], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SNAPSHOT "))[9:])
    assert before["node"] != ray.get_runtime_context().get_node_id()  # really another cluster

    reg = get_or_create_registry(registry_cfg)
    assert ray.get(reg.list_versions.remote("gpt", include_deleted=True)) == before["versions"]
    assert ray.get(reg.list_models.remote()) == before["models"]
    assert ray.get(reg.alias_history.remote("gpt")) == before["history"]
    assert ray.get(reg.metric_history.remote("gpt", 1)) == before["curve"]
    assert ray.get(reg.aliases.remote("gpt")) == {"production": 1}
    assert [h["action"] for h in before["history"]] == ["set", "set", "rollback"]
    assert ray.get(reg.register_version.remote("gpt", "/runs/gpt/4", "torch_fp32"))["version"] == 4


# ----------------------------------------------------------------------------- concurrency


def test_eight_concurrent_writers_200_metric_writes_each(ray_cluster, registry_cfg):
    """8 Ray tasks (like 8 Tune trials) each send 200 log_metrics calls at once: all 1600 land, no
    errors, and the actor commits them in far fewer transactions than calls (group commit)."""
    ray = ray_cluster
    handle = get_or_create_registry(registry_cfg)
    ray.get(handle.register_version.remote("gpt", "/runs/gpt/1", "torch_fp32"))
    name, namespace = registry_cfg.actor_name, registry_cfg.namespace

    @ray.remote(num_cpus=0)
    def trial(i: int) -> list[int]:
        reg = ray.get_actor(name, namespace=namespace)
        return ray.get([reg.log_metrics.remote("gpt", 1, {f"trial{i}": float(s)}, step=s) for s in range(200)])

    results = ray.get([trial.remote(i) for i in range(8)], timeout=300)
    assert results == [[1] * 200] * 8
    history = ray.get(handle.metric_history.remote("gpt", 1))
    assert len(history) == 1600
    for i in range(8):
        assert sorted(h["step"] for h in history if h["key"] == f"trial{i}") == list(range(200))
    stats = ray.get(handle.stats.remote())
    assert stats["metric_calls"] == 1600
    assert stats["metric_transactions"] < 1600 / 4  # batched, not one transaction per call


def test_a_refused_write_in_a_group_does_not_sink_the_others(ray_cluster, sqlite_registry_cfg):
    ray = ray_cluster
    handle = get_or_create_registry(sqlite_registry_cfg)
    ray.get(handle.register_version.remote("gpt", "/runs/gpt/1", "torch_fp32"))
    refs = [handle.log_metrics.remote("gpt", 1 if i % 5 else 99, {"x": float(i)}, step=i) for i in range(50)]
    for i, ref in enumerate(refs):
        if i % 5:
            assert ray.get(ref) == 1
        else:
            with pytest.raises(RegistryNotFound, match="no version 99"):
                ray.get(ref)
    assert len(ray.get(handle.metric_history.remote("gpt", 1, "x"))) == 40
    with pytest.raises(ValueError, match="must be finite"):  # refused before it is queued
        ray.get(handle.log_metrics.remote("gpt", 1, {"x": float("nan")}))


# ----------------------------------------------------------------------------- the v2 operations through Ray


def test_aliases_history_rollback_compare_and_delete_through_the_actor(ray_cluster, registry_cfg):
    ray = ray_cluster
    reg = get_or_create_registry(registry_cfg)
    _populate(ray, reg)  # v1 trained, v2 quantized; production v1 -> v2
    rolled = ray.get(reg.rollback_alias.remote("gpt", "production", reason="latency regression", actor="oncall"))
    assert (rolled["from_version"], rolled["version"]) == (2, 1)
    history = ray.get(reg.alias_history.remote("gpt", "production"))
    assert [(h["action"], h["to_version"], h["reason"]) for h in history] == [
        ("set", 1, "baseline"), ("set", 2, "int8 within budget"), ("rollback", 1, "latency regression")]
    assert ray.get(reg.as_of.remote("gpt", "production", history[1]["created_at"]))["version"] == 2
    assert ray.get(reg.as_of.remote("gpt", "production", history[2]["created_at"]))["version"] == 1

    cmp = ray.get(reg.compare.remote("gpt", 1, 2))
    assert {m["key"]: round(m["delta"], 6) for m in cmp["metrics"] if m["delta"] is not None} == {"val_loss": 0.05}
    assert cmp["lineage"]["relation"] == "b descends from a"
    listed = ray.get(reg.list_versions.remote("gpt", where="val_loss<3", order_by="val_loss"))
    assert [v["version"] for v in listed] == [1, 2]

    with pytest.raises(RegistryConflict, match="production"):
        ray.get(reg.delete_version.remote("gpt", 1))
    assert ray.get(reg.delete_version.remote("gpt", 2, reason="superseded"))["forced"] is False
    assert [v["version"] for v in ray.get(reg.list_versions.remote("gpt"))] == [1]


# ----------------------------------------------------------------------------- MLflow mirror


def test_mlflow_mirror_through_the_actor(ray_cluster, tmp_path):
    """A registered version with its run and the alias appear in a local MLflow tracking store
    (SQLite file + explicit artifact folder), read back with mlflow's client API."""
    from mlflow import MlflowClient

    ray = ray_cluster
    tracking = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    cfg = _config(f"sqlite:///{tmp_path / 'registry.db'}", mlflow=MlflowMirrorConfig(
        enabled=True, tracking_uri=tracking, artifact_location=str(tmp_path / "mlflow" / "artifacts"), experiment="temper-test",
    ))
    artifact = tmp_path / "artifacts" / "gpt-v1"
    artifact.mkdir(parents=True)
    (artifact / "model.safetensors").write_bytes(b"\0" * 32)
    try:
        reg = get_or_create_registry(cfg)
        ray.get(reg.register_version.remote("gpt", str(artifact), "torch_fp32", config={"train": {"lr": 0.003}},
                                            params={"lr": 0.003}, metrics={"val_loss": 2.4}))
        ray.get(reg.log_metrics_batch.remote("gpt", 1, [{"step": s, "metrics": {"train_loss": 3.0 - s}} for s in range(3)]))
        ray.get(reg.register_version.remote("gpt", "s3://bucket/gpt/int8", "torch_int8",
                                            parent={"model": "gpt", "version": 1}, transformation="quantized"))
        ray.get(reg.set_alias.remote("gpt", "production", 2, reason="ship int8"))
        status = ray.get(reg.mirror_flush.remote(), timeout=300)
        assert status["errors"] == {} and status["pending"] == []

        client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
        prod = client.get_model_version_by_alias("gpt", "production")
        assert (prod.tags["temper.version"], prod.source) == ("2", "s3://bucket/gpt/int8")
        [trained] = [mv for mv in client.search_model_versions("name='gpt'") if mv.tags["temper.version"] == "1"]
        run = client.get_run(trained.run_id)
        assert run.info.run_name == "gpt-v1" and run.data.params["lr"] == "0.003"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1, 2]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "artifact")] == ["artifact/model.safetensors"]
        assert run.info.artifact_uri.startswith((tmp_path / "mlflow" / "artifacts").as_uri())

        # the mirror follows alias moves; asking for another mirror target is refused clearly
        ray.get(reg.set_alias.remote("gpt", "production", 1, reason="rollback"))
        assert ray.get(reg.mirror_flush.remote(), timeout=300)["errors"] == {}
        assert client.get_model_version_by_alias("gpt", "production").tags["temper.version"] == "1"
        elsewhere = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"experiment": "other"})})
        with pytest.raises(ValueError, match="already runs with MLflow mirror"):
            get_or_create_registry(elsewhere)
        assert not (Path.cwd() / "mlruns").exists()
    finally:
        _kill_actor(cfg)
