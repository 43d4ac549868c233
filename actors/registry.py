"""The model registry: versions, metrics, lineage and aliases of models, persisted in SQL.

Two layers, read top to bottom:

- `RegistryStore`: the persistence layer. Plain synchronous SQLAlchemy Core over any SQL
  database (a SQLite file by default, Postgres on clusters). Every write method runs in one
  transaction that is committed before it returns. It knows nothing about Ray, so it is
  tested directly (tests/unit/test_registry_store.py).
- `ModelRegistry`: a named, detached, async Ray actor owning one store. It holds locations
  and metadata only, never weights; everything lives in the database, so killing or
  restarting the actor (or the cluster) loses nothing.

`get_or_create_registry(cfg)` is how drivers reach it; callers then use
`ray.get(handle.method.remote(...))`.

Version numbers are issued here (max + 1 per model, starting at 1), never derived from
timestamps, so re-running a pipeline is reproducible. A version reference ("ref") is a
version number (int or numeric string), an alias name, or "latest" (the highest number).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import numbers
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import ray
from sqlalchemy import (
    Column,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from app.config import RegistryConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Version of the table layout below; a database carrying another number is refused."""

TRANSFORMATIONS = ("trained", "quantized", "pruned", "distilled", "tuned", "imported")
"""How a version was produced from its parent (or from nothing, for `trained`/`imported`)."""

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
FORMAT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # torch_fp32, torch_int8, onnx_fp32, onnx_int8, ...
_URI_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_KEY_LEN = 128

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite connection waits for another writer's lock before failing."""
ACTOR_START_TIMEOUT_S = 120.0
"""How long `get_or_create_registry` waits for the actor to answer its first call."""


class RegistryNotFound(LookupError):
    """A model, version or alias that the registry does not have; the message names it."""


class RegistrySchemaError(RuntimeError):
    """The database was written with another registry schema version than this code expects."""


# ----------------------------------------------------------------------------- schema

metadata = MetaData()

schema_info_table = Table(
    "schema_info", metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)

