"""The HTTP ingress of a Temper Serve app: request validation, error bodies, traffic routing,
metrics, the FastAPI app and the `TemperIngress` deployment that serves it.

    client --HTTP--> TemperIngress (FastAPI: validation, errors, traffic split, metrics)
                         --DeploymentHandle--> BatchedModelServer "model-<name>"            (route 1)
                                           --> BatchedModelServer "model-<name>--<ref>"     (route 2 ...)
                         --outcomes--> RolloutWatcher --rollback_alias--> ModelRegistry

With `serve.single_hop` the routes' `BatchedModelServer`s run inside the ingress replica instead,
called in-process through `serve/local_routes.py`'s handle-like `LocalRoute`s.

Read top to bottom:
1. the ingress's helpers: `RouteTable` (weighted split, sticky keys, live weights),
   `OutcomeReporter` (outcomes to the rollout watcher), metrics, the request middleware;
2. `make_api`: the REST API under `/api/v1/` (testable with fake handles, no Ray), plus the
   OpenAI-compatible routes under `/v1/` (`serve/openai_api.py`) and the control plane (training
   jobs, model versions) under `/api/v1/` (`serve/control_plane.py`);
3. `TemperIngress`.

Traffic weights (and, with single_hop, the routes' batch settings and version refs) are the
ingress's live part (`user_config`, applied by `reconfigure`); which
fields of the config are live and how the app is assembled is in `serve/deploy.py`. The model
server (batching, generation, hot swap) is in `serve/replica.py`, the error body and request
schemas in `serve/protocol.py`. The module is over 500 lines and one idea, the app's HTTP front:
the routes, their error bodies, the traffic table and the request middleware are one FastAPI app.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import time
import uuid
from typing import Any, Mapping

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import telemetry
from app.config.serve import ServeConfig
from app.logs import LogFormat, emit, line_logger
from serve.access import AccessControl, IngressAuth
from serve.control_plane import JobsClient, RegistryHandle, install_control_plane, job_submission_client
from serve.local_routes import local_routes
from serve.openai_api import install_openai_routes, is_openai_path, openai_error_body, openai_status
from serve.protocol import (
    API_PREFIX,
    ROUTE_HEADER,
    APIError,
    ClassifyTextsRequest,
    EmbedRequest,
    GenerateRequest,
    ModelRequestError,
    ModelServerError,
    PredictRequest,
    ScoreRequest,
    error_body,
    error_code,
    model_deployment_name,
    raise_if_refused,
)
from serve.routing import TrafficRouter

log = logging.getLogger(__name__)
request_logger = line_logger("temper.requests")
"""The per-request lines (serve.request_log): written bare to the ingress replica's stderr, which
Ray keeps in the worker's log file and forwards to a driver that asked for its workers' output."""

REPORT_INTERVAL_S = 1.0
"""How often (at most) the ingress sends its buffered outcomes to the rollout watcher."""

# ============================================================================ ingress helpers


class IngressSettings(BaseModel):
    """The live part of the ingress (its `user_config`): traffic weights per model, routes in deployment order."""

    model_config = ConfigDict(extra="forbid")

    traffic: dict[str, dict[str, int]]
    auth: IngressAuth = IngressAuth()
    models: dict[str, list[dict]] = {}
    """With `serve.single_hop`: per model, the batch settings and version ref of each route (route
    order), applied to the routes running in this replica as a route deployment's `user_config` is."""


class RouteTable:
    """The traffic router of every served model; `update` applies new weights live."""

    def __init__(self, traffic: Mapping[str, Mapping[str, int]]):
        self.routers = {model: TrafficRouter(dict(weights)) for model, weights in traffic.items()}

    def update(self, traffic: Mapping[str, Mapping[str, int]]) -> None:
        for model, weights in traffic.items():
            router = self.routers.get(model)
            if router is None or len(router.weights) != len(weights):
                # Routes are deployments: adding or removing one redeploys the ingress (new version).
                raise ValueError(f"model {model!r}: live traffic update must keep its {len(router.weights) if router else 0} routes")
            router.set_weights(dict(weights))

    def pick(self, model: str, sticky_key: str | None, explicit: str | None) -> tuple[int, str]:
        """(index of the route's handle, route name) for one request."""
        router = self.routers[model]
        routes = router.routes
        if explicit:
            if explicit not in routes:
                raise APIError(404, f"model {model!r} has no route {explicit!r} (routes: {routes})", ROUTE_HEADER)
            return routes.index(explicit), explicit
        route = router.pick(sticky_key)
        return routes.index(route), route


