"""`RegistryStore`: the registry's versions, metrics, params, lineage and aliases in one SQL database.

Plain synchronous SQLAlchemy Core over any SQL database (a SQLite file by default, PostgreSQL
on clusters), without Ray: the actor (actors/registry/actor.py) wraps one store, and read-only
commands open one directly (`actors.registry.client.open_store`). Every write method runs in
one transaction that is committed before it returns. The module is over 500 lines and still one
idea: each method is a transaction over the same tables, built on the same ref resolution and
record assembly (`_resolve`, `_records`), which splitting reads from writes would tear apart.

Version numbers are issued here (max + 1 per model, starting at 1, never reused even after a
delete), never derived from timestamps, so re-running a pipeline is reproducible. A version
reference ("ref") is a version number (int or numeric string), an alias name, or "latest"
(the highest number that is not deleted).

Aliases move; every move is a row in the alias history (who, from which version, to which,
when, why, and how: set / rollback / remove / delete), so `as_of(model, alias, time)` answers
which version an alias pointed at at any moment, and `rollback_alias` undoes moves one by one.
Deleting a version is a soft delete: the row stays (children keep their lineage, numbers are
not reused) but it disappears from lists and refs; it is refused while an alias points at it
unless forced, and a forced delete removes those aliases through the history.

Who did what: every mutation may carry a `Principal` (app/auth/identity.py). A store opened
with `auth_enabled` checks it against the permissions table (actors/registry/permissions.py)
before the write; either way each mutation appends an audit row (principal, operation, target,
before, after) in the same transaction as the change, and a refused attempt appends a `refused`
row in a transaction of its own before PermissionDenied is raised. Without a principal the row
says "anonymous". API keys live here too, stored only as HMAC hashes (app/auth/api_keys.py).

The tables and their migrations are in actors/registry/schema.py.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from actors.registry.errors import RegistryConflict, RegistryNotFound
from actors.registry.permissions import alias_operation, check
from actors.registry.schema import (
    ALIAS_ACTIONS,
    AUDIT_RESULTS,
    MAX_KEY_LEN,
    SCHEMA_VERSION,
    alias_history_table,
    aliases_table,
    api_keys_table,
    audit_log_table,
    metrics_table,
    models_table,
    open_schema,
    params_table,
    versions_table,
)
from actors.registry.validation import (
    WHERE_OPS,
    check_alias,
    check_artifact_uri,
    check_format,
    check_label,
    check_metrics,
    check_model_name,
    check_params,
    check_parent,
    check_step,
    check_tags,
    check_text,
    check_transformation,
    config_json,
    flatten_dict,
    parse_time,
    parse_where,
)
from app.artifact_roots import check_under_roots
from app.auth import api_keys
from app.auth.identity import ANONYMOUS, ROLES, AuthError, PermissionDenied, Principal
from app.config.base import tree_hash
from app.config.registry import mask_url_password

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite connection waits for another writer's lock before failing."""

_KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(ts: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything is written in UTC.
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else _utc(ts).isoformat()


def mask_password(url: str) -> str:
    """`url` (a database, tracking or any other URL) with its password shown as `***`.

    Used for every message and log line that names a URL, and to compare databases without
    sending a password around.
    """
    return mask_url_password(url)


@dataclass(frozen=True)
class MetricWrite:
    """One `log_metrics` call, validated: rows of (key, value, step) for version `ref` of `model`."""

    model: str
    ref: int | str
    rows: tuple[tuple[str, float, int | None], ...]

    @classmethod
    def single(cls, model: str, ref: int | str, metrics: dict, step: int | None) -> "MetricWrite":
        values = check_metrics(metrics)
        check_step(step)
        return cls(check_model_name(model), ref, tuple((k, v, step) for k, v in values.items()))

    @classmethod
    def batch(cls, model: str, ref: int | str, points: Any) -> "MetricWrite":
        """`points`: [{"metrics": {...}, "step": n}, ...], e.g. a training curve sent at once."""
        if not isinstance(points, (list, tuple)):
            raise ValueError(f"points must be a list of {{'metrics': {{...}}, 'step': n}}, got {type(points).__name__}")
        rows = []
        for i, point in enumerate(points):
            if not isinstance(point, dict) or "metrics" not in point or set(point) - {"metrics", "step"}:
                raise ValueError(f"points[{i}] must be {{'metrics': {{...}}, 'step': n}}, got {point!r}")
            rows += cls.single(model, ref, point["metrics"], point.get("step")).rows
        return cls(check_model_name(model), ref, tuple(rows))


class RegistryStore:
    """Synchronous persistence of the registry in one SQL database (no Ray involved).

    Methods take and return plain JSON-able values. Unknown models, versions or aliases raise
    `RegistryNotFound`; invalid input raises `ValueError` naming the field and value; a write
    the current state forbids raises `RegistryConflict`.
    """

    def __init__(self, url: str, *, key_secret: bytes | None = None, auth_enabled: bool = False,
                 artifact_roots: list[str] | tuple[str, ...] = ()) -> None:
        """`key_secret`: the server secret API keys are hashed with (needed to create or check
        keys); `auth_enabled`: refuse mutations the caller's principal may not perform;
        `artifact_roots` (normalized, see app.artifact_roots): where registered artifacts must lie."""
        self.url = url
        self.artifact_roots = tuple(artifact_roots)
        self.key_secret = None if key_secret is None else api_keys.check_server_secret(key_secret, "key_secret")
        self.auth_enabled = auth_enabled
        self._engine = _create_engine(url)
        with self._write() as conn:
            self.migrated_from = open_schema(conn, mask_password(url))
        if self.migrated_from is not None:
            log.warning("registry database %s migrated from schema v%d to v%d",
                        mask_password(url), self.migrated_from, SCHEMA_VERSION)

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
        # another writer. Other databases: the model row is locked FOR UPDATE (see `_model_id`).
        with self._engine.connect() as conn:
            conn.execution_options(temper_sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    # ---- lookups (inside a transaction)

    def _model_id(self, conn: Connection, name: str, *, lock: bool = False) -> int:
        """The model's id; `lock` holds its row until the transaction ends (serializes writers per model)."""
        check_model_name(name)
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

    def _resolve(
        self, conn: Connection, model: str, ref: int | str, *, include_deleted: bool = False, lock: bool = False
    ) -> tuple[int, int]:
        """(model_id, versions.id) of `ref` in `model`: a number, a numeric string, an alias or 'latest'.

        A deleted version is not found (the message says it was deleted) unless `include_deleted`.
        """
        model_id = self._model_id(conn, model, lock=lock)
        if isinstance(ref, str) and re.fullmatch(r"[0-9]+", ref):
            ref = int(ref)
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise ValueError(f"version ref must be a version number, an alias or 'latest', got {ref!r}")
        v = versions_table.c
        if isinstance(ref, int):
            row = None  # a number outside SQL's 64-bit integers is no version's (the driver would raise OverflowError)
            if -2**63 <= ref < 2**63:
                row = conn.execute(
                    select(v.id, v.deleted_at, v.deleted_by, v.deleted_reason)
                    .where(v.model_id == model_id, v.version == ref)
                ).first()
            if row is None:
                top = _max_version(conn, model_id)
                have = f"versions 1..{top}" if top else "no versions yet"
                raise RegistryNotFound(f"model {model!r} has no version {ref} ({have})")
            if row.deleted_at is not None and not include_deleted:
                raise RegistryNotFound(
                    f"version {ref} of model {model!r} was deleted at {_iso(row.deleted_at)} by {row.deleted_by}"
                    + (f" ({row.deleted_reason})" if row.deleted_reason else "")
                )
            return model_id, row.id
        if ref == "latest":
            row = conn.execute(
                select(v.id).where(v.model_id == model_id, v.deleted_at.is_(None)).order_by(v.version.desc()).limit(1)
            ).first()
            if row is None:
                raise RegistryNotFound(f"model {model!r} has no versions (all deleted), so 'latest' points nowhere")
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
        return model_id, row.version_id  # aliases never point at deleted versions (delete removes them)

    def _version_numbers(self, conn: Connection, version_ids: set[int | None]) -> dict[int, int]:
        ids = {i for i in version_ids if i is not None}
        if not ids:
            return {}
        rows = conn.execute(
            select(versions_table.c.id, versions_table.c.version).where(versions_table.c.id.in_(ids))
        )
        return {r.id: r.version for r in rows}

    def _latest_metrics(self, conn: Connection, version_ids: list[int]) -> dict[int, dict[str, float]]:
        """{version id: {key: last logged value}} with one query (the newest row per key wins)."""
        m = metrics_table.c
        newest = (
            select(func.max(m.id)).where(m.version_id.in_(version_ids)).group_by(m.version_id, m.key)
        ).scalar_subquery()
        latest: dict[int, dict[str, float]] = {i: {} for i in version_ids}
        for r in conn.execute(select(m.version_id, m.key, m.value).where(m.id.in_(newest)).order_by(m.key)):
            latest[r.version_id][r.key] = r.value
        return latest

    def _records(self, conn: Connection, version_ids: list[int]) -> list[dict]:
        """Version records for `version_ids` (in that order), built with a fixed number of queries."""
        if not version_ids:
            return []
        unique_ids = list(dict.fromkeys(version_ids))
        rows = {
            r.id: r for r in conn.execute(
                select(versions_table, models_table.c.name.label("model_name"))
                .join(models_table, models_table.c.id == versions_table.c.model_id)
                .where(versions_table.c.id.in_(unique_ids))
            )
        }
        latest = self._latest_metrics(conn, unique_ids)
        params: dict[int, dict[str, Any]] = {i: {} for i in unique_ids}
        for p in conn.execute(
            select(params_table.c.version_id, params_table.c.key, params_table.c.value_json)
            .where(params_table.c.version_id.in_(unique_ids)).order_by(params_table.c.key)
        ):
            params[p.version_id][p.key] = json.loads(p.value_json)
        pointing: dict[int, list[str]] = {i: [] for i in unique_ids}
        for a in conn.execute(
            select(aliases_table.c.version_id, aliases_table.c.alias)
            .where(aliases_table.c.version_id.in_(unique_ids)).order_by(aliases_table.c.alias)
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
                "label": r.label,
                "artifact_uri": r.artifact_uri,
                "format": r.format,
                "config_hash": r.config_hash,
                "config": json.loads(r.config_json) if r.config_json is not None else None,
                "params": params[vid],
                "dataset_fingerprint": r.dataset_fingerprint,
                "metrics": latest[vid],
                "parent": parents.get(r.parent_version_id),
                "transformation": r.transformation,
                "tags": json.loads(r.tags_json),
                "aliases": pointing[vid],
                "created_at": _iso(r.created_at),
                "deleted": None if r.deleted_at is None else {
                    "at": _iso(r.deleted_at), "by": r.deleted_by, "reason": r.deleted_reason,
                    "forced": bool(r.deleted_forced),
                },
            })
        return out

    def _history_time(self, conn: Connection, model_id: int) -> datetime:
        """Now, or 1 µs after the model's last alias change if the clock says otherwise.

        Keeps each model's alias history strictly increasing in time (a clock step backwards or
        two changes within one microsecond), so `as_of` windows never overlap or swap.
        """
        now = _now()
        last = conn.execute(
            select(alias_history_table.c.created_at).where(alias_history_table.c.model_id == model_id)
            .order_by(alias_history_table.c.id.desc()).limit(1)
        ).scalar()
        return now if last is None or _utc(last) < now else _utc(last) + timedelta(microseconds=1)

    def _record_alias_change(
        self, conn: Connection, model_id: int, alias: str, from_id: int | None, to_id: int | None,
        action: str, reason: str, actor: str,
    ) -> datetime:
        assert action in ALIAS_ACTIONS, action
        at = self._history_time(conn, model_id)
        conn.execute(insert(alias_history_table).values(
            model_id=model_id, alias=alias, from_version_id=from_id, to_version_id=to_id,
            action=action, reason=reason, actor=actor, created_at=at,
        ))
        return at

    def _history_rows(self, conn: Connection, model_id: int, alias: str | None) -> list[Any]:
        query = select(alias_history_table).where(alias_history_table.c.model_id == model_id)
        if alias is not None:
            query = query.where(alias_history_table.c.alias == alias)
        return conn.execute(query.order_by(alias_history_table.c.id)).all()

    # ---- writes

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
        params: dict[str, Any] | None = None,
        dataset_fingerprint: str | None = None,
        label: str | None = None,
        principal: Principal | None = None,
        request_id: str | None = None,
    ) -> dict:
        """Add the next version of `model` (creating the model on first use); returns its record.

        `parent` is `{"model": name, "version": ref}` of the version this one was derived from
        (it must exist). `config_hash` defaults to the hash of `config` when only that is given.
        `params` are hyperparameters (flat name -> scalar); `dataset_fingerprint` identifies the
        data it was trained or evaluated on; `label` is an optional semantic name (e.g. 1.4.0),
        unique within the model.
        """
        check_model_name(model)
        check_artifact_uri(artifact_uri)
        check_under_roots(artifact_uri, self.artifact_roots)
        check_format(format)
        check_transformation(transformation)
        config_blob = config_json(config)
        if config_hash is None and config_blob is not None:
            config_hash = tree_hash(config)  # the recipe of `app.config.base.config_hash`
        if config_hash is not None:
            check_text("config_hash", config_hash, max_len=128)
        values = check_metrics(metrics or {})
        tags = check_tags(tags)
        params = check_params(params)
        if dataset_fingerprint is not None:
            check_text("dataset_fingerprint", dataset_fingerprint, max_len=MAX_KEY_LEN)
        check_label(label)
        check_parent(parent)
        self.authorize(principal, "register", model, model, request_id)

        with self._write() as conn:
            parent_id = None
            if parent is not None:
                try:
                    _, parent_id = self._resolve(conn, parent["model"], parent["version"])
                except RegistryNotFound as err:
                    raise ValueError(f"parent {parent!r} does not exist: {err}") from None
            model_id = self._get_or_create_model(conn, model)  # locks the model row: numbers are issued one at a time
            if label is not None:
                taken = conn.execute(
                    select(versions_table.c.version)
                    .where(versions_table.c.model_id == model_id, versions_table.c.label == label)
                ).scalar()
                if taken is not None:
                    raise RegistryConflict(f"label {label!r} is already version {taken} of model {model!r}")
            top = _max_version(conn, model_id)
            now = _now()
            version_id = conn.execute(insert(versions_table).values(
                model_id=model_id, version=(top or 0) + 1, artifact_uri=artifact_uri, format=format,
                config_hash=config_hash, config_json=config_blob, parent_version_id=parent_id,
                transformation=transformation, tags_json=json.dumps(tags, sort_keys=True), created_at=now,
                label=label, dataset_fingerprint=dataset_fingerprint,
            )).inserted_primary_key[0]
            if values:
                conn.execute(insert(metrics_table), [
                    {"version_id": version_id, "key": k, "value": v, "step": None, "created_at": now}
                    for k, v in values.items()
                ])
            if params:
                conn.execute(insert(params_table), [
                    {"version_id": version_id, "key": k, "value_json": json.dumps(v)} for k, v in params.items()
                ])
            record = self._records(conn, [version_id])[0]
            self._audit(conn, principal, "register", model, f"{model}/v{record['version']}", None,
                        {k: record[k] for k in ("version", "artifact_uri", "format", "transformation", "parent", "label")},
                        "allowed", "", request_id)
            return record

    def log_metric_writes(self, writes: list[MetricWrite]) -> list[int | Exception]:
        """Commit many `log_metrics` calls in one transaction (the actor's group commit).

        Returns, per write, the number of rows written or the `RegistryNotFound` / `ValueError`
        that refused it (a refused write adds nothing; the others still commit). Any other
        error aborts the transaction and propagates: then nothing of any write was written.
        """
        results: list[int | Exception] = []
        now = _now()
        with self._write() as conn:
            rows = []
            for w in writes:
                try:
                    _, version_id = self._resolve(conn, w.model, w.ref)
                except (RegistryNotFound, ValueError) as err:
                    results.append(err)
                    continue
                rows += [
                    {"version_id": version_id, "key": k, "value": v, "step": s, "created_at": now}
                    for k, v, s in w.rows
                ]
                results.append(len(w.rows))
            if rows:
                conn.execute(insert(metrics_table), rows)
        return results

    def log_metrics(
        self, model: str, version: int | str, metrics: dict[str, float], step: int | None = None,
        *, principal: Principal | None = None,
    ) -> int:
        """Append metric values (one step) to a version; returns the number of rows written.

        Checked as `register` when auth is enabled; only refusals are audited (a training curve
        would otherwise write an audit row per step).
        """
        self.authorize(principal, "register", model, f"{model}/{version}", None)
        return self._one_write(MetricWrite.single(model, version, metrics, step))

    def log_metrics_batch(
        self, model: str, version: int | str, points: list[dict], *, principal: Principal | None = None
    ) -> int:
        """Append many steps at once: `points` = [{"metrics": {...}, "step": n}, ...]; one transaction."""
        self.authorize(principal, "register", model, f"{model}/{version}", None)
        return self._one_write(MetricWrite.batch(model, version, points))

    def _one_write(self, write: MetricWrite) -> int:
        if not write.rows:
            return 0
        [result] = self.log_metric_writes([write])
        if isinstance(result, Exception):
            raise result
        return result

    def set_alias(
        self, model: str, alias: str, version: int | str, reason: str = "", actor: str = "cli",
        *, principal: Principal | None = None, request_id: str | None = None,
    ) -> dict:
        """Point `alias` at version `version` (a ref), creating or moving it, and record the change.

        Returns {model, alias, version, from_version, changed}. Pointing an alias where it already
        points changes nothing and writes no history row.
        """
        check_alias(alias, new=True)
        check_text("reason", reason, max_len=10_000, allow_empty=True)
        check_text("actor", actor, max_len=MAX_KEY_LEN)
        operation = alias_operation(alias)
        self.authorize(principal, operation, model, f"{model}@{alias}", request_id)
        with self._write() as conn:
            model_id, to_id = self._resolve(conn, model, version, lock=True)
            moved = self._move_alias(conn, model, model_id, alias, to_id, "set", reason, actor)
            self._audit_alias(conn, principal, operation, moved, reason, request_id)
            return moved

    def _move_alias(
        self, conn: Connection, model: str, model_id: int, alias: str, to_id: int, action: str, reason: str, actor: str
    ) -> dict:
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
            self._record_alias_change(conn, model_id, alias, from_id, to_id, action, reason, actor)
        number_of = self._version_numbers(conn, {from_id, to_id})
        return {
            "model": model, "alias": alias, "version": number_of[to_id],
            "from_version": number_of.get(from_id), "changed": changed,
        }

    def remove_alias(
        self, model: str, alias: str, reason: str = "", actor: str = "cli",
        *, principal: Principal | None = None, request_id: str | None = None,
    ) -> dict:
        """Remove `alias` (recorded in the history; `as_of` after this answers no version).

        Checked as moving the alias (`set_alias`, or `set_alias_production` for production).
        """
        check_alias(alias)
        check_text("reason", reason, max_len=10_000, allow_empty=True)
        check_text("actor", actor, max_len=MAX_KEY_LEN)
        operation = alias_operation(alias)
        self.authorize(principal, operation, model, f"{model}@{alias}", request_id)
        with self._write() as conn:
            model_id = self._model_id(conn, model, lock=True)
            from_id = conn.execute(
                select(aliases_table.c.version_id)
                .where(aliases_table.c.model_id == model_id, aliases_table.c.alias == alias)
            ).scalar()
            if from_id is None:
                raise RegistryNotFound(f"model {model!r} has no alias {alias!r} to remove")
            conn.execute(delete(aliases_table).where(aliases_table.c.model_id == model_id, aliases_table.c.alias == alias))
            self._record_alias_change(conn, model_id, alias, from_id, None, "remove", reason, actor)
            removed = {"model": model, "alias": alias, "version": None,
                       "from_version": self._version_numbers(conn, {from_id})[from_id], "changed": True}
            self._audit_alias(conn, principal, operation, removed, reason, request_id)
            return removed

    def rollback_alias(
        self, model: str, alias: str, reason: str = "", actor: str = "cli",
        *, principal: Principal | None = None, request_id: str | None = None,
    ) -> dict:
        """Move `alias` back to the version it pointed at before its current one; recorded as a rollback.

        Rollbacks undo moves one at a time (promote v1, v2, v3; rollback -> v2; rollback -> v1),
        like popping a stack; a removal is undone too (the removed holder comes back). Refused
        when there is no earlier holder, or when it was deleted since.
        """
        check_alias(alias)
        check_text("reason", reason, max_len=10_000, allow_empty=True)
        check_text("actor", actor, max_len=MAX_KEY_LEN)
        operation = alias_operation(alias, rollback=True)
        self.authorize(principal, operation, model, f"{model}@{alias}", request_id)
        with self._write() as conn:
            model_id = self._model_id(conn, model, lock=True)
            rows = self._history_rows(conn, model_id, alias)
            if not rows:
                raise RegistryNotFound(f"model {model!r} has never had an alias {alias!r}")
            stack = _holder_stack(rows)
            target = _rollback_target(stack)
            if target is None:
                raise RegistryConflict(
                    f"alias {alias!r} of model {model!r} has no earlier holder to roll back to "
                    "(it had only its current one, or every earlier move was rolled back already); set it explicitly"
                )
            target_row = conn.execute(
                select(versions_table.c.version, versions_table.c.deleted_at).where(versions_table.c.id == target)
            ).one()
            if target_row.deleted_at is not None:
                raise RegistryConflict(
                    f"cannot roll back alias {alias!r} of model {model!r} to version {target_row.version}: "
                    "it was deleted; set the alias explicitly"
                )
            moved = self._move_alias(conn, model, model_id, alias, target, "rollback", reason, actor)
            self._audit_alias(conn, principal, operation, moved, reason, request_id)
            return moved

    def delete_version(
        self, model: str, ref: int | str, *, force: bool = False, reason: str = "", actor: str = "cli",
        principal: Principal | None = None, request_id: str | None = None,
    ) -> dict:
        """Soft-delete a version: it leaves lists and refs, its number is never reused, children keep it as parent.

        Refused (RegistryConflict) while an alias points at it, unless `force`: then those aliases
        are removed, each removal recorded in the alias history with the reason.
        """
        check_text("reason", reason, max_len=10_000, allow_empty=True)
        check_text("actor", actor, max_len=MAX_KEY_LEN)
        self.authorize(principal, "delete_version", model, f"{model}/{ref}", request_id)
        with self._write() as conn:
            model_id, version_id = self._resolve(conn, model, ref, lock=True)
            number = self._version_numbers(conn, {version_id})[version_id]
            pointing = conn.execute(
                select(aliases_table.c.alias).where(aliases_table.c.version_id == version_id)
                .order_by(aliases_table.c.alias)
            ).scalars().all()
            if pointing and not force:
                raise RegistryConflict(
                    f"version {number} of model {model!r} is what alias(es) {', '.join(pointing)} point at; "
                    "move them first, or force the delete (--force), which removes them and records it"
                )
            for alias in pointing:
                conn.execute(delete(aliases_table).where(aliases_table.c.model_id == model_id, aliases_table.c.alias == alias))
                why = f"version {number} deleted (forced)" + (f": {reason}" if reason else "")
                self._record_alias_change(conn, model_id, alias, version_id, None, "delete", why, actor)
            at = _now()
            conn.execute(update(versions_table).where(versions_table.c.id == version_id).values(
                deleted_at=at, deleted_by=actor, deleted_reason=reason or None, deleted_forced=bool(pointing),
            ))
            deleted = {"model": model, "version": number, "deleted_at": _iso(at), "forced": bool(pointing),
                       "aliases_removed": list(pointing)}
            self._audit(conn, principal, "delete_version", model, f"{model}/v{number}",
                        {"version": number, "aliases": list(pointing)}, deleted, "allowed", reason, request_id)
            return deleted

    # ---- identities, permissions and the audit log

    def authorize(
        self, principal: Principal | None, operation: str, model: str | None, target: str, request_id: str | None
    ) -> None:
        """With auth enabled: return if `principal` may do `operation`, else record the refusal
        (committed on its own: the refused write never opens its transaction) and raise PermissionDenied."""
        if not self.auth_enabled:
            return
        try:
            check(principal, operation, target)
        except PermissionDenied as err:
            with self._write() as conn:
                self._audit(conn, principal, operation, model, target, None, None, "refused", str(err), request_id)
            raise

    def _audit(
        self, conn: Connection, principal: Principal | None, operation: str, model: str | None, target: str,
        before: Any, after: Any, result: str, reason: str, request_id: str | None,
    ) -> None:
        assert result in AUDIT_RESULTS, result
        conn.execute(insert(audit_log_table).values(
            created_at=_now(), principal=principal.name if principal else ANONYMOUS,
            principal_kind=principal.kind if principal else None, operation=operation, model=model, target=target,
            before_json=None if before is None else json.dumps(before, sort_keys=True, default=str),
            after_json=None if after is None else json.dumps(after, sort_keys=True, default=str),
            result=result, reason=reason, request_id=request_id,
        ))

    def _audit_alias(
        self, conn: Connection, principal: Principal | None, operation: str, moved: dict, reason: str,
        request_id: str | None,
    ) -> None:
        self._audit(conn, principal, operation, moved["model"], f"{moved['model']}@{moved['alias']}",
                    {"version": moved["from_version"]}, {"version": moved["version"]}, "allowed", reason, request_id)

    def append_audit(
        self, principal: Principal | None, operation: str, target: str, *, result: str, model: str | None = None,
        before: Any = None, after: Any = None, reason: str = "", request_id: str | None = None,
    ) -> None:
        """Record an operation that happens outside the store (a prediction, a training job) in the audit log."""
        if result not in AUDIT_RESULTS:
            raise ValueError(f"result must be one of {', '.join(AUDIT_RESULTS)}, got {result!r}")
        check_text("target", target, max_len=10_000)
        with self._write() as conn:
            self._audit(conn, principal, operation, model, target, before, after, result, reason, request_id)

    def query_audit(
        self, model: str | None = None, since: datetime | str | None = None, limit: int | None = None,
        *, principal: Principal | None = None,
    ) -> list[dict]:
        """Audit rows, oldest first: of one `model`, at or after `since`, the newest `limit` of them.

        Each: {id, time, principal, principal_kind, operation, model, target, before, after, result,
        reason, request_id}. The log is append-only: the store has no method that changes a row.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        self.authorize(principal, "audit_read", model, f"audit log{f' of {model}' if model else ''}", None)
        a = audit_log_table.c
        query = select(audit_log_table).order_by(a.id.desc())
        if model is not None:
            query = query.where(a.model == check_model_name(model))
        if since is not None:
            query = query.where(a.created_at >= parse_time(since))
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [
            {
                "id": r.id, "time": _iso(r.created_at), "principal": r.principal, "principal_kind": r.principal_kind,
                "operation": r.operation, "model": r.model, "target": r.target,
                "before": None if r.before_json is None else json.loads(r.before_json),
                "after": None if r.after_json is None else json.loads(r.after_json),
                "result": r.result, "reason": r.reason, "request_id": r.request_id,
            }
            for r in reversed(rows)
        ]

    def _need_key_secret(self) -> bytes:
        if self.key_secret is None:
            raise AuthError("not_configured", "API keys need the server secret: set the environment variable that "
                                              "auth.key_secret_env names (TEMPER_KEY_SECRET by default)")
        return self.key_secret

    def create_key(
        self, name: str, role: str, expires_in: timedelta | None = None,
        *, principal: Principal | None = None, request_id: str | None = None,
    ) -> tuple[str, str]:
        """A new API key for `name` with `role`: returns (key id, plaintext key).

        The plaintext exists only in the return value; the database keeps its HMAC. Names are
        unique for good (a revoked key keeps its name, which the audit log refers to).
        """
        if not isinstance(name, str) or not _KEY_NAME_RE.fullmatch(name):
            raise ValueError(f"key name {name!r} is invalid: it must match {_KEY_NAME_RE.pattern}")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if expires_in is not None and (not isinstance(expires_in, timedelta) or expires_in <= timedelta(0)):
            raise ValueError(f"expires_in must be a positive timedelta or None, got {expires_in!r}")
        secret = self._need_key_secret()
        self.authorize(principal, "manage_keys", None, f"key:{name}", request_id)
        key_id, plaintext = api_keys.new_key()
        now = _now()
        expires_at = None if expires_in is None else now + expires_in
        with self._write() as conn:
            k = api_keys_table.c
            taken = conn.execute(select(k.created_at, k.revoked_at).where(k.name == name)).first()
            if taken is not None:
                state = f"revoked at {_iso(taken.revoked_at)}" if taken.revoked_at else "active"
                raise RegistryConflict(f"an API key named {name!r} already exists ({state}); pick another name")
            conn.execute(insert(api_keys_table).values(
                key_id=key_id, name=name, role=role, key_hash=api_keys.hash_key(plaintext, secret), created_at=now,
                created_by=principal.name if principal else ANONYMOUS, expires_at=expires_at,
            ))
            self._audit(conn, principal, "manage_keys", None, f"key:{name}", None,
                        {"action": "create", "key_id": key_id, "role": role, "expires_at": _iso(expires_at)},
                        "allowed", "", request_id)
        return key_id, plaintext

    def list_keys(self, *, principal: Principal | None = None) -> list[dict]:
        """Every API key, by name: {name, key_id, role, status (active | expired | revoked),
        created_at, created_by, expires_at, revoked_at, revoked_by}; never a hash or a key."""
        self.authorize(principal, "manage_keys", None, "keys", None)
        k = api_keys_table.c
        now = _now()
        with self._read() as conn:
            rows = conn.execute(
                select(k.name, k.key_id, k.role, k.created_at, k.created_by, k.expires_at, k.revoked_at, k.revoked_by)
                .order_by(k.name)
            ).all()
        return [
            {
                "name": r.name, "key_id": r.key_id, "role": r.role, "status": _key_status(r, now),
                "created_at": _iso(r.created_at), "created_by": r.created_by, "expires_at": _iso(r.expires_at),
                "revoked_at": _iso(r.revoked_at), "revoked_by": r.revoked_by,
            }
            for r in rows
        ]

    def revoke_key(
        self, name_or_id: str, *, principal: Principal | None = None, request_id: str | None = None
    ) -> dict:
        """Revoke the key named `name_or_id` (or with that key id); it authenticates no more.

        Returns {name, key_id, revoked_at}. Revoking a revoked key is a RegistryConflict.
        """
        check_text("name_or_id", name_or_id, max_len=MAX_KEY_LEN)
        self.authorize(principal, "manage_keys", None, f"key:{name_or_id}", request_id)
        k = api_keys_table.c
        with self._write() as conn:
            row = conn.execute(select(api_keys_table).where(k.name == name_or_id)).first() or conn.execute(
                select(api_keys_table).where(k.key_id == name_or_id)
            ).first()
            if row is None:
                raise RegistryNotFound(f"no API key named (or with id) {name_or_id!r}")
            if row.revoked_at is not None:
                raise RegistryConflict(f"API key {row.name!r} was already revoked at {_iso(row.revoked_at)}")
            at = _now()
            conn.execute(update(api_keys_table).where(k.id == row.id).values(
                revoked_at=at, revoked_by=principal.name if principal else ANONYMOUS,
            ))
            self._audit(conn, principal, "manage_keys", None, f"key:{row.name}", {"action": "revoke", "revoked_at": None},
                        {"action": "revoke", "revoked_at": _iso(at)}, "allowed", "", request_id)
        return {"name": row.name, "key_id": row.key_id, "revoked_at": _iso(at)}

    def authenticate(self, plaintext: str) -> Principal:
        """The principal behind an API key; AuthError (unknown_key, revoked_key, expired_key) otherwise.

        Revocation and expiry are only told to a caller who holds the real key: a wrong key for
        a known id is "unknown", like any other wrong key.
        """
        secret = self._need_key_secret()
        key_id = api_keys.key_id_of(plaintext)
        unknown = AuthError("unknown_key", "unknown API key: it was not issued by this registry (or was mistyped)")
        if key_id is None:
            raise unknown
        with self._read() as conn:
            row = conn.execute(select(api_keys_table).where(api_keys_table.c.key_id == key_id)).first()
        if row is None or not api_keys.matches(plaintext, row.key_hash, secret):
            raise unknown
        if row.revoked_at is not None:
            raise AuthError("revoked_key", f"API key {row.name!r} was revoked at {_iso(row.revoked_at)}; ask an admin for a new one")
        if row.expires_at is not None and _utc(row.expires_at) <= _now():
            raise AuthError("expired_key", f"API key {row.name!r} expired at {_iso(row.expires_at)}; ask an admin for a new one")
        return Principal(name=row.name, role=row.role, kind="key")

    # ---- reads

    def get_version(self, model: str, ref: int | str, *, include_deleted: bool = False) -> dict:
        """The record of version `ref` (number, numeric string, alias or 'latest') of `model`."""
        with self._read() as conn:
            _, version_id = self._resolve(conn, model, ref, include_deleted=include_deleted)
            return self._records(conn, [version_id])[0]

    def list_versions(
        self,
        model: str,
        *,
        where: str | list[str] | None = None,
        order_by: str | None = None,
        descending: bool = False,
        format: str | None = None,
        transformation: str | None = None,
        tags: dict[str, str] | None = None,
        label: str | None = None,
        limit: int | None = None,
        include_deleted: bool = False,
    ) -> list[dict]:
        """Version records of `model`, oldest (version 1) first unless `order_by` says otherwise.

        Filters: `where` metric conditions on the latest value ('val_loss<2.5', a list = all of
        them; a version without that metric does not match), exact `format`, `transformation`,
        `label`, and `tags` (all given pairs). `order_by` is a metric name (versions without it
        come last either way) or 'version' / 'created_at'. Deleted versions only with
        `include_deleted`.
        """
        conditions = parse_where(where)
        tags = check_tags(tags)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        v = versions_table.c
        with self._read() as conn:
            model_id = self._model_id(conn, model)
            query = select(v.id).where(v.model_id == model_id).order_by(v.version)
            if not include_deleted:
                query = query.where(v.deleted_at.is_(None))
            for column, value in (("format", format), ("transformation", transformation), ("label", label)):
                if value is not None:
                    query = query.where(v[column] == value)
            records = self._records(conn, list(conn.execute(query).scalars().all()))
        records = [
            r for r in records
            if all(r["tags"].get(k) == val for k, val in tags.items())
            and all(key in r["metrics"] and WHERE_OPS[op](r["metrics"][key], value) for key, op, value in conditions)
        ]
        if order_by in ("version", "created_at"):
            records.sort(key=lambda r: r[order_by], reverse=descending)
        elif order_by is not None:
            have = [r for r in records if order_by in r["metrics"]]
            have.sort(key=lambda r: r["metrics"][order_by], reverse=descending)
            records = have + [r for r in records if order_by not in r["metrics"]]
        elif descending:
            records.reverse()
        return records[:limit] if limit is not None else records

    def list_models(self) -> list[dict]:
        """One summary per model, by name: {name, versions, latest, aliases, deleted, created_at}.

        `versions` counts versions that are not deleted, `latest` is the highest of those,
        `deleted` counts deleted ones.
        """
        v = versions_table.c
        with self._read() as conn:
            counts = {
                r.model_id: (r.n, r.top) for r in conn.execute(
                    select(v.model_id, func.count().label("n"), func.max(v.version).label("top"))
                    .where(v.deleted_at.is_(None)).group_by(v.model_id)
                )
            }
            deleted = {
                r.model_id: r.n for r in conn.execute(
                    select(v.model_id, func.count().label("n")).where(v.deleted_at.is_not(None)).group_by(v.model_id)
                )
            }
            by_model: dict[int, dict[str, int]] = {}
            for a in conn.execute(
                select(aliases_table.c.model_id, aliases_table.c.alias, v.version)
                .join(versions_table, v.id == aliases_table.c.version_id)
                .order_by(aliases_table.c.alias)
            ):
                by_model.setdefault(a.model_id, {})[a.alias] = a.version
            return [
                {
                    "name": m.name,
                    "versions": counts.get(m.id, (0, None))[0],
                    "latest": counts.get(m.id, (0, None))[1],
                    "aliases": by_model.get(m.id, {}),
                    "deleted": deleted.get(m.id, 0),
                    "created_at": _iso(m.created_at),
                }
                for m in conn.execute(select(models_table).order_by(models_table.c.name))
            ]

    def model_names(self) -> list[str]:
        with self._read() as conn:
            return list(conn.execute(select(models_table.c.name).order_by(models_table.c.name)).scalars())

    def metric_history(self, model: str, ref: int | str, key: str | None = None) -> list[dict]:
        """Every logged value of version `ref` (optionally of one metric), in logging order:
        [{key, value, step, created_at}]."""
        m = metrics_table.c
        with self._read() as conn:
            _, version_id = self._resolve(conn, model, ref, include_deleted=True)
            query = select(m.key, m.value, m.step, m.created_at).where(m.version_id == version_id)
            if key is not None:
                query = query.where(m.key == key)
            return [
                {"key": r.key, "value": r.value, "step": r.step, "created_at": _iso(r.created_at)}
                for r in conn.execute(query.order_by(m.id))
            ]

    def _ancestry(self, conn: Connection, version_id: int) -> list[int]:
        """[version_id, its parent, grandparent, ...] up to the root."""
        chain = [version_id]
        while len(chain) < 10_000:  # parents exist before children, so this is a path, never a cycle
            parent = conn.execute(
                select(versions_table.c.parent_version_id).where(versions_table.c.id == chain[-1])
            ).scalar()
            if parent is None:
                break
            chain.append(parent)
        return chain

    def _nodes(self, conn: Connection, version_ids: list[int]) -> list[dict]:
        if not version_ids:
            return []
        rows = {
            r.id: r for r in conn.execute(
                select(versions_table.c.id, versions_table.c.version, versions_table.c.format,
                       versions_table.c.transformation, versions_table.c.deleted_at, models_table.c.name)
                .join(models_table, models_table.c.id == versions_table.c.model_id)
                .where(versions_table.c.id.in_(set(version_ids)))
            )
        }
        return [
            {"model": rows[i].name, "version": rows[i].version, "format": rows[i].format,
             "transformation": rows[i].transformation, "deleted": rows[i].deleted_at is not None}
            for i in version_ids
        ]

    def lineage(self, model: str, ref: int | str) -> dict:
        """Where version `ref` came from and what was made from it.

        {"path": [root, ..., this version], "children": [versions whose parent is this one]};
        each node is {model, version, format, transformation, deleted}.
        """
        with self._read() as conn:
            _, version_id = self._resolve(conn, model, ref, include_deleted=True)
            path = list(reversed(self._ancestry(conn, version_id)))
            children = conn.execute(
                select(versions_table.c.id).where(versions_table.c.parent_version_id == version_id)
                .order_by(versions_table.c.model_id, versions_table.c.version)
            ).scalars().all()
            return {"path": self._nodes(conn, path), "children": self._nodes(conn, list(children))}

    def compare(self, model: str, a: int | str, b: int | str, *, model_b: str | None = None) -> dict:
        """Version `a` of `model` against version `b` (of `model_b`, default the same model).

        Returns {"a", "b": summaries; "metrics": [{key, a, b, delta (b - a), relative (delta / |a|)}]
        for every metric either has; "params" and "config": [{key, a, b}] for the keys that
        differ (config flattened to dotted keys, None = absent); "same_config_hash";
        "dataset": {a, b, same}; "lineage": {common_ancestor, path, relation}}. Deleted versions
        can be compared.
        """
        with self._read() as conn:
            _, id_a = self._resolve(conn, model, a, include_deleted=True)
            _, id_b = self._resolve(conn, model_b or model, b, include_deleted=True)
            rec_a, rec_b = self._records(conn, [id_a, id_b])
            chain_a, chain_b = self._ancestry(conn, id_a), self._ancestry(conn, id_b)
            common = next((i for i in chain_a if i in set(chain_b)), None)
            if common is None:
                path_ids, relation = [], "unrelated: no common ancestor"
            else:
                up = chain_a[: chain_a.index(common) + 1]
                down = list(reversed(chain_b[: chain_b.index(common)]))
                path_ids = up + down
                if id_a == id_b:
                    relation = "same version"
                elif common == id_a:
                    relation = "b descends from a"
                elif common == id_b:
                    relation = "a descends from b"
                else:
                    relation = "siblings: both descend from the common ancestor"
            path = self._nodes(conn, path_ids)
            ancestor = self._nodes(conn, [common])[0] if common is not None else None

        metrics = []
        for key in sorted(set(rec_a["metrics"]) | set(rec_b["metrics"])):
            va, vb = rec_a["metrics"].get(key), rec_b["metrics"].get(key)
            delta = vb - va if va is not None and vb is not None else None
            metrics.append({
                "key": key, "a": va, "b": vb, "delta": delta,
                "relative": delta / abs(va) if delta is not None and va != 0 else None,
            })

        def differing(left: dict, right: dict) -> list[dict]:
            return [
                {"key": k, "a": left.get(k), "b": right.get(k)}
                for k in sorted(set(left) | set(right)) if left.get(k) != right.get(k) or (k in left) != (k in right)
            ]

        def summary(r: dict) -> dict:
            return {k: r[k] for k in ("model", "version", "label", "format", "transformation", "config_hash",
                                      "dataset_fingerprint", "artifact_uri", "parent", "aliases", "created_at", "deleted")}

        return {
            "a": summary(rec_a),
            "b": summary(rec_b),
            "metrics": metrics,
            "params": differing(rec_a["params"], rec_b["params"]),
            "config": differing(flatten_dict(rec_a["config"] or {}), flatten_dict(rec_b["config"] or {})),
            "same_config_hash": rec_a["config_hash"] is not None and rec_a["config_hash"] == rec_b["config_hash"],
            "dataset": {"a": rec_a["dataset_fingerprint"], "b": rec_b["dataset_fingerprint"],
                        "same": rec_a["dataset_fingerprint"] == rec_b["dataset_fingerprint"]},
            "lineage": {"common_ancestor": ancestor, "path": path, "relation": relation},
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
        """Alias changes of `model` (optionally one alias), oldest first:
        [{model, alias, action, from_version, to_version, reason, actor, created_at}]
        (`to_version` None = the alias was removed)."""
        with self._read() as conn:
            model_id = self._model_id(conn, model)
            rows = self._history_rows(conn, model_id, alias)
            if alias is not None and not rows:
                raise RegistryNotFound(f"model {model!r} has never had an alias {alias!r}")
            number_of = self._version_numbers(
                conn, {r.from_version_id for r in rows} | {r.to_version_id for r in rows}
            )
            return [
                {
                    "model": model, "alias": r.alias, "action": r.action,
                    "from_version": number_of.get(r.from_version_id), "to_version": number_of.get(r.to_version_id),
                    "reason": r.reason, "actor": r.actor, "created_at": _iso(r.created_at),
                }
                for r in rows
            ]

    def as_of(self, model: str, alias: str, when: datetime | str) -> dict:
        """Which version `alias` pointed at at time `when` (a datetime or ISO 8601 string; naive = UTC).

        Returns {model, alias, as_of, version, since, action, reason, actor}: the history entry in
        force at that moment. `version` is None (and `since` None) before the alias first existed,
        or `since` the time it was removed. An alias the model never had is RegistryNotFound.
        """
        check_alias(alias)
        at = parse_time(when)
        h = alias_history_table.c
        with self._read() as conn:
            model_id = self._model_id(conn, model)
            if conn.execute(select(h.id).where(h.model_id == model_id, h.alias == alias).limit(1)).first() is None:
                raise RegistryNotFound(f"model {model!r} has never had an alias {alias!r}")
            row = conn.execute(
                select(alias_history_table).where(h.model_id == model_id, h.alias == alias, h.created_at <= at)
                .order_by(h.created_at.desc(), h.id.desc()).limit(1)
            ).first()
            answer = {"model": model, "alias": alias, "as_of": at.isoformat(), "version": None, "since": None,
                      "action": None, "reason": None, "actor": None}
            if row is not None:
                number_of = self._version_numbers(conn, {row.to_version_id})
                answer.update(version=number_of.get(row.to_version_id), since=_iso(row.created_at),
                              action=row.action, reason=row.reason, actor=row.actor)
            return answer

    def mirror_snapshot(self, model: str, metrics_after: dict[int, int] | None = None) -> dict:
        """What the MLflow mirror needs of `model`: every version record (deleted ones too), each
        with its metric rows newer than `metrics_after[version]` (a metrics row id), and the aliases."""
        metrics_after = metrics_after or {}
        m = metrics_table.c
        with self._read() as conn:
            model_id = self._model_id(conn, model)
            ids = conn.execute(
                select(versions_table.c.id).where(versions_table.c.model_id == model_id).order_by(versions_table.c.version)
            ).scalars().all()
            records = self._records(conn, list(ids))
            for vid, rec in zip(ids, records):
                rec["metric_rows"] = [
                    {"id": r.id, "key": r.key, "value": r.value, "step": r.step, "created_at": _iso(r.created_at)}
                    for r in conn.execute(
                        select(m.id, m.key, m.value, m.step, m.created_at)
                        .where(m.version_id == vid, m.id > metrics_after.get(rec["version"], 0)).order_by(m.id)
                    )
                ]
            aliases = {
                r.alias: r.version for r in conn.execute(
                    select(aliases_table.c.alias, versions_table.c.version)
                    .join(versions_table, versions_table.c.id == aliases_table.c.version_id)
                    .where(aliases_table.c.model_id == model_id)
                )
            }
        return {"model": model, "versions": records, "aliases": aliases}


def _holder_stack(rows: list[Any]) -> list[int | None]:
    """Replay an alias's history into a stack of holders (None = removed); the top is the current one."""
    stack: list[int | None] = []
    for r in rows:
        if r.action == "rollback":
            _pop_to_previous(stack)
        else:
            stack.append(r.to_version_id)
    return stack


def _pop_to_previous(stack: list[int | None]) -> None:
    stack.pop()
    while stack and stack[-1] is None:  # a removal is undone together with what followed it
        stack.pop()


def _rollback_target(stack: list[int | None]) -> int | None:
    trial = list(stack)
    if not trial:
        return None
    _pop_to_previous(trial)
    return trial[-1] if trial else None


def _key_status(row: Any, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and _utc(row.expires_at) <= now:
        return "expired"
    return "active"


def _max_version(conn: Connection, model_id: int) -> int | None:
    """Highest version number ever issued for the model, deleted ones included (numbers are never reused)."""
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


