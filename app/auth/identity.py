"""Who a request comes from (`Principal`), the three roles, and the two ways it can be turned away.

`AuthError` means "we do not know who you are" (HTTP 401: unknown, revoked or expired key, bad
token); `PermissionDenied` means "we know, and your role may not do this" (HTTP 403). Both are
`TemperError`s, so the CLI prints them as one line; each message says what happened, never a
secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.errors import TemperError

ROLES = ("viewer", "developer", "admin")
"""The roles, least to most powerful: each may do everything the ones before it may."""

Role = Literal["viewer", "developer", "admin"]

PrincipalKind = Literal["key", "jwt", "local"]
"""How the principal proved who it is: an API key, a JWT, or direct access to the database
(a CLI command on the registry database itself: whoever can open the file can change it anyway)."""

ANONYMOUS = "anonymous"
"""The principal name recorded for a call that carries no identity."""


class AuthError(TemperError, PermissionError):
    """The caller's credentials were not accepted (HTTP 401); `reason` is a stable code.

    Codes: unknown_key, revoked_key, expired_key, malformed_token, expired_token,
    wrong_audience, wrong_issuer, bad_signature, bad_claims, not_configured.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # pickled with both arguments, so it crosses Ray (actor -> caller) intact
        return type(self), (self.reason, str(self))


class PermissionDenied(TemperError, PermissionError):
    """A known caller whose role may not perform the operation (HTTP 403); the message names both."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its name (key name, JWT subject, or local user), role, and how it proved it."""

    name: str
    role: Role
    kind: PrincipalKind

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not self.name:
            raise ValueError("a principal needs a non-empty name")
