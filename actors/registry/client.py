"""Driver-side access to the registry: the actor's handle, the database URL, direct store access.

`get_or_create_registry(cfg)` starts or finds the `ModelRegistry` actor (needs Ray);
`open_store(cfg)` opens the same database in this process without Ray, for read-only commands
when no cluster runs (this module imports Ray and the actor only where they are used: a registry
command that reads the database starts ~0.7 s sooner). Both resolve a relative SQLite path
against this process's working directory, so they open the same file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

from actors.registry.store import RegistryStore, mask_password
from actors.registry.validation import URI_SCHEME_RE

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from app.config.auth import AuthConfig
    from app.config.registry import MlflowMirrorConfig, RegistryConfig

ACTOR_START_TIMEOUT_S = 120.0
"""How long `get_or_create_registry` waits for the actor to answer its first call."""

API_KEY_ENV = "TEMPER_API_KEY"
"""Environment variable holding the caller's credentials (an API key, or a JWT) that the CLI,
the pipelines and `serve.client` send to the registry actor and the HTTP ingress."""


def caller_credentials() -> str | None:
    """This process's credentials: the value of TEMPER_API_KEY (None when unset or empty)."""
    return os.environ.get(API_KEY_ENV) or None


def registry_auth(auth: AuthConfig, enabled: bool) -> dict:
    """What the registry actor needs to check callers, read in this (the driver's) process:
    {enabled, key_secret, jwt, jwt_key}. The secrets come from the environment variables the
    config names and travel as constructor arguments, never through the actor's runtime_env
    (which Ray's dashboard shows). ValueError when `enabled` but no credential could be checked."""
    from app.auth.api_keys import read_server_secret
    from app.auth.tokens import verification_key

    key_secret = read_server_secret(auth.key_secret_env)
    jwt_key = None if auth.jwt is None else verification_key(auth.jwt)
    if enabled and key_secret is None and jwt_key is None:
        raise ValueError(
            f"auth is enabled but nothing could authenticate a caller: set the environment variable "
            f"{auth.key_secret_env} (auth.key_secret_env, for API keys) or configure auth.jwt"
        )
    return {
        "enabled": enabled,
        "key_secret": None if key_secret is None else key_secret.decode(),
        "jwt": None if auth.jwt is None else auth.jwt.model_dump(mode="json"),
        "jwt_key": jwt_key.decode() if isinstance(jwt_key, bytes) else jwt_key,
    }


def _absolute_sqlite(url: str, cwd: str | Path | None, field: str) -> str:
    parsed = make_url(url)
    database = parsed.database or ""
    if database in ("", ":memory:") or "mode=memory" in database:
        raise ValueError(
            f"{field} {url!r} is an in-memory SQLite database, which would vanish with the actor; "
            "it needs a file (sqlite:///path.db)"
        )
    if database.startswith("file:"):
        return url
    path = Path(database).expanduser()
    if not path.is_absolute():
        path = Path(cwd) / path if cwd is not None else Path.cwd() / path
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


def resolve_db_url(db_url: str, cwd: str | Path | None = None) -> str:
    """`db_url` with a relative SQLite path made absolute against `cwd` (default: this process's).

    The actor runs with another working directory, so it must receive an absolute path. An
    in-memory SQLite database is refused: it would vanish with the actor.
    """
    if make_url(db_url).get_backend_name() != "sqlite":
        return db_url
    return _absolute_sqlite(db_url, cwd, "registry.db_url")


def database_url(cfg: "RegistryConfig", cwd: str | Path | None = None) -> str:
    """The URL to connect to `cfg`'s database with: a relative SQLite path made absolute
    (`resolve_db_url`) and the password taken from `registry.password_env` when that is set."""
    from app.config.base import ConfigError
    from app.config.registry import MASK

    url = resolve_db_url(cfg.db_url, cwd)
    if cfg.password_env is None:
        if make_url(url).password == MASK:
            raise ConfigError(
                f"registry.db_url {url}: this config was written down with its password masked (passwords are "
                "never saved); give the config file again (e.g. `tune CONFIG --resume NAME`) or set registry.password_env"
            )
        return url
    password = os.environ.get(cfg.password_env)
    if not password:
        raise ConfigError(f"registry.password_env: the environment variable {cfg.password_env} is not set in this process")
    return make_url(url).set(password=password).render_as_string(hide_password=False)


def resolve_mirror_settings(cfg: MlflowMirrorConfig, db_url: str, cwd: str | Path | None = None) -> dict | None:
    """The MLflow mirror's settings with every default filled in and every path absolute; None when off.

    Defaults sit next to a SQLite registry database: `mlflow.db` (tracking and model registry)
    and the `mlflow-artifacts/` folder (the experiment's artifact location, so nothing lands in
    MLflow's default `./mlruns` of whatever folder the actor runs in).
    """
    if not cfg.enabled:
        return None
    db = make_url(resolve_db_url(db_url, cwd))
    base = None
    if db.get_backend_name() == "sqlite" and not (db.database or "").startswith("file:"):
        base = Path(db.database).parent
    if base is None and (cfg.tracking_uri is None or cfg.artifact_location is None):
        raise ValueError(
            "registry.mlflow.tracking_uri and registry.mlflow.artifact_location must be set when "
            "registry.db_url is not a SQLite file (there is no folder to put them next to)"
        )
    tracking = cfg.tracking_uri or f"sqlite:///{base / 'mlflow.db'}"
    if tracking.startswith("sqlite:"):
        tracking = _absolute_sqlite(tracking, cwd, "registry.mlflow.tracking_uri")
    registry_uri = cfg.registry_uri or tracking
    if registry_uri.startswith("sqlite:"):
        registry_uri = _absolute_sqlite(registry_uri, cwd, "registry.mlflow.registry_uri")
    artifacts = cfg.artifact_location or str(base / "mlflow-artifacts")
    if not URI_SCHEME_RE.match(artifacts):
        path = Path(artifacts).expanduser()
        if not path.is_absolute():
            path = (Path(cwd) if cwd is not None else Path.cwd()) / path
        artifacts = path.as_uri()
    return {"tracking_uri": tracking, "registry_uri": registry_uri, "artifact_location": artifacts,
            "experiment": cfg.experiment, "log_artifacts": cfg.log_artifacts}


