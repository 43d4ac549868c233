"""The registry's tables and their migrations, one numbered step per schema change.

`SCHEMA_VERSION` is the layout the code below reads and writes; the number is kept in the
`schema_info` table. Opening a database (`open_schema`):

- empty database: create every table at the current version;
- older version: run each step in `MIGRATIONS` (v1 -> v2 -> ...) inside the same transaction,
  so a failed migration leaves the database as it was;
- newer version: refuse with a message naming both numbers (this build cannot know what the
  newer layout means, so it must not write to it);
- our table names without `schema_info`: refuse (not a registry database).

After that, the layout is checked against the tables below (every table and column present),
so a hand-edited or half-copied database fails at open with the missing pieces named, not
later with an SQL error. DDL goes through alembic's `Operations`: on SQLite, which cannot
alter a column in place, `batch_alter_table` copies the table into a new one.

To change the schema: edit the tables, bump `SCHEMA_VERSION`, add `_migrate_vN_to_vN+1`, and
extend tests/unit/test_registry_migrations.py with a database of the old layout.
"""

from __future__ import annotations

import logging
from typing import Callable

from sqlalchemy import (
    Boolean,
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
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection

from actors.registry.errors import RegistrySchemaError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
"""Version of the table layout below; older databases are migrated, newer ones refused."""

MAX_KEY_LEN = 128


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
    # v2
    Column("label", String(MAX_KEY_LEN), nullable=True),  # optional semantic label, unique per model
    Column("dataset_fingerprint", String(MAX_KEY_LEN), nullable=True),
    Column("deleted_at", DateTime(timezone=True), nullable=True),  # soft delete: the row stays for lineage
    Column("deleted_by", String(MAX_KEY_LEN), nullable=True),
    Column("deleted_reason", Text, nullable=True),
    Column("deleted_forced", Boolean, nullable=True),
    UniqueConstraint("model_id", "version", name="uq_versions_model_version"),
    Index("uq_versions_model_label", "model_id", "label", unique=True),  # NULL labels never collide
)

params_table = Table(  # v2
    "params", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version_id", Integer, ForeignKey("versions.id"), nullable=False),
    Column("key", String(MAX_KEY_LEN), nullable=False),
    Column("value_json", Text, nullable=False),
    UniqueConstraint("version_id", "key", name="uq_params_version_key"),
)

