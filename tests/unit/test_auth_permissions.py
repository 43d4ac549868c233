"""The roles x operations table: every cell is checked, through the store's own mutation where
one exists (the refusal is recorded in the audit log and changes nothing), through `check`
otherwise; the README shows the generated table; audit rows record allowed and refused
attempts with before and after; the audit log has no method that changes it; a store without
auth enabled behaves as before and audits as "anonymous"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from actors.registry.permissions import OPERATIONS, PERMISSIONS, check, permissions_table
from actors.registry.store import RegistryStore
from app.auth.identity import ROLES, PermissionDenied, Principal

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"0123456789abcdef0123456789abcdef-test"
ADMIN = Principal("root", "admin", "local")

EXPECTED = {  # the issue's words, written out: viewer reads and predicts; developer also trains and moves
    "viewer": {"read", "predict"},  # aliases other than production; admin also production, delete, keys
    "developer": {"read", "predict", "train", "tune", "compress", "register", "set_alias", "rollback"},
    "admin": set(OPERATIONS),
}


@pytest.fixture
def store(tmp_path):
    s = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}", key_secret=SECRET, auth_enabled=True)
    s.register_version("gpt", "/runs/gpt/1", "torch_fp32", principal=ADMIN)
    s.register_version("gpt", "/runs/gpt/2", "torch_fp32", principal=ADMIN)
    for alias in ("staging", "production"):  # each alias has an earlier holder to roll back to
        s.set_alias("gpt", alias, 1, principal=ADMIN)
        s.set_alias("gpt", alias, 2, principal=ADMIN)
    yield s
    s.close()


MUTATIONS = {  # operation -> a call of the store that performs it
    "register": lambda s, p: s.register_version("gpt", "/runs/gpt/3", "onnx_int8", principal=p),
    "set_alias": lambda s, p: s.set_alias("gpt", "staging", 1, principal=p),
    "set_alias_production": lambda s, p: s.set_alias("gpt", "production", 1, principal=p),
    "rollback": lambda s, p: s.rollback_alias("gpt", "staging", principal=p),
    "rollback_production": lambda s, p: s.rollback_alias("gpt", "production", principal=p),
    "delete_version": lambda s, p: s.delete_version("gpt", 2, force=True, principal=p),
    "manage_keys": lambda s, p: s.create_key("new-key", "viewer", principal=p),
    "audit_read": lambda s, p: s.query_audit(principal=p),
}


def test_table_says_what_the_issue_says():
    assert set(PERMISSIONS) == set(OPERATIONS) and len(OPERATIONS) == 13
    for role in ROLES:
        assert {op for op in OPERATIONS if _allowed(role, op)} == EXPECTED[role], role


def _allowed(role: str, operation: str) -> bool:
    try:
        check(Principal("someone", role, "key"), operation, "gpt")
        return True
    except PermissionDenied:
        return False


def _state(store) -> tuple:
    return (store.aliases("gpt"), [v["version"] for v in store.list_versions("gpt")],
            [k["name"] for k in store.list_keys(principal=ADMIN)])


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_cell(store, role, operation):
    who = Principal(f"{role}-key", role, "key")
    allowed = operation in EXPECTED[role]
    if operation not in MUTATIONS:  # no store mutation is this operation (yet): the check itself
        assert _allowed(role, operation) is allowed
        return
    before = _state(store)
    rows_before = len(store.query_audit(principal=ADMIN))
    if allowed:
        MUTATIONS[operation](store, who)
        last = store.query_audit(principal=ADMIN)[-1]
        if operation != "audit_read":  # reading the audit log is not itself a mutation
            assert (last["principal"], last["operation"], last["result"]) == (who.name, operation, "allowed")
    else:
        with pytest.raises(PermissionDenied, match=rf"role {role}, which may not {operation} .*needs role {PERMISSIONS[operation]}"):
            MUTATIONS[operation](store, who)
        assert _state(store) == before  # nothing changed...
        rows = store.query_audit(principal=ADMIN)
        assert len(rows) == rows_before + 1  # ...but the refusal is on record
        last = rows[-1]
        assert (last["principal"], last["principal_kind"], last["operation"], last["result"]) == (
            who.name, "key", operation, "refused")
        assert f"may not {operation}" in last["reason"]


def test_anonymous_calls_are_refused_when_auth_is_enabled(store):
    with pytest.raises(PermissionDenied, match="anonymous caller may not register gpt.*authenticate"):
        store.register_version("gpt", "/runs/gpt/9", "torch_fp32")
    assert store.query_audit(principal=ADMIN)[-1]["principal"] == "anonymous"
    with pytest.raises(PermissionDenied):
        store.log_metrics("gpt", 1, {"val_loss": 1.0})
    assert store.log_metrics("gpt", 1, {"val_loss": 1.0}, principal=Principal("ci", "developer", "key")) == 1


def test_audit_rows_hold_before_after_and_filters(store):
    store.set_alias("gpt", "production", 1, reason="p99 regression", principal=ADMIN)
    dev = Principal("ci", "developer", "key")
    with pytest.raises(PermissionDenied):
        store.delete_version("gpt", 1, principal=dev)
    rows = store.query_audit(principal=ADMIN, model="gpt")
    moved, refused = rows[-2], rows[-1]
    assert (moved["target"], moved["before"], moved["after"], moved["reason"]) == (
        "gpt@production", {"version": 2}, {"version": 1}, "p99 regression")
    assert (refused["target"], refused["result"], refused["after"]) == ("gpt/1", "refused", None)
    first = store.query_audit(principal=ADMIN)[0]
    assert (first["operation"], first["after"]["version"], first["before"]) == ("register", 1, None)
    assert store.query_audit(principal=ADMIN, limit=2) == rows[-2:]
    assert store.query_audit(principal=ADMIN, since=refused["time"]) == [refused]
    assert store.query_audit(principal=ADMIN, model="nothing-here") == []
    store.append_audit(dev, "predict", "gpt@production", model="gpt", result="allowed", request_id="req-1")
    assert store.query_audit(principal=ADMIN, limit=1)[0]["request_id"] == "req-1"


def test_audit_log_is_append_only():
    names = [n for n in dir(RegistryStore) if "audit" in n and not n.startswith("__")]
    assert sorted(n for n in names if not n.startswith("_")) == ["append_audit", "query_audit"]
    for verb in ("update", "delete", "remove", "clear", "purge", "edit", "truncate"):
        assert not [n for n in names if verb in n], verb


def test_without_auth_everything_works_and_is_audited_as_anonymous(tmp_path):
    s = RegistryStore(f"sqlite:///{tmp_path / 'open.db'}")
    try:
        s.register_version("gpt", "/runs/gpt/1", "torch_fp32")
        s.set_alias("gpt", "production", 1, principal=Principal("viewer-key", "viewer", "key"))  # not enforced
        s.delete_version("gpt", 1, force=True)
        rows = s.query_audit()
        assert [(r["principal"], r["operation"], r["result"]) for r in rows] == [
            ("anonymous", "register", "allowed"), ("viewer-key", "set_alias_production", "allowed"),
            ("anonymous", "delete_version", "allowed")]
    finally:
        s.close()


def test_readme_permissions_table_is_in_sync():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- permissions table: generated.*?-->\n(.*?)\n<!-- end of permissions table -->", readme, re.S)
    assert m, "README.md lacks the generated permissions table"
    assert m.group(1).strip() == permissions_table().strip(), "README permissions table is stale: paste permissions_table()"