models_table = Table(
    "models", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

versions_table = Table(
    "versions", metadata,
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
    UniqueConstraint("model_id", "version", name="uq_versions_model_version"),
)

metrics_table = Table(
    "metrics", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version_id", Integer, ForeignKey("versions.id"), nullable=False),
    Column("key", String(_MAX_KEY_LEN), nullable=False),
    Column("value", Double, nullable=False),
    Column("step", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_metrics_version_key", "version_id", "key"),
)

aliases_table = Table(
    "aliases", metadata,
    Column("model_id", Integer, ForeignKey("models.id"), primary_key=True),
    Column("alias", String(64), primary_key=True),  # primary key (model_id, alias) = unique
    Column("version_id", Integer, ForeignKey("versions.id"), nullable=False),
)

alias_history_table = Table(
    "alias_history", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
    Column("alias", String(64), nullable=False),
    Column("from_version_id", Integer, ForeignKey("versions.id"), nullable=True),
    Column("to_version_id", Integer, ForeignKey("versions.id"), nullable=False),
    Column("reason", Text, nullable=False),
    Column("actor", String(_MAX_KEY_LEN), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


# ----------------------------------------------------------------------------- validation


def _check_model_name(name: Any) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        raise ValueError(f"model name {name!r} is invalid: it must match {MODEL_NAME_RE.pattern}")
    return name


def _check_alias(alias: Any) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias):
        raise ValueError(
            f"alias {alias!r} is invalid: it must match {ALIAS_RE.pattern} "
            "(start with a letter, so it never looks like a version number)"
        )
    if alias.lower() == "latest":
        raise ValueError(f"alias {alias!r} is reserved: 'latest' always means the highest version number")
    return alias


def _check_text(field: str, value: Any, *, max_len: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > max_len:
        kind = "string" if allow_empty else "non-empty string"
        raise ValueError(f"{field} must be a {kind} of at most {max_len} characters, got {value!r}")
    return value


def _check_metrics(values: Any) -> dict[str, float]:
    """Metric keys are short strings; values must be finite real numbers (NaN/inf refused)."""
    if not isinstance(values, dict):
        raise ValueError(f"metrics must be a dict of name -> number, got {type(values).__name__}")
    out: dict[str, float] = {}
    for key, value in values.items():
        _check_text("metric name", key, max_len=_MAX_KEY_LEN)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"metric {key!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"metric {key!r} must be finite, got {value}")
        out[key] = value
    return out


def _check_step(step: Any) -> int | None:
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"metric step must be a non-negative int or None, got {step!r}")
    return step


def _check_artifact_uri(uri: Any) -> str:
    # The registry is read by other processes on other nodes, with other working directories,
    # so a relative path would point somewhere else for each reader.
    _check_text("artifact_uri", uri, max_len=4096)
    if not (_URI_SCHEME_RE.match(uri) or Path(uri).is_absolute()):
        raise ValueError(f"artifact_uri {uri!r} must be an absolute path or a URI such as s3://bucket/key")
    return uri


def _check_tags(tags: Any) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise ValueError(f"tags must be a dict of str -> str, got {type(tags).__name__}")
    for key, value in tags.items():
        _check_text("tag name", key, max_len=_MAX_KEY_LEN)
        if not isinstance(value, str):
            raise ValueError(f"tag {key!r} must have a string value, got {value!r}")
    return dict(tags)


def _config_json(config: Any) -> str | None:
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict (the resolved job config), got {type(config).__name__}")
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config is not JSON-serializable: {err}") from None


def _hash_config_json(blob: str) -> str:
    """Same recipe as `app.config.config_hash` (sha256 of sorted compact JSON, 16 hex chars)."""
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(ts: datetime) -> str:
    # SQLite hands back naive datetimes; everything is written in UTC.
    return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).isoformat()


def _display_url(url: str) -> str:
    """The URL with any password masked, for messages and for comparing databases."""
    return make_url(url).render_as_string(hide_password=True)


# ----------------------------------------------------------------------------- store


class RegistryStore:
    """Synchronous persistence of the registry in one SQL database (no Ray involved).

    Methods take and return plain JSON-able values. Unknown models, versions or aliases raise
    `RegistryNotFound`; invalid input raises `ValueError` naming the field and value.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = _create_engine(url)
        self._open_schema()

    def close(self) -> None:
        self._engine.dispose()

    # ---- transactions

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        # SQLite: BEGIN IMMEDIATE takes the write lock up front, so "max + 1" cannot race with
        # another writer. Other databases: the model row is locked FOR UPDATE (see below).
        with self._engine.connect() as conn:
            conn.execution_options(temper_sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    def _open_schema(self) -> None:
        ours = set(metadata.tables)
        with self._write() as conn:
            existing = set(inspect(conn).get_table_names())
            if "schema_info" in existing:
                found = conn.execute(select(schema_info_table.c.version)).scalars().all()
                if found != [SCHEMA_VERSION]:
                    shown = ", ".join(map(str, found)) or "none"
                    raise RegistrySchemaError(
                        f"registry database {_display_url(self.url)} has schema version {shown}, but this "
                        f"Temper build expects schema version {SCHEMA_VERSION}; use a Temper build that "
                        "matches the database, or point registry.db_url at another database"
                    )
            elif existing & ours:
                raise RegistrySchemaError(
                    f"registry database {_display_url(self.url)} has tables {sorted(existing & ours)} but no "
                    f"schema_info table (expected schema version {SCHEMA_VERSION}); it was not written by "
                    "this registry, point registry.db_url at another database"
                )
            metadata.create_all(conn)
            if "schema_info" not in existing:
                conn.execute(insert(schema_info_table).values(id=1, version=SCHEMA_VERSION))

    # ---- lookups (inside a transaction)

    def _model_id(self, conn: Connection, name: str, *, lock: bool = False) -> int:
        _check_model_name(name)
        query = select(models_table.c.id).where(models_table.c.name == name)
        row = conn.execute(query.with_for_update() if lock else query).first()
        if row is None:
            known = conn.execute(select(models_table.c.name).order_by(models_table.c.name).limit(20)).scalars().all()
            raise RegistryNotFound(f"no model named {name!r} in the registry (models: {', '.join(known) or 'none'})")
        return row.id

    def _get_or_create_model(self, conn: Connection, name: str) -> int:
        """The id of model `name`, created if new, its row locked until the transaction ends."""
        query = select(models_table.c.id).where(models_table.c.name == name).with_for_update()
        row = conn.execute(query).first()
        if row is not None:
            return row.id
        try:
            with conn.begin_nested():
                return conn.execute(insert(models_table).values(name=name, created_at=_now())).inserted_primary_key[0]
        except IntegrityError:  # another writer created it meanwhile (Postgres; SQLite's write lock excludes this)
            return conn.execute(query).scalar_one()

    def _resolve(self, conn: Connection, model: str, ref: int | str) -> tuple[int, int]:
        """(model_id, versions.id) of `ref` in `model`: a number, a numeric string, an alias or 'latest'."""
        model_id = self._model_id(conn, model)
        if isinstance(ref, str) and re.fullmatch(r"[0-9]+", ref):
            ref = int(ref)
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise ValueError(f"version ref must be a version number, an alias or 'latest', got {ref!r}")
        if isinstance(ref, int):
            row = conn.execute(
                select(versions_table.c.id)
                .where(versions_table.c.model_id == model_id, versions_table.c.version == ref)
            ).first()
            if row is None:
                top = _max_version(conn, model_id)
                have = f"versions 1..{top}" if top else "no versions yet"
                raise RegistryNotFound(f"model {model!r} has no version {ref} ({have})")
            return model_id, row.id
        if ref == "latest":
            row = conn.execute(
                select(versions_table.c.id).where(versions_table.c.model_id == model_id)
                .order_by(versions_table.c.version.desc()).limit(1)
            ).first()
            if row is None:
                raise RegistryNotFound(f"model {model!r} has no versions yet, so 'latest' points nowhere")
            return model_id, row.id
        row = conn.execute(
            select(aliases_table.c.version_id)
            .where(aliases_table.c.model_id == model_id, aliases_table.c.alias == ref)
        ).first()
        if row is None:
            known = conn.execute(
                select(aliases_table.c.alias)
                .where(aliases_table.c.model_id == model_id).order_by(aliases_table.c.alias)
            ).scalars().all()
            raise RegistryNotFound(f"model {model!r} has no alias {ref!r} (aliases: {', '.join(known) or 'none'})")
        return model_id, row.version_id

    def _version_numbers(self, conn: Connection, version_ids: set[int]) -> dict[int, int]:
        ids = {i for i in version_ids if i is not None}
        if not ids:
            return {}
        rows = conn.execute(
            select(versions_table.c.id, versions_table.c.version).where(versions_table.c.id.in_(ids))
        )
        return {r.id: r.version for r in rows}

    def _records(self, conn: Connection, version_ids: list[int]) -> list[dict]:
        """Version records for `version_ids` (in that order), built with a fixed number of queries."""
        if not version_ids:
            return []
        rows = {
            r.id: r for r in conn.execute(
                select(versions_table, models_table.c.name.label("model_name"))
                .join(models_table, models_table.c.id == versions_table.c.model_id)
                .where(versions_table.c.id.in_(version_ids))
            )
        }
        latest: dict[int, dict[str, float]] = {i: {} for i in version_ids}
        for m in conn.execute(
            select(metrics_table.c.version_id, metrics_table.c.key, metrics_table.c.value)
            .where(metrics_table.c.version_id.in_(version_ids)).order_by(metrics_table.c.id)
        ):
            latest[m.version_id][m.key] = m.value  # later rows overwrite: the last logged value wins
        pointing: dict[int, list[str]] = {i: [] for i in version_ids}
        for a in conn.execute(
            select(aliases_table.c.version_id, aliases_table.c.alias)
            .where(aliases_table.c.version_id.in_(version_ids)).order_by(aliases_table.c.alias)
        ):
            pointing[a.version_id].append(a.alias)
        parent_ids = {r.parent_version_id for r in rows.values() if r.parent_version_id is not None}
        parents = {
            p.id: {"model": p.name, "version": p.version} for p in conn.execute(
                select(versions_table.c.id, versions_table.c.version, models_table.c.name)
                .join(models_table, models_table.c.id == versions_table.c.model_id)
                .where(versions_table.c.id.in_(parent_ids))
            )
        } if parent_ids else {}
        out = []
        for vid in version_ids:
            r = rows[vid]
            out.append({
                "model": r.model_name,
                "version": r.version,
                "artifact_uri": r.artifact_uri,
                "format": r.format,
                "config_hash": r.config_hash,
                "config": json.loads(r.config_json) if r.config_json is not None else None,
                "metrics": latest[vid],
                "parent": parents.get(r.parent_version_id),
                "transformation": r.transformation,
                "tags": json.loads(r.tags_json),
                "aliases": pointing[vid],
                "created_at": _iso(r.created_at),
            })
        return out

    # ---- public API

    def register_version(
        self,
        model: str,
        artifact_uri: str,
        format: str,
        *,
        config: dict | None = None,
        config_hash: str | None = None,
        metrics: dict[str, float] | None = None,
        parent: dict | None = None,
        transformation: str = "trained",
        tags: dict[str, str] | None = None,
    ) -> dict:
        """Add the next version of `model` (creating the model on first use); returns its record.

        `parent` is `{"model": name, "version": ref}` of the version this one was derived from
        (it must exist). `config_hash` defaults to the hash of `config` when only that is given.
        """
        _check_model_name(model)
        _check_artifact_uri(artifact_uri)
        if not isinstance(format, str) or not FORMAT_RE.fullmatch(format):
            raise ValueError(f"format {format!r} is invalid: it must match {FORMAT_RE.pattern} (e.g. torch_int8)")
        if transformation not in TRANSFORMATIONS:
            raise ValueError(f"transformation {transformation!r} is not one of {list(TRANSFORMATIONS)}")
        config_blob = _config_json(config)
        if config_hash is None and config_blob is not None:
            config_hash = _hash_config_json(config_blob)
        if config_hash is not None:
            _check_text("config_hash", config_hash, max_len=128)
        values = _check_metrics(metrics or {})
        tags = _check_tags(tags)
        if parent is not None and (not isinstance(parent, dict) or set(parent) != {"model", "version"}):
            raise ValueError(f"parent must be {{'model': name, 'version': number}}, got {parent!r}")

        with self._write() as conn:
            parent_id = None
            if parent is not None:
                try:
                    _, parent_id = self._resolve(conn, parent["model"], parent["version"])
                except RegistryNotFound as err:
                    raise ValueError(f"parent {parent!r} does not exist: {err}") from None
            model_id = self._get_or_create_model(conn, model)  # locks the model row: numbers are issued one at a time
            top = _max_version(conn, model_id)
            now = _now()
            version_id = conn.execute(insert(versions_table).values(
                model_id=model_id, version=(top or 0) + 1, artifact_uri=artifact_uri, format=format,
                config_hash=config_hash, config_json=config_blob, parent_version_id=parent_id,
                transformation=transformation, tags_json=json.dumps(tags, sort_keys=True), created_at=now,
            )).inserted_primary_key[0]
            if values:
                conn.execute(insert(metrics_table), [
                    {"version_id": version_id, "key": k, "value": v, "step": None, "created_at": now}
                    for k, v in values.items()
                ])
            return self._records(conn, [version_id])[0]

    def log_metrics(self, model: str, version: int | str, metrics: dict[str, float], step: int | None = None) -> int:
        """Append metric values to a version; returns the number of rows written."""
        values = _check_metrics(metrics)
        _check_step(step)
        if not values:
            return 0
        with self._write() as conn:
            _, version_id = self._resolve(conn, model, version)
            now = _now()
            conn.execute(insert(metrics_table), [
                {"version_id": version_id, "key": k, "value": v, "step": step, "created_at": now}
                for k, v in values.items()
            ])
        return len(values)

    def get_version(self, model: str, ref: int | str) -> dict:
        """The record of version `ref` (number, numeric string, alias or 'latest') of `model`."""
        with self._read() as conn:
            _, version_id = self._resolve(conn, model, ref)
            return self._records(conn, [version_id])[0]

    def list_versions(self, model: str) -> list[dict]:
        """All version records of `model`, oldest (version 1) first."""
        with self._read() as conn:
            model_id = self._model_id(conn, model)
            ids = conn.execute(
                select(versions_table.c.id)
                .where(versions_table.c.model_id == model_id).order_by(versions_table.c.version)
            ).scalars().all()
            return self._records(conn, list(ids))

    def list_models(self) -> list[dict]:
        """One summary per model, by name: {name, versions (count), latest, aliases, created_at}."""
        with self._read() as conn:
            counts = {
                r.model_id: (r.n, r.top) for r in conn.execute(
                    select(
                        versions_table.c.model_id,
                        func.count().label("n"),
                        func.max(versions_table.c.version).label("top"),
                    )
                    .group_by(versions_table.c.model_id)
                )
            }
            by_model: dict[int, dict[str, int]] = {}
            for a in conn.execute(
                select(aliases_table.c.model_id, aliases_table.c.alias, versions_table.c.version)
                .join(versions_table, versions_table.c.id == aliases_table.c.version_id)
                .order_by(aliases_table.c.alias)
            ):
                by_model.setdefault(a.model_id, {})[a.alias] = a.version
            return [
                {
                    "name": m.name,
                    "versions": counts.get(m.id, (0, None))[0],
                    "latest": counts.get(m.id, (0, None))[1],
                    "aliases": by_model.get(m.id, {}),
                    "created_at": _iso(m.created_at),
                }
                for m in conn.execute(select(models_table).order_by(models_table.c.name))
            ]

    def set_alias(self, model: str, alias: str, version: int | str, reason: str = "", actor: str = "cli") -> dict:
        """Point `alias` at version `version` (a ref), creating or moving it, and record the change.

        Returns {model, alias, version, from_version, changed}. Pointing an alias where it already
        points changes nothing and writes no history row.
        """
        _check_alias(alias)
        _check_text("reason", reason, max_len=10_000, allow_empty=True)
        _check_text("actor", actor, max_len=_MAX_KEY_LEN)
        with self._write() as conn:
            model_id, to_id = self._resolve(conn, model, version)
            current = conn.execute(
                select(aliases_table.c.version_id)
                .where(aliases_table.c.model_id == model_id, aliases_table.c.alias == alias)
            ).first()
            from_id = current.version_id if current else None
            if from_id is None:
                conn.execute(insert(aliases_table).values(model_id=model_id, alias=alias, version_id=to_id))
            elif from_id != to_id:
                conn.execute(
                    update(aliases_table).where(aliases_table.c.model_id == model_id, aliases_table.c.alias == alias)
                    .values(version_id=to_id)
                )
            changed = from_id != to_id
            if changed:
                conn.execute(insert(alias_history_table).values(
                    model_id=model_id, alias=alias, from_version_id=from_id, to_version_id=to_id,
                    reason=reason, actor=actor, created_at=_now(),
                ))
            number_of = self._version_numbers(conn, {from_id, to_id})
            return {
                "model": model, "alias": alias, "version": number_of[to_id],
                "from_version": number_of.get(from_id), "changed": changed,
            }

    def aliases(self, model: str) -> dict[str, int]:
        """{alias: version number} of `model`, sorted by alias."""
        with self._read() as conn:
            model_id = self._model_id(conn, model)
            rows = conn.execute(
                select(aliases_table.c.alias, versions_table.c.version)
                .join(versions_table, versions_table.c.id == aliases_table.c.version_id)
                .where(aliases_table.c.model_id == model_id).order_by(aliases_table.c.alias)
            )
            return {r.alias: r.version for r in rows}

    def alias_history(self, model: str, alias: str | None = None) -> list[dict]:
        """Alias changes of `model` (optionally one alias), oldest first."""
        with self._read() as conn:
            model_id = self._model_id(conn, model)
            query = select(alias_history_table).where(alias_history_table.c.model_id == model_id)
            if alias is not None:
                query = query.where(alias_history_table.c.alias == alias)
            rows = conn.execute(query.order_by(alias_history_table.c.id)).all()
            if alias is not None and not rows:
                raise RegistryNotFound(f"model {model!r} has never had an alias {alias!r}")
            number_of = self._version_numbers(
                conn, {r.from_version_id for r in rows} | {r.to_version_id for r in rows}
            )
            return [
                {
                    "model": model, "alias": r.alias,
                    "from_version": number_of.get(r.from_version_id), "to_version": number_of[r.to_version_id],
                    "reason": r.reason, "actor": r.actor, "created_at": _iso(r.created_at),
                }
                for r in rows
            ]


def _max_version(conn: Connection, model_id: int) -> int | None:
    return conn.execute(
        select(func.max(versions_table.c.version)).where(versions_table.c.model_id == model_id)
    ).scalar()


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)

    database = parsed.database or ":memory:"
    in_memory = database == ":memory:" or "mode=memory" in database
    if not in_memory and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        parsed,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        # One shared connection keeps an in-memory database alive between transactions.
        **({"poolclass": StaticPool} if in_memory else {}),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin (see `_on_begin`);
        # the documented recipe for correct SQLite transactions with pysqlite.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, and vice versa
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('temper_sqlite_begin', 'DEFERRED')}")

    return engine


# ----------------------------------------------------------------------------- actor

# Writes are not idempotent (a retried register_version would issue a second version number,
# a retried log_metrics or set_alias would write duplicate rows), so the actor's default is
# no task retries; only the read-only methods below retry across an actor restart.
_READ_RETRIES = 3


@ray.remote
class ModelRegistry:
    """The registry as a named, detached, async Ray actor around one `RegistryStore`.

    Database calls run on one dedicated thread: they are serialized (SQLite has one writer
    anyway) and never block the event loop, so `ping` answers while a slow query runs.
    """

    def __init__(self, db_url: str) -> None:
        self._store = RegistryStore(db_url)
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-db")
        log.info("ModelRegistry open on %s (schema version %d)", _display_url(db_url), SCHEMA_VERSION)

    async def _call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, functools.partial(fn, *args, **kwargs))

    @ray.method(max_task_retries=_READ_RETRIES)
    async def ping(self) -> str:
        return "ok"

    @ray.method(max_task_retries=_READ_RETRIES)
    async def db_url(self) -> str:
        """The database URL, password masked."""
        return _display_url(self._store.url)

    async def register_version(
        self,
        model: str,
        artifact_uri: str,
        format: str,
        *,
        config: dict | None = None,
        config_hash: str | None = None,
        metrics: dict[str, float] | None = None,
        parent: dict | None = None,
        transformation: str = "trained",
        tags: dict[str, str] | None = None,
    ) -> dict:
        return await self._call(
            self._store.register_version, model, artifact_uri, format, config=config, config_hash=config_hash,
            metrics=metrics, parent=parent, transformation=transformation, tags=tags,
        )

    async def log_metrics(
        self, model: str, version: int | str, metrics: dict[str, float], step: int | None = None
    ) -> int:
        return await self._call(self._store.log_metrics, model, version, metrics, step)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def get_version(self, model: str, ref: int | str) -> dict:
        return await self._call(self._store.get_version, model, ref)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def list_versions(self, model: str) -> list[dict]:
        return await self._call(self._store.list_versions, model)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def list_models(self) -> list[dict]:
        return await self._call(self._store.list_models)

    async def set_alias(
        self, model: str, alias: str, version: int | str, reason: str = "", actor: str = "cli"
    ) -> dict:
        return await self._call(self._store.set_alias, model, alias, version, reason, actor)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def aliases(self, model: str) -> dict[str, int]:
        return await self._call(self._store.aliases, model)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def alias_history(self, model: str, alias: str | None = None) -> list[dict]:
        return await self._call(self._store.alias_history, model, alias)


def resolve_db_url(db_url: str, cwd: str | Path | None = None) -> str:
    """`db_url` with a relative SQLite path made absolute against `cwd` (default: this process's).

    The actor runs with another working directory, so it must receive an absolute path. An
    in-memory SQLite database is refused: it would vanish with the actor.
    """
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite":
        return db_url
    database = url.database or ""
    if database in ("", ":memory:") or "mode=memory" in database:
        raise ValueError(
            f"registry.db_url {db_url!r} is an in-memory SQLite database, which would vanish with the "
            "actor; the registry needs a file (sqlite:///path.db)"
        )
    if database.startswith("file:"):
        return db_url
    path = Path(database).expanduser()
    if not path.is_absolute():
        path = Path(cwd) / path if cwd is not None else Path.cwd() / path
    return url.set(database=str(path)).render_as_string(hide_password=False)


def get_or_create_registry(cfg: RegistryConfig) -> ActorHandle:
    """The registry actor named `cfg.actor_name` in `cfg.namespace`, started if absent.

    Needs Ray initialized. Raises ValueError when an actor of that name already serves another
    database than `cfg.db_url`.
    """
    if not ray.is_initialized():
        raise RuntimeError("get_or_create_registry needs Ray: call ray.init() first")
    url = resolve_db_url(cfg.db_url)
    options: dict[str, Any] = dict(
        name=cfg.actor_name,
        namespace=cfg.namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,  # writes are not idempotent; reads retry per method (see _READ_RETRIES)
        num_cpus=0,
    )
    if make_url(url).get_backend_name() == "sqlite":
        # A SQLite file lives on this machine's disk: keep the actor (and its restarts) on this node.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=False
        )
    handle = ModelRegistry.options(**options).remote(url)
    where = f"registry actor {cfg.actor_name!r} (namespace {cfg.namespace!r}) on {_display_url(url)}"
    try:
        actual = ray.get(handle.db_url.remote(), timeout=ACTOR_START_TIMEOUT_S)
    except ray.exceptions.RayActorError as err:  # e.g. its __init__ refused the database
        raise RuntimeError(f"{where} failed to start: {err}") from err
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"{where} did not answer within {ACTOR_START_TIMEOUT_S:.0f}s") from None
    if actual != _display_url(url):
        raise ValueError(
            f"registry actor {cfg.actor_name!r} (namespace {cfg.namespace!r}) already runs on database "
            f"{actual}, not {_display_url(url)} (registry.db_url); use another registry.actor_name "
            "or the same registry.db_url"
        )
    return handle
