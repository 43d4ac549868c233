"""`ModelRegistry`: the registry as a named, detached, async Ray actor around one `RegistryStore`.

It holds locations and metadata only, never weights; everything lives in the database, so
killing or restarting the actor (or the cluster) loses nothing. Concurrent `log_metrics` calls
are group-committed (one transaction for all calls waiting at that moment), and the optional
MLflow mirror (actors/mlflow_mirror.py) runs after the commit, off the request path. Drivers
reach it through `actors.registry.client.get_or_create_registry` and call
`ray.get(handle.method.remote(...))`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Callable

import ray

from actors.mlflow_mirror import MlflowMirror
from actors.registry.schema import SCHEMA_VERSION
from actors.registry.store import MetricWrite, RegistryStore, mask_password

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

    def __init__(self, db_url: str, mirror: dict | None = None) -> None:
        self._store = RegistryStore(db_url)
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
        log.info("ModelRegistry open on %s (schema version %d%s), MLflow mirror %s", mask_password(db_url),
                 SCHEMA_VERSION, f", migrated from {self._store.migrated_from}" if self._store.migrated_from else "",
                 "on" if mirror else "off")

    async def _call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, functools.partial(fn, *args, **kwargs))

    async def _write(self, model: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        result = await self._call(fn, *args, **kwargs)
        self._mirror_touch(model)
        return result

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
        """{db_url (password masked), schema_version, migrated_from, mirror (settings or None)}."""
        return {"db_url": mask_password(self._store.url), "schema_version": SCHEMA_VERSION,
                "migrated_from": self._store.migrated_from, "mirror": self._mirror_settings}

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
    ) -> dict:
        return await self._write(
            model, self._store.register_version, model, artifact_uri, format, config=config,
            config_hash=config_hash, metrics=metrics, parent=parent, transformation=transformation, tags=tags,
            params=params, dataset_fingerprint=dataset_fingerprint, label=label,
        )

    async def log_metrics(
        self, model: str, version: int | str, metrics: dict[str, float], step: int | None = None
    ) -> int:
        """Append metric values (one step); returns the rows written, once committed."""
        return await self._log(MetricWrite.single(model, version, metrics, step))

    async def log_metrics_batch(self, model: str, version: int | str, points: list[dict]) -> int:
        """Append many steps: `points` = [{"metrics": {...}, "step": n}, ...]; all or nothing."""
        return await self._log(MetricWrite.batch(model, version, points))

    async def _log(self, write: MetricWrite) -> int:
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
        self, model: str, alias: str, version: int | str, reason: str = "", actor: str = "cli"
    ) -> dict:
        return await self._write(model, self._store.set_alias, model, alias, version, reason, actor)

    async def remove_alias(self, model: str, alias: str, reason: str = "", actor: str = "cli") -> dict:
        return await self._write(model, self._store.remove_alias, model, alias, reason, actor)

    async def rollback_alias(self, model: str, alias: str, reason: str = "", actor: str = "cli") -> dict:
        return await self._write(model, self._store.rollback_alias, model, alias, reason, actor)

    async def delete_version(
        self, model: str, version: int | str, *, force: bool = False, reason: str = "", actor: str = "cli"
    ) -> dict:
        return await self._write(
            model, self._store.delete_version, model, version, force=force, reason=reason, actor=actor
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


