"""JWT bearer tokens (`verify_token`) and the `auth` config section: valid HS256 and RS256 tokens
give a principal; expired, wrong audience, wrong issuer, bad signature, wrong algorithm, missing
claims and a bad role are each refused with their own reason and message."""

from __future__ import annotations

import time

import jwt
import pytest
from pydantic import ValidationError

from app.auth.identity import AuthError, Principal
from app.auth.tokens import verify_token
from app.config.auth import AuthConfig

HS_SECRET = "an-hs256-secret-that-is-long-enough-for-tests"
AUD, ISS = "temper", "https://idp.example"


def _hs_config(monkeypatch, **jwt_fields) -> AuthConfig:
    monkeypatch.setenv("TEMPER_JWT_SECRET", HS_SECRET)
    return AuthConfig.model_validate({"jwt": {"audience": AUD, "issuer": ISS, "leeway_s": 0, **jwt_fields}})


def _claims(**over) -> dict:
    return {"sub": "alice", "role": "developer", "aud": AUD, "iss": ISS, "exp": int(time.time()) + 600, **over}


def _refusal(token, cfg) -> AuthError:
    with pytest.raises(AuthError) as info:
        verify_token(token, cfg)
    return info.value


def test_valid_hs256_token(monkeypatch):
    cfg = _hs_config(monkeypatch)
    assert verify_token(jwt.encode(_claims(), HS_SECRET, "HS256"), cfg) == Principal("alice", "developer", "jwt")


def test_valid_rs256_token_with_a_generated_key_pair(tmp_path):
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    from cryptography.hazmat.primitives import serialization

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "idp.pem").write_bytes(public_pem)
    cfg = AuthConfig.model_validate({"jwt": {"algorithm": "RS256", "public_key_path": str(tmp_path / "idp.pem"),
                                             "audience": AUD, "issuer": ISS, "role_claim": "temper_role"}})
    token = jwt.encode(_claims(temper_role="admin"), private, "RS256")
    assert verify_token(token, cfg) == Principal("alice", "admin", "jwt")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert _refusal(jwt.encode(_claims(temper_role="admin"), other, "RS256"), cfg).reason == "bad_signature"
    # an HS256 token "signed" with the public key (algorithm confusion) is refused
    assert _refusal(jwt.encode(_claims(temper_role="admin"), "x" * 40, "HS256"), cfg).reason == "malformed_token"


# Claims are built when the test runs, not when it is collected: a full suite reaches the unit
# tests over an hour after collection, past any `exp` set then.
@pytest.mark.parametrize("claims, key, reason, message", [
    (lambda: _claims(exp=int(time.time()) - 60), HS_SECRET, "expired_token", "token expired"),
    (lambda: _claims(aud="another-service"), HS_SECRET, "wrong_audience", "not meant for this service"),
    (lambda: _claims(iss="https://evil.example"), HS_SECRET, "wrong_issuer", "was not issued by"),
    (lambda: _claims(), "a-different-secret-also-long-enough-for-hs256", "bad_signature", "signature does not verify"),
    (lambda: _claims(role="root"), HS_SECRET, "bad_claims", "must be one of viewer, developer, admin"),
])
def test_each_bad_token_has_its_own_reason(monkeypatch, claims, key, reason, message):
    err = _refusal(jwt.encode(claims(), key, "HS256"), _hs_config(monkeypatch))
    assert err.reason == reason and message in str(err)


def test_required_claims_and_malformed_tokens(monkeypatch):
    cfg = _hs_config(monkeypatch)
    for claim in ("exp", "aud", "iss", "sub"):
        claims = _claims()
        del claims[claim]
        err = _refusal(jwt.encode(claims, HS_SECRET, "HS256"), cfg)
        assert err.reason == "bad_claims" and repr(claim) in str(err), claim
    assert _refusal("not-a-token", cfg).reason == "malformed_token"
    unsigned = jwt.encode(_claims(), None, "none")
    assert _refusal(unsigned, cfg).reason == "malformed_token"


def test_tokens_need_configuration(monkeypatch):
    assert _refusal("x", AuthConfig()).reason == "not_configured"
    monkeypatch.delenv("TEMPER_JWT_SECRET", raising=False)
    cfg = AuthConfig.model_validate({"jwt": {"audience": AUD, "issuer": ISS}})
    err = _refusal(jwt.encode(_claims(), HS_SECRET, "HS256"), cfg)
    assert err.reason == "not_configured" and "TEMPER_JWT_SECRET" in str(err)


def test_auth_section_checks_its_fields():
    with pytest.raises(ValidationError, match="extra"):
        AuthConfig.model_validate({"secret": "hunter2"})  # unknown keys are errors: no place for a secret
    with pytest.raises(ValidationError, match="public_key_path must be set"):
        AuthConfig.model_validate({"jwt": {"algorithm": "RS256", "audience": AUD, "issuer": ISS}})
    with pytest.raises(ValidationError, match="audience"):
        AuthConfig.model_validate({"jwt": {"issuer": ISS}})
    with pytest.raises(ValidationError, match="key_secret_env"):
        AuthConfig.model_validate({"key_secret_env": "not an env name"})
    with pytest.raises(ValidationError, match="requests_per_s"):
        AuthConfig.model_validate({"rate_limit": {"requests_per_s": 0, "burst": 1}})


def test_auth_is_on_by_default_only_off_loopback():
    default = AuthConfig()
    assert [default.enabled_for(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.1.2.3", "example.org")] == [
        False, False, False, True, True, True]
    assert AuthConfig(enabled=True).enabled_for("127.0.0.1") and not AuthConfig(enabled=False).enabled_for("0.0.0.0")


def test_registry_auth_reads_the_secrets_here_and_refuses_auth_that_checks_nothing(monkeypatch):
    from actors.registry.client import registry_auth
    from app.config.auth import JwtConfig

    monkeypatch.delenv("TEMPER_KEY_SECRET", raising=False)
    monkeypatch.delenv("TEMPER_JWT_SECRET", raising=False)
    with pytest.raises(ValueError, match="nothing could authenticate a caller: set the environment variable TEMPER_KEY_SECRET"):
        registry_auth(AuthConfig(), enabled=True)
    assert registry_auth(AuthConfig(), enabled=False) == {"enabled": False, "key_secret": None, "jwt": None, "jwt_key": None}
    monkeypatch.setenv("TEMPER_KEY_SECRET", HS_SECRET)
    monkeypatch.setenv("TEMPER_JWT_SECRET", HS_SECRET)
    got = registry_auth(AuthConfig(jwt=JwtConfig(audience="a", issuer="i")), enabled=True)
    assert (got["enabled"], got["key_secret"], got["jwt_key"], got["jwt"]["audience"]) == (True, HS_SECRET, HS_SECRET, "a")
