"""Automatic rollback of a canary route (`serve.models[].auto_rollback`).

    ingress --outcomes every ~1 s--> RolloutWatcher --rollback_alias(reason)--> ModelRegistry
                                                          (alias history, metric)

The ingress records every model call's outcome per (model, route, version): `ok` (with its
latency), `server_error` (5xx: the model failed or timed out), `client_error` (4xx) or
`rejected` (503 backpressure). Only ok and server_error count as requests of a version: a bad
request or an overloaded queue says nothing about the version.

The watcher keeps a sliding window per (model, route, version) and, at most every
`check_interval_s`, compares the canary's current version with the baseline's (`judge`): it
rolls the canary's alias back in the registry when its server-error rate exceeds both
`error_rate_factor` x the baseline's and `min_error_rate`, or its p95 latency exceeds
`latency_p95_factor` x the baseline's. The reason lands in the registry's alias history, the
`temper_serve_rollbacks_total` counter goes up, and the model servers of the canary route pick
up the moved alias on their next poll. A version is judged only while canary and baseline serve
different versions, and rolled back at most once.

The watcher is one replica (`num_replicas=1`): every ingress replica reports to it, so the
decision sees all traffic and an alias is never rolled back twice by two deciders.

With auth on, the registry refuses an anonymous rollback like any other, so the watcher acts with
a service credential: the API key or JWT in the environment variable `auth.service_key_env`
(default TEMPER_SERVICE_KEY) of the node it runs on, read from the process environment rather than
passed through the deployment's arguments, which Serve keeps in its config and shows on the
dashboard. The watcher checks the credential and its role against every canary alias when it
starts, so a missing key or a viewer key fails the deploy instead of the first rollback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from ray import serve

from app import telemetry
from app.config.serve import AutoRollbackConfig
from app.config.registry import RegistryConfig

log = logging.getLogger(__name__)

Outcome = tuple[str, str, "int | None", str, float]
"""(model, route, version or None, outcome, latency_ms) as the ingress reports it."""

ROLLBACK_ACTOR = "serve:auto-rollback"


@dataclass
class WindowStats:
    """What one version did on one route within the window."""

    requests: int = 0
    """Successes + server errors."""
    errors: int = 0
    """Server errors (5xx)."""
    p95_ms: float | None = None
    """p95 latency of the successes (None without any)."""
    successes: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class OutcomeWindow:
    """Outcomes of the last `window_s` seconds, per (model, route, version)."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._events: dict[tuple[str, str, int | None], deque] = {}

    def add(self, model: str, route: str, version: int | None, outcome: str, latency_ms: float, now: float) -> None:
        if outcome not in ("ok", "server_error"):
            return
        self._events.setdefault((model, route, version), deque()).append((now, outcome == "ok", latency_ms))

    def stats(self, model: str, route: str, version: int | None, now: float, include_unknown: bool = False) -> WindowStats:
        """Stats of `version` on `route`; `include_unknown` adds outcomes whose version was not known."""
        keys = [(model, route, version)] + ([(model, route, None)] if include_unknown and version is not None else [])
        ok_latencies, errors = [], 0
        for key in keys:
            events = self._events.get(key)
            if not events:
                continue
            while events and events[0][0] < now - self.window_s:
                events.popleft()
            for _, ok, latency in events:
                if ok:
                    ok_latencies.append(latency)
                else:
                    errors += 1
        n = len(ok_latencies) + errors
        p95 = float(np.percentile(ok_latencies, 95)) if ok_latencies else None
        return WindowStats(requests=n, errors=errors, p95_ms=p95, successes=len(ok_latencies))


