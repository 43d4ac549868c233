"""RegistryStore without Ray: numbering, lineage, metrics, aliases, refs, validation, persistence.

Every test taking `store` or `db_url` runs twice: on a SQLite file and on a database of a real
PostgreSQL server (tests/conftest.py). Tests taking `db_path` are about SQLite itself."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sqlalchemy import text

from actors.registry.client import open_store
from actors.registry.errors import RegistryNotFound, RegistrySchemaError
from actors.registry.schema import SCHEMA_VERSION
from actors.registry.store import RegistryStore, mask_password
from app.config.registry import RegistryConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "nested" / "registry.db"  # the parent folder does not exist yet


@pytest.fixture
def db_url(registry_db_url):
    return registry_db_url


@pytest.fixture
def store(db_url):
    s = RegistryStore(db_url)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(db_path):
    s = RegistryStore(f"sqlite:///{db_path}")
    yield s
    s.close()


def _register(store, model, n=1, **kw):
    return [store.register_version(model, f"/ckpt/{model}/{i}", "torch_fp32", **kw)["version"] for i in range(n)]


def test_sqlite_file_is_created_with_wal_and_foreign_keys(sqlite_store, db_path):
    assert db_path.is_file()
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version FROM schema_info").fetchall() == [(SCHEMA_VERSION,)]
    with sqlite_store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0


def test_versions_are_numbered_per_model_independently(store):
    assert _register(store, "gpt", 3) == [1, 2, 3]
    assert _register(store, "vit", 2) == [1, 2]
    assert _register(store, "gpt") == [4]
    assert [v["version"] for v in store.list_versions("gpt")] == [1, 2, 3, 4]
    assert [v["artifact_uri"] for v in store.list_versions("vit")] == ["/ckpt/vit/0", "/ckpt/vit/1"]
    summary = {m["name"]: (m["versions"], m["latest"]) for m in store.list_models()}
    assert summary == {"gpt": (4, 4), "vit": (2, 2)}


def test_version_record_fields(store):
    cfg = {"train": {"lr": 0.003, "steps": 10}, "name": "gpt"}
    rec = store.register_version(
        "gpt", "s3://bucket/gpt/1", "torch_fp32", config=cfg, metrics={"val_loss": 2.5},
        tags={"run": "quickstart"},
    )
    assert rec["model"] == "gpt" and rec["version"] == 1
    assert rec["artifact_uri"] == "s3://bucket/gpt/1"
    assert rec["format"] == "torch_fp32"
    assert rec["config"] == cfg
    assert len(rec["config_hash"]) == 16  # derived from config when not given
    assert rec["metrics"] == {"val_loss": 2.5}
    assert rec["parent"] is None
    assert rec["transformation"] == "trained"
    assert rec["tags"] == {"run": "quickstart"}
    assert rec["aliases"] == []
    assert rec["created_at"].endswith("+00:00")
    assert store.get_version("gpt", 1) == rec
    # an explicit hash is kept as given
    assert store.register_version("gpt", "/x", "onnx_fp32", config=cfg, config_hash="abc123")["config_hash"] == "abc123"


def test_parent_link_is_stored_and_unknown_parent_refused(store):
    _register(store, "gpt")
    child = store.register_version(
        "gpt-int8", "/ckpt/gpt-int8", "torch_int8", parent={"model": "gpt", "version": 1}, transformation="quantized"
    )
    assert child["parent"] == {"model": "gpt", "version": 1}
    assert child["transformation"] == "quantized"
    assert store.get_version("gpt-int8", "latest")["parent"] == {"model": "gpt", "version": 1}

    with pytest.raises(ValueError, match=r"parent .*'gpt'.*no version 7"):
        store.register_version("gpt", "/y", "torch_int8", parent={"model": "gpt", "version": 7})
    with pytest.raises(ValueError, match="no model named 'nope'"):
        store.register_version("gpt", "/y", "torch_int8", parent={"model": "nope", "version": 1})
    with pytest.raises(ValueError, match="parent must be"):
        store.register_version("gpt", "/y", "torch_int8", parent={"model": "gpt"})
    # a refused write leaves nothing behind: no version 2, no model created by the failed call
    assert [v["version"] for v in store.list_versions("gpt")] == [1]
    with pytest.raises(ValueError, match="parent"):
        store.register_version("fresh", "/y", "torch_int8", parent={"model": "gpt", "version": 9})
    assert "fresh" not in {m["name"] for m in store.list_models()}


def test_metrics_latest_value_view(store):
    _register(store, "gpt", metrics={"val_loss": 3.0})
    assert store.log_metrics("gpt", 1, {"val_loss": 2.0, "tokens_per_s": 1500}, step=10) == 2
    assert store.log_metrics("gpt", "1", {"val_loss": 1.5}, step=20) == 1
    assert store.get_version("gpt", 1)["metrics"] == {"val_loss": 1.5, "tokens_per_s": 1500.0}
    with store._engine.connect() as conn:  # every value is kept, not only the latest
        rows = conn.exec_driver_sql("SELECT key, value, step FROM metrics ORDER BY id").all()
    assert [tuple(r) for r in rows] == [
        ("val_loss", 3.0, None), ("val_loss", 2.0, 10), ("tokens_per_s", 1500.0, 10), ("val_loss", 1.5, 20),
    ]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_metrics_refused_naming_the_key(store, bad):
    _register(store, "gpt")
    with pytest.raises(ValueError, match="metric 'val_loss' must be finite"):
        store.log_metrics("gpt", 1, {"acc": 0.5, "val_loss": bad})
    with pytest.raises(ValueError, match="metric 'ppl' must be finite"):
        store.register_version("gpt", "/z", "torch_fp32", metrics={"ppl": bad})
    assert store.get_version("gpt", 1)["metrics"] == {}  # nothing partial was written
    assert [v["version"] for v in store.list_versions("gpt")] == [1]


def test_alias_set_and_move_records_history(store):
    _register(store, "gpt", 3)
    first = store.set_alias("gpt", "production", 1, reason="baseline", actor="alice")
    assert first == {"model": "gpt", "alias": "production", "version": 1, "from_version": None, "changed": True}
    moved = store.set_alias("gpt", "production", "3", reason="int8 is as good", actor="bob")
    assert moved["from_version"] == 1 and moved["version"] == 3
    store.set_alias("gpt", "staging", 2)
    assert store.set_alias("gpt", "production", 3)["changed"] is False  # no-op: no history row

    assert store.aliases("gpt") == {"production": 3, "staging": 2}
    assert store.get_version("gpt", 3)["aliases"] == ["production"]
    assert store.get_version("gpt", 1)["aliases"] == []
    history = store.alias_history("gpt", "production")
    assert [(h["from_version"], h["to_version"], h["reason"], h["actor"]) for h in history] == [
        (None, 1, "baseline", "alice"), (1, 3, "int8 is as good", "bob"),
    ]
    assert [(h["alias"], h["to_version"]) for h in store.alias_history("gpt")] == [
        ("production", 1), ("production", 3), ("staging", 2),
    ]
    assert {m["name"]: m["aliases"] for m in store.list_models()} == {"gpt": {"production": 3, "staging": 2}}
    # an alias may also be set from another alias
    assert store.set_alias("gpt", "staging", "production")["version"] == 3
    with pytest.raises(RegistryNotFound, match="never had an alias 'canary'"):
        store.alias_history("gpt", "canary")


def test_ref_resolution(store):
    _register(store, "gpt", 3)
    store.set_alias("gpt", "staging", 2)
    assert store.get_version("gpt", 1)["version"] == 1
    assert store.get_version("gpt", "3")["version"] == 3
    assert store.get_version("gpt", "staging")["version"] == 2
    assert store.get_version("gpt", "latest")["version"] == 3
    _register(store, "gpt")
    assert store.get_version("gpt", "latest")["version"] == 4

    with pytest.raises(RegistryNotFound, match=r"model 'gpt' has no version 9 \(versions 1..4\)"):
        store.get_version("gpt", 9)
    # numbers past SQL's 64-bit integers (the fuzzer sent one as an alias target): not found, not an OverflowError
    for huge in (2**70, -2**70, str(2**70)):
        with pytest.raises(RegistryNotFound, match=f"model 'gpt' has no version {int(huge)} "):
            store.get_version("gpt", huge)
    with pytest.raises(RegistryNotFound, match=f"has no version {2**64}"):
        store.set_alias("gpt", "huge", 2**64)
    with pytest.raises(RegistryNotFound, match=r"model 'gpt' has no alias 'prod' \(aliases: staging\)"):
        store.get_version("gpt", "prod")
    with pytest.raises(RegistryNotFound, match="no model named 'bert'"):
        store.get_version("bert", "latest")
    with pytest.raises(RegistryNotFound, match="no model named 'bert'"):
        store.list_versions("bert")
    with pytest.raises(ValueError, match="version ref"):
        store.get_version("gpt", 1.5)
    assert isinstance(RegistryNotFound("x"), LookupError)


def test_latest_of_a_model_without_versions_is_not_found(store):
    # a model only exists once a version is registered, so this is the "no model" error
    with pytest.raises(RegistryNotFound, match="no model named 'gpt'"):
        store.get_version("gpt", "latest")


@pytest.mark.parametrize("alias", ["123", "latest", "LATEST", "1abc", "-x", "a b", "", "x" * 65])
def test_bad_alias_names_refused(store, alias):
    _register(store, "gpt")
    with pytest.raises(ValueError, match=f"alias {alias!r}"):
        store.set_alias("gpt", alias, 1)
    assert store.aliases("gpt") == {}


@pytest.mark.parametrize("name", ["", "-gpt", "has space", "a/b", "x" * 65])
def test_bad_model_names_refused(store, name):
    with pytest.raises(ValueError, match=f"model name {name!r}"):
        store.register_version(name, "/ckpt", "torch_fp32")


def test_other_bad_inputs_name_the_field(store):
    with pytest.raises(ValueError, match="transformation 'compiled'"):
        store.register_version("gpt", "/ckpt", "torch_fp32", transformation="compiled")
    with pytest.raises(ValueError, match="artifact_uri 'runs/ckpt'"):
        store.register_version("gpt", "runs/ckpt", "torch_fp32")
    with pytest.raises(ValueError, match="format 'torch fp32'"):
        store.register_version("gpt", "/ckpt", "torch fp32")
    with pytest.raises(ValueError, match="tag 'run'"):
        store.register_version("gpt", "/ckpt", "torch_fp32", tags={"run": 3})
    with pytest.raises(ValueError, match="metric 'acc' must be a number"):
        store.register_version("gpt", "/ckpt", "torch_fp32", metrics={"acc": "high"})
    assert store.list_models() == []


def test_reopening_the_database_sees_everything(db_url):
    url = db_url
    first = RegistryStore(url)
    _register(first, "gpt", 2, metrics={"val_loss": 2.0})
    first.register_version("gpt", "/q", "onnx_int8", parent={"model": "gpt", "version": 2}, transformation="quantized")
    first.log_metrics("gpt", 3, {"val_loss": 2.1, "latency_ms": 1.25})
    first.set_alias("gpt", "production", 2, reason="r1")
    first.set_alias("gpt", "production", 3, reason="r2")
    before = (first.list_versions("gpt"), first.list_models(), first.alias_history("gpt"))
    first.close()

    second = RegistryStore(url)
    try:
        after = (second.list_versions("gpt"), second.list_models(), second.alias_history("gpt"))
        assert after == before
        assert second.get_version("gpt", "production")["metrics"] == {"val_loss": 2.1, "latency_ms": 1.25}
        assert second.register_version("gpt", "/next", "torch_fp32")["version"] == 4  # numbering continues
    finally:
        second.close()


def test_concurrent_writers_on_one_database_get_distinct_numbers(db_url):
    # Two stores = two connections, as with the actor plus a CLI writing to the same database.
    stores = [RegistryStore(db_url) for _ in range(2)]
    start = threading.Barrier(len(stores))
    issued: list[int] = []
    errors: list[BaseException] = []

    def writer(store):
        start.wait()
        try:
            for i in range(15):
                issued.append(store.register_version("gpt", f"/ckpt/{i}", "torch_fp32")["version"])
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert errors == []
    assert sorted(issued) == list(range(1, 31))


def test_relative_sqlite_path_gets_its_folder_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = RegistryStore("sqlite:///runs/reg.db")
    try:
        _register(s, "gpt")
    finally:
        s.close()
    assert (tmp_path / "runs" / "reg.db").is_file()


def test_open_store_reads_the_database_the_actor_would_open_without_ray(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = RegistryStore(f"sqlite:///{tmp_path / 'runs' / 'reg.db'}")
    try:
        _register(s, "gpt", 2)
    finally:
        s.close()
    # a relative path resolves against the caller's folder, as `get_or_create_registry` does
    opened = open_store(RegistryConfig(db_url="sqlite:///runs/reg.db"))
    try:
        assert opened.url == f"sqlite:///{tmp_path / 'runs' / 'reg.db'}"
        assert [v["version"] for v in opened.list_versions("gpt")] == [1, 2]
    finally:
        opened.close()
    with pytest.raises(ValueError, match="in-memory SQLite"):
        open_store(RegistryConfig(db_url="sqlite://"))


def test_the_store_and_the_mirror_import_without_ray():
    code = "import sys, actors.registry.store, actors.mlflow_mirror; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://temper:s3cr%40t@db.internal:5432/registry", "postgresql+psycopg://temper:***@db.internal:5432/registry"),
    ("http://user:pw@mlflow:5000", "http://user:***@mlflow:5000"),
    ("postgresql://temper@db/registry", "postgresql://temper@db/registry"),
    ("sqlite:////data/registry.db", "sqlite:////data/registry.db"),
])
def test_passwords_in_urls_are_masked(url, shown):
    assert mask_password(url) == shown


def test_newer_schema_version_is_refused(store, db_url):
    with store._engine.begin() as conn:
        conn.execute(text("UPDATE schema_info SET version = 99"))
    with pytest.raises(RegistrySchemaError, match=rf"has schema version 99, newer than .* expects schema version {SCHEMA_VERSION}"):
        RegistryStore(db_url)


def test_foreign_tables_without_schema_info_are_refused(db_url):
    from sqlalchemy import create_engine

    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE models (id INTEGER PRIMARY KEY, name TEXT)"))
    engine.dispose()
    with pytest.raises(RegistrySchemaError, match="no schema_info table"):
        RegistryStore(db_url)


def test_in_memory_store_works_for_quick_use():
    s = RegistryStore("sqlite://")
    try:
        assert _register(s, "gpt", 2) == [1, 2]
        assert s.get_version("gpt", "latest")["version"] == 2
    finally:
        s.close()
