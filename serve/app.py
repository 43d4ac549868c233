"""Temper on Ray Serve: one HTTP ingress plus one dynamically batched replica set per model.

    client --HTTP--> TemperIngress (FastAPI, validation, errors, metrics)
                         --DeploymentHandle--> BatchedModelServer "model-<name>" (@serve.batch)
                                                   --load_predictor--> registry version's artifact

Read top to bottom:
1. errors and request schemas (what a client may send, what a 4xx says);
2. plain batch functions (`run_classify_batch`, `run_lm_batch`, ...), testable without Serve;
3. `BatchedModelServer`: resolves a registry version, loads it, and runs batches. Batch size,
   batch wait and the version ref live in `user_config`, so `reconfigure` changes them live
   (the version is hot-swapped: load new -> switch -> drop old);
4. `TemperIngress` / `make_api`: the REST API under `/api/v1/`;
5. `build_app`, `deploy`, `shutdown`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import Counter as CountMap
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import telemetry
from app.config import RegistryConfig, ServeApp, ServeConfig, ServedModel
from app.inference import Predictor, classify, generate_text, load_predictor, score_text

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
INGRESS_CPUS = 0.1
"""Logical CPUs the ingress replica reserves: it only parses JSON and awaits handles."""
HEALTH_WAIT_S = 60.0
"""How long `deploy` polls the health endpoint after `serve.run` returns."""

# ============================================================================ errors

ERROR_CODES = {
    400: "400_0001", 401: "401_0001", 403: "403_0001", 404: "404_0001", 409: "409_0001",
    413: "413_0001", 422: "422_0001", 500: "500_0001", 503: "500_0002", 504: "500_0003",
}
"""HTTP status -> error code of the error body (REQUIREMENTS.md)."""


def error_code(status: int) -> str:
    return ERROR_CODES.get(status, "400_0001" if status < 500 else "500_0001")


class ModelRequestError(Exception):
    """A request a model server refuses (wrong shape, wrong task, over a cap): a 4xx.

    The server's entry points return it as `{"refused": {...}}` (see `as_refusal`); callers
    turn that back into this exception with `raise_if_refused`.
    """

    def __init__(self, status: int, field: str, message: str):
        super().__init__(status, field, message)
        self.status, self.field, self.message = status, field, message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def as_refusal(self) -> dict:
        return {"refused": {"status": self.status, "field": self.field, "message": self.message}}


def raise_if_refused(result: dict) -> dict:
    """A server entry point's result, or ModelRequestError when it refused the request."""
    refused = result.get("refused") if isinstance(result, dict) else None
    if refused is not None:
        raise ModelRequestError(refused["status"], refused["field"], refused["message"])
    return result


