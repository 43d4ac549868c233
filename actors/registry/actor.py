"""`ModelRegistry`: the registry as a named, detached, async Ray actor around one `RegistryStore`.

It holds locations and metadata only, never weights; everything lives in the database, so
killing or restarting the actor (or the cluster) loses nothing. Concurrent `log_metrics` calls
are group-committed (one transaction for all calls waiting at that moment), and the optional
MLflow mirror (actors/mlflow_mirror.py) runs after the commit, off the request path. Drivers
reach it through `actors.registry.client.get_or_create_registry` and call
`ray.get(handle.method.remote(...))`.

Who may write: every mutation takes `credentials=`, the caller's API key or JWT as a string,
and the actor turns it into a principal itself (an API key against the database, a JWT against
the `auth.jwt` settings); no method accepts a principal, a role or a name from the caller, so
none can be forged through the API. Whether writes are refused is fixed when the actor starts
(`auth` below, from `get_or_create_registry(cfg, auth=...)`); reads stay open. The boundary of
this check is the actor's API: code that can run arbitrary tasks on the cluster can also open
the database or the actor's process (Ray itself has no authentication), so the cluster must be
reachable only by trusted hosts.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Callable

import ray

from actors.mlflow_mirror import MlflowMirror
from actors.registry.permissions import alias_operation
from actors.registry.schema import SCHEMA_VERSION
from actors.registry.store import MetricWrite, RegistryStore, mask_password
from app.auth.api_keys import KEY_PREFIX
from app.auth.identity import AuthError, Principal
from app.auth.tokens import token_expiry, verify_token
from app import telemetry
from app.config.auth import AuthConfig

log = logging.getLogger(__name__)

METRIC_GROUP_MAX_WRITES = 512
"""Most `log_metrics` calls committed in one transaction by the actor's group commit."""

# Writes are not idempotent (a retried register_version would issue a second version number,
# a retried log_metrics or set_alias would write duplicate rows), so the actor's default is
# no task retries; only the read-only methods below retry across an actor restart.
_READ_RETRIES = 3


