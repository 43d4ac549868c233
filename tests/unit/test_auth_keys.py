"""API keys in the registry store: create, authenticate, list without secrets, revoke and expiry
each refused with its own message, a migrated database gets the tables, and the plaintext key is
nowhere in the database. Runs on SQLite and PostgreSQL (`registry_db_url`, tests/conftest.py)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, text

import actors.registry.store as store_module
from actors.registry.errors import RegistryConflict, RegistryNotFound
from actors.registry.store import RegistryStore
from app.auth.api_keys import KEY_PREFIX, hash_key, parse_duration
from app.auth.identity import AuthError, Principal

SECRET = b"0123456789abcdef0123456789abcdef-test"


@pytest.fixture
def store(registry_db_url):
    s = RegistryStore(registry_db_url, key_secret=SECRET)
    yield s
    s.close()


def _auth_error(store, key) -> AuthError:
    with pytest.raises(AuthError) as info:
        store.authenticate(key)
    return info.value


def test_created_key_authenticates_as_its_name_and_role(store):
    key_id, key = store.create_key("ci", "developer")
    assert key.startswith(f"{KEY_PREFIX}{key_id}_") and len(key) > 60
    assert store.authenticate(key) == Principal("ci", "developer", "key")
    other_id, other = store.create_key("alice", "admin", timedelta(days=30))
    assert other_id != key_id and other != key
    assert store.authenticate(other).role == "admin"


def test_list_keys_shows_state_but_no_secret(store):
    _, key = store.create_key("ci", "viewer", timedelta(hours=1))
    [row] = store.list_keys()
    assert set(row) == {"name", "key_id", "role", "status", "created_at", "created_by", "expires_at",
                        "revoked_at", "revoked_by"}
    assert (row["name"], row["role"], row["status"], row["created_by"]) == ("ci", "viewer", "active", "anonymous")
    assert row["expires_at"] is not None
    text_of_listing = repr(store.list_keys())
    assert key not in text_of_listing and hash_key(key, SECRET) not in text_of_listing


def test_unknown_and_wrong_keys_are_refused_as_unknown(store):
    key_id, key = store.create_key("ci", "viewer")
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")  # right id, wrong secret
    for bad in ("", "hello", "tmp_0000000000000000_" + "x" * 43, forged):
        err = _auth_error(store, bad)
        assert err.reason == "unknown_key" and "unknown API key" in str(err)


def test_revoked_key_is_refused_with_its_own_message(store):
    key_id, key = store.create_key("ci", "developer")
    revoked = store.revoke_key("ci", principal=Principal("root", "admin", "local"))
    assert revoked["key_id"] == key_id
    err = _auth_error(store, key)
    assert err.reason == "revoked_key" and "API key 'ci' was revoked at" in str(err)
    assert store.list_keys()[0]["status"] == "revoked" and store.list_keys()[0]["revoked_by"] == "root"
    with pytest.raises(RegistryConflict, match="already revoked"):
        store.revoke_key(key_id)  # by id too
    with pytest.raises(RegistryNotFound, match="no API key named"):
        store.revoke_key("nobody")
    with pytest.raises(RegistryConflict, match="already exists \\(revoked"):
        store.create_key("ci", "viewer")


def test_expired_key_is_refused_with_its_own_message(store, monkeypatch):
    _, key = store.create_key("ci", "developer", parse_duration("1h"))
    assert store.authenticate(key).name == "ci"
    later = datetime.now(timezone.utc) + timedelta(hours=1, seconds=1)
    monkeypatch.setattr(store_module, "_now", lambda: later)
    err = _auth_error(store, key)
    assert err.reason == "expired_key" and "API key 'ci' expired at" in str(err)
    assert store.list_keys()[0]["status"] == "expired"


def test_keys_need_the_server_secret(registry_db_url):
    with pytest.raises(ValueError, match="at least 32 characters"):
        RegistryStore(registry_db_url, key_secret=b"short")
    bare = RegistryStore(registry_db_url)
    try:
        with pytest.raises(AuthError, match="auth.key_secret_env"):
            bare.create_key("ci", "viewer")
        with pytest.raises(AuthError, match="auth.key_secret_env"):
            bare.authenticate("tmp_x")
    finally:
        bare.close()


def test_another_server_secret_accepts_no_key(registry_db_url):
    first = RegistryStore(registry_db_url, key_secret=SECRET)
    _, key = first.create_key("ci", "admin")
    first.close()
    other = RegistryStore(registry_db_url, key_secret=b"another-secret-of-more-than-32-characters")
    try:
        assert _auth_error(other, key).reason == "unknown_key"
    finally:
        other.close()


def test_bad_names_roles_and_durations_are_refused(store):
    with pytest.raises(ValueError, match="role must be one of viewer, developer, admin"):
        store.create_key("ci", "root")
    with pytest.raises(ValueError, match="key name"):
        store.create_key("has space", "viewer")
    with pytest.raises(ValueError, match="expires_in"):
        store.create_key("ci", "viewer", timedelta(0))
    assert parse_duration("1d12h") == timedelta(days=1, hours=12)
    for bad in ("", "30", "3q", "0d", "d30"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_plaintext_key_is_nowhere_in_the_database(registry_db_url, tmp_path):
    s = RegistryStore(registry_db_url, key_secret=SECRET)
    _, key = s.create_key("ci", "admin", timedelta(days=1))
    s.revoke_key("ci")
    s.close()
    engine = create_engine(registry_db_url)
    with engine.connect() as conn:
        dump = []
        for table in ("api_keys", "audit_log"):
            dump += [repr(tuple(r)) for r in conn.execute(text(f"SELECT * FROM {table}"))]
    engine.dispose()
    everything = "\n".join(dump)
    assert "ci" in everything  # the rows are there...
    assert key not in everything and key[len("tmp_") + 17:] not in everything  # ...the key and its secret part are not
    if registry_db_url.startswith("sqlite"):
        path = registry_db_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as raw:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for suffix in ("", "-wal", "-shm"):
            try:
                data = open(path + suffix, "rb").read()
            except FileNotFoundError:
                continue
            assert key.encode() not in data and key[len("tmp_") + 17:].encode() not in data, suffix