metrics_table = Table(
    "metrics", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version_id", Integer, ForeignKey("versions.id"), nullable=False),
    Column("key", String(MAX_KEY_LEN), nullable=False),
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

ALIAS_ACTIONS = ("set", "rollback", "remove", "delete")
"""alias_history.action: set/move, rollback to the previous holder, removal, removal by a forced delete."""

alias_history_table = Table(
    "alias_history", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
    Column("alias", String(64), nullable=False),
    Column("from_version_id", Integer, ForeignKey("versions.id"), nullable=True),
    Column("to_version_id", Integer, ForeignKey("versions.id"), nullable=True),  # v2: NULL = alias removed
    Column("reason", Text, nullable=False),
    Column("actor", String(MAX_KEY_LEN), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("action", String(16), nullable=False, server_default="set"),  # v2, one of ALIAS_ACTIONS
    Index("ix_alias_history_model_alias", "model_id", "alias", "created_at"),  # v2: as_of lookups
)

api_keys_table = Table(  # v3
    "api_keys", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(16), nullable=False, unique=True),  # the public part of the key, for lookup
    Column("name", String(64), nullable=False, unique=True),  # revoked keys keep their name: the audit log names them
    Column("role", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False),  # HMAC-SHA256 of the key (app/auth/api_keys.py); never the key
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(MAX_KEY_LEN), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("revoked_by", String(MAX_KEY_LEN), nullable=True),
)

AUDIT_RESULTS = ("allowed", "refused")

audit_log_table = Table(  # v3: append-only (the store has no method that updates or deletes a row)
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("principal", String(MAX_KEY_LEN), nullable=False),  # key name, JWT subject, local user or "anonymous"
    Column("principal_kind", String(16), nullable=True),  # key | jwt | local; NULL for anonymous
    Column("operation", String(32), nullable=False),  # a key of actors/registry/permissions.PERMISSIONS
    Column("model", String(64), nullable=True),  # for per-model queries; NULL for key management
    Column("target", Text, nullable=False),  # model, model/vN, model@alias or key:NAME
    Column("before_json", Text, nullable=True),
    Column("after_json", Text, nullable=True),
    Column("result", String(8), nullable=False),  # one of AUDIT_RESULTS
    Column("reason", Text, nullable=False),
    Column("request_id", String(MAX_KEY_LEN), nullable=True),
    Index("ix_audit_log_model_time", "model", "created_at"),
    Index("ix_audit_log_time", "created_at"),
)


# ----------------------------------------------------------------------------- migrations


def _operations(conn: Connection):
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    return Operations(MigrationContext.configure(conn))


def _migrate_v1_to_v2(conn: Connection) -> None:
    """v2: params, dataset fingerprint, semantic label, soft delete, alias removal and actions.

    Spelled out column by column (not taken from the tables above) so that it keeps producing
    exactly the v2 layout when later versions change those tables.
    """
    ops = _operations(conn)
    ops.add_column("versions", Column("label", String(MAX_KEY_LEN), nullable=True))
    ops.add_column("versions", Column("dataset_fingerprint", String(MAX_KEY_LEN), nullable=True))
    ops.add_column("versions", Column("deleted_at", DateTime(timezone=True), nullable=True))
    ops.add_column("versions", Column("deleted_by", String(MAX_KEY_LEN), nullable=True))
    ops.add_column("versions", Column("deleted_reason", Text, nullable=True))
    ops.add_column("versions", Column("deleted_forced", Boolean, nullable=True))
    ops.create_index("uq_versions_model_label", "versions", ["model_id", "label"], unique=True)
    ops.create_table(
        "params",
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("version_id", Integer, ForeignKey("versions.id"), nullable=False),
        Column("key", String(MAX_KEY_LEN), nullable=False),
        Column("value_json", Text, nullable=False),
        UniqueConstraint("version_id", "key", name="uq_params_version_key"),
    )
    # SQLite cannot drop NOT NULL in place: batch mode copies the table into a new one there
    # (and is a plain ALTER TABLE on other databases).
    with ops.batch_alter_table("alias_history") as batch:
        batch.alter_column("to_version_id", existing_type=Integer, nullable=True)
        batch.add_column(Column("action", String(16), nullable=False, server_default="set"))
    ops.create_index("ix_alias_history_model_alias", "alias_history", ["model_id", "alias", "created_at"])


def _migrate_v2_to_v3(conn: Connection) -> None:
    """v3: API keys (hashed) and the audit log. Two new tables, nothing existing changes."""
    ops = _operations(conn)
    ops.create_table(
        "api_keys",
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key_id", String(16), nullable=False, unique=True),
        Column("name", String(64), nullable=False, unique=True),
        Column("role", String(16), nullable=False),
        Column("key_hash", String(64), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("created_by", String(MAX_KEY_LEN), nullable=False),
        Column("expires_at", DateTime(timezone=True), nullable=True),
        Column("revoked_at", DateTime(timezone=True), nullable=True),
        Column("revoked_by", String(MAX_KEY_LEN), nullable=True),
    )
    ops.create_table(
        "audit_log",
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("principal", String(MAX_KEY_LEN), nullable=False),
        Column("principal_kind", String(16), nullable=True),
        Column("operation", String(32), nullable=False),
        Column("model", String(64), nullable=True),
        Column("target", Text, nullable=False),
        Column("before_json", Text, nullable=True),
        Column("after_json", Text, nullable=True),
        Column("result", String(8), nullable=False),
        Column("reason", Text, nullable=False),
        Column("request_id", String(MAX_KEY_LEN), nullable=True),
    )
    ops.create_index("ix_audit_log_model_time", "audit_log", ["model", "created_at"])
    ops.create_index("ix_audit_log_time", "audit_log", ["created_at"])


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _migrate_v1_to_v2, 2: _migrate_v2_to_v3}
"""MIGRATIONS[n] turns a version-n database into version n+1."""


# ----------------------------------------------------------------------------- opening


def open_schema(conn: Connection, where: str) -> int | None:
    """Create, migrate or refuse the registry tables on `conn` (inside a write transaction).

    `where` names the database in messages. Returns the version migrated from, or None when
    nothing was migrated.
    """
    if conn.dialect.name == "postgresql":
        # Two processes opening one fresh or old database at once: the second waits here, then
        # finds the tables created / migrated by the first. Released when the transaction ends.
        conn.execute(text("SELECT pg_advisory_xact_lock(7340321)"))
    ours = set(metadata.tables)
    existing = set(inspect(conn).get_table_names())
    migrated_from = None
    if "schema_info" not in existing:
        if existing & ours:
            raise RegistrySchemaError(
                f"registry database {where} has tables {sorted(existing & ours)} but no schema_info table "
                f"(expected schema version {SCHEMA_VERSION}); it was not written by this registry, point "
                "registry.db_url at another database"
            )
        metadata.create_all(conn)
        conn.execute(insert(schema_info_table).values(id=1, version=SCHEMA_VERSION))
        return None

    found = conn.execute(select(schema_info_table.c.version)).scalars().all()
    if len(found) != 1:
        raise RegistrySchemaError(
            f"registry database {where} has {len(found)} rows in schema_info (expected one); it is damaged"
        )
    version = found[0]
    if version > SCHEMA_VERSION:
        raise RegistrySchemaError(
            f"registry database {where} has schema version {version}, newer than this Temper build "
            f"understands (it expects schema version {SCHEMA_VERSION} and migrates older ones); upgrade "
            "Temper to open it, or point registry.db_url at another database"
        )
    if version < 1 or (version < SCHEMA_VERSION and version not in MIGRATIONS):
        raise RegistrySchemaError(
            f"registry database {where} has schema version {version}, which no migration of this build "
            f"starts from (it migrates {sorted(MIGRATIONS)} up to {SCHEMA_VERSION})"
        )
    if version < SCHEMA_VERSION:
        migrated_from = version
        while version < SCHEMA_VERSION:
            log.warning("registry database %s: migrating schema v%d -> v%d", where, version, version + 1)
            MIGRATIONS[version](conn)
            version += 1
            conn.execute(update(schema_info_table).values(version=version))
    _check_layout(conn, where)
    return migrated_from


def _check_layout(conn: Connection, where: str) -> None:
    insp = inspect(conn)
    tables = set(insp.get_table_names())
    problems = []
    for name, table in metadata.tables.items():
        if name not in tables:
            problems.append(f"table {name} is missing")
            continue
        have = {c["name"] for c in insp.get_columns(name)}
        missing = [c.name for c in table.columns if c.name not in have]
        if missing:
            problems.append(f"table {name} lacks columns {missing}")
    if problems:
        raise RegistrySchemaError(
            f"registry database {where} says schema version {SCHEMA_VERSION} but {'; '.join(problems)}; "
            "it was changed by hand or copied incompletely"
        )