def judge(canary: WindowStats, baseline: WindowStats, cfg: AutoRollbackConfig) -> list[str]:
    """Why the canary should be rolled back (empty: it should not, or there is too little data)."""
    if canary.requests < cfg.min_requests:
        return []
    reasons = []
    limit = max(baseline.error_rate * cfg.error_rate_factor, cfg.min_error_rate)
    if canary.error_rate > limit:
        reasons.append(
            f"error rate {canary.error_rate:.3f} ({canary.errors}/{canary.requests}) > {limit:.3f} "
            f"(baseline {baseline.error_rate:.3f} x {cfg.error_rate_factor}, floor {cfg.min_error_rate})"
        )
    if (cfg.latency_p95_factor is not None and canary.p95_ms is not None and baseline.p95_ms is not None
            and canary.successes >= cfg.min_requests and baseline.successes >= cfg.min_requests
            and canary.p95_ms > baseline.p95_ms * cfg.latency_p95_factor):
        reasons.append(
            f"p95 latency {canary.p95_ms:.1f} ms > {baseline.p95_ms * cfg.latency_p95_factor:.1f} ms "
            f"(baseline {baseline.p95_ms:.1f} ms x {cfg.latency_p95_factor})"
        )
    return reasons


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class RolloutWatcher:
    """Receives outcomes from the ingress, judges canaries, rolls their aliases back."""

    def __init__(self, rollback: dict[str, dict], registry: dict, service_key_env: str | None = None):
        import ray

        self.cfgs = {model: AutoRollbackConfig.model_validate(c) for model, c in rollback.items()}
        reg = RegistryConfig.model_validate(registry)
        self._registry = ray.get_actor(reg.actor_name, namespace=reg.namespace)
        self._credentials = None if service_key_env is None else self._service_credentials(service_key_env)
        self._window = OutcomeWindow(max(c.window_s for c in self.cfgs.values()))
        self._last_check: dict[str, float] = {}
        self._judged: set[tuple[str, str, int]] = set()  # (model, canary alias, version) rolled back (or refused)
        self._events: list[dict] = []
        self._last: dict[str, dict] = {}
        self._lock = asyncio.Lock()
        self._counter = telemetry.counter(telemetry.SERVE_ROLLBACKS, ("model", "alias"))

    def _service_credentials(self, env: str) -> str:
        """The credential in `$env`, checked by the registry, whose role may roll back every canary alias."""
        import ray

        from actors.registry.permissions import alias_operation, check
        from app.auth.identity import PermissionDenied, Principal

        credentials = os.environ.get(env, "").strip()
        if not credentials:
            raise RuntimeError(
                f"auto_rollback with auth on: the rollout watcher moves aliases with the API key or JWT in the "
                f"environment variable {env} (auth.service_key_env), which is not set on the node it runs on; "
                f"create one (`python -m app auth create-key rollout --role developer`) and set {env} "
                "where the cluster starts (`ray start`), or in the shell that runs an embedded cluster"
            )
        try:
            who = ray.get(self._registry.authenticate.remote(credentials))
        except Exception as err:
            raise RuntimeError(f"auto_rollback: the credential in {env} is not accepted by the registry: "
                               f"{getattr(err, 'cause', None) or err}") from None
        principal = Principal(who["name"], who["role"], who["kind"])
        for model, cfg in self.cfgs.items():
            try:  # the table the registry will apply to the rollback itself
                check(principal, alias_operation(cfg.canary, rollback=True), f"{model}@{cfg.canary}")
            except PermissionDenied as err:
                raise RuntimeError(f"auto_rollback: the credential in {env}: {err}") from None
        return credentials

    async def report(self, outcomes: list[Outcome]) -> None:
        now = time.monotonic()
        for model, route, version, outcome, latency_ms in outcomes:
            if model in self.cfgs:
                self._window.add(model, route, version, outcome, latency_ms, now)
        for model, cfg in self.cfgs.items():
            if now - self._last_check.get(model, float("-inf")) >= cfg.check_interval_s:
                self._last_check[model] = now
                async with self._lock:  # one decision per model at a time
                    await self._check(model, cfg, now)

    async def _check(self, model: str, cfg: AutoRollbackConfig, now: float) -> None:
        aliases = await self._registry.aliases.remote(model)
        canary_v = aliases.get(cfg.canary)
        baseline_v = int(cfg.baseline) if cfg.baseline.isdigit() else aliases.get(cfg.baseline)
        if canary_v is None or baseline_v is None or canary_v == baseline_v or (model, cfg.canary, canary_v) in self._judged:
            self._last[model] = {"canary": canary_v, "baseline": baseline_v, "judged": False}
            return
        canary = self._window.stats(model, cfg.canary, canary_v, now, include_unknown=True)
        baseline = self._window.stats(model, cfg.baseline, baseline_v, now)
        self._last[model] = {"canary": canary_v, "baseline": baseline_v, "judged": True,
                             "canary_stats": canary.__dict__, "baseline_stats": baseline.__dict__}
        reasons = judge(canary, baseline, cfg)
        if not reasons:
            return
        self._judged.add((model, cfg.canary, canary_v))
        reason = (f"auto-rollback of {cfg.canary} v{canary_v} vs {cfg.baseline} v{baseline_v} over the last "
                  f"{cfg.window_s:g} s: " + "; ".join(reasons))
        event = {"model": model, "alias": cfg.canary, "from_version": canary_v, "reason": reason}
        try:
            moved = await self._registry.rollback_alias.remote(model, cfg.canary, reason, ROLLBACK_ACTOR,
                                                               credentials=self._credentials)
        except Exception as err:  # e.g. no earlier holder: recorded, not retried (the version stays judged)
            log.error("model %s: rollback of alias %r refused: %s", model, cfg.canary, err)
            self._events.append({**event, "to_version": None, "error": str(getattr(err, "cause", None) or err)})
            return
        self._counter.inc(tags={"model": model, "alias": cfg.canary})
        log.warning("model %s: %s -> v%s", model, reason, moved["version"])
        self._events.append({**event, "to_version": moved["version"], "error": None})

    async def status(self) -> dict:
        """Rollbacks done (or refused) and the last comparison per model."""
        return {"rollbacks": list(self._events), "last_check": dict(self._last),
                "watching": {m: c.model_dump() for m, c in self.cfgs.items()}}
