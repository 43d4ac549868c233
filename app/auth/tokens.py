"""JWT bearer tokens: `verify_token(token, cfg)` checks one against the `auth.jwt` settings.

Only the configured algorithm is accepted (no `none`, no HS256 token signed with an RS256 public
key), and `exp`, `aud`, `iss` and `sub` are required. Each way a token can fail has its own
message and `AuthError.reason`, so a caller can tell an expired token from a forged one.
"""

from __future__ import annotations

import os
from pathlib import Path

import jwt

from app.auth.api_keys import check_server_secret
from app.auth.identity import ROLES, AuthError, Principal
from app.config.auth import AuthConfig, JwtConfig


def verification_key(cfg: JwtConfig) -> str | bytes:
    """The HS256 secret (from the environment variable `cfg.secret_env`) or the RS256 public key (PEM file)."""
    if cfg.algorithm == "RS256":
        path = Path(cfg.public_key_path).expanduser()
        if not path.is_file():
            raise AuthError("not_configured", f"auth.jwt.public_key_path {str(path)!r} does not exist")
        return path.read_bytes()
    secret = os.environ.get(cfg.secret_env)
    if not secret:
        raise AuthError("not_configured", f"JWTs cannot be checked: environment variable {cfg.secret_env} "
                                          "(auth.jwt.secret_env) is not set")
    try:
        return check_server_secret(secret, f"environment variable {cfg.secret_env}")
    except ValueError as err:
        raise AuthError("not_configured", str(err)) from None


def verify_token(token: str, cfg: AuthConfig, key: str | bytes | None = None) -> Principal:
    """The principal a valid token names (subject, role claim); AuthError saying why otherwise.

    `key`: the verification key when the caller already holds it (a process that received it
    at start, such as the registry actor); otherwise it is read as `verification_key` says."""
    if cfg.jwt is None:
        raise AuthError("not_configured", "JWT bearer tokens are not accepted here (auth.jwt is not set)")
    j = cfg.jwt
    try:
        claims = jwt.decode(
            token, verification_key(j) if key is None else key, algorithms=[j.algorithm], audience=j.audience, issuer=j.issuer,
            leeway=j.leeway_s, options={"require": ["exp", "aud", "iss", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("expired_token", "token expired: ask the identity provider for a new one") from None
    except jwt.InvalidAudienceError:
        raise AuthError("wrong_audience", f"token is not meant for this service (audience must be {j.audience!r})") from None
    except jwt.InvalidIssuerError:
        raise AuthError("wrong_issuer", f"token was not issued by {j.issuer!r} (auth.jwt.issuer)") from None
    except jwt.InvalidSignatureError:
        raise AuthError("bad_signature", "token signature does not verify: it was forged, altered, or signed with another key") from None
    except jwt.MissingRequiredClaimError as err:
        raise AuthError("bad_claims", f"token lacks the required claim {err.claim!r}") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError("malformed_token", f"token is not signed with {j.algorithm} (the only algorithm accepted)") from None
    except jwt.ImmatureSignatureError:
        raise AuthError("bad_claims", "token is not valid yet (nbf/iat in the future)") from None
    except jwt.InvalidTokenError as err:  # malformed: not three base64 parts, bad JSON, bad header
        raise AuthError("malformed_token", f"token is malformed ({type(err).__name__})") from None
    role = claims.get(j.role_claim)
    if role not in ROLES:
        raise AuthError("bad_claims", f"token claim {j.role_claim!r} must be one of {', '.join(ROLES)}, got {role!r}")
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise AuthError("bad_claims", "token claim 'sub' must be a non-empty string")
    return Principal(name=subject, role=role, kind="jwt")


def token_expiry(token: str) -> float:
    """The `exp` claim (Unix time) of a token that `verify_token` accepted (not verified again here)."""
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])
