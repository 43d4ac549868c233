"""`auth create-key|list-keys|revoke` and `registry audit` as a user runs them: `python -m app` in
a subprocess on a temporary SQLite registry, no Ray. The key is printed once and appears in no
later output, nor in the database file; errors are one line with the CLI's exit codes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from actors.registry.store import RegistryStore

ROOT = Path(__file__).resolve().parents[2]
SECRET = "cli-test-secret-0123456789abcdefghijklmnop"


@pytest.fixture
def db(tmp_path):
    return tmp_path / "registry.db"


def _app(db: Path, *argv: str, secret: str | None = SECRET) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TEMPER_KEY_SECRET"}
    if secret is not None:
        env["TEMPER_KEY_SECRET"] = secret
    return subprocess.run([sys.executable, "-m", "app", *argv, f"registry.db_url=sqlite:///{db}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


def test_key_lifecycle_through_the_cli(db):
    made = _app(db, "auth", "create-key", "ci", "--role", "developer", "--expires-in", "30d", "--json")
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)  # --json: nothing but JSON on stdout
    key = record["key"]
    assert key.startswith(f"tmp_{record['key_id']}_") and record["role"] == "developer"
    assert record["expires_at"] is not None and "will not be shown again" in made.stderr

    store = RegistryStore(f"sqlite:///{db}", key_secret=SECRET.encode())
    assert store.authenticate(key).name == "ci"  # the printed key is the real one
    store.close()

    listed = _app(db, "auth", "list-keys")
    assert listed.returncode == 0 and "ci" in listed.stdout and "active" in listed.stdout
    as_json = json.loads(_app(db, "auth", "list-keys", "--json").stdout)
    assert [(k["name"], k["status"]) for k in as_json] == [("ci", "active")]

    revoked = _app(db, "auth", "revoke", "ci")
    assert revoked.returncode == 0 and "revoked at" in revoked.stdout
    again = _app(db, "auth", "revoke", "ci")
    assert again.returncode == 1 and again.stderr.strip().count("\n") == 0 and "already revoked" in again.stderr
    assert json.loads(_app(db, "auth", "list-keys", "--json").stdout)[0]["status"] == "revoked"

    audit = _app(db, "registry", "audit", "--json")
    assert audit.returncode == 0, audit.stderr
    rows = json.loads(audit.stdout)
    assert [(r["operation"], r["target"], r["result"], r["principal_kind"]) for r in rows] == [
        ("manage_keys", "key:ci", "allowed", "local"), ("manage_keys", "key:ci", "allowed", "local")]
    table = _app(db, "registry", "audit")
    assert table.returncode == 0 and "manage_keys" in table.stdout

    # redaction: the key is in no later output and not in the database files
    for out in (listed.stdout, json.dumps(as_json), revoked.stdout, audit.stdout, table.stdout):
        assert key not in out
    with sqlite3.connect(db) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for f in db.parent.glob("registry.db*"):
        assert key.encode() not in f.read_bytes(), f


def test_registry_audit_filters_by_model_and_time(db):
    store = RegistryStore(f"sqlite:///{db}")
    store.register_version("gpt", "/runs/gpt/1", "torch_fp32")
    store.register_version("vit", "/runs/vit/1", "torch_fp32")
    store.close()
    rows = json.loads(_app(db, "registry", "audit", "--model", "vit", "--json").stdout)
    assert [(r["target"], r["principal"]) for r in rows] == [("vit/v1", "anonymous")]
    assert json.loads(_app(db, "registry", "audit", "--since", "2999-01-01T00:00:00", "--json").stdout) == []
    bad = _app(db, "registry", "audit", "--since", "yesterday")
    assert bad.returncode == 1 and "ISO 8601" in bad.stderr


def test_cli_errors_and_exit_codes(db):
    no_secret = _app(db, "auth", "create-key", "ci", "--role", "viewer", secret=None)
    assert no_secret.returncode == 2 and "TEMPER_KEY_SECRET" in no_secret.stderr
    short = _app(db, "auth", "create-key", "ci", "--role", "viewer", secret="short")
    assert short.returncode == 2 and "at least 32 characters" in short.stderr
    bad_duration = _app(db, "auth", "create-key", "ci", "--role", "viewer", "--expires-in", "soon")
    assert bad_duration.returncode == 2 and "duration" in bad_duration.stderr
    bad_role = _app(db, "auth", "create-key", "ci", "--role", "root")
    assert bad_role.returncode == 2  # argparse: invalid choice
    unknown = _app(db, "auth", "revoke", "nobody")
    assert unknown.returncode == 1 and unknown.stderr.startswith("auth: no API key named")
    assert _app(db, "auth", "create-key", "ci", "--role", "viewer").returncode == 0
    taken = _app(db, "auth", "create-key", "ci", "--role", "admin")
    assert taken.returncode == 1 and "already exists" in taken.stderr and "Traceback" not in taken.stderr