def get_or_create_registry(cfg: RegistryConfig, auth: dict | None = None) -> ActorHandle:
    """The registry actor named `cfg.actor_name` in `cfg.namespace`, started if absent.

    Needs Ray initialized. Raises ValueError when an actor of that name already serves another
    database than `cfg.db_url`, or when `cfg.mlflow` is enabled and the running actor mirrors
    elsewhere (or not at all). A caller with the mirror off uses whatever actor runs.

    `auth` (from `registry_auth`) is fixed when the actor starts: with `enabled`, every mutation
    needs credentials whose role allows it. Asking for auth from a running actor without it is a
    ValueError (restart it); a caller without `auth` uses whatever actor runs, and a running
    actor with auth on refuses that caller's writes unless it sends credentials. `cfg.artifact_roots`
    too is fixed when the actor starts.
    """
    import ray

    from actors.registry.actor import ModelRegistry

    if not ray.is_initialized():
        raise RuntimeError("get_or_create_registry needs Ray: call ray.init() first")
    url = database_url(cfg)
    mirror = resolve_mirror_settings(cfg.mlflow, url)
    options: dict[str, Any] = dict(
        name=cfg.actor_name,
        namespace=cfg.namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,  # writes are not idempotent; reads retry per method (see actor.py)
        num_cpus=0,
    )
    if mirror is not None and "MLFLOW_DISABLE_TELEMETRY" not in os.environ:
        # A long-lived service process: MLflow's usage telemetry would otherwise block its first
        # calls for seconds on machines without internet access. Set the variable to override.
        options["runtime_env"] = {"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}}
    if make_url(url).get_backend_name() == "sqlite":
        # A SQLite file lives on this machine's disk: keep the actor (and its restarts) on this node.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=False
        )
    where = f"registry actor {cfg.actor_name!r} (namespace {cfg.namespace!r}) on {mask_password(url)}"
    for attempt in range(3):
        handle = ModelRegistry.options(**options).remote(url, mirror, auth, list(cfg.artifact_roots))
        try:
            actual = ray.get(handle.settings.remote(), timeout=ACTOR_START_TIMEOUT_S)
            break
        except ray.exceptions.RayActorError as err:
            # Right after a `ray.kill`, the name can still resolve to the dead actor for a moment:
            # ask again. An actor whose __init__ raised (e.g. it refused the database) is not
            # asked again: the same database gives the same answer.
            if attempt == 2 or err.actor_init_failed:
                raise RuntimeError(f"{where} failed to start: {err}") from err
            time.sleep(1.0)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"{where} did not answer within {ACTOR_START_TIMEOUT_S:.0f}s") from None
    if actual["db_url"] != mask_password(url):
        raise ValueError(
            f"registry actor {cfg.actor_name!r} (namespace {cfg.namespace!r}) already runs on database "
            f"{actual['db_url']}, not {mask_password(url)} (registry.db_url); use another registry.actor_name "
            "or the same registry.db_url"
        )
    if auth is not None and auth["enabled"] and not actual["auth"]["enabled"]:
        raise ValueError(
            f"registry actor {cfg.actor_name!r} (namespace {cfg.namespace!r}) already runs without auth, "
            "but auth is enabled here; restart it (ray.kill) so that it starts with auth on"
        )
    if mirror is not None and actual["mirror"] != mirror:
        shown = {k: mask_password(v) if isinstance(v, str) else v for k, v in (actual["mirror"] or {}).items()} or "off"
        raise ValueError(
            f"registry actor {cfg.actor_name!r} (namespace {cfg.namespace!r}) already runs with MLflow mirror "
            f"{shown}, not the requested registry.mlflow settings; restart it (ray.kill) or use another "
            "registry.actor_name"
        )
    return handle


def open_store(cfg: RegistryConfig, *, key_secret: bytes | None = None, auth_enabled: bool = False) -> RegistryStore:
    """The registry database of `cfg.db_url` opened in this process, without Ray or the actor.

    For read-only commands when no cluster runs (no actor start-up, nothing on stdout). It opens
    the database exactly as the actor would (creating or migrating it); SQLite's WAL mode and
    Postgres' row locks make it safe next to a running actor. Writes through it are not
    mirrored to MLflow until the actor's next start. Close it with `store.close()`.
    `key_secret` and `auth_enabled` are passed to the store (API keys, permission checks).
    """
    return RegistryStore(database_url(cfg), key_secret=key_secret, auth_enabled=auth_enabled)


def find_version_by_artifact(registry: ActorHandle, model: str, artifact_uri: str) -> dict | None:
    """The version already registered for an artifact folder, if any (makes re-runs idempotent)."""
    import ray

    if model not in {m["name"] for m in ray.get(registry.list_models.remote())}:
        return None
    versions = ray.get(registry.list_versions.remote(model))
    return next((v for v in versions if v["artifact_uri"] == artifact_uri), None)