@ray.remote
class ModelRegistry:
    """The registry as a named, detached, async Ray actor around one `RegistryStore`.

    Database calls run on one dedicated thread: they are serialized (SQLite has one writer
    anyway) and never block the event loop, so `ping` answers while a slow query runs. A
    write returns once it is committed. `log_metrics` calls that arrive while the thread is
    busy are committed together in the next transaction (group commit), so many concurrent
    writers (Tune trials) cost a few transactions, not one each.

    With the MLflow mirror on, each write marks its model dirty; a second thread brings MLflow
    in line with the database (runs, model versions, aliases) after the commit. A mirror
    failure is logged and reported by `mirror_status`, never raised to the writer: the database
    is the source of truth. After a restart the first write or `mirror_flush` re-syncs every model.
    """

    def __init__(self, db_url: str, mirror: dict | None = None, auth: dict | None = None,
                 artifact_roots: list[str] | None = None) -> None:
        """`auth` (see `actors.registry.client.registry_auth`): {enabled, key_secret, jwt, jwt_key}; None: off."""
        auth = auth or {"enabled": False, "key_secret": None, "jwt": None, "jwt_key": None}
        self._auth_enabled = bool(auth["enabled"])
        self._auth_cfg = AuthConfig(enabled=self._auth_enabled, jwt=auth["jwt"])
        self._jwt_key = auth["jwt_key"]
        key_secret = auth["key_secret"]
        self._store = RegistryStore(db_url, key_secret=None if key_secret is None else key_secret.encode(),
                                    auth_enabled=self._auth_enabled, artifact_roots=artifact_roots or ())
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-db")
        self._metric_queue: list[tuple[MetricWrite, asyncio.Future]] = []
        self._metric_flusher: asyncio.Task | None = None
        self._stats = {"metric_calls": 0, "metric_transactions": 0}
        self._mirror_settings = mirror
        self._mirror = None
        if mirror is not None:
            self._mirror = MlflowMirror(mirror)
            self._mirror_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-mlflow")
            self._mirror_dirty: set[str] = {"*"}  # "*": every model (first sync after a (re)start)
            self._mirror_errors: dict[str, str] = {}
            self._mirror_task: asyncio.Task | None = None
        log.info("ModelRegistry open on %s (schema version %d%s), MLflow mirror %s, auth %s", mask_password(db_url),
                 SCHEMA_VERSION, f", migrated from {self._store.migrated_from}" if self._store.migrated_from else "",
                 "on" if mirror else "off", "on" if self._auth_enabled else "off")

    async def _call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run one store method on the database thread; counted and timed per method name."""
        loop = asyncio.get_running_loop()
        tags = {"operation": fn.__name__}
        t0 = time.perf_counter()
        try:
            return await loop.run_in_executor(self._db_thread, functools.partial(fn, *args, **kwargs))
        except Exception as err:
            error_tags = {**tags, "error": type(err).__name__}
            telemetry.record(telemetry.REGISTRY_ERRORS, lambda: telemetry.counter(
                telemetry.REGISTRY_ERRORS, ("operation", "error")).inc(tags=error_tags))
            raise
        finally:
            ms = (time.perf_counter() - t0) * 1000
            telemetry.record(telemetry.REGISTRY_OPERATIONS, lambda: telemetry.counter(
                telemetry.REGISTRY_OPERATIONS, ("operation",)).inc(tags=tags))
            telemetry.record(telemetry.REGISTRY_LATENCY_MS, lambda: telemetry.histogram(
                telemetry.REGISTRY_LATENCY_MS, tuple(telemetry.LATENCY_BOUNDARIES_MS), ("operation",)).observe(ms, tags=tags))

    async def _write(self, model: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        result = await self._call(fn, *args, **kwargs)
        self._mirror_touch(model)
        return result

    async def _principal(self, credentials: str | None, operation: str, model: str, target: str) -> Principal | None:
        """Who `credentials` (an API key or a JWT) belong to; None (anonymous) without any or with auth off.

        With auth off nothing is checked, credentials included, exactly as before auth existed.
        Credentials that are not accepted raise AuthError after a `refused` audit row for the
        attempted `operation` on `target` (a wrong role is recorded by the store).
        """
        if not self._auth_enabled or credentials is None:
            return None
        try:
            return await self._identify(credentials)
        except AuthError as err:
            await self._call(self._store.append_audit, None, operation, target, result="refused", model=model,
                             reason=f"credentials not accepted: {err}")
            raise

    async def _identify(self, credentials: str) -> Principal:
        if not isinstance(credentials, str):
            raise TypeError(f"credentials must be an API key or a JWT string, got {type(credentials).__name__}: "
                            "the registry authenticates callers itself and accepts no principal object")
        if credentials.startswith(KEY_PREFIX):
            return await self._call(self._store.authenticate, credentials)
        return verify_token(credentials, self._auth_cfg, self._jwt_key)

    # ---- health and settings

    @ray.method(max_task_retries=_READ_RETRIES)
    async def ping(self) -> str:
        return "ok"

    @ray.method(max_task_retries=_READ_RETRIES)
    async def db_url(self) -> str:
        """The database URL, password masked."""
        return mask_password(self._store.url)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def settings(self) -> dict:
        """{db_url (password masked), schema_version, migrated_from, mirror (settings or None),
        auth {enabled, api_keys (whether the server secret is set), jwt (whether tokens are accepted)}}."""
        return {"db_url": mask_password(self._store.url), "schema_version": SCHEMA_VERSION,
                "migrated_from": self._store.migrated_from, "mirror": self._mirror_settings,
                "auth": {"enabled": self._auth_enabled, "api_keys": self._store.key_secret is not None,
                         "jwt": self._auth_cfg.jwt is not None}}

    @ray.method(max_task_retries=_READ_RETRIES)
    async def authenticate(self, credentials: str) -> dict:
        """{name, role, kind, expires (a JWT's `exp` as Unix time; None for a key)} of an API key or
        JWT, checked now whether or not writes are enforced here; AuthError saying why it is not
        accepted. The HTTP ingress asks this (and caches the answer briefly)."""
        principal = await self._identify(credentials)
        expires = token_expiry(credentials) if principal.kind == "jwt" else None
        return {"name": principal.name, "role": principal.role, "kind": principal.kind, "expires": expires}

    @ray.method(max_task_retries=_READ_RETRIES)
    async def stats(self) -> dict:
        """Counters since this actor process started: metric_calls, metric_transactions (group commit)."""
        return dict(self._stats)

    # ---- writes

    async def register_version(
        self,
        model: str,
        artifact_uri: str,
        format: str,
        *,
        config: dict | None = None,
        config_hash: str | None = None,
        metrics: dict[str, float] | None = None,
        parent: dict | None = None,
        transformation: str = "trained",
        tags: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        dataset_fingerprint: str | None = None,
        label: str | None = None,
        credentials: str | None = None,
    ) -> dict:
        return await self._write(
            model, self._store.register_version, model, artifact_uri, format, config=config,
            config_hash=config_hash, metrics=metrics, parent=parent, transformation=transformation, tags=tags,
            params=params, dataset_fingerprint=dataset_fingerprint, label=label,
            principal=await self._principal(credentials, "register", model, model),
        )

    async def log_metrics(
        self, model: str, version: int | str, metrics: dict[str, float], step: int | None = None,
        *, credentials: str | None = None,
    ) -> int:
        """Append metric values (one step); returns the rows written, once committed."""
        return await self._log(MetricWrite.single(model, version, metrics, step), credentials)

    async def log_metrics_batch(
        self, model: str, version: int | str, points: list[dict], *, credentials: str | None = None
    ) -> int:
        """Append many steps: `points` = [{"metrics": {...}, "step": n}, ...]; all or nothing."""
        return await self._log(MetricWrite.batch(model, version, points), credentials)

    async def _log(self, write: MetricWrite, credentials: str | None) -> int:
        if self._auth_enabled:  # checked as `register`, like the store's own log_metrics
            target = f"{write.model}/{write.ref}"
            principal = await self._principal(credentials, "register", write.model, target)
            await self._call(self._store.authorize, principal, "register", write.model, target, None)
        if not write.rows:
            return 0
        future = asyncio.get_running_loop().create_future()
        self._metric_queue.append((write, future))
        if self._metric_flusher is None or self._metric_flusher.done():
            self._metric_flusher = asyncio.create_task(self._flush_metrics())
        written = await future
        self._mirror_touch(write.model)
        return written

    async def _flush_metrics(self) -> None:
        """Commit queued metric writes, as many per transaction as are waiting (up to a cap)."""
        while self._metric_queue:
            group = self._metric_queue[:METRIC_GROUP_MAX_WRITES]
            del self._metric_queue[:METRIC_GROUP_MAX_WRITES]
            self._stats["metric_calls"] += len(group)
            self._stats["metric_transactions"] += 1
            try:
                results = await self._call(self._store.log_metric_writes, [w for w, _ in group])
            except Exception as err:  # the transaction failed: none of the group was written, all callers hear it
                for _, future in group:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(group, results):
                if future.done():  # the caller was cancelled; its rows are committed anyway
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def set_alias(
        self, model: str, alias: str, version: int | str, reason: str = "", actor: str = "cli",
        *, credentials: str | None = None,
    ) -> dict:
        principal = await self._principal(credentials, alias_operation(alias), model, f"{model}@{alias}")
        return await self._write(model, self._store.set_alias, model, alias, version, reason, actor, principal=principal)

    async def remove_alias(
        self, model: str, alias: str, reason: str = "", actor: str = "cli", *, credentials: str | None = None
    ) -> dict:
        principal = await self._principal(credentials, alias_operation(alias), model, f"{model}@{alias}")
        return await self._write(model, self._store.remove_alias, model, alias, reason, actor, principal=principal)

    async def rollback_alias(
        self, model: str, alias: str, reason: str = "", actor: str = "cli", *, credentials: str | None = None
    ) -> dict:
        principal = await self._principal(credentials, alias_operation(alias, rollback=True), model, f"{model}@{alias}")
        return await self._write(model, self._store.rollback_alias, model, alias, reason, actor, principal=principal)

    async def delete_version(
        self, model: str, version: int | str, *, force: bool = False, reason: str = "", actor: str = "cli",
        credentials: str | None = None,
    ) -> dict:
        principal = await self._principal(credentials, "delete_version", model, f"{model}/{version}")
        return await self._write(
            model, self._store.delete_version, model, version, force=force, reason=reason, actor=actor,
            principal=principal,
        )

    # ---- reads

    @ray.method(max_task_retries=_READ_RETRIES)
    async def get_version(self, model: str, ref: int | str, *, include_deleted: bool = False) -> dict:
        return await self._call(self._store.get_version, model, ref, include_deleted=include_deleted)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def list_versions(self, model: str, **filters: Any) -> list[dict]:
        """See `RegistryStore.list_versions` for the filters (where, order_by, descending, format, ...)."""
        return await self._call(self._store.list_versions, model, **filters)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def list_models(self) -> list[dict]:
        return await self._call(self._store.list_models)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def metric_history(self, model: str, ref: int | str, key: str | None = None) -> list[dict]:
        return await self._call(self._store.metric_history, model, ref, key)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def lineage(self, model: str, ref: int | str) -> dict:
        return await self._call(self._store.lineage, model, ref)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def compare(self, model: str, a: int | str, b: int | str, *, model_b: str | None = None) -> dict:
        return await self._call(self._store.compare, model, a, b, model_b=model_b)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def aliases(self, model: str) -> dict[str, int]:
        return await self._call(self._store.aliases, model)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def alias_history(self, model: str, alias: str | None = None) -> list[dict]:
        return await self._call(self._store.alias_history, model, alias)

    @ray.method(max_task_retries=_READ_RETRIES)
    async def as_of(self, model: str, alias: str, when: datetime | str) -> dict:
        return await self._call(self._store.as_of, model, alias, when)

    # ---- MLflow mirror

    def _mirror_touch(self, model: str) -> None:
        if self._mirror is None:
            return
        self._mirror_dirty.add(model)
        if self._mirror_task is None or self._mirror_task.done():
            self._mirror_task = asyncio.create_task(self._mirror_loop())

    async def _mirror_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._mirror_dirty:
            if "*" in self._mirror_dirty:
                self._mirror_dirty.discard("*")
                self._mirror_dirty.update(await self._call(self._store.model_names))
                continue
            model = min(self._mirror_dirty)
            self._mirror_dirty.discard(model)
            try:
                await loop.run_in_executor(self._mirror_thread, self._mirror.sync_model, self._store, model)
                self._mirror_errors.pop(model, None)
            except Exception as err:  # reported by mirror_status; retried on the next write or flush
                log.exception("MLflow mirror of model %r failed (the registry write itself is committed)", model)
                self._mirror_errors[model] = f"{type(err).__name__}: {err}"

    @ray.method(max_task_retries=_READ_RETRIES)
    async def mirror_status(self) -> dict:
        """{enabled, pending (models not yet mirrored), errors {model: message}, settings}."""
        if self._mirror is None:
            return {"enabled": False, "pending": [], "errors": {}, "settings": None}
        return {"enabled": True, "pending": sorted(self._mirror_dirty), "errors": dict(self._mirror_errors),
                "settings": self._mirror_settings}

    async def mirror_flush(self) -> dict:
        """Bring MLflow in line now (retrying models that failed) and return `mirror_status()` when done."""
        if self._mirror is not None:
            self._mirror_dirty.update(self._mirror_errors)
            if self._mirror_dirty:
                self._mirror_touch(min(self._mirror_dirty))
            while self._mirror_task is not None and not self._mirror_task.done():
                await asyncio.shield(self._mirror_task)
        return await self.mirror_status()


