"""Who may call the HTTP ingress: credentials from the request headers, checked against the
registry (API keys) or the `auth.jwt` settings (tokens) and cached briefly, the role each route
needs, and a token bucket per caller.

Headers: `X-API-Key: <key>` or `Authorization: Bearer <credentials>`, where the bearer value may
be a JWT or an API key (keys start with `tmp_`, so the two never mix up). Answers: 401 when the
credentials are missing or not accepted (the message says which: missing, unknown, revoked or
expired key, expired token, wrong audience, bad signature, ...), 403 when the role may not use
the route, 429 with `Retry-After` past the rate limit. Pure asyncio: testable without Ray by
passing any `lookup` coroutine.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Awaitable, Callable, Mapping

from pydantic import BaseModel, ConfigDict

from actors.registry.permissions import check
from app.auth.identity import AuthError, PermissionDenied, Principal
from app.config.auth import RateLimitConfig
from serve.protocol import APIError

CREDENTIALS_CACHE_S = 5.0
"""How long the ingress trusts an answer about one credential (accepted or refused) before asking
the registry again: a revoked key stops working at most this long after `auth revoke`."""
MAX_CACHED = 10_000
"""Most credentials (and rate-limit buckets) remembered at once; past this the oldest are dropped."""


class IngressAuth(BaseModel):
    """The ingress's auth settings (part of its live `user_config`): changing them reconfigures
    the running ingress without a restart."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    rate_limit: RateLimitConfig | None = None


def credentials_from(headers: Mapping[str, str]) -> str | None:
    """The credentials a request carries: `X-API-Key`, else the `Authorization: Bearer` value."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, value = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


class TokenBuckets:
    """One token bucket per key: `burst` requests at once, refilled at `rate` per second."""

    def __init__(self, cfg: RateLimitConfig, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = cfg.requests_per_s, float(cfg.burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """0.0 when a request of `key` may pass now (one token taken), else seconds until it may."""
        now = self.clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0 if wait == 0.0 else tokens, now)  # most recent last
        if len(self._buckets) > MAX_CACHED:
            del self._buckets[next(iter(self._buckets))]
        return wait


class AccessControl:
    """The ingress's door: `admit(headers, client, operation)` returns the caller's principal (None
    with auth off) or raises the APIError to answer (401, 403, 429).

    `lookup(credentials)` answers {name, role, kind, expires} or raises AuthError; in the ingress
    it is the registry actor's `authenticate`. Answers are cached for `cache_s` (a JWT's no
    longer than its `exp`), refusals too, so a flood of bad keys costs one lookup each per period.
    """

    def __init__(self, lookup: Callable[[str], Awaitable[dict]], settings: IngressAuth | None = None,
                 cache_s: float = CREDENTIALS_CACHE_S, clock: Callable[[], float] = time.monotonic):
        self.lookup, self.cache_s, self.clock = lookup, cache_s, clock
        self._cache: dict[str, tuple[float, Principal | AuthError]] = {}
        self.update(settings or IngressAuth())

    def update(self, settings: IngressAuth) -> None:
        self.settings = settings
        self.buckets = None if settings.rate_limit is None else TokenBuckets(settings.rate_limit, self.clock)

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    async def admit(self, headers: Mapping[str, str], client: str | None, operation: str, target: str) -> Principal | None:
        if not self.enabled:
            self._limit(f"address:{client or '-'}")
            return None
        credentials = credentials_from(headers)
        if credentials is None:
            raise APIError(401, "missing credentials: send an API key as `X-API-Key: <key>` or a token as "
                                "`Authorization: Bearer <token>`", "authorization")
        principal = await self._principal(credentials)
        self._limit(f"{principal.kind}:{principal.name}")
        try:
            check(principal, operation, target)
        except PermissionDenied as err:
            raise APIError(403, str(err), "authorization") from None
        return principal

    def _limit(self, key: str) -> None:
        if self.buckets is None:
            return
        wait = self.buckets.take(key)
        if wait > 0.0:
            raise APIError(429, f"rate limit of {self.settings.rate_limit.requests_per_s:g} requests/s "
                                f"(burst {self.settings.rate_limit.burst}) exceeded (auth.rate_limit); retry in {wait:.2f} s",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})

    async def _principal(self, credentials: str) -> Principal:
        digest = hashlib.sha256(credentials.encode()).hexdigest()  # the cache never holds a credential
        now = self.clock()
        hit = self._cache.get(digest)
        if hit is None or hit[0] <= now:
            until = now + self.cache_s
            try:
                found = await self.lookup(credentials)
                answer: Principal | AuthError = Principal(found["name"], found["role"], found["kind"])
                if found.get("expires") is not None:
                    until = min(until, now + (found["expires"] - time.time()))
            except AuthError as err:
                answer = AuthError(err.reason, str(err))
            hit = (until, answer)
            self._cache.pop(digest, None)
            self._cache[digest] = hit
            if len(self._cache) > MAX_CACHED:
                del self._cache[next(iter(self._cache))]
        if isinstance(hit[1], AuthError):
            raise APIError(401, f"credentials not accepted: {hit[1]}", "authorization", hit[1].reason)
        return hit[1]