class APIError(Exception):
    """An error the ingress answers with the JSON error body."""

    def __init__(self, status: int, message: str, field: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.detail = status, message, field, detail or message


def error_body(status: int, message: str, request_id: str, field: str | None = None, detail: str | None = None) -> dict:
    return {
        "error_code": error_code(status),
        "error_message": message,
        "error_details": {"field": field, "message": detail or message},
        "request_id": request_id,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }


# ============================================================================ request schemas


def _check_image(value: Any) -> list:
    """One image: a flat list of numbers, or a rectangular list of lists of numbers."""

    def is_num(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not isinstance(value, list) or not value:
        raise ValueError("an image must be a non-empty list of numbers or of rows of numbers")
    if all(is_num(x) for x in value):
        return [float(x) for x in value]
    if all(isinstance(row, list) for row in value):
        width = len(value[0])
        for i, row in enumerate(value):
            if len(row) != width or not row:
                raise ValueError(f"row {i} has {len(row)} values, row 0 has {width}: rows must be of one length")
            if not all(is_num(x) for x in row):
                raise ValueError(f"row {i} holds a value that is not a number")
        return [[float(x) for x in row] for row in value]
    raise ValueError("an image must be a list of numbers or a list of rows of numbers, not a mix")


Image = Annotated[Any, AfterValidator(_check_image)]


class APIRequest(BaseModel):
    """Request bodies: unknown keys are errors; JSON types are taken strictly (no "3" for 3)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class PredictRequest(APIRequest):
    inputs: list[Image] = Field(min_length=1, max_length=1024)
    """Images: each a flat list of C*H*W floats (64 for digits) or H rows of W floats (8x8)."""
    top_k: int = Field(3, ge=1, le=100)
    """Classes (with probabilities) returned per image."""


class ScoreRequest(APIRequest):
    texts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=64)
    """Texts to score (UTF-8 bytes, at most the model's block_size each)."""
    top_k: int = Field(5, ge=1, le=256)
    """Most likely next bytes returned per text."""


class GenerateRequest(APIRequest):
    prompt: str = Field(min_length=1)
    """Prompt text (UTF-8); only its last block_size bytes are seen by the model."""
    max_new_tokens: int = Field(16, ge=1)
    """Bytes to generate (greedy); capped by the served model's `max_new_tokens`."""


# ============================================================================ batch functions (no Serve)


@dataclass
class ClassifyRequest:
    """One predict request inside a batch: its images (N, C, H, W) float32 and top_k."""

    images: np.ndarray
    top_k: int


@dataclass
class LMRequest:
    """One lm request inside a batch: `score` (rows = texts) or `generate` (one row = prompt)."""

    op: Literal["score", "generate"]
    rows: list[np.ndarray]  # each (T,) int64 byte ids
    top_k: int = 5
    max_new_tokens: int = 0


def images_from_inputs(inputs: list, input_shape: tuple[int, ...]) -> np.ndarray:
    """JSON images -> (N, C, H, W) float32; raises ModelRequestError naming `inputs.<i>`."""
    c, h, w = input_shape
    out = np.empty((len(inputs), c, h, w), dtype=np.float32)
    for i, item in enumerate(inputs):
        arr = np.asarray(item, dtype=np.float32)
        if arr.ndim == 1 and arr.size == c * h * w:
            arr = arr.reshape(c, h, w)
        elif arr.shape == (h, w) and c == 1:
            arr = arr[None]
        elif arr.shape != (c, h, w):
            raise ModelRequestError(
                422, f"inputs.{i}",
                f"image has shape {list(arr.shape)}; expected {c * h * w} values or {h}x{w} rows"
                + ("" if c == 1 else f" per channel ({c}x{h}x{w})"),
            )
        if not np.isfinite(arr).all():
            raise ModelRequestError(422, f"inputs.{i}", "image holds NaN or infinite values")
        out[i] = arr
    return out


def tokens_from_text(text: str) -> np.ndarray:
    """UTF-8 bytes of a text as (T,) int64 byte ids."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def run_classify_batch(pred: Predictor, requests: list[ClassifyRequest]) -> list[dict]:
    """All images of all requests in one forward pass; per request {outputs, probabilities}."""
    images = np.concatenate([r.images for r in requests], axis=0)  # (sum N, C, H, W)
    results = classify(pred, images, max(r.top_k for r in requests))
    out, start = [], 0
    for r in requests:
        mine = results[start:start + len(r.images)]
        start += len(r.images)
        out.append({
            "outputs": [x["label"] for x in mine],
            "probabilities": [x["top_k"][:r.top_k] for x in mine],
        })
    return out


LMGroupKey = tuple[str, int, int]  # (op, prompt length, max_new_tokens)


def group_lm_rows(requests: list[LMRequest]) -> dict[LMGroupKey, list[tuple[int, int]]]:
    """(request index, row index) of every row, grouped by (op, length, max_new_tokens).

    Rows of one group stack into one (G, T) array without padding. Groups keep first-seen
    order and rows keep request order, so results can be scattered back exactly.
    """
    groups: dict[LMGroupKey, list[tuple[int, int]]] = {}
    for i, req in enumerate(requests):
        for j, row in enumerate(req.rows):
            key = (req.op, int(row.shape[0]), req.max_new_tokens if req.op == "generate" else 0)
            groups.setdefault(key, []).append((i, j))
    return groups


def run_lm_batch(pred: Predictor, requests: list[LMRequest]) -> list[list]:
    """Per request, per row: a score dict (`score`) or the list of generated byte ids (`generate`).

    Each (op, length, max_new_tokens) group runs as one numpy batch. Rows of other lengths wait
    for their own group: padding with attention masks (and a KV cache so that one decode step
    serves every active sequence) come later; they are where generation batching pays most.
    """
    out: list[list] = [[None] * len(r.rows) for r in requests]
    for (op, _length, max_new), members in group_lm_rows(requests).items():
        x = np.stack([requests[i].rows[j] for i, j in members])  # (G, T)
        if op == "score":
            results = score_text(pred, x, max(requests[i].top_k for i, _ in members))
            for (i, j), res in zip(members, results):
                res["next"] = res["next"][:requests[i].top_k]
                out[i][j] = res
        else:
            new = generate_text(pred, x, max_new)  # (G, max_new)
            for (i, j), row in zip(members, new):
                out[i][j] = [int(t) for t in row]
    return out


class BatchStats:
    """Counts of batch sizes seen by one replica (what tests assert real batching on)."""

    def __init__(self) -> None:
        self.sizes: CountMap[int] = CountMap()

    def record(self, size: int) -> None:
        self.sizes[size] += 1

    def snapshot(self) -> dict:
        return {
            "batches": sum(self.sizes.values()),
            "max_batch_size_seen": max(self.sizes, default=0),
            "batch_size_counts": dict(sorted(self.sizes.items())),
        }


# ============================================================================ model server


class BatchSettings(BaseModel):
    """The live part of a served model: Serve passes it to `reconfigure` as `user_config`."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(ge=1, le=1024)
    """Largest dynamic batch (requests)."""
    batch_wait_timeout_s: float = Field(ge=0, le=10)
    """Wait for more requests after the first of a batch."""
    version: str
    """Registry version number or alias to serve."""

    @classmethod
    def of(cls, served: ServedModel) -> "BatchSettings":
        return cls(max_batch_size=served.max_batch_size, batch_wait_timeout_s=served.batch_wait_timeout_s, version=served.version)


@dataclass(frozen=True)
class LoadedVersion:
    """A loaded registry version; a batch takes one snapshot so a hot swap never mixes versions."""

    version: int
    backend: str
    artifact_uri: str
    predictor: Predictor = field(repr=False)


@serve.deployment
class BatchedModelServer:
    """One registry model version behind `@serve.batch` (`predict`: classifier, `lm`: language model).

    Callers use the validating entry points `classify`, `score` and `generate`; they enqueue
    into the batched methods, so one forward pass serves many concurrent requests.
    """

    def __init__(self, model: str, backend: str | None, max_new_tokens: int, registry: dict):
        import ray

        self.model = model
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        reg = RegistryConfig.model_validate(registry)
        try:
            self._registry = ray.get_actor(reg.actor_name, namespace=reg.namespace)
        except ValueError:
            raise RuntimeError(
                f"registry actor {reg.actor_name!r} (namespace {reg.namespace!r}) is not running; "
                "register a model first (it is started by `get_or_create_registry`)"
            ) from None
        self._loaded: LoadedVersion | None = None
        self._settings: BatchSettings | None = None
        self._swap = asyncio.Lock()
        self._stats = BatchStats()
        self._batch_hist = telemetry.histogram(
            telemetry.SERVE_BATCH_SIZE, tuple(telemetry.BATCH_BOUNDARIES), ("model", "method")
        )

    async def reconfigure(self, user_config: dict) -> None:
        """Apply batch settings and (re)load the version when its ref resolves to another one.

        A new version is loaded while the current one keeps answering, then swapped in; a
        ref that does not resolve or load raises and leaves the replica as it was.
        """
        settings = BatchSettings.model_validate(user_config)
        async with self._swap:
            record = await self._registry.get_version.remote(self.model, settings.version)
            if self._loaded is None or record["version"] != self._loaded.version:
                pred = await asyncio.to_thread(load_predictor, record["artifact_uri"], self.backend)
                old = self._loaded
                self._loaded = LoadedVersion(record["version"], pred.backend, record["artifact_uri"], pred)
                log.info(
                    "model %s: serving version %s (%s, %s)%s", self.model, record["version"], pred.backend,
                    record["artifact_uri"], f", replacing version {old.version}" if old else "",
                )
        for method in (self.predict, self.lm):
            method.set_max_batch_size(settings.max_batch_size)
            method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._settings = settings

    def check_health(self) -> None:
        if self._loaded is None:
            raise RuntimeError(f"model {self.model!r}: no version loaded")

    def _current(self) -> LoadedVersion:
        if self._loaded is None:
            raise RuntimeError(f"model {self.model!r}: no version loaded (reconfigure was not called)")
        return self._loaded

    def _record_batch(self, size: int, method: str) -> None:
        self._stats.record(size)
        self._batch_hist.observe(size, tags={"model": self.model, "method": method})

    # ---- batched methods: a list of requests in, a list of results out (same order)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict(self, requests: list[ClassifyRequest]) -> list[dict]:
        loaded = self._current()
        self._record_batch(len(requests), "predict")
        # Off the event loop: the replica keeps enqueueing requests (and answering health
        # checks) while a batch computes.
        results = await asyncio.to_thread(run_classify_batch, loaded.predictor, requests)
        return [{"version": loaded.version, "backend": loaded.backend, **r} for r in results]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def lm(self, requests: list[LMRequest]) -> list[dict]:
        loaded = self._current()
        self._record_batch(len(requests), "lm")
        results = await asyncio.to_thread(run_lm_batch, loaded.predictor, requests)
        return [{"version": loaded.version, "backend": loaded.backend, "results": r} for r in results]

    # ---- validating entry points (what the ingress and HandleClient call). A refused request
    # comes back as {"refused": {status, field, message}} rather than as an exception, so
    # client mistakes do not fill replica logs with "Request failed" tracebacks.

    def _need_task(self, task: str, endpoint: str) -> Predictor:
        pred = self._current().predictor
        if pred.task != task:
            other = "predict" if pred.task == "classifier" else "score or generate"
            raise ModelRequestError(
                400, "model", f"model {self.model!r} is a {pred.task!r} model, {endpoint} needs a {task!r} model (use {other})"
            )
        return pred

    async def classify(self, inputs: list, top_k: int = 3) -> dict:
        """inputs: images as nested lists / arrays -> {version, backend, outputs, probabilities}."""
        try:
            pred = self._need_task("classifier", "predict")
            images = images_from_inputs(list(inputs), pred.input_shape())
        except ModelRequestError as err:
            return err.as_refusal()
        return await self.predict(ClassifyRequest(images, int(top_k)))

    async def score(self, texts: list[str], top_k: int = 5) -> dict:
        """texts -> {version, backend, outputs: [{nll, perplexity, next: [...]}, ...]}."""
        try:
            pred = self._need_task("lm", "score")
            rows = []
            for i, text in enumerate(texts):
                row = tokens_from_text(text)
                if not 1 <= len(row) <= pred.block_size:
                    raise ModelRequestError(422, f"texts.{i}", f"text is {len(row)} bytes; 1 to {pred.block_size} (block_size) are accepted")
                rows.append(row)
        except ModelRequestError as err:
            return err.as_refusal()
        out = await self.lm(LMRequest("score", rows, top_k=int(top_k)))
        return {"version": out["version"], "backend": out["backend"], "outputs": out["results"]}

    async def generate(self, prompt: str, max_new_tokens: int = 16) -> dict:
        """prompt -> {version, backend, tokens: [new byte ids], text}."""
        row = tokens_from_text(prompt)
        try:
            self._need_task("lm", "generate")
            if not 1 <= max_new_tokens <= self.max_new_tokens:
                raise ModelRequestError(422, "max_new_tokens", f"must be between 1 and {self.max_new_tokens} for model {self.model!r}")
            if not len(row):
                raise ModelRequestError(422, "prompt", "prompt is empty")
        except ModelRequestError as err:
            return err.as_refusal()
        out = await self.lm(LMRequest("generate", [row], max_new_tokens=int(max_new_tokens)))
        tokens = out["results"][0]
        return {
            "version": out["version"], "backend": out["backend"],
            "tokens": tokens, "text": bytes(tokens).decode("utf-8", errors="replace"),
        }

    async def info(self) -> dict:
        """What /api/v1/models lists for this model."""
        loaded, settings = self._current(), self._settings
        pred = loaded.predictor
        return {
            "model": self.model, "version": loaded.version, "backend": loaded.backend, "task": pred.task,
            "artifact_uri": loaded.artifact_uri, "input_shape": list(pred.input_shape()),
            "block_size": pred.block_size, "max_new_tokens": self.max_new_tokens,
            "ref": settings.version, "max_batch_size": settings.max_batch_size,
            "batch_wait_timeout_s": settings.batch_wait_timeout_s,
        }

    async def stats(self) -> dict:
        """Batch sizes this replica ran, plus the version and backend answering."""
        loaded = self._current()
        return {
            **self._stats.snapshot(), "version": loaded.version, "backend": loaded.backend,
            "replica": serve.get_replica_context().replica_id.unique_id,
        }


# ============================================================================ ingress (REST API)


class IngressMetrics:
    """Request counter, error counter and latency histogram of the ingress (ray.util.metrics)."""

    def __init__(self) -> None:
        self.requests = telemetry.counter(telemetry.SERVE_REQUESTS, ("model", "endpoint", "status"))
        self.errors = telemetry.counter(telemetry.SERVE_ERRORS, ("model", "endpoint", "error_code"))
        self.latency = telemetry.histogram(
            telemetry.SERVE_LATENCY_MS, tuple(telemetry.LATENCY_BOUNDARIES_MS), ("model", "endpoint")
        )

    def observe(self, model: str, endpoint: str, status: int, latency_ms: float) -> None:
        self.requests.inc(tags={"model": model, "endpoint": endpoint, "status": str(status)})
        self.latency.observe(latency_ms, tags={"model": model, "endpoint": endpoint})
        if status >= 400:
            self.errors.inc(tags={"model": model, "endpoint": endpoint, "error_code": error_code(status)})


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

    def __init__(self, app, max_body_bytes: int, models: set[str], metrics: IngressMetrics | None, add_id_header: bool):
        self.app, self.max_body_bytes, self.models, self.metrics = app, max_body_bytes, models, metrics
        self.add_id_header = add_id_header

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
                await self._send_error(send_with_id, 413, error_body(
                    413, f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes} bytes "
                    "(serve.max_body_bytes)", request_id, field="body"))
            else:
                await self.app(scope, receive_limited, send_with_id)
        except Exception as exc:  # nothing handled it: answer 500 with the error body, log the trace
            log.exception("request %s failed", request_id)
            if status_seen:
                raise  # the response has started: nothing sane can be sent any more
            await self._send_error(send_with_id, 500, error_body(
                500, f"internal error ({type(exc).__name__})", request_id, detail=str(exc)[:500]))
        finally:
            if self.metrics is not None:
                endpoint, model = self._labels(scope)
                self.metrics.observe(model, endpoint, status_seen[0] if status_seen else 500, (time.perf_counter() - t0) * 1000)

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


def _error_response(request: Request, status: int, message: str, field: str | None = None, detail: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, _request_id(request), field, detail), status_code=status)


def _field_path(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def install_error_handlers(api: FastAPI) -> None:
    """Every non-2xx answer is the JSON error body of REQUIREMENTS.md (unexpected exceptions:
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
        return _error_response(request, exc.status, exc.message, exc.field, exc.detail)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            msg = f"no endpoint {request.method} {request.url.path}"
        return _error_response(request, exc.status_code, msg, "body" if exc.status_code == 413 else None)


def make_api(cfg: ServeConfig, servers: Mapping[str, Any], metrics: IngressMetrics | None = None,
             behind_serve_proxy: bool = False) -> FastAPI:
    """The REST API. `servers` maps model name -> a handle to its BatchedModelServer (anything
    whose `.classify/.score/.generate/.info.remote(...)` returns an awaitable, so the API is
    testable with fakes). `metrics=None` records none (tests without Ray).

    Of `cfg.models[]` only the fixed fields are read (model, max_new_tokens,
    max_ongoing_requests, num_replicas): batch settings and version refs change live in the
    model servers while this app keeps running (see `build_app`), so they are asked from them.
    """
    from ray.serve.exceptions import BackPressureError

    served = {m.model: m for m in cfg.models}
    api = FastAPI(title="Temper", version="1", openapi_url=f"{API_PREFIX}/openapi.json", docs_url=f"{API_PREFIX}/docs")
    install_error_handlers(api)
    api.add_middleware(
        RequestContextMiddleware, max_body_bytes=cfg.max_body_bytes, models=set(served), metrics=metrics,
        add_id_header=not behind_serve_proxy,
    )

    def server_of(model: str):
        if model not in served:
            raise APIError(404, f"model {model!r} is not served here (served: {sorted(served)})", "model")
        return servers[model]

    async def call(model: str, method: str, *args: Any) -> dict:
        response = getattr(server_of(model), method).remote(*args)
        try:
            return raise_if_refused(await asyncio.wait_for(_awaited(response), cfg.request_timeout_s))
        except ModelRequestError as err:
            prefix = "invalid request: " if err.status == 422 else ""
            raise APIError(err.status, f"{prefix}{err.field}: {err.message}", err.field, err.message) from None
        except asyncio.TimeoutError:
            cancel = getattr(response, "cancel", None)
            if cancel is not None:
                cancel()
            raise APIError(504, f"model {model!r} did not answer within {cfg.request_timeout_s} s (serve.request_timeout_s)") from None
        except BackPressureError as err:
            raise APIError(503, f"model {model!r} is overloaded, retry later: {err}") from None

    @api.get(f"{API_PREFIX}/health", name="health")
    async def health() -> dict:
        return {"status": "ok", "app": cfg.app_name, "models": sorted(served)}

    @api.get(f"{API_PREFIX}/models", name="models")
    async def models() -> dict:
        infos = await asyncio.gather(*(call(name, "info") for name in served))
        out = []
        for info in infos:
            m = served[info["model"]]
            out.append({**info, "max_ongoing_requests": m.max_ongoing_requests, "num_replicas": m.num_replicas})
        return {"models": out}

    @api.post(f"{API_PREFIX}/models/{{model}}/predict", name="predict")
    async def predict(model: str, body: PredictRequest) -> dict:
        t0 = time.perf_counter()
        out = await call(model, "classify", body.inputs, body.top_k)
        return {
            "model": model, "version": out["version"], "backend": out["backend"],
            "outputs": out["outputs"], "probabilities": out["probabilities"],
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
        }

    @api.post(f"{API_PREFIX}/models/{{model}}/score", name="score")
    async def score(model: str, body: ScoreRequest) -> dict:
        t0 = time.perf_counter()
        out = await call(model, "score", body.texts, body.top_k)
        return {
            "model": model, "version": out["version"], "backend": out["backend"], "outputs": out["outputs"],
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
        }

    @api.post(f"{API_PREFIX}/models/{{model}}/generate", name="generate")
    async def generate(model: str, body: GenerateRequest) -> dict:
        t0 = time.perf_counter()
        cap = served[model].max_new_tokens if model in served else None
        if cap is not None and body.max_new_tokens > cap:
            raise APIError(422, f"invalid request: max_new_tokens: at most {cap} for model {model!r}", "max_new_tokens",
                           f"must be <= {cap} (serve.models[].max_new_tokens)")
        out = await call(model, "generate", body.prompt, body.max_new_tokens)
        return {
            "model": model, "version": out["version"], "backend": out["backend"],
            "text": out["text"], "tokens": out["tokens"],
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
        }

    return api


async def _awaited(response: Any) -> Any:
    return await response


@serve.deployment
@serve.ingress()
class TemperIngress:
    """HTTP entry of the app: builds the FastAPI app at replica start (`make_api`)."""

    def __init__(self, serve_cfg: dict, servers: dict):
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.servers = servers  # model name -> DeploymentHandle (Serve replaced the bound apps)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.cfg, self.servers, IngressMetrics(), behind_serve_proxy=True)


# ============================================================================ build / deploy


def model_deployment_name(model: str) -> str:
    """Serve deployment name of a served model (for `serve.get_deployment_handle`)."""
    return f"model-{model}"


def _code_version(*parts: Any) -> str:
    """A deployment version that changes with the replica's constructor arguments and code.

    Serve restarts replicas when this changes and otherwise only calls `reconfigure` with the
    new `user_config`. `serve.run` would draw a random version on every call (restarting
    replicas even when only batch settings change), so we pass one; the driver's job id is
    part of it so that a new driver process, which may carry new code, restarts replicas.
    """
    import ray

    blob = json.dumps(
        [parts, _source_digest(), ray.get_runtime_context().get_job_id()],
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _source_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def build_app(app_cfg: ServeApp) -> serve.Application:
    """Ingress + one BatchedModelServer deployment per served model, ready for `serve.run`."""
    cfg = app_cfg.serve
    registry = app_cfg.registry.model_dump(mode="json")
    servers = {}
    for m in cfg.models:
        args = (m.model, m.backend, m.max_new_tokens, registry)
        deployment = BatchedModelServer.options(
            name=model_deployment_name(m.model),
            num_replicas=m.num_replicas,
            max_ongoing_requests=m.max_ongoing_requests,
            ray_actor_options={"num_cpus": m.cpus_per_replica},
            user_config=BatchSettings.of(m).model_dump(),
            # Private in Ray 2.60 (`version` needs `_internal=True`); see `_code_version`.
            version=_code_version(args), _internal=True,
        )
        servers[m.model] = deployment.bind(*args)
    # The ingress's version leaves out the live fields: a redeploy that only changes batch
    # settings or version refs reconfigures the model servers and keeps the ingress (and HTTP)
    # up. `make_api` must therefore never read those fields from its config.
    fixed = cfg.model_dump(mode="json")
    for m in fixed["models"]:
        for name in BatchSettings.model_fields:
            m.pop(name)
    return TemperIngress.options(
        name="TemperIngress",
        version=_code_version(fixed), _internal=True,
        ray_actor_options={"num_cpus": INGRESS_CPUS},
        # Serve's default (5) would cap the concurrency reaching the model replicas, and so their batches.
        max_ongoing_requests=sum(m.max_ongoing_requests * m.num_replicas for m in cfg.models) + 16,
    ).bind(cfg.model_dump(mode="json"), servers)


def app_builder(args: dict) -> serve.Application:
    """Application builder for Serve config files / KubeRay RayService:
    `import_path: serve.app:app_builder` with `args:` holding a ServeApp (registry + serve)."""
    return build_app(ServeApp.model_validate(args))


def base_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def check_versions(app_cfg: ServeApp) -> list[dict]:
    """Driver-side check that every served model's version ref resolves (and has the expected
    backend) before any replica starts; returns the registry records."""
    import ray

    from actors.registry import get_or_create_registry

    registry = get_or_create_registry(app_cfg.registry)
    records = []
    for m in app_cfg.serve.models:
        try:
            record = ray.get(registry.get_version.remote(m.model, m.version))
        except Exception as err:
            raise ValueError(f"serve.models[{m.model}]: version {m.version!r} cannot be served: {err}") from err
        if m.backend is not None and record["format"] != m.backend:
            raise ValueError(
                f"serve.models[{m.model}]: version {record['version']} has backend {record['format']!r}, "
                f"but backend {m.backend!r} was asked for"
            )
        records.append(record)
    return records


def deploy(app_cfg: ServeApp, blocking: bool = False) -> str:
    """Start Serve (HTTP on serve.host:serve.port), run the app, wait until it answers; returns
    the base URL (endpoints under `<url>/api/v1/`). With `blocking`, serve until Ctrl-C."""
    import httpx
    import ray

    if not ray.is_initialized():
        raise RuntimeError("deploy needs Ray: call ray.init() first")
    cfg = app_cfg.serve
    check_versions(app_cfg)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(app_cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    url = base_url(cfg)
    deadline, last = time.monotonic() + HEALTH_WAIT_S, "no answer"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}{API_PREFIX}/health", timeout=5.0)
            if resp.status_code == 200:
                break
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as err:
            last = repr(err)
        time.sleep(0.25)
    else:
        raise RuntimeError(
            f"Serve app {cfg.app_name!r} is running but {url}{API_PREFIX}/health did not answer 200 within "
            f"{HEALTH_WAIT_S:.0f} s ({last}). If Serve was already started with other http_options, "
            "call serve.shutdown() first: host/port are fixed when Serve starts."
        )
    log.info("Serve app %r healthy at %s", cfg.app_name, url)
    if blocking:
        print(f"Temper serving at {url}{API_PREFIX}/ (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            shutdown(cfg.app_name)
    return url


def shutdown(app_name: str) -> None:
    """Delete the Serve application `app_name` (Serve itself keeps running for other apps)."""
    serve.delete(app_name)
