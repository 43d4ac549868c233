"""Schema migrations: a real schema-v1 database (built below with the v1 table definitions, as
the first registry release wrote them) opens migrated to the current schema with its data
intact, on SQLite and PostgreSQL; the migrated layout equals a fresh one; a failed migration
leaves the database as it was; newer or damaged databases are refused with clear messages."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import (
    Column, DateTime, Double, ForeignKey, Index, Integer, MetaData, String, Table, Text, UniqueConstraint,
    create_engine, inspect, text,
)

import actors.registry.schema as schema
from actors.registry.errors import RegistryNotFound, RegistrySchemaError
from actors.registry.schema import SCHEMA_VERSION
from actors.registry.store import RegistryStore

# ----------------------------------------------------------------------------- the v1 layout, frozen

v1 = MetaData()
Table("schema_info", v1, Column("id", Integer, primary_key=True), Column("version", Integer, nullable=False))
Table("models", v1,
      Column("id", Integer, primary_key=True, autoincrement=True),
      Column("name", String(64), nullable=False, unique=True),
      Column("created_at", DateTime(timezone=True), nullable=False))
Table("versions", v1,
      Column("id", Integer, primary_key=True, autoincrement=True),
      Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
      Column("version", Integer, nullable=False),
      Column("artifact_uri", Text, nullable=False),
      Column("format", String(64), nullable=False),
      Column("config_hash", String(128), nullable=True),
      Column("config_json", Text, nullable=True),
      Column("parent_version_id", Integer, ForeignKey("versions.id"), nullable=True),
      Column("transformation", String(16), nullable=False),
      Column("tags_json", Text, nullable=False),
      Column("created_at", DateTime(timezone=True), nullable=False),
      UniqueConstraint("model_id", "version", name="uq_versions_model_version"))
Table("metrics", v1,
      Column("id", Integer, primary_key=True, autoincrement=True),
      Column("version_id", Integer, ForeignKey("versions.id"), nullable=False),
      Column("key", String(128), nullable=False),
      Column("value", Double, nullable=False),
      Column("step", Integer, nullable=True),
      Column("created_at", DateTime(timezone=True), nullable=False),
      Index("ix_metrics_version_key", "version_id", "key"))
Table("aliases", v1,
      Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
      Column("alias", String(64), primary_key=True),
      Column("version_id", Integer, ForeignKey("versions.id"), nullable=False))
Table("alias_history", v1,
      Column("id", Integer, primary_key=True, autoincrement=True),
      Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
      Column("alias", String(64), nullable=False),
      Column("from_version_id", Integer, ForeignKey("versions.id"), nullable=True),
      Column("to_version_id", Integer, ForeignKey("versions.id"), nullable=False),
      Column("reason", Text, nullable=False),
      Column("actor", String(128), nullable=False),
      Column("created_at", DateTime(timezone=True), nullable=False))

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def _write_v1_database(url: str) -> None:
    """A v1 registry as the first release left it: gpt v1 (trained) -> v2 (quantized), metrics,
    production moved v1 -> v2."""
    engine = create_engine(url)
    t = v1.tables
    with engine.begin() as conn:  # ids come from the database, as the v1 code let them
        v1.create_all(conn)
        conn.execute(t["schema_info"].insert().values(id=1, version=1))
        model = conn.execute(t["models"].insert().values(name="gpt", created_at=T0)).inserted_primary_key[0]
        first = conn.execute(t["versions"].insert().values(
            model_id=model, version=1, artifact_uri="/runs/gpt/1", format="torch_fp32", config_hash="abc",
            config_json=json.dumps({"train": {"lr": 0.003}}), parent_version_id=None, transformation="trained",
            tags_json=json.dumps({"run": "q"}), created_at=T0,
        )).inserted_primary_key[0]
        second = conn.execute(t["versions"].insert().values(
            model_id=model, version=2, artifact_uri="/runs/gpt/2", format="torch_int8", config_hash="abc",
            config_json=None, parent_version_id=first, transformation="quantized", tags_json="{}",
            created_at=T0 + timedelta(minutes=1),
        )).inserted_primary_key[0]
        conn.execute(t["metrics"].insert(), [
            dict(version_id=first, key="val_loss", value=2.5, step=None, created_at=T0),
            dict(version_id=first, key="val_loss", value=2.1, step=100, created_at=T0),
            dict(version_id=second, key="val_loss", value=2.15, step=None, created_at=T0),
        ])
        conn.execute(t["aliases"].insert().values(model_id=model, alias="production", version_id=second))
        conn.execute(t["alias_history"].insert(), [
            dict(model_id=model, alias="production", from_version_id=None, to_version_id=first, reason="baseline",
                 actor="app run", created_at=T0 + timedelta(minutes=2)),
            dict(model_id=model, alias="production", from_version_id=first, to_version_id=second,
                 reason="int8 within budget", actor="app run", created_at=T0 + timedelta(minutes=3)),
        ])
    engine.dispose()


def _schema_version(url: str) -> int:
    engine = create_engine(url)
    with engine.connect() as conn:
        version = conn.execute(text("SELECT version FROM schema_info")).scalar_one()
    engine.dispose()
    return version


def _layout(url: str) -> dict:
    """Tables -> columns (name, nullable), indexes (name, columns, unique), foreign keys."""
    engine = create_engine(url)
    insp = inspect(engine)
    out = {}
    for table in sorted(insp.get_table_names()):
        out[table] = {
            "columns": sorted((c["name"], bool(c["nullable"])) for c in insp.get_columns(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(table)),
            "foreign_keys": sorted((tuple(f["constrained_columns"]), f["referred_table"]) for f in insp.get_foreign_keys(table)),
        }
    engine.dispose()
    return out


def test_v1_database_is_migrated_with_its_data(registry_db_url):
    _write_v1_database(registry_db_url)
    store = RegistryStore(registry_db_url)
    try:
        assert store.migrated_from == 1
        assert _schema_version(registry_db_url) == SCHEMA_VERSION
        v1_rec, v2_rec = store.list_versions("gpt")
        assert (v1_rec["metrics"], v1_rec["config"], v1_rec["tags"]) == ({"val_loss": 2.1}, {"train": {"lr": 0.003}}, {"run": "q"})
        assert (v2_rec["parent"], v2_rec["transformation"], v2_rec["aliases"]) == ({"model": "gpt", "version": 1}, "quantized", ["production"])
        for rec in (v1_rec, v2_rec):  # the new fields exist, empty
            assert (rec["params"], rec["label"], rec["dataset_fingerprint"], rec["deleted"]) == ({}, None, None, None)
        history = store.alias_history("gpt", "production")
        assert [(h["action"], h["from_version"], h["to_version"], h["reason"]) for h in history] == [
            ("set", None, 1, "baseline"), ("set", 1, 2, "int8 within budget")]
        assert store.as_of("gpt", "production", T0 + timedelta(minutes=2, seconds=30))["version"] == 1

        # the v2 features work on the migrated data
        assert store.rollback_alias("gpt", "production", reason="after migration")["version"] == 1
        new = store.register_version("gpt", "/runs/gpt/3", "onnx_int8", params={"opset": 17}, label="1.1.0",
                                     dataset_fingerprint="digits:1", parent={"model": "gpt", "version": 1},
                                     transformation="quantized")
        assert (new["version"], new["params"], new["label"]) == (3, {"opset": 17}, "1.1.0")
        store.delete_version("gpt", 1, force=True, reason="gone")
        assert store.alias_history("gpt", "production")[-1]["to_version"] is None  # NULL allowed now
        with pytest.raises(RegistryNotFound, match="was deleted"):
            store.get_version("gpt", 1)
    finally:
        store.close()
    # reopening a migrated database migrates nothing
    again = RegistryStore(registry_db_url)
    assert again.migrated_from is None
    again.close()


def test_migrated_layout_equals_a_fresh_one(registry_db_url, tmp_path, request):
    _write_v1_database(registry_db_url)
    RegistryStore(registry_db_url).close()
    if registry_db_url.startswith("sqlite"):
        fresh_url = f"sqlite:///{tmp_path / 'fresh.db'}"
        RegistryStore(fresh_url).close()
        assert _layout(registry_db_url) == _layout(fresh_url)
    else:
        server = request.getfixturevalue("postgres_server")
        name = server.create_database()
        try:
            RegistryStore(server.url(name)).close()
            assert _layout(registry_db_url) == _layout(server.url(name))
        finally:
            server.drop_database(name)


def test_a_failing_migration_leaves_the_database_untouched(registry_db_url, monkeypatch):
    _write_v1_database(registry_db_url)
    before = _layout(registry_db_url)

    def half_then_fail(conn):
        schema._migrate_v1_to_v2(conn)  # every DDL step of the real migration runs...
        raise RuntimeError("disk full")  # ...then it fails before the version is bumped

    monkeypatch.setitem(schema.MIGRATIONS, 1, half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        RegistryStore(registry_db_url)
    assert _schema_version(registry_db_url) == 1
    assert _layout(registry_db_url) == before  # DDL is transactional on both databases
    monkeypatch.undo()
    store = RegistryStore(registry_db_url)  # and the real migration still succeeds afterwards
    assert store.migrated_from == 1 and [v["version"] for v in store.list_versions("gpt")] == [1, 2]
    store.close()


def test_newer_and_damaged_databases_are_refused(registry_db_url):
    RegistryStore(registry_db_url).close()
    engine = create_engine(registry_db_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE schema_info SET version = {SCHEMA_VERSION + 1}"))
    with pytest.raises(RegistrySchemaError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this Temper build.*upgrade Temper"):
        RegistryStore(registry_db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_info SET version = 0"))
    with pytest.raises(RegistrySchemaError, match="schema version 0, which no migration of this build starts from"):
        RegistryStore(registry_db_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE schema_info SET version = {SCHEMA_VERSION}"))
        conn.execute(text("DROP TABLE params"))
    with pytest.raises(RegistrySchemaError, match=rf"says schema version {SCHEMA_VERSION} but table params is missing"):
        RegistryStore(registry_db_url)
    engine.dispose()


def test_version_like_aliases_of_v1_stay_usable_but_no_new_ones(registry_db_url):
    """v1 allowed an alias such as `v2`; v2 refuses new ones (they read as version numbers, and
    MLflow reserves them) but can still read, roll back and remove the old ones."""
    _write_v1_database(registry_db_url)
    engine = create_engine(registry_db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE aliases SET alias = 'v2'"))
        conn.execute(text("UPDATE alias_history SET alias = 'v2'"))
    engine.dispose()
    store = RegistryStore(registry_db_url)
    try:
        assert store.aliases("gpt") == {"v2": 2}
        assert store.as_of("gpt", "v2", T0 + timedelta(minutes=5))["version"] == 2
        with pytest.raises(ValueError, match="alias 'v3' is reserved"):
            store.set_alias("gpt", "v3", 1)
        assert store.rollback_alias("gpt", "v2")["version"] == 1
        assert store.remove_alias("gpt", "v2")["from_version"] == 1
    finally:
        store.close()
