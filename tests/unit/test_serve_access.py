"""The ingress's door without Ray: credential headers, 401 with the lookup's reason, 403 from the
permissions table, the credentials cache (a revoked key is refused once its entry expires, a JWT's
entry never outlives its `exp`) and the per-caller token bucket."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.auth.identity import AuthError
from app.config.auth import RateLimitConfig
from serve.access import AccessControl, IngressAuth, TokenBuckets, credentials_from
from serve.protocol import APIError


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _gate(answers: dict, clock: Clock, **settings) -> tuple[AccessControl, list[str]]:
    asked: list[str] = []

    async def lookup(credentials: str) -> dict:
        asked.append(credentials)
        answer = answers[credentials]
        if isinstance(answer, AuthError):
            raise answer
        return answer

    return AccessControl(lookup, IngressAuth(enabled=True, **settings), cache_s=5.0, clock=clock), asked


def _admit(gate: AccessControl, headers: dict, operation: str = "predict", client: str = "10.0.0.1"):
    return asyncio.run(gate.admit(headers, client, operation, "model digits"))


def _status(gate, headers, operation="predict") -> tuple[int, str]:
    with pytest.raises(APIError) as caught:
        _admit(gate, headers, operation)
    return caught.value.status, caught.value.message


def test_credential_headers():
    assert credentials_from({"x-api-key": " tmp_k "}) == "tmp_k"
    assert credentials_from({"authorization": "Bearer eyJ.a.b"}) == "eyJ.a.b"
    assert credentials_from({"authorization": "bearer tmp_k"}) == "tmp_k"
    assert credentials_from({"authorization": "Basic dXNlcg=="}) is None
    assert credentials_from({}) is None


def test_missing_refused_and_wrong_role():
    viewer = {"name": "v", "role": "viewer", "kind": "key", "expires": None}
    gate, _ = _gate({"good": viewer, "bad": AuthError("revoked_key", "API key 'v' was revoked")}, Clock())
    assert _status(gate, {}) == (401, _status(gate, {})[1]) and "missing credentials" in _status(gate, {})[1]
    assert _status(gate, {"x-api-key": "bad"}) == (401, "credentials not accepted: API key 'v' was revoked")
    assert _admit(gate, {"x-api-key": "good"}).name == "v"
    status, message = _status(gate, {"x-api-key": "good"}, "set_alias_production")
    assert status == 403 and "role viewer, which may not set_alias_production" in message


def test_answers_are_cached_for_a_while_and_a_jwt_no_longer_than_its_exp():
    clock = Clock()
    answers = {"k": {"name": "k", "role": "admin", "kind": "key", "expires": None},
               "t": {"name": "t", "role": "admin", "kind": "jwt", "expires": time.time() + 2.0}}
    gate, asked = _gate(answers, clock)
    for _ in range(3):
        _admit(gate, {"x-api-key": "k"})
        _admit(gate, {"authorization": "Bearer t"})
    assert asked == ["k", "t"]
    clock.now += 2.5  # past the token's exp, within the cache period
    answers["t"] = AuthError("expired_token", "token expired")
    assert _admit(gate, {"x-api-key": "k"}).name == "k"
    assert _status(gate, {"authorization": "Bearer t"})[0] == 401
    answers["k"] = AuthError("revoked_key", "API key 'k' was revoked")  # revoked: refused once the entry expires
    clock.now += 3.0
    assert "revoked" in _status(gate, {"x-api-key": "k"})[1]
    assert asked == ["k", "t", "t", "k"]


def test_token_bucket_and_429_retry_after():
    clock = Clock()
    buckets = TokenBuckets(RateLimitConfig(requests_per_s=2.0, burst=3), clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # a bucket per caller
    clock.now += 0.5
    assert buckets.take("a") == 0.0
    gate, _ = _gate({"k": {"name": "k", "role": "viewer", "kind": "key", "expires": None}}, clock,
                    rate_limit=RateLimitConfig(requests_per_s=0.5, burst=1))
    _admit(gate, {"x-api-key": "k"})
    with pytest.raises(APIError) as caught:
        _admit(gate, {"x-api-key": "k"})
    assert (caught.value.status, caught.value.headers) == (429, {"Retry-After": "2"})


def test_auth_off_admits_everyone_but_still_limits_per_address():
    clock = Clock()
    gate = AccessControl(None, IngressAuth(enabled=False, rate_limit=RateLimitConfig(requests_per_s=1.0, burst=1)),
                         clock=clock)
    assert _admit(gate, {}, client="10.0.0.1") is None
    assert _admit(gate, {}, client="10.0.0.2") is None
    with pytest.raises(APIError, match="rate limit"):
        _admit(gate, {}, client="10.0.0.1")