class OutcomeReporter:
    """Buffers model-call outcomes of watched models and sends them to the rollout watcher.

    Flushing piggybacks on traffic (at most every `interval_s`): without requests there is
    nothing new to judge, so no timer is needed.
    """

    def __init__(self, watcher: Any | None, watched: set[str], interval_s: float = REPORT_INTERVAL_S):
        self.watcher, self.watched, self.interval_s = watcher, watched, interval_s
        self._buffer: list[tuple] = []
        self._last = float("-inf")
        self._pending: set[asyncio.Task] = set()

    def record(self, model: str, route: str, version: int | None, outcome: str, latency_ms: float) -> None:
        if self.watcher is None or model not in self.watched:
            return
        self._buffer.append((model, route, version, outcome, round(latency_ms, 3)))
        if time.monotonic() - self._last >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer, self._last = self._buffer, [], time.monotonic()
        task = asyncio.ensure_future(self._send(batch))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, batch: list[tuple]) -> None:
        try:
            await self.watcher.report.remote(batch)
        except Exception as err:  # a lost report delays a rollback decision; serving goes on
            log.warning("rollout watcher did not take %d outcomes: %s", len(batch), err)


class IngressMetrics:
    """Request counter, error counter, latency histogram and per-route outcomes (ray.util.metrics)."""

    def __init__(self) -> None:
        self.requests = telemetry.counter(telemetry.SERVE_REQUESTS, ("model", "endpoint", "status"))
        self.errors = telemetry.counter(telemetry.SERVE_ERRORS, ("model", "endpoint", "error_code"))
        self.latency = telemetry.histogram(
            telemetry.SERVE_LATENCY_MS, tuple(telemetry.LATENCY_BOUNDARIES_MS), ("model", "endpoint")
        )
        self.routes = telemetry.counter(telemetry.SERVE_ROUTE_REQUESTS, ("model", "route", "version", "outcome"))

    def observe(self, model: str, endpoint: str, status: int, latency_ms: float) -> None:
        self.requests.inc(tags={"model": model, "endpoint": endpoint, "status": str(status)})
        self.latency.observe(latency_ms, tags={"model": model, "endpoint": endpoint})
        if status >= 400:
            self.errors.inc(tags={"model": model, "endpoint": endpoint, "error_code": error_code(status)})

    def route(self, model: str, route: str, version: int | None, outcome: str) -> None:
        self.routes.inc(tags={"model": model, "route": route, "version": str(version or "-"), "outcome": outcome})


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` while a body without Content-Length streams past the limit (an
    HTTPException, so FastAPI's body parsing re-raises it rather than answering 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes (serve.max_body_bytes)")


class RequestContextMiddleware:
    """Pure ASGI middleware around the API: request id, body size limit, last-resort 500, metrics.

    The request id is the `X-Request-ID` request header or a new uuid4; it is kept in
    `scope["state"]` for the error handlers. Behind Serve's proxy the header is always there
    (the proxy sets it when the client did not, and adds it to every response), so
    `add_id_header` is False there; standalone (tests) this middleware adds the header.
    Bodies over the limit are refused with 413 from Content-Length, or while streaming.
    """

    def __init__(self, app, max_body_bytes: int, models: set[str], metrics: IngressMetrics | None, add_id_header: bool,
                 request_log: LogFormat = "off"):
        self.app, self.max_body_bytes, self.models, self.metrics = app, max_body_bytes, models, metrics
        self.add_id_header, self.request_log = add_id_header, request_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id") or str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        status_seen: list[int] = []

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                if self.add_id_header:
                    message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
            return message

        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        try:
            if declared > self.max_body_bytes:
                message = (f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes} bytes "
                           "(serve.max_body_bytes)")
                await self._send_error(send_with_id, 413, openai_error_body(413, message, "body")
                                       if is_openai_path(scope) else error_body(413, message, request_id, field="body"))
            else:
                await self.app(scope, receive_limited, send_with_id)
        except Exception as exc:  # nothing handled it: answer 500 with the error body, log the trace
            log.exception("request %s failed", request_id)
            if status_seen:
                raise  # the response has started: nothing sane can be sent any more
            message = f"internal error ({type(exc).__name__})"
            await self._send_error(send_with_id, 500, openai_error_body(500, f"{message}: {str(exc)[:500]}")
                                   if is_openai_path(scope) else error_body(500, message, request_id, detail=str(exc)[:500]))
        finally:
            latency_ms = (time.perf_counter() - t0) * 1000
            status = status_seen[0] if status_seen else 500
            if self.metrics is not None:
                endpoint, model = self._labels(scope)
                self.metrics.observe(model, endpoint, status, latency_ms)
            if self.request_log != "off":
                self._log_request(scope, request_id, status, latency_ms)

    def _log_request(self, scope, request_id: str, status: int, latency_ms: float) -> None:
        """One line per request (serve.request_log). The model call's details are what the
        handler left in `scope["state"]["served"]` (absent for requests that reached no model)."""
        served = scope.get("state", {}).get("served") or {}
        route = scope.get("route")
        emit(request_logger, "request", {
            "request_id": request_id, "method": scope.get("method"), "path": scope.get("path"),  # no query string
            "endpoint": getattr(route, "name", None) or "unmatched",
            "model": served.get("model") or (scope.get("path_params") or {}).get("model"),
            "route": served.get("route"), "version": served.get("version"), "backend": served.get("backend"),
            "adapter": served.get("adapter"), "batch_size": served.get("batch_size"),
            "status": status, "latency_ms": round(latency_ms, 3),
        }, self.request_log)

    @staticmethod
    async def _send_error(send, status: int, body: dict) -> None:
        await JSONResponse(body, status_code=status)({"type": "http"}, None, send)

    def _labels(self, scope) -> tuple[str, str]:
        """(endpoint, model) metric tags; unknown model names collapse to one tag value."""
        route = scope.get("route")
        endpoint = getattr(route, "name", None) or "unmatched"
        model = (scope.get("path_params") or {}).get("model")
        return endpoint, (model if model in self.models else ("-" if model is None else "unknown"))


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or str(uuid.uuid4())


def _error_response(request: Request, status: int, message: str, field: str | None = None, detail: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    """Our error body, or OpenAI's error shape on the /v1 routes."""
    if is_openai_path(request.scope):
        status = openai_status(status)
        return JSONResponse(openai_error_body(status, message, field), status_code=status, headers=headers)
    return JSONResponse(error_body(status, message, _request_id(request), field, detail), status_code=status, headers=headers)


def _field_path(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def install_error_handlers(api: FastAPI) -> None:
    """Every non-2xx answer is the JSON error body of `serve.protocol.error_body` (unexpected exceptions:
    `RequestContextMiddleware` answers 500)."""

    @api.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
        fld = _field_path(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            msg = "unknown field (not part of the request schema)"
        elif first.get("type") == "json_invalid":
            fld, msg = "body", f"body is not valid JSON: {first.get('ctx', {}).get('error', msg)}"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return _error_response(request, 422, f"invalid request: {fld}: {msg}{more}", fld, msg)

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(request, exc.status, exc.message, exc.field, exc.detail, exc.headers or None)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            msg = f"no endpoint {request.method} {request.url.path}"
        return _error_response(request, exc.status_code, msg, "body" if exc.status_code == 413 else None)


def _sse(event: str, data: dict) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# ============================================================================ the REST API


def make_api(cfg: ServeConfig, servers: Mapping[str, Any], metrics: IngressMetrics | None = None,
             behind_serve_proxy: bool = False, routes: RouteTable | None = None,
             reporter: OutcomeReporter | None = None, access: AccessControl | None = None,
             registry: RegistryHandle | None = None, jobs: JobsClient | None = None,
             registry_cfg: dict | None = None) -> FastAPI:
    """The REST API. `servers` maps model name -> the handles of its route deployments in route
    order (or one handle): anything whose `.classify/.score/.generate/.info.remote(...)` returns
    an awaitable, so the API is testable with fakes. `metrics=None` records none (tests without Ray).
    `registry` and `jobs` give the registry actor's handle and a Ray JobSubmissionClient to the
    control-plane routes (`serve/control_plane.py`); without them those routes answer 503.
    `registry_cfg` is that registry's config: jobs submitted over HTTP register there, and its
    `artifact_roots` bound their storage and the artifacts registered over HTTP.

    Of `cfg.models[]` only the fixed fields are read (model, max_new_tokens, queue and replica
    settings): batch settings, version refs and traffic weights change live (the model servers
    and `routes` hold them), so they are asked from there.
    """
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    served = {m.model: m for m in cfg.models}
    handles = {name: list(v) if isinstance(v, (list, tuple)) else [v] for name, v in servers.items()}
    routes = routes or RouteTable({m.model: m.routes() for m in cfg.models})
    reporter = reporter or OutcomeReporter(None, set())
    api = FastAPI(title="Temper", version="1", openapi_url=f"{API_PREFIX}/openapi.json", docs_url=f"{API_PREFIX}/docs")
    install_error_handlers(api)
    api.add_middleware(
        RequestContextMiddleware, max_body_bytes=cfg.max_body_bytes, models=set(served), metrics=metrics,
        add_id_header=not behind_serve_proxy, request_log=cfg.request_log,
    )
    overloaded_headers = {"Retry-After": str(cfg.retry_after_s)}

    def require(operation: str):
        async def admitted(request: Request) -> None:
            if access is not None:
                model = request.path_params.get("model")
                request.state.principal = await access.admit(
                    request.headers, request.client.host if request.client else None, operation,
                    f"model {model}" if model else "the model list")
        return Depends(admitted)

    read, use = [require("read")], [require("predict")]

    def record(model: str, route: str, version: int | None, outcome: str, latency_ms: float) -> None:
        if metrics is not None:
            metrics.route(model, route, version, outcome)
        reporter.record(model, route, version, outcome, latency_ms)

    def pick(model: str, request: Request) -> tuple[Any, str]:
        if model not in served:
            raise APIError(404, f"model {model!r} is not served here (served: {sorted(served)})", "model")
        index, route = routes.pick(model, request.headers.get(cfg.sticky_header), request.headers.get(ROUTE_HEADER))
        return handles[model][index], route

    def check_items(n: int, fld: str) -> None:
        if n > cfg.max_items_per_request:
            raise APIError(413, f"{n} {fld} in one request; at most {cfg.max_items_per_request} "
                           "(serve.max_items_per_request): split it", fld)

    def translate(model: str, route: str, err: Exception, t0: float) -> APIError:
        """A failed model call as the API error to answer (and its outcome recorded)."""
        ms = (time.perf_counter() - t0) * 1000
        if isinstance(err, ModelRequestError):
            record(model, route, None, "client_error", ms)
            prefix = "invalid request: " if err.status == 422 else ""
            return APIError(err.status, f"{prefix}{err.field}: {err.message}", err.field, err.message)
        if isinstance(err, ModelServerError):
            record(model, route, err.version, "server_error", ms)
            return APIError(err.status, f"model {model!r} version {err.version} ({route}) failed: {err.message}")
        if isinstance(err, asyncio.TimeoutError):
            record(model, route, None, "server_error", ms)
            return APIError(504, f"model {model!r} did not answer within {cfg.request_timeout_s} s (serve.request_timeout_s)")
        if isinstance(err, (BackPressureError, DeploymentUnavailableError)):
            record(model, route, None, "rejected", ms)
            return APIError(503, f"model {model!r} ({route}) is overloaded, retry later: {err}", headers=overloaded_headers)
        raise TypeError(type(err))

    async def call(model: str, method: str, request: Request, *args: Any) -> tuple[dict, str]:
        handle, route = pick(model, request)
        t0 = time.perf_counter()
        response = getattr(handle, method).remote(*args)
        try:
            async with asyncio.timeout(cfg.request_timeout_s):  # no extra task per call, unlike wait_for
                out = raise_if_refused(await response)
        except (ModelRequestError, ModelServerError, BackPressureError, DeploymentUnavailableError) as err:
            raise translate(model, route, err, t0) from None
        except asyncio.TimeoutError as err:
            cancel = getattr(response, "cancel", None)
            if cancel is not None:
                cancel()
            raise translate(model, route, err, t0) from None
        except Exception:  # unexpected: counted against the route, answered 500 by the middleware
            record(model, route, None, "server_error", (time.perf_counter() - t0) * 1000)
            raise
        record(model, route, out.get("version"), "ok", (time.perf_counter() - t0) * 1000)
        request.state.served = {"model": model, "route": route, "version": out.get("version"), "backend": out.get("backend"),
                                "adapter": out.get("adapter"), "batch_size": out.get("batch_size")}
        return out, route

    def answer(model: str, route: str, out: dict, t0: float, **fields: Any) -> JSONResponse:
        # A response object is sent as it is: FastAPI would first walk a returned dict with
        # `jsonable_encoder`, which for one 384-float embedding took 0.6 ms more than encoding it
        # (measured here), on the ingress's one thread, per request. The answers are plain JSON types.
        return JSONResponse({"model": model, "route": route, "version": out["version"], "backend": out["backend"],
                             **fields, "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})

    @api.get(f"{API_PREFIX}/health", name="health")
    async def health() -> dict:
        if access is not None and access.enabled:
            return {"status": "ok"}
        return {"status": "ok", "app": cfg.app_name, "models": sorted(served)}

    @api.get(f"{API_PREFIX}/models", name="models", dependencies=read)
    async def models() -> dict:
        async def describe(name: str) -> dict:
            m = served[name]
            weights = routes.routers[name].weights
            infos = await asyncio.gather(*(_awaited(h.info.remote()) for h in handles[name]))
            route_list = [{"route": r, "weight": w, "deployment": model_deployment_name(name, None if i == 0 else r),
                           "version": info["version"], "backend": info["backend"]}
                          for i, ((r, w), info) in enumerate(zip(weights.items(), infos))]
            return {**infos[0], "model": name, "traffic": weights, "routes": route_list,
                    # as Serve applies it (a hand-edited `serve deploy` file may differ from our config)
                    "max_ongoing_requests": infos[0].get("max_ongoing_requests", m.max_ongoing_requests),
                    "max_queued_requests": m.max_queued_requests,
                    "num_replicas": m.num_replicas if m.autoscaling is None else None,
                    "autoscaling": m.autoscaling.model_dump() if m.autoscaling else None,
                    "auto_rollback": m.auto_rollback.model_dump() if m.auto_rollback else None}

        return {"models": list(await asyncio.gather(*(describe(name) for name in served)))}

    @api.post(f"{API_PREFIX}/models/{{model}}/predict", name="predict", dependencies=use)
    async def predict(model: str, body: PredictRequest, request: Request) -> dict:
        t0 = time.perf_counter()
        check_items(len(body.inputs), "inputs")
        out, route = await call(model, "classify", request, body.inputs, body.top_k)
        return answer(model, route, out, t0, outputs=out["outputs"], probabilities=out["probabilities"])

    @api.post(f"{API_PREFIX}/models/{{model}}/embed", name="embed", dependencies=use)
    async def embed(model: str, body: EmbedRequest, request: Request) -> dict:
        t0 = time.perf_counter()
        check_items(len(body.texts), "texts")
        out, route = await call(model, "embed", request, body.texts, body.truncate)
        return answer(model, route, out, t0, embeddings=out["embeddings"])

    @api.post(f"{API_PREFIX}/models/{{model}}/classify", name="classify", dependencies=use)
    async def classify_texts(model: str, body: ClassifyTextsRequest, request: Request) -> dict:
        t0 = time.perf_counter()
        check_items(len(body.texts), "texts")
        out, route = await call(model, "classify_texts", request, body.texts, body.top_k, body.truncate)
        return answer(model, route, out, t0, outputs=out["outputs"], probabilities=out["probabilities"])

    @api.post(f"{API_PREFIX}/models/{{model}}/score", name="score", dependencies=use)
    async def score(model: str, body: ScoreRequest, request: Request) -> dict:
        t0 = time.perf_counter()
        check_items(len(body.texts), "texts")
        out, route = await call(model, "score", request, body.texts, body.top_k)
        return answer(model, route, out, t0, outputs=out["outputs"])

    @api.post(f"{API_PREFIX}/models/{{model}}/generate", name="generate", dependencies=use)
    async def generate(model: str, body: GenerateRequest, request: Request):
        t0 = time.perf_counter()
        cap = served[model].max_new_tokens if model in served else None
        if cap is not None and body.max_new_tokens > cap:
            raise APIError(422, f"invalid request: max_new_tokens: at most {cap} for model {model!r}", "max_new_tokens",
                           f"must be <= {cap} (serve.models[].max_new_tokens)")
        args = (body.prompt, body.max_new_tokens, body.temperature, body.top_k, body.seed)
        if body.stream:
            return await stream_generation(model, request, args, t0)
        out, route = await call(model, "generate", request, *args)
        return answer(model, route, out, t0, text=out["text"], tokens=out["tokens"], finish_reason=out["finish_reason"])

    async def stream_generation(model: str, request: Request, args: tuple, t0: float) -> StreamingResponse:
        """Server-sent events: `start` {model, route, version, backend, request_id}, one `token`
        {index, token, text} per token (built-in GPT: a byte, text the UTF-8 characters it
        completes; hf causal LM: a tokenizer id, text what it adds to the decoded text), then
        `done` {tokens, text, latency_ms, finish_reason: stop (end-of-sequence token) | length}
        or `error` (the JSON error body)."""
        handle, route = pick(model, request)
        deadline = t0 + cfg.request_timeout_s
        gen = handle.options(stream=True).generate_stream.remote(*args)
        try:  # errors before the first event still get a proper status code
            head = raise_if_refused(await asyncio.wait_for(gen.__anext__(), cfg.request_timeout_s))
        except (ModelRequestError, ModelServerError, BackPressureError, DeploymentUnavailableError, asyncio.TimeoutError) as err:
            gen.cancel()
            raise translate(model, route, err, t0) from None
        except StopAsyncIteration:
            raise APIError(500, f"model {model!r} ended the stream before it started") from None
        request_id = _request_id(request)

        async def events():
            tokens: list[int] = []
            pieces: list[str] = []
            finish = "length"
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            yield _sse("start", {"model": model, "route": route, "version": head["version"],
                                 "backend": head["backend"], "request_id": request_id})
            try:
                while True:
                    batch = raise_if_refused(await asyncio.wait_for(gen.__anext__(), max(deadline - time.perf_counter(), 0.001)))
                    events = []  # one event per token, written together (the replica sends tokens in lists)
                    for item in batch:
                        if isinstance(item, dict):  # hf causal LM: {token, text, stop}
                            token, piece = item["token"], item["text"]
                            finish = "stop" if item["stop"] else finish
                        else:  # built-in GPT: a byte id
                            token, piece = item, utf8.decode(bytes([item]))
                        tokens.append(token)
                        pieces.append(piece)
                        events.append(_sse("token", {"index": len(tokens) - 1, "token": token, "text": piece}))
                    yield b"".join(events)
            except StopAsyncIteration:
                ms = (time.perf_counter() - t0) * 1000
                record(model, route, head["version"], "ok", ms)
                text = "".join(pieces) + utf8.decode(b"", final=True)
                yield _sse("done", {"tokens": tokens, "text": text, "latency_ms": round(ms, 3), "finish_reason": finish})
            except (ModelServerError, asyncio.TimeoutError) as err:
                gen.cancel()
                api_err = translate(model, route, err, t0)
                yield _sse("error", error_body(api_err.status, api_err.message, request_id, api_err.field))
            except Exception as err:  # the response has started: report in-band, log the trace
                log.exception("stream %s of model %s failed", request_id, model)
                record(model, route, head["version"], "server_error", (time.perf_counter() - t0) * 1000)
                yield _sse("error", error_body(500, f"internal error ({type(err).__name__})", request_id, detail=str(err)[:500]))

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    install_openai_routes(api, served=served, call=call, pick=pick, translate=translate, record=record,
                          dependencies_read=read, dependencies_use=use, request_timeout_s=cfg.request_timeout_s,
                          check_items=check_items)
    install_control_plane(api, access=access, registry=registry, jobs=jobs, request_timeout_s=cfg.request_timeout_s,
                          retry_after_s=cfg.retry_after_s, registry_cfg=registry_cfg)
    return api


async def _awaited(response: Any) -> Any:
    return await response


@serve.deployment
@serve.ingress()
class TemperIngress:
    """HTTP entry of the app: builds the FastAPI app at replica start (`make_api`); traffic
    weights arrive (and change live) through `reconfigure`."""

    def __init__(self, serve_cfg: dict, servers: dict, watcher: Any = None, registry: dict | None = None,
                 local: dict[str, list[dict]] | None = None):
        self.cfg = ServeConfig.model_validate(serve_cfg)
        # model name -> DeploymentHandles of its routes (Serve replaced the bound apps), or with
        # serve.single_hop the routes built in this replica (`local`: their constructor arguments)
        self.local = local_routes(local or {})
        self.servers = {**servers, **self.local}
        self.routes = RouteTable({m.model: m.routes() for m in self.cfg.models})
        self.reporter = OutcomeReporter(watcher, {m.model for m in self.cfg.models if m.auto_rollback})
        self.registry_cfg = registry  # {actor_name, namespace, ...}: whom to ask about credentials
        self._registry = None
        self.access = AccessControl(self._authenticate)

    def _registry_handle(self) -> Any:
        """The registry actor (looked up once, and again after it was lost)."""
        import ray

        if self._registry is None:
            self._registry = ray.get_actor(self.registry_cfg["actor_name"], namespace=self.registry_cfg["namespace"])
        return self._registry

    async def _authenticate(self, credentials: str) -> dict:
        """The registry actor's answer about `credentials` (it holds the key hashes and the JWT settings)."""
        import ray

        if self.registry_cfg is None:
            raise APIError(503, "credentials cannot be checked: this ingress knows no registry")
        try:
            return await self._registry_handle().authenticate.remote(credentials)
        except ray.exceptions.RayActorError as err:
            self._registry = None  # looked up again next time (the actor restarts under the same name)
            raise APIError(503, f"credentials cannot be checked now: the registry is unavailable ({type(err).__name__})",
                           headers={"Retry-After": str(self.cfg.retry_after_s)}) from None

    async def reconfigure(self, user_config: dict) -> None:
        settings = IngressSettings.model_validate(user_config)
        for model, routes in self.local.items():  # versions first: the new weights may send traffic to them
            for route, route_settings in zip(routes, settings.models[model], strict=True):
                await route.reconfigure(route_settings)
        self.routes.update(settings.traffic)
        self.access.update(settings.auth)

    def check_health(self) -> None:
        for routes in self.local.values():
            for route in routes:
                route.check_health()

    async def route_call(self, model: str, index: int, method: str = "info") -> dict:
        """`info()` or `stats()` of a route running in this replica (with serve.single_hop, what a
        route deployment's handle answers: `serve status` asks for it)."""
        if method not in ("info", "stats"):
            raise ValueError(f"route_call: {method!r} is not info or stats")
        return await getattr(self.local[model][index], method).remote()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.cfg, self.servers, IngressMetrics(), behind_serve_proxy=True,
                        routes=self.routes, reporter=self.reporter, access=self.access,
                        registry=None if self.registry_cfg is None else self._registry_handle,
                        jobs=job_submission_client(None), registry_cfg=self.registry_cfg)
