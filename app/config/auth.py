"""The `auth` section: whether callers must prove who they are, how JWTs are checked, and where the
secrets are. Secrets themselves never sit in a config file: the config names the environment
variables that hold them."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, model_validator

from app.config.base import Section

ENV_NAME_PATTERN = r"^[A-Z_][A-Z0-9_]{0,127}$"
"""An environment variable name (upper case, as secrets are conventionally named)."""


class JwtConfig(Section):
    """Bearer tokens from an identity provider: signature, expiry, audience and issuer are checked."""

    algorithm: Literal["HS256", "RS256"] = "HS256"
    """`HS256`: a shared secret (from `secret_env`); `RS256`: the provider's public key (`public_key_path`). Only this one algorithm is accepted, so a token cannot choose a weaker one."""
    secret_env: str = Field("TEMPER_JWT_SECRET", pattern=ENV_NAME_PATTERN)
    """Environment variable holding the HS256 secret (at least 32 characters)."""
    public_key_path: str | None = None
    """PEM file with the RS256 public key; required with `algorithm: RS256`."""
    audience: str = Field(min_length=1)
    """Required `aud` claim: tokens issued for another service are refused."""
    issuer: str = Field(min_length=1)
    """Required `iss` claim: tokens from another identity provider are refused."""
    role_claim: str = Field("role", min_length=1)
    """Claim holding the caller's role (viewer, developer or admin)."""
    leeway_s: float = Field(30.0, ge=0, le=300)
    """Clock skew tolerated on `exp` (and `nbf`, `iat`), in seconds."""

    @model_validator(mode="after")
    def _key(self) -> "JwtConfig":
        if self.algorithm == "RS256" and self.public_key_path is None:
            raise ValueError("auth.jwt.public_key_path must be set when auth.jwt.algorithm is RS256")
        if self.algorithm == "HS256" and self.public_key_path is not None:
            raise ValueError("auth.jwt.public_key_path is only read with auth.jwt.algorithm RS256; remove it or switch")
        return self


class RateLimitConfig(Section):
    """Per-principal request budget (a token bucket), enforced where requests arrive."""

    requests_per_s: float = Field(gt=0)
    """Sustained requests per second per principal."""
    burst: int = Field(ge=1)
    """Requests a principal may make at once before the sustained rate applies."""


class AuthConfig(Section):
    """Authentication and authorization: API keys stored hashed in the registry database, JWTs from an identity provider, roles viewer < developer < admin."""

    enabled: bool | None = None
    """Require an identity on every call; default (null): on when serving on an address other than loopback (127.0.0.1, ::1, localhost), off otherwise."""
    key_secret_env: str = Field("TEMPER_KEY_SECRET", pattern=ENV_NAME_PATTERN)
    """Environment variable holding the server secret that API keys are hashed with (at least 32 characters); changing it invalidates every key."""
    service_key_env: str = Field("TEMPER_SERVICE_KEY", pattern=ENV_NAME_PATTERN)
    """Environment variable, on the cluster's nodes, holding the API key or JWT that the rollout watcher moves aliases with when auth is on (role developer; admin when an auto_rollback canary is production); read only when a model has auto_rollback."""
    jwt: JwtConfig | None = None
    """Accept JWT bearer tokens too (off by default: API keys only)."""
    rate_limit: RateLimitConfig | None = None
    """Per-principal rate limit (off by default)."""

    def enabled_for(self, host: str) -> bool:
        """Whether auth applies to a server listening on `host`: `enabled` if set, else off only on loopback."""
        if self.enabled is not None:
            return self.enabled
        return not is_loopback(host)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: reachable from elsewhere
