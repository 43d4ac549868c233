"""Python clients of a Temper Serve app.

- `TemperClient` / `AsyncTemperClient`: the REST API over HTTP (httpx). Non-2xx answers raise
  `TemperAPIError` with the fields of the JSON error body. Overload (503) and connection
  failures are retried with exponential backoff (honouring Retry-After); 4xx never are, nor
  timeouts or 500s (the server may have done the work).
- `HandleClient`: in-cluster callers (a Ray task, actor or another deployment) call a model
  route's `BatchedModelServer` directly through a Serve `DeploymentHandle`, skipping HTTP.

One idea, although over 500 lines: calling a Temper Serve app from Python. The three clients
share the result types, the retry policy and the stream parsing, so they live together; the
wire names come from `serve.protocol`, and nothing here imports Ray Serve or torch at import time.

    client = TemperClient("http://127.0.0.1:8000", route_key="user-42")   # sticky traffic route
    client = TemperClient(url, api_key=os.environ["TEMPER_API_KEY"])       # or token=<JWT>, when auth is on
    result = client.predict("digits", images)          # images (N, 8, 8), (N, 1, 8, 8) or (N, 64)
    result.labels, result.version, result.route

    stream = client.generate_stream("lm-code", "def ", max_new_tokens=32)
    for chunk in stream:
        print(chunk.text, end="")
    stream.result.tokens
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import httpx
import numpy as np

from serve.protocol import API_PREFIX, ROUTE_HEADER, model_deployment_name, raise_if_refused

STICKY_HEADER = "x-temper-route-key"
"""Default of `serve.sticky_header`."""


class TemperAPIError(RuntimeError):
    """A non-2xx answer of the Temper API."""

    def __init__(self, status: int, error_code: str | None, message: str, field: str | None = None,
                 request_id: str | None = None, retry_after_s: float | None = None):
        super().__init__(f"HTTP {status} [{error_code}] {message}" + (f" (field: {field})" if field else ""))
        self.status, self.error_code, self.message, self.field, self.request_id = status, error_code, message, field, request_id
        self.retry_after_s = retry_after_s

    @classmethod
    def from_response(cls, resp: httpx.Response) -> "TemperAPIError":
        """Parse the JSON error body; a body that is not one (a proxy's plain text) still gives status and text."""
        rid = resp.headers.get("x-request-id")
        retry_after = _retry_after(resp)
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "error_code" not in body:
            return cls(resp.status_code, None, resp.text[:500] or resp.reason_phrase, None, rid, retry_after)
        details = body.get("error_details") or {}
        return cls(
            resp.status_code, body.get("error_code"), str(body.get("error_message", "")),
            details.get("field") if isinstance(details, dict) else None, body.get("request_id") or rid, retry_after,
        )

    @classmethod
    def from_event(cls, body: dict) -> "TemperAPIError":
        """An `error` event of a stream (the same error body, sent after the 200 status line)."""
        status = {"500_0003": 504, "500_0002": 503}.get(body.get("error_code", ""), 500)
        details = body.get("error_details") or {}
        return cls(status, body.get("error_code"), str(body.get("error_message", "")), details.get("field"), body.get("request_id"))


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: not sent by Serve; fall back to our backoff
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of overloaded (503) answers and connection failures; never of 4xx, 500 or timeouts."""

    retries: int = 3
    """Extra attempts after the first (0 = none)."""
    backoff_s: float = 0.1
    """First wait; doubled after every retry (with +-25% jitter)."""
    max_backoff_s: float = 5.0
    """Cap of one wait (also caps a server's Retry-After)."""

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        return min(self.backoff_s * 2 ** attempt, self.max_backoff_s) * random.uniform(0.75, 1.25)


RETRIED_STATUSES = frozenset({503})
RETRIED_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
"""Failures before the server could have answered: safe to send again."""


@dataclass(frozen=True)
class PredictResult:
    model: str
    version: int
    backend: str
    labels: list[int]
    """Predicted class per image."""
    probabilities: list[list[dict]]
    """Per image, top-k `{"label", "probability"}`, most likely first."""
    latency_ms: float
    """Latency measured by the server (ingress) or, for HandleClient, by the caller."""
    route: str | None = None
    """Traffic route (version ref) that answered."""


@dataclass(frozen=True)
class EmbedResult:
    model: str
    version: int
    backend: str
    embeddings: list[list[float]]
    """One vector per text, in the order sent."""
    latency_ms: float
    route: str | None = None


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    version: int
    backend: str
    labels: list[str]
    """Most likely label per text."""
    probabilities: list[list[dict]]
    """Per text, top-k `{"label", "probability"}`, most likely first."""
    latency_ms: float
    route: str | None = None


@dataclass(frozen=True)
class ScoreResult:
    model: str
    version: int
    backend: str
    outputs: list[dict]
    """Per text: `{"nll", "perplexity", "next": [{"byte", "text", "probability"}, ...]}`; an hf causal
    LM names `token` instead of `byte` and adds `logprobs` (each token's log-probability after the first)."""
    latency_ms: float
    route: str | None = None


@dataclass(frozen=True)
class GenerateResult:
    model: str
    version: int
    backend: str
    text: str
    """The generated text: bytes decoded as UTF-8 (invalid sequences replaced) for the built-in
    GPT, the tokenizer's decoding without special tokens for an hf causal LM."""
    tokens: list[int]
    """The generated token ids, exactly (bytes, or an hf tokenizer's ids, an end-of-sequence id included)."""
    latency_ms: float
    route: str | None = None
    finish_reason: str | None = None
    """'stop' (ended at an end-of-sequence token) or 'length' (reached max_new_tokens)."""


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed token."""

    index: int
    token: int
    text: str
    """The UTF-8 characters this byte completes ('' inside a multi-byte character)."""


def image_inputs(images: Any) -> list:
    """Images as JSON lists: an array (N, 8, 8), (N, 1, 8, 8) or (N, 64), or already lists."""
    if isinstance(images, np.ndarray):
        return [img.astype(np.float32).reshape(-1).tolist() for img in images]
    return [np.asarray(img, dtype=np.float32).reshape(-1).tolist() for img in images]


def _predict_result(model: str, body: dict, latency_ms: float | None = None) -> PredictResult:
    return PredictResult(model, body["version"], body["backend"], list(body["outputs"]), body["probabilities"],
                         body["latency_ms"] if latency_ms is None else latency_ms, body.get("route"))


def _embed_result(model: str, body: dict, latency_ms: float | None = None) -> EmbedResult:
    return EmbedResult(model, body["version"], body["backend"], body["embeddings"],
                       body["latency_ms"] if latency_ms is None else latency_ms, body.get("route"))


def _classify_result(model: str, body: dict, latency_ms: float | None = None) -> ClassifyResult:
    return ClassifyResult(model, body["version"], body["backend"], list(body["outputs"]), body["probabilities"],
                          body["latency_ms"] if latency_ms is None else latency_ms, body.get("route"))


def _score_result(model: str, body: dict, latency_ms: float | None = None) -> ScoreResult:
    return ScoreResult(model, body["version"], body["backend"], body["outputs"],
                       body["latency_ms"] if latency_ms is None else latency_ms, body.get("route"))


def _generate_result(model: str, body: dict, latency_ms: float | None = None) -> GenerateResult:
    return GenerateResult(model, body["version"], body["backend"], body["text"], list(body["tokens"]),
                          body["latency_ms"] if latency_ms is None else latency_ms, body.get("route"),
                          body.get("finish_reason"))


def _json(resp: httpx.Response) -> Any:
    if resp.status_code >= 300:
        raise TemperAPIError.from_response(resp)
    return resp.json()


def auth_headers(api_key: str | None, token: str | None) -> dict[str, str]:
    """The credential header of every request: `X-API-Key: <key>` or `Authorization: Bearer <token>`."""
    if api_key and token:
        raise ValueError("pass api_key or token, not both")
    if api_key:
        return {"X-API-Key": api_key}
    return {"Authorization": f"Bearer {token}"} if token else {}


def _headers(route_key: str | None, route: str | None, sticky_header: str) -> dict[str, str]:
    out = {}
    if route_key:
        out[sticky_header] = route_key
    if route:
        out[ROUTE_HEADER] = route
    return out


def _generate_body(prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int | None, stream: bool) -> dict:
    body: dict[str, Any] = {"prompt": prompt, "max_new_tokens": max_new_tokens}
    if temperature:
        body["temperature"] = float(temperature)
    if top_k:
        body["top_k"] = top_k
    if seed is not None:
        body["seed"] = seed
    if stream:
        body["stream"] = True
    return body


class _SSEParser:
    """Server-sent events from lines: (event, data dict) per blank-line-terminated block."""

    def __init__(self) -> None:
        self.event, self.data = "message", []

    def feed(self, line: str) -> tuple[str, dict] | None:
        if line == "":
            if not self.data:
                return None
            out = (self.event, json.loads("\n".join(self.data)))
            self.event, self.data = "message", []
            return out
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].strip())
        return None


class _StreamState:
    """What a stream has told so far; builds the final GenerateResult."""

    def __init__(self, model: str):
        self.model, self.start, self.result = model, None, None

    def on_event(self, event: str, data: dict) -> GenerateChunk | None:
        if event == "start":
            self.start = data
        elif event == "token":
            return GenerateChunk(data["index"], data["token"], data["text"])
        elif event == "done":
            s = self.start or {}
            self.result = GenerateResult(self.model, s.get("version"), s.get("backend"), data["text"], list(data["tokens"]),
                                         data["latency_ms"], s.get("route"), data.get("finish_reason"))
        elif event == "error":
            raise TemperAPIError.from_event(data)
        return None


class GenerationStream:
    """Iterate for `GenerateChunk`s as the server makes them; `.result` once exhausted."""

    def __init__(self, chunks: Iterator[GenerateChunk], state: _StreamState):
        self._chunks, self._state = chunks, state

    def __iter__(self) -> Iterator[GenerateChunk]:
        return self._chunks

    @property
    def result(self) -> GenerateResult:
        if self._state.result is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._state.result


class TemperClient:
    """Synchronous REST client.

    `route_key` pins every call to one traffic route (sent as `sticky_header`); `retry` governs
    retries of 503 and connection errors. `transport` is for tests (httpx.MockTransport).
    `api_key` (an API key) or `token` (a JWT) is sent with every request when the app requires auth.
    """

    def __init__(self, base_url: str, timeout: float = 10.0, transport: httpx.BaseTransport | None = None,
                 retry: RetryPolicy | None = None, route_key: str | None = None, sticky_header: str = STICKY_HEADER,
                 api_key: str | None = None, token: str | None = None):
        self._http = httpx.Client(base_url=base_url.rstrip("/") + API_PREFIX, timeout=timeout, transport=transport,
                                  headers=auth_headers(api_key, token))
        self.retry = retry or RetryPolicy()
        self.route_key, self.sticky_header = route_key, sticky_header
        self.attempts = 0
        """HTTP attempts made (retries included), for callers that want to see retrying at work."""

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "TemperClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, method: str, path: str, body: dict | None = None, route: str | None = None,
              route_key: str | None = None) -> httpx.Response:
        headers = _headers(route_key or self.route_key, route, self.sticky_header)
        for attempt in range(self.retry.retries + 1):
            self.attempts += 1
            last = attempt == self.retry.retries
            try:
                resp = self._http.request(method, path, json=body, headers=headers)
            except RETRIED_ERRORS:
                if last:
                    raise
                time.sleep(self.retry.delay(attempt, None))
                continue
            if resp.status_code in RETRIED_STATUSES and not last:
                time.sleep(self.retry.delay(attempt, _retry_after(resp)))
                continue
            return resp
        raise AssertionError("unreachable")

    def health(self) -> dict:
        return _json(self._send("GET", "/health"))

    def models(self) -> list[dict]:
        return _json(self._send("GET", "/models"))["models"]

    def predict(self, model: str, images: Any, top_k: int = 3, *, route: str | None = None,
                route_key: str | None = None) -> PredictResult:
        body = {"inputs": image_inputs(images), "top_k": top_k}
        return _predict_result(model, _json(self._send("POST", f"/models/{model}/predict", body, route, route_key)))

    def embed(self, model: str, texts: list[str], *, truncate: bool = False, route: str | None = None,
              route_key: str | None = None) -> EmbedResult:
        """Vectors of `texts` from an hf embedding model."""
        body = {"texts": list(texts), "truncate": truncate}
        return _embed_result(model, _json(self._send("POST", f"/models/{model}/embed", body, route, route_key)))

    def classify(self, model: str, texts: list[str], top_k: int = 1, *, truncate: bool = False,
                 route: str | None = None, route_key: str | None = None) -> ClassifyResult:
        """Labels (and top-k probabilities) of `texts` from an hf sequence_classification model."""
        body = {"texts": list(texts), "top_k": top_k, "truncate": truncate}
        return _classify_result(model, _json(self._send("POST", f"/models/{model}/classify", body, route, route_key)))

    def score(self, model: str, texts: list[str], top_k: int = 5, *, route: str | None = None,
              route_key: str | None = None) -> ScoreResult:
        body = {"texts": texts, "top_k": top_k}
        return _score_result(model, _json(self._send("POST", f"/models/{model}/score", body, route, route_key)))

    def generate(self, model: str, prompt: str, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
                 seed: int | None = None, route: str | None = None, route_key: str | None = None) -> GenerateResult:
        body = _generate_body(prompt, max_new_tokens, temperature, top_k, seed, False)
        return _generate_result(model, _json(self._send("POST", f"/models/{model}/generate", body, route, route_key)))

    def generate_stream(self, model: str, prompt: str, max_new_tokens: int = 16, *, temperature: float = 0.0,
                        top_k: int = 0, seed: int | None = None, route: str | None = None,
                        route_key: str | None = None) -> GenerationStream:
        """Server-sent events as `GenerateChunk`s. Retries (503, connection) apply until the
        stream has started; an `error` event mid-stream raises TemperAPIError."""
        body = _generate_body(prompt, max_new_tokens, temperature, top_k, seed, True)
        headers = _headers(route_key or self.route_key, route, self.sticky_header)
        state = _StreamState(model)

        def chunks() -> Iterator[GenerateChunk]:
            for attempt in range(self.retry.retries + 1):
                self.attempts += 1
                last = attempt == self.retry.retries
                try:
                    with self._http.stream("POST", f"/models/{model}/generate", json=body, headers=headers) as resp:
                        if resp.status_code in RETRIED_STATUSES and not last:
                            resp.read()
                            wait = self.retry.delay(attempt, _retry_after(resp))
                        elif resp.status_code >= 300:
                            resp.read()
                            raise TemperAPIError.from_response(resp)
                        else:
                            parser = _SSEParser()
                            for line in resp.iter_lines():
                                parsed = parser.feed(line)
                                if parsed is not None:
                                    chunk = state.on_event(*parsed)
                                    if chunk is not None:
                                        yield chunk
                            return
                except RETRIED_ERRORS:
                    if last:
                        raise
                    wait = self.retry.delay(attempt, None)
                time.sleep(wait)

        return GenerationStream(chunks(), state)


class AsyncTemperClient:
    """The same API for asyncio callers (`async with AsyncTemperClient(url) as c: await c.predict(...)`)."""

    def __init__(self, base_url: str, timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None,
                 retry: RetryPolicy | None = None, route_key: str | None = None, sticky_header: str = STICKY_HEADER,
                 max_connections: int = 100, api_key: str | None = None, token: str | None = None):
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/") + API_PREFIX, timeout=timeout,
                                       transport=transport, limits=limits, headers=auth_headers(api_key, token))
        self.retry = retry or RetryPolicy()
        self.route_key, self.sticky_header = route_key, sticky_header
        self.attempts = 0

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncTemperClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, body: dict | None = None, route: str | None = None,
                    route_key: str | None = None) -> httpx.Response:
        headers = _headers(route_key or self.route_key, route, self.sticky_header)
        for attempt in range(self.retry.retries + 1):
            self.attempts += 1
            last = attempt == self.retry.retries
            try:
                resp = await self._http.request(method, path, json=body, headers=headers)
            except RETRIED_ERRORS:
                if last:
                    raise
                await asyncio.sleep(self.retry.delay(attempt, None))
                continue
            if resp.status_code in RETRIED_STATUSES and not last:
                await asyncio.sleep(self.retry.delay(attempt, _retry_after(resp)))
                continue
            return resp
        raise AssertionError("unreachable")

    async def health(self) -> dict:
        return _json(await self._send("GET", "/health"))

    async def models(self) -> list[dict]:
        return _json(await self._send("GET", "/models"))["models"]

    async def predict(self, model: str, images: Any, top_k: int = 3, *, route: str | None = None,
                      route_key: str | None = None) -> PredictResult:
        body = {"inputs": image_inputs(images), "top_k": top_k}
        return _predict_result(model, _json(await self._send("POST", f"/models/{model}/predict", body, route, route_key)))

    async def embed(self, model: str, texts: list[str], *, truncate: bool = False, route: str | None = None,
                    route_key: str | None = None) -> EmbedResult:
        body = {"texts": list(texts), "truncate": truncate}
        return _embed_result(model, _json(await self._send("POST", f"/models/{model}/embed", body, route, route_key)))

    async def classify(self, model: str, texts: list[str], top_k: int = 1, *, truncate: bool = False,
                       route: str | None = None, route_key: str | None = None) -> ClassifyResult:
        body = {"texts": list(texts), "top_k": top_k, "truncate": truncate}
        return _classify_result(model, _json(await self._send("POST", f"/models/{model}/classify", body, route, route_key)))

    async def score(self, model: str, texts: list[str], top_k: int = 5, *, route: str | None = None,
                    route_key: str | None = None) -> ScoreResult:
        body = {"texts": texts, "top_k": top_k}
        return _score_result(model, _json(await self._send("POST", f"/models/{model}/score", body, route, route_key)))

    async def generate(self, model: str, prompt: str, max_new_tokens: int = 16, *, temperature: float = 0.0,
                       top_k: int = 0, seed: int | None = None, route: str | None = None,
                       route_key: str | None = None) -> GenerateResult:
        body = _generate_body(prompt, max_new_tokens, temperature, top_k, seed, False)
        return _generate_result(model, _json(await self._send("POST", f"/models/{model}/generate", body, route, route_key)))

    async def generate_stream(self, model: str, prompt: str, max_new_tokens: int = 16, *, temperature: float = 0.0,
                              top_k: int = 0, seed: int | None = None, route: str | None = None,
                              route_key: str | None = None) -> AsyncIterator[GenerateChunk | GenerateResult]:
        """Yields `GenerateChunk`s, then the final `GenerateResult` (no retries: use `generate`
        for retried calls)."""
        body = _generate_body(prompt, max_new_tokens, temperature, top_k, seed, True)
        headers = _headers(route_key or self.route_key, route, self.sticky_header)
        state = _StreamState(model)
        self.attempts += 1
        async with self._http.stream("POST", f"/models/{model}/generate", json=body, headers=headers) as resp:
            if resp.status_code >= 300:
                await resp.aread()
                raise TemperAPIError.from_response(resp)
            parser = _SSEParser()
            async for line in resp.aiter_lines():
                parsed = parser.feed(line)
                if parsed is not None:
                    chunk = state.on_event(*parsed)
                    if chunk is not None:
                        yield chunk
        if state.result is not None:
            yield state.result


class HandleClient:
    """Calls one served model route through its Serve DeploymentHandle (no HTTP; needs Ray connected).

    `route=None` is the model's primary route (`model-<name>`); another route ref picks its own
    deployment. Model-side refusals raise `serve.protocol.ModelRequestError` (status, field,
    message) and failures `ModelServerError`; a call longer than `timeout_s` raises
    `TimeoutError`; an overloaded route (BackPressureError) is retried like the HTTP clients do.
    """

    def __init__(self, app_name: str, model: str, timeout_s: float = 30.0, route: str | None = None,
                 retry: RetryPolicy | None = None):
        from ray import serve

        self.model, self.timeout_s, self.route = model, timeout_s, route
        self.retry = retry or RetryPolicy()
        self._handle = serve.get_deployment_handle(model_deployment_name(model, route), app_name)

    def _call(self, method: str, *args: Any) -> tuple[dict, float]:
        from ray.serve.exceptions import BackPressureError

        t0 = time.perf_counter()
        for attempt in range(self.retry.retries + 1):
            try:
                out = getattr(self._handle, method).remote(*args).result(timeout_s=self.timeout_s)
                break
            except BackPressureError:
                if attempt == self.retry.retries:
                    raise
                time.sleep(self.retry.delay(attempt, None))
        return raise_if_refused(out), (time.perf_counter() - t0) * 1000

    def predict(self, images: Any, top_k: int = 3) -> PredictResult:
        out, ms = self._call("classify", image_inputs(images), top_k)
        return _predict_result(self.model, out, ms)

    def embed(self, texts: list[str], *, truncate: bool = False) -> EmbedResult:
        out, ms = self._call("embed", list(texts), truncate)
        return _embed_result(self.model, out, ms)

    def classify(self, texts: list[str], top_k: int = 1, *, truncate: bool = False) -> ClassifyResult:
        out, ms = self._call("classify_texts", list(texts), top_k, truncate)
        return _classify_result(self.model, out, ms)

    def score(self, texts: list[str], top_k: int = 5) -> ScoreResult:
        out, ms = self._call("score", list(texts), top_k)
        return _score_result(self.model, out, ms)

    def generate(self, prompt: str, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
                 seed: int | None = None) -> GenerateResult:
        out, ms = self._call("generate", prompt, max_new_tokens, temperature, top_k, seed)
        return _generate_result(self.model, out, ms)

    def generate_stream(self, prompt: str, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
                        seed: int | None = None) -> Iterator[int]:
        """New token ids as the replica makes them (a streaming DeploymentHandle call): bytes of
        the built-in GPT, tokenizer ids of an hf causal LM."""
        gen = self._handle.options(stream=True).generate_stream.remote(prompt, max_new_tokens, temperature, top_k, seed)
        for message in gen:
            if isinstance(message, dict):
                raise_if_refused(message)  # the header ({version, ...}) passes, a refusal/failure raises
                continue
            for item in message:  # a list of new tokens: byte ids, or an hf causal LM's {token, text, stop}
                yield item["token"] if isinstance(item, dict) else item

    def stats(self) -> dict:
        """Batch statistics of the replica that answers (one of them when there are several)."""
        return self._call("stats")[0]
