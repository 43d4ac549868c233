"""API keys as text: making one, splitting it into its public id and secret, and hashing it.

A key reads `tmp_<key id>_<secret>`: the 16-hex-digit key id is stored in clear so a key is found
with one indexed lookup, the secret (32 random bytes) never is. The database keeps
HMAC-SHA256(server secret, whole key). Why HMAC and not scrypt/PBKDF2: a slow KDF protects
low-entropy passwords against guessing, but these keys carry 256 random bits, which no guessing
reaches; a slow hash would only add tens of milliseconds to every authenticated request. The
server secret (read from the environment variable that `auth.key_secret_env` names) means a
copy of the database alone cannot even confirm a leaked key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from datetime import timedelta

KEY_PREFIX = "tmp_"
"""Every API key starts with this, so secret scanners and people recognize one."""

MIN_SERVER_SECRET_LEN = 32
"""Shortest server secret accepted (characters): shorter ones are too easy to guess."""

_KEY_RE = re.compile(r"tmp_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_DURATION_RE = re.compile(r"([0-9]+)([smhdw])")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def new_key() -> tuple[str, str]:
    """(key id, plaintext key): a fresh random key; the plaintext is shown once and never stored."""
    key_id = secrets.token_hex(8)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(plaintext: str) -> str | None:
    """The key id of a well-formed key, None for anything else (never echoes the input)."""
    m = _KEY_RE.fullmatch(plaintext) if isinstance(plaintext, str) else None
    return m.group(1) if m else None


def hash_key(plaintext: str, server_secret: bytes) -> str:
    """Hex HMAC-SHA256 of the whole key under the server secret: what the database keeps."""
    return hmac.new(server_secret, plaintext.encode(), hashlib.sha256).hexdigest()


def matches(plaintext: str, stored_hash: str, server_secret: bytes) -> bool:
    """Whether `plaintext` is the key behind `stored_hash` (constant-time comparison)."""
    return hmac.compare_digest(hash_key(plaintext, server_secret), stored_hash)


def check_server_secret(secret: str | bytes, where: str) -> bytes:
    """The server secret as bytes; ValueError naming `where` when it is too short to be safe."""
    raw = secret.encode() if isinstance(secret, str) else secret
    if len(raw) < MIN_SERVER_SECRET_LEN:
        raise ValueError(f"{where} must hold at least {MIN_SERVER_SECRET_LEN} characters, got {len(raw)}")
    return raw


def read_server_secret(env_name: str) -> bytes | None:
    """The server secret from environment variable `env_name` (None when unset); ValueError when too short."""
    value = os.environ.get(env_name)
    if not value:
        return None
    return check_server_secret(value, f"environment variable {env_name}")


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `3600s`, `2w` (or several: `1d12h`) as a timedelta; ValueError otherwise."""
    parts = _DURATION_RE.findall(text or "")
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"duration must look like 30d, 12h, 90m, 3600s or 2w, got {text!r}")
    total = timedelta()
    for number, unit in parts:
        total += timedelta(**{_DURATION_UNITS[unit]: int(number)})
    if total <= timedelta(0):
        raise ValueError(f"duration must be positive, got {text!r}")
    return total
