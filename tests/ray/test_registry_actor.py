"""The ModelRegistry actor on the shared local Ray cluster: it persists across kills and restarts."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid

import pytest

from actors.registry import RegistryNotFound, get_or_create_registry
from app.config import RegistryConfig

pytestmark = pytest.mark.ray


@pytest.fixture
def registry_cfg(tmp_path):
    """A registry config with its own sqlite file and a unique actor name; kills the actor afterwards."""
    cfg = RegistryConfig(
        actor_name=f"registry-test-{uuid.uuid4().hex[:8]}",
        namespace="temper-tests",
        db_url=f"sqlite:///{tmp_path / 'registry.db'}",
    )
    yield cfg
    import ray

    try:
        ray.kill(ray.get_actor(cfg.actor_name, namespace=cfg.namespace), no_restart=True)
    except ValueError:  # no actor of that name (already killed by the test, or never started)
        pass


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

    # the database is the source of truth: another process reading the file sees the same rows
    with sqlite3.connect(registry_cfg.db_url.removeprefix("sqlite:///")) as raw:
        assert raw.execute("SELECT version, format FROM versions ORDER BY version").fetchall() == [
            (1, "torch_fp32"), (2, "torch_int8"),
        ]


def test_everything_survives_killing_the_actor(ray_cluster, registry_cfg):
    ray = ray_cluster
    handle = get_or_create_registry(registry_cfg)
    _populate(ray, handle)
    before = _snapshot(ray, handle)

    ray.kill(handle, no_restart=True)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.ping.remote())

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


def test_same_name_other_database_is_refused(ray_cluster, registry_cfg, tmp_path):
    ray = ray_cluster
    handle = get_or_create_registry(registry_cfg)
    other = registry_cfg.model_copy(update={"db_url": f"sqlite:///{tmp_path / 'other.db'}"})
    with pytest.raises(ValueError, match=r"already runs on database sqlite:///.*registry\.db, not sqlite:///.*other\.db"):
        get_or_create_registry(other)
    assert ray.get(handle.ping.remote()) == "ok"  # the existing actor is left alone
    # asking again with the original URL returns the same actor
    assert get_or_create_registry(registry_cfg)._actor_id == handle._actor_id


def test_relative_sqlite_path_resolves_against_the_callers_cwd(ray_cluster, registry_cfg, tmp_path, monkeypatch):
    ray = ray_cluster
    monkeypatch.chdir(tmp_path)
    cfg = registry_cfg.model_copy(update={"db_url": "sqlite:///relative/registry.db"})
    handle = get_or_create_registry(cfg)
    assert ray.get(handle.db_url.remote()) == f"sqlite:///{tmp_path / 'relative' / 'registry.db'}"
    ray.get(handle.register_version.remote("gpt", "/runs/gpt/1", "torch_fp32"))
    assert (tmp_path / "relative" / "registry.db").is_file()


def test_database_with_unknown_schema_fails_clearly(ray_cluster, registry_cfg):
    path = registry_cfg.db_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE schema_info (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
        raw.execute("INSERT INTO schema_info VALUES (1, 99)")
    with pytest.raises(RuntimeError, match=r"failed to start(.|\n)*schema version 99"):
        get_or_create_registry(registry_cfg)
