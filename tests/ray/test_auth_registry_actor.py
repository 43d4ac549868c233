"""The registry actor enforces the README's role x operation table itself: every cell the actor
performs is called through a real actor handle with an API key (and a JWT) of each role, and is
allowed or refused exactly as the README says, with an audit row either way. A caller without
credentials, with a bad key, or handing over a principal object of its own making is refused."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest

from actors.registry.client import get_or_create_registry, open_store, registry_auth
from app.auth.identity import ROLES, AuthError, PermissionDenied, Principal
from app.config.auth import AuthConfig, JwtConfig
from app.config.registry import RegistryConfig
from conftest import readme_permissions

pytestmark = pytest.mark.ray

KEY_SECRET = "registry-actor-test-key-secret-0123456789"
JWT_SECRET = "registry-actor-test-jwt-secret-0123456789"
TABLE = readme_permissions()

ACTOR_CALLS = {  # operation -> a call of the registry actor that performs it on a fresh model `m`
    "read": lambda h, m, c: h.list_versions.remote(m),
    "register": lambda h, m, c: h.register_version.remote(m, "/runs/x/3", "onnx_int8", credentials=c),
    "set_alias": lambda h, m, c: h.set_alias.remote(m, "staging", 1, credentials=c),
    "set_alias_production": lambda h, m, c: h.set_alias.remote(m, "production", 1, credentials=c),
    "rollback": lambda h, m, c: h.rollback_alias.remote(m, "staging", credentials=c),
    "rollback_production": lambda h, m, c: h.rollback_alias.remote(m, "production", credentials=c),
    "delete_version": lambda h, m, c: h.delete_version.remote(m, 2, force=True, credentials=c),
}
"""Operations the actor performs; read and predict are checked over HTTP too (tests/ray/test_serve.py),
the others (train, tune, compress, keys, audit) by the store's own tests."""


@pytest.fixture(scope="module")
def secured(ray_cluster, tmp_path_factory, monkeypatch_module):
    """(handle, config, {role: api key}, {role: jwt}, admin key) of an actor started with auth on."""
    monkeypatch_module.setenv("TEMPER_KEY_SECRET", KEY_SECRET)
    monkeypatch_module.setenv("TEMPER_JWT_SECRET", JWT_SECRET)
    cfg = RegistryConfig(actor_name=f"auth-test-{uuid.uuid4().hex[:8]}", namespace="temper-tests",
                         db_url=f"sqlite:///{tmp_path_factory.mktemp('auth-registry') / 'r.db'}")
    auth = AuthConfig(enabled=True, jwt=JwtConfig(audience="temper", issuer="https://idp.test"))
    store = open_store(cfg, key_secret=KEY_SECRET.encode())
    keys = {role: store.create_key(f"{role}-key", role)[1] for role in ROLES}
    store.close()
    tokens = {role: jwt.encode({"sub": f"{role}-sub", "role": role, "aud": "temper", "iss": "https://idp.test",
                                "exp": int(time.time()) + 600}, JWT_SECRET, "HS256") for role in ROLES}
    handle = get_or_create_registry(cfg, auth=registry_auth(auth, enabled=True))
    yield handle, cfg, keys, tokens
    ray_cluster.kill(handle, no_restart=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _fresh_model(ray, handle, admin: str) -> str:
    """A model with versions 1, 2 and aliases staging, production moved 1 -> 2 (each can roll back)."""
    m = f"m-{uuid.uuid4().hex[:8]}"
    for n in (1, 2):
        ray.get(handle.register_version.remote(m, f"/runs/x/{n}", "torch_fp32", credentials=admin))
    for alias in ("staging", "production"):
        for n in (1, 2):
            ray.get(handle.set_alias.remote(m, alias, n, credentials=admin))
    return m


def _audit(cfg: RegistryConfig, model: str) -> list[dict]:
    store = open_store(cfg)
    try:
        return store.query_audit(model=model)
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["key", "jwt"])
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("operation", list(ACTOR_CALLS))
def test_every_cell_through_the_actor(ray_cluster, secured, operation, role, kind):
    ray = ray_cluster
    handle, cfg, keys, tokens = secured
    credentials = keys[role] if kind == "key" else tokens[role]
    name = f"{role}-key" if kind == "key" else f"{role}-sub"
    model = _fresh_model(ray, handle, keys["admin"])
    before = ray.get(handle.aliases.remote(model)), [v["version"] for v in ray.get(handle.list_versions.remote(model))]
    rows_before = len(_audit(cfg, model))
    call = ACTOR_CALLS[operation]
    if TABLE[operation][role]:
        ray.get(call(handle, model, credentials))
        if operation != "read":
            last = _audit(cfg, model)[-1]
            assert (last["principal"], last["principal_kind"], last["operation"], last["result"]) == (
                name, kind, operation, "allowed")
        return
    with pytest.raises(PermissionDenied, match=rf"{kind} '{name}' has role {role}, which may not {operation}"):
        ray.get(call(handle, model, credentials))
    after = ray.get(handle.aliases.remote(model)), [v["version"] for v in ray.get(handle.list_versions.remote(model))]
    assert after == before  # nothing changed
    rows = _audit(cfg, model)
    assert len(rows) == rows_before + 1
    assert (rows[-1]["principal"], rows[-1]["operation"], rows[-1]["result"]) == (name, operation, "refused")


