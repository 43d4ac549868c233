"""Assembling and running a Temper Serve app: `build_app` (ingress + one batched replica
deployment per model route + the rollout watcher; with `serve.single_hop` the routes are built
inside the ingress replica instead), `deploy` / `shutdown` / `app_status`,
the Serve config file (`serve deploy FILE`, KubeRay RayService) and the deployments' names.

What is live and what restarts (see `build_app`): batch size, batch wait, a route's version
ref and the traffic weights live in `user_config`, so redeploying with only those changed
reconfigures the running replicas (hot swap for the version) and HTTP never drops. A moved
registry alias reaches the replicas by polling (`serve.alias_poll_interval_s`), no redeploy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from ray import serve

from app.config.jobs import ServeApp
from app.config.serve import ServeConfig, ServedModel, registered_adapter_ref
from app.runtime import verbose
from serve.protocol import API_PREFIX, model_deployment_name

# The deployments' classes (serve.ingress, serve.replica, serve.rollout) and app.models are
# imported where an app is built or checked, not here: `serve status` and `serve shutdown` load
# this module too, and those imports (torch, FastAPI) were ~3 of their ~8 s on 2 cores.

log = logging.getLogger(__name__)

INGRESS_CPUS = 0.1
"""Logical CPUs the ingress replica reserves: it only parses JSON and awaits handles."""
HEALTH_WAIT_S = 60.0
"""How long `deploy` polls the health endpoint after `serve.run` returns."""
WATCHER_NAME = "RolloutWatcher"
INGRESS_NAME = "TemperIngress"


def route_deployments(m: ServedModel) -> list[tuple[str, str]]:
    """(route ref, deployment name) of each route of a served model, primary first."""
    return [(ref, model_deployment_name(m.model, None if i == 0 else ref)) for i, ref in enumerate(m.routes())]


def _build_identity(fresh: bool) -> str:
    """What every deployment version of one build shares (see `_code_version`): the project's code
    (`_source_digest`), the runtime environment of the job that deploys (pip packages, working_dir:
    Ray names a working_dir package by a hash of its content), and with `fresh` a random salt, so
    that no earlier deploy had these versions. Computed once per build: it reads every module."""
    import ray

    env = ray.get_runtime_context().runtime_env if ray.is_initialized() else None
    salt = os.urandom(8).hex() if fresh else ""
    return json.dumps([_source_digest(), env, salt], sort_keys=True, default=str)


def _code_version(identity: str, *parts: Any) -> str:
    """A deployment version that changes with the replica's constructor arguments and the build's
    `identity` (code, environment).

    Serve restarts replicas when this changes and otherwise only calls `reconfigure` with the
    new `user_config`. `serve.run` would draw a random version on every call, restarting every
    replica even when the same config is deployed again (a re-run of `serve deploy` or of a `run`
    job: ~8 s on 2 cores until the app was RUNNING again, with each replica loading its model
    anew), so we pass one; new code or dependencies still restart replicas.
    """
    blob = json.dumps([parts, identity], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _source_digest() -> str:
    """Hash of the project's code that a replica may run: every module of app/, serve/ and actors/."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in ("app", "serve", "actors"):
        for f in sorted((root / package).rglob("*.py")):
            digest.update(str(f.relative_to(root)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


def _ingress_capacity(cfg: ServeConfig) -> int:
    """Requests one ingress replica admits at once: everything the model routes behind it could hold
    or queue (all their replicas; with serve.single_hop the routes in the replica itself), so
    overload is answered by the model queues (503 with our error body), not by Serve's proxy."""
    return sum((m.max_ongoing_requests + m.max_queued_requests) * (1 if cfg.single_hop else m.max_replicas()) * len(m.routes())
               for m in cfg.models) + 16


def _route_settings(m: ServedModel, ref: str) -> dict:
    """A route's live settings: its deployment's `user_config` (with serve.single_hop, the ingress's)."""
    from serve.replica import BatchSettings

    return BatchSettings(max_batch_size=m.max_batch_size, batch_wait_timeout_s=m.batch_wait_timeout_s,
                         stream_interval_s=m.stream_interval_s, version=ref).model_dump()


def _server_args(m: ServedModel, cfg: ServeConfig, registry: dict) -> tuple:
    """The `BatchedModelServer` constructor's arguments for a route of `m`."""
    return (m.model, m.backend, m.max_new_tokens, registry, cfg.alias_poll_interval_s, adapter_folders(m), m.max_adapters)


def ingress_options(app_cfg: ServeApp) -> dict:
    """Serve options of the ingress deployment (what `serve config` writes for it as well)."""
    from serve.access import IngressAuth
    from serve.ingress import IngressSettings

    cfg = app_cfg.serve
    capacity = _ingress_capacity(cfg)
    cpus = INGRESS_CPUS
    models: dict[str, list[dict]] = {}
    if cfg.single_hop:  # the model routes run in the ingress replica: their CPUs and live settings are its
        cpus += sum(m.cpus_per_replica * len(m.routes()) for m in cfg.models)
        models = {m.model: [_route_settings(m, ref) for ref in m.routes()] for m in cfg.models}
    opts = dict(
        name=INGRESS_NAME,
        ray_actor_options={"num_cpus": round(cpus, 3)},
        # Serve's default (5) would cap the concurrency reaching the model replicas, and so their batches.
        max_ongoing_requests=capacity,
        max_queued_requests=capacity,
        backpressure_config={"status_code": 503, "retry_after_s": float(cfg.retry_after_s)},
        user_config=IngressSettings(
            traffic={m.model: m.routes() for m in cfg.models},
            auth=IngressAuth(enabled=auth_enabled(app_cfg), rate_limit=app_cfg.auth.rate_limit),
            models=models,
        ).model_dump(mode="json"),
    )
    if cfg.single_hop and cfg.models:
        opts["num_replicas"] = cfg.models[0].num_replicas  # the config checks every model has the same
    return opts


def _fixed_ingress_config(cfg: ServeConfig) -> dict:
    """The ingress's config minus its live fields: its deployment version is computed from this.

    A redeploy that only changes batch settings, version refs or traffic weights keeps the
    ingress (and HTTP) up: the model servers and the ingress are reconfigured. `make_api` must
    therefore never read those fields from its config.
    """
    fixed = cfg.model_dump(mode="json")
    for m in fixed["models"]:
        for name in ("max_batch_size", "batch_wait_timeout_s", "stream_interval_s", "version"):
            m.pop(name)
        m["traffic"] = list(m["traffic"]) if m["traffic"] else None  # the routes (deployments), not their weights
    return fixed


def adapter_folders(m: ServedModel) -> dict[str, str] | None:
    """A served model's adapter folders with relative paths made absolute here (the driver's working
    directory): the replicas run in other working directories."""
    if not m.adapters:
        return None
    return {name: source if registered_adapter_ref(source) is not None else str(Path(source).expanduser().resolve())
            for name, source in m.adapters.items()}


def route_deployment_options(m: ServedModel, ref: str, name: str, cfg: ServeConfig) -> dict:
    """Serve options of one route deployment (what `serve config` writes as well)."""
    opts: dict[str, Any] = dict(
        name=name,
        max_ongoing_requests=m.max_ongoing_requests,
        max_queued_requests=m.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": float(cfg.retry_after_s)},
        ray_actor_options={"num_cpus": m.cpus_per_replica},
        user_config=_route_settings(m, ref),
    )
    if m.autoscaling is not None:
        opts["autoscaling_config"] = m.autoscaling.model_dump(exclude_none=True)
    else:
        opts["num_replicas"] = m.num_replicas
    return opts


def auth_enabled(app_cfg: ServeApp) -> bool:
    """Whether callers must authenticate: `auth.enabled`, or by default whether `serve.host` is not loopback."""
    return app_cfg.auth.enabled_for(app_cfg.serve.host)


def registry_for(app_cfg: ServeApp):
    """The registry actor of the app, started (when absent) with the app's auth settings: it
    checks the credentials the ingress receives, and enforces roles on writes when auth is on."""
    from actors.registry.client import get_or_create_registry, registry_auth

    return get_or_create_registry(app_cfg.registry, auth=registry_auth(app_cfg.auth, auth_enabled(app_cfg)))


def build_app(app_cfg: ServeApp, fresh: bool = False) -> serve.Application:
    """Ingress + one BatchedModelServer deployment per model route (+ the rollout watcher when a
    model has `auto_rollback`), ready for `serve.run`. The ingress's auth settings (on or off,
    rate limit) are live like its traffic weights. `fresh`: versions no earlier deploy had, so
    every replica starts anew (Serve does not try a failed version again)."""
    from serve.ingress import TemperIngress
    from serve.replica import BatchedModelServer
    from serve.rollout import RolloutWatcher

    identity = _build_identity(fresh)
    cfg = app_cfg.serve
    registry = app_cfg.registry.model_dump(mode="json")
    servers: dict[str, list] = {}
    local: dict[str, list[dict]] = {}
    for m in cfg.models:
        args = _server_args(m, cfg, registry)
        if cfg.single_hop:  # built by the ingress replica itself (serve/local_routes.py)
            local[m.model] = [{"args": args, "max_ongoing_requests": m.max_ongoing_requests,
                               "max_queued_requests": m.max_queued_requests} for _ in m.routes()]
            continue
        servers[m.model] = []
        for ref, name in route_deployments(m):
            opts = route_deployment_options(m, ref, name, cfg)
            # `version` is private in Ray 2.60 (needs `_internal=True`); see `_code_version`.
            deployment = BatchedModelServer.options(**opts, version=_code_version(identity, args, m.cpus_per_replica), _internal=True)
            servers[m.model].append(deployment.bind(*args))
    rollback = {m.model: m.auto_rollback.model_dump(mode="json") for m in cfg.models if m.auto_rollback}
    watcher = None
    if rollback:
        watcher = RolloutWatcher.options(
            name=WATCHER_NAME, version=_code_version(identity, rollback, registry), _internal=True,
        ).bind(rollback, registry, app_cfg.auth.service_key_env if auth_enabled(app_cfg) else None)
    return TemperIngress.options(
        **ingress_options(app_cfg),
        version=_code_version(identity, _fixed_ingress_config(cfg), bool(watcher), registry, local), _internal=True,
    ).bind(cfg.model_dump(mode="json"), servers, watcher, registry, local)


def app_builder(args: dict) -> serve.Application:
    """Application builder for Serve config files / KubeRay RayService:
    `import_path: serve.deploy:app_builder` with `args:` holding a ServeApp (registry + serve).

    It runs in a task on the cluster: the registry actor (detached) is started there when it is
    not running yet, so `serve deploy FILE` works on its own."""
    app_cfg = ServeApp.model_validate(args)
    registry_for(app_cfg)
    return build_app(app_cfg)


def _any_interface(cfg: ServeConfig) -> bool:
    """Whether Serve's HTTP servers bind every interface (then they are reached on a real address)."""
    return cfg.host in ("0.0.0.0", "::", "")


def base_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if _any_interface(cfg) else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


DIRECT_INGRESS_WAIT_S = 30.0
"""How long `deploy` waits for Serve's controller to list the ingress replica's own port."""


def replica_urls(cfg: ServeConfig) -> list[str]:
    """Base URLs of the app's ingress replicas on their own HTTP ports when Ray Serve runs with
    direct ingress; [] when it does not (then only the proxy serves HTTP).

    Serve's controller knows them as the app's "target groups" (the public `TargetGroup` schema);
    Ray 2.60 has no public call that returns them, so the controller is asked directly. Without
    direct ingress it answers with the proxies' group, which names no ingress deployment.
    """
    import ray
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(cfg.app_name))
    prefix = cfg.route_prefix.rstrip("/")
    # A replica binds serve.host; bound to every interface, it is reached on its node's address.
    return [f"http://{t.ip if _any_interface(cfg) else cfg.host}:{t.port}{prefix}" for g in groups
            if g.ingress_deployment_name and str(getattr(g.protocol, "value", g.protocol)).upper() == "HTTP"
            for t in g.targets]


def _first_healthy(candidates: Callable[[], list[str]], wait_s: float) -> tuple[str | None, str]:
    """Poll the health route of each of `candidates()` every 0.25 s for up to `wait_s`: (the first
    URL that answers 200, "") or (None, what the last one answered)."""
    import httpx

    deadline, last = time.monotonic() + wait_s, "no answer"
    while True:
        for url in candidates():
            try:
                resp = httpx.get(f"{url}{API_PREFIX}/health", timeout=5.0)
                if resp.status_code == 200:
                    return url, ""
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except httpx.HTTPError as err:
                last = repr(err)
        if time.monotonic() > deadline:
            return None, last
        time.sleep(0.25)


def _direct_ingress_url(cfg: ServeConfig) -> str | None:
    """The first ingress replica's own URL once it answers health checks; None (with a warning
    on stderr) when the cluster runs Serve without direct ingress."""
    import sys

    url, _ = _first_healthy(lambda: replica_urls(cfg), DIRECT_INGRESS_WAIT_S)
    if url is not None:
        return url
    print(f"[serve] warning: serve.direct_ingress is set, but no ingress replica of {cfg.app_name!r} answers on its "
          "own port: this cluster's Serve runs without direct ingress (start the cluster with "
          "RAY_SERVE_THROUGHPUT_OPTIMIZED=1); serving through the proxy", file=sys.stderr, flush=True)
    return None


def check_versions(app_cfg: ServeApp) -> list[dict]:
    """Driver-side check that every route's version ref resolves (and has the expected backend)
    before any replica starts; returns the registry records, route by route."""
    import ray

    from app.models.adapters import check_adapter_folder, registered_adapter_folder

    registry = registry_for(app_cfg)
    records = []
    for m in app_cfg.serve.models:
        for ref in m.routes():
            try:
                record = ray.get(registry.get_version.remote(m.model, ref))
            except Exception as err:
                raise ValueError(f"serve.models[{m.model}]: version {ref!r} cannot be served: {err}") from err
            if m.backend is not None and record["format"] != m.backend:
                raise ValueError(
                    f"serve.models[{m.model}]: version {record['version']} ({ref}) has backend {record['format']!r}, "
                    f"but backend {m.backend!r} was asked for"
                )
            records.append(record)
        for name, source in (m.adapters or {}).items():
            ref = registered_adapter_ref(source)
            try:
                check_adapter_folder(source if ref is None else registered_adapter_folder(
                    ray.get(registry.get_version.remote(m.model, ref)), m.model, name), name)
            except Exception as err:  # AdapterError, or the registry's RegistryNotFound (wrapped by Ray)
                raise ValueError(f"serve.models[{m.model}].adapters.{name}: {getattr(err, 'cause', None) or err}") from None
    return records


def _failed_deployments(app_name: str) -> str:
    """Why each unhealthy deployment of `app_name` failed, as Serve recorded it: the last line of
    its replica's error (a constructor's exception), which Serve's own deploy error leaves out."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - only adds detail to an error already being raised
        return ""
    lines = []
    for name, dep in (app.deployments.items() if app else ()):
        if dep.status != "HEALTHY" and dep.message:
            last = [line for line in dep.message.strip().splitlines() if line.strip()][-1]
            lines.append(f"\n  {name}: {last.strip()}")
    return "".join(lines)


def deploy(app_cfg: ServeApp, blocking: bool = False) -> str:
    """Start Serve (HTTP on serve.host:serve.port), run the app, wait until it answers; returns
    the base URL (endpoints under `<url>/api/v1/`): the proxy's, or with `serve.direct_ingress`
    the ingress replica's own. With `blocking`, serve until Ctrl-C."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("deploy needs Ray: call ray.init() first")
    cfg = app_cfg.serve
    check_versions(app_cfg)
    # Serve's controller, proxy and replicas log every deployment step and request at INFO;
    # on the console that drowns our own lines, so they log warnings only unless verbose.
    logging_config = None if verbose() else {"log_level": "WARNING", "enable_access_log": False}
    quiet_serve_driver_logs()
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging_config)
    # The same config deployed again keeps its replicas (stable versions), but a deployment that
    # failed to start would then not be tried again: over an app that is not RUNNING, start afresh.
    running = serve.status().applications.get(cfg.app_name)
    fresh = running is not None and _state(running.status) != "RUNNING"
    try:
        serve.run(build_app(app_cfg, fresh), name=cfg.app_name, route_prefix=cfg.route_prefix, logging_config=logging_config)
    except RuntimeError as err:
        raise RuntimeError(f"{err}{_failed_deployments(cfg.app_name)}") from err
    url = base_url(cfg)
    healthy, last = _first_healthy(lambda: [url], HEALTH_WAIT_S)
    if healthy is None:
        raise RuntimeError(
            f"Serve app {cfg.app_name!r} is running but {url}{API_PREFIX}/health did not answer 200 within "
            f"{HEALTH_WAIT_S:.0f} s ({last}). If Serve was already started with other http_options, "
            "call serve.shutdown() first: host/port are fixed when Serve starts."
        )
    if cfg.direct_ingress:
        url = _direct_ingress_url(cfg) or url
    log.info("Serve app %r healthy at %s", cfg.app_name, url)
    if blocking:
        print(f"Temper serving at {url}{API_PREFIX}/ (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            shutdown(cfg.app_name)
    return url


def _state(value: Any) -> str:
    """A Serve status or replica state as its name (Serve hands enums; a plain string stays as is)."""
    return str(getattr(value, "value", value))


def quiet_serve_driver_logs() -> None:
    """Serve's logger in this process (`ray.serve`, set to INFO with its own console handler when
    Serve is imported) prints lines such as `Connecting to existing Serve app in namespace "serve"`
    and `Application 'x' is ready at ...` next to our own; warnings only, unless verbose."""
    if not verbose():
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def shutdown(app_name: str) -> None:
    """Delete the Serve application `app_name` (Serve itself keeps running for other apps)."""
    quiet_serve_driver_logs()
    serve.delete(app_name)


def app_status(app_cfg: ServeApp, timeout_s: float = 10.0) -> dict:
    """What runs now for this config: Serve's application and deployment states, and per model
    route the version each serves next to what its ref resolves to in the registry, plus the
    rollout watcher's rollbacks. `{"status": "NOT_RUNNING"}` when the app is not deployed."""
    import ray

    quiet_serve_driver_logs()
    cfg = app_cfg.serve
    app = serve.status().applications.get(cfg.app_name)
    if app is None:
        return {"app": cfg.app_name, "status": "NOT_RUNNING", "url": base_url(cfg)}
    deployments = {name: {"status": _state(d.status), "replicas": {_state(k): v for k, v in d.replica_states.items()},
                          "message": d.message}
                   for name, d in app.deployments.items()}
    from actors.registry.client import get_or_create_registry

    registry = get_or_create_registry(app_cfg.registry)  # reads only: whatever actor runs, no secrets needed
    models = []
    for m in cfg.models:
        aliases = ray.get(registry.aliases.remote(m.model))
        routes = []
        for index, ((ref, name), weight) in enumerate(zip(route_deployments(m), m.routes().values())):
            if cfg.single_hop:  # the route runs in the ingress replicas
                name = INGRESS_NAME
            entry = {"route": ref, "weight": weight, "deployment": name,
                     "registry_version": int(ref) if ref.isdigit() else aliases.get(ref),
                     **deployments.get(name, {"status": "MISSING"})}
            if name in deployments:
                try:
                    handle = serve.get_deployment_handle(name, cfg.app_name)
                    call = handle.route_call.remote(m.model, index) if cfg.single_hop else handle.info.remote()
                    info = call.result(timeout_s=timeout_s)
                    entry["serving_version"], entry["backend"] = info["version"], info["backend"]
                except Exception as err:  # noqa: BLE001 - no replica answers (failed, starting): say so, go on
                    entry["serving_version"], entry["backend"] = None, None
                    entry["message"] = entry.get("message") or f"no replica answered within {timeout_s:.0f} s ({type(err).__name__})"
            routes.append(entry)
        models.append({"model": m.model, "aliases": aliases, "routes": routes})
    out = {"app": cfg.app_name, "status": _state(app.status),
           "message": app.message, "url": base_url(cfg), "replica_urls": replica_urls(cfg) if cfg.direct_ingress else [],
           "models": models,
           "other_deployments": {k: v for k, v in deployments.items() if not k.startswith("model-")}}
    if WATCHER_NAME in deployments:
        out["rollouts"] = serve.get_deployment_handle(WATCHER_NAME, cfg.app_name).status.remote().result(timeout_s=timeout_s)
    return out


def serve_config_file(app_cfg: ServeApp) -> dict:
    """A Serve config (`serve deploy FILE`, KubeRay RayService `serveConfigV2`) equivalent to `deploy`.

    The application is built by `serve.deploy:app_builder` from `args` (our validated config). The
    `deployments` section repeats each route's live settings so they can be tuned the Ray way:
    editing a `user_config` (batch size, wait, version ref) or the replica settings there and
    re-running `serve deploy` is a lightweight update (no restart); Serve lets `deployments`
    override what the builder set.
    """
    from actors.registry.client import resolve_db_url
    from app.config.registry import mask_url_password

    cfg = app_cfg.serve
    args = app_cfg.model_dump(mode="json")
    # A relative SQLite path means "next to where I run this": make it absolute, since the
    # builder runs in the cluster's working directory.
    # The file is written to disk: the database password is masked (set registry.password_env
    # where the cluster runs instead).
    args["registry"]["db_url"] = mask_url_password(resolve_db_url(app_cfg.registry.db_url))
    if cfg.single_hop:  # the routes' live settings are the ingress's user_config
        deployments = [ingress_options(app_cfg)]
    else:
        deployments = []
        for m in cfg.models:
            for ref, name in route_deployments(m):
                opts = route_deployment_options(m, ref, name, cfg)
                deployments.append({k: v for k, v in opts.items() if k != "ray_actor_options"}
                                   | {"ray_actor_options": opts["ray_actor_options"]})
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": cfg.route_prefix,
            "import_path": "serve.deploy:app_builder",
            "args": args,
            "deployments": deployments,
        }],
    }
