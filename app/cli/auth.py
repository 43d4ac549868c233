"""`auth create-key|list-keys|revoke`: API keys in the registry database, managed on the database itself.

Like the registry's read commands, these open the database in this process (no Ray). Whoever
runs them can open that database, so they act as a local admin (`local:cli:$USER` in the audit
log): a permission check would guard nothing. A new key is printed once; only its HMAC, made
with the secret in the environment variable `auth.key_secret_env` names, is stored.
"""

from __future__ import annotations

import getpass
import json
import sys

from app.cli.console import error_message
from app.cli.registry import config_sections
from app.cli.tables import format_table
from app.config.base import ConfigError
from app.errors import TemperError

SHOWN_ONCE = "Store this key now: it is not kept anywhere and will not be shown again."


def cmd_auth(args) -> int:
    from actors.registry.client import open_store
    from app.auth.api_keys import parse_duration, read_server_secret
    from app.auth.identity import Principal
    from app.config.auth import AuthConfig
    from app.config.registry import RegistryConfig

    cfg = config_sections(args, {"registry": RegistryConfig, "auth": AuthConfig})
    env = cfg["auth"].key_secret_env
    try:
        secret = read_server_secret(env)
        expires_in = parse_duration(args.expires_in) if getattr(args, "expires_in", None) else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.action == "create-key" and secret is None:
        raise ConfigError(f"environment variable {env} (auth.key_secret_env) must hold the server secret that "
                          "API keys are hashed with (at least 32 characters, e.g. from `openssl rand -base64 48`)")
    me = Principal(name=f"cli:{getpass.getuser()}", role="admin", kind="local")
    try:
        store = open_store(cfg["registry"], key_secret=secret)
    except (TemperError, RuntimeError, ValueError) as err:
        print(f"auth: {error_message(err)}", file=sys.stderr)
        return 1
    try:
        if args.action == "create-key":
            key_id, plaintext = store.create_key(args.name, args.role, expires_in, principal=me)
            [record] = [k for k in store.list_keys() if k["key_id"] == key_id]
            result = {**record, "key": plaintext, "warning": SHOWN_ONCE}
            expires = f", expires {record['expires_at']}" if record["expires_at"] else ", never expires"
            text = f"API key {args.name!r} (role {args.role}, id {key_id}{expires}):\n{plaintext}"
            print(SHOWN_ONCE, file=sys.stderr)
        elif args.action == "list-keys":
            result = store.list_keys()
            text = format_table(["name", "key_id", "role", "status", "created_at", "expires_at", "revoked_at"], [
                [k["name"], k["key_id"], k["role"], k["status"], k["created_at"], k["expires_at"], k["revoked_at"]]
                for k in result
            ]) if result else "(no API keys)"
        else:
            result = store.revoke_key(args.name, principal=me)
            text = f"API key {result['name']!r} (id {result['key_id']}) revoked at {result['revoked_at']}"
    except (TemperError, ValueError) as err:  # unknown or already revoked key, a taken name, a bad name
        print(f"auth: {error_message(err)}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps(result, indent=2, default=str) if args.json else text, file=args.out)
    return 0