def test_callers_without_valid_credentials_are_refused(ray_cluster, secured):
    ray = ray_cluster
    handle, cfg, keys, _ = secured
    model = _fresh_model(ray, handle, keys["admin"])
    with pytest.raises(PermissionDenied, match="anonymous caller may not set_alias_production"):
        ray.get(handle.set_alias.remote(model, "production", 1))
    with pytest.raises(PermissionDenied, match="anonymous caller may not register"):
        ray.get(handle.log_metrics.remote(model, 1, {"loss": 1.0}))
    assert ray.get(handle.log_metrics.remote(model, 1, {"loss": 1.0}, credentials=keys["developer"])) == 1
    forged = Principal("root", "admin", "local")  # what a caller might build to pass itself off as admin
    with pytest.raises(TypeError, match="accepts no principal object"):
        ray.get(handle.delete_version.remote(model, 1, credentials=forged))
    with pytest.raises(TypeError):
        ray.get(handle.delete_version.remote(model, 1, principal=forged))  # no such parameter
    with pytest.raises(AuthError, match="unknown API key"):
        ray.get(handle.delete_version.remote(model, 1, credentials=keys["admin"][:-4] + "AAAA"))
    with pytest.raises(AuthError, match="signature does not verify"):
        ray.get(handle.delete_version.remote(model, 1, credentials=jwt.encode(
            {"sub": "x", "role": "admin", "aud": "temper", "iss": "https://idp.test", "exp": int(time.time()) + 60},
            "another-secret-of-at-least-32-characters", "HS256")))
    assert ray.get(handle.aliases.remote(model)) == {"staging": 2, "production": 2}
    refused = [r for r in _audit(cfg, model) if r["result"] == "refused"]
    assert [(r["principal"], r["operation"], r["target"]) for r in refused] == [
        ("anonymous", "set_alias_production", f"{model}@production"), ("anonymous", "register", f"{model}/1"),
        ("anonymous", "delete_version", f"{model}/1"), ("anonymous", "delete_version", f"{model}/1")]
    assert [r["reason"] for r in refused[2:]] == [
        "credentials not accepted: unknown API key: it was not issued by this registry (or was mistyped)",
        "credentials not accepted: token signature does not verify: it was forged, altered, or signed with another key"]
    assert ray.get(handle.settings.remote())["auth"] == {"enabled": True, "api_keys": True, "jwt": True}
    assert ray.get(handle.authenticate.remote(keys["viewer"])) == {
        "name": "viewer-key", "role": "viewer", "kind": "key", "expires": None}


def test_rollout_watcher_rolls_back_with_its_service_credential(ray_cluster, secured, monkeypatch):
    """With auth on, the auto-rollback watcher acts with the key in `auth.service_key_env` (an
    anonymous rollback would be refused): checked when it starts (missing, not accepted, or a role
    that may not roll the canary back), then used for the rollback, which the audit log names."""
    import asyncio

    from serve.rollout import ROLLBACK_ACTOR, RolloutWatcher

    ray = ray_cluster
    handle, cfg, keys, _ = secured
    model = _fresh_model(ray, handle, keys["admin"])
    ray.get(handle.set_alias.remote(model, "production", 1, credentials=keys["admin"]))  # staging v2 vs production v1
    watch = {"canary": "staging", "baseline": "production", "min_requests": 4, "check_interval_s": 0.001,
             "latency_p95_factor": None}
    watcher_class = RolloutWatcher.func_or_class
    env = "ROLLOUT_TEST_SERVICE_KEY"
    registry = cfg.model_dump(mode="json")

    monkeypatch.delenv(env, raising=False)
    with pytest.raises(RuntimeError, match=f"environment variable {env} .*not set"):
        watcher_class({model: watch}, registry, env)
    monkeypatch.setenv(env, "tmp_not_a_real_key")
    with pytest.raises(RuntimeError, match=f"the credential in {env} is not accepted"):
        watcher_class({model: watch}, registry, env)
    monkeypatch.setenv(env, keys["viewer"])
    with pytest.raises(RuntimeError, match=r"key 'viewer-key' has role viewer, which may not rollback m-\w+@staging \(needs role developer"):
        watcher_class({model: watch}, registry, env)
    monkeypatch.setenv(env, keys["developer"])
    with pytest.raises(RuntimeError, match=r"has role developer, which may not rollback_production m-\w+@production \(needs role admin"):
        watcher_class({model: {**watch, "canary": "production", "baseline": "staging"}}, registry, env)

    watcher = watcher_class({model: watch}, registry, env)
    outcomes = [(model, "staging", 2, "server_error", 5.0)] * 5 + [(model, "production", 1, "ok", 5.0)] * 5
    asyncio.run(watcher.report(outcomes))
    [event] = asyncio.run(watcher.status())["rollbacks"]
    assert (event["from_version"], event["to_version"], event["error"]) == (2, 1, None)
    assert ray.get(handle.aliases.remote(model))["staging"] == 1
    last = _audit(cfg, model)[-1]
    assert (last["principal"], last["operation"], last["result"]) == ("developer-key", "rollback", "allowed")
    history = ray.get(handle.alias_history.remote(model, "staging"))
    assert history[-1]["actor"] == ROLLBACK_ACTOR and "auto-rollback of staging v2" in history[-1]["reason"]
