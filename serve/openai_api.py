"""OpenAI-compatible routes on the ingress: `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (both streamable as server-sent events) and `POST /v1/embeddings`,
so the official `openai` client (and anything speaking its protocol) works against Temper.

Read top to bottom:
1. the wire shapes: request schemas, the error body, response and stream-chunk builders (pure
   functions, testable without Ray or HTTP);
2. `install_openai_routes`: the routes, on the model calls `make_api` gives them.

Naming: the request's `model` is a served model's name (`lm`), or `<model>:<adapter>` for one
of its LoRA adapters (`lm:support`, see `serve.models[].adapters`); the traffic split and the
route header apply as on `/api/v1/`. Errors on these routes use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`: a bad field is 400 naming it in `param`
(the replica's 422 is 400 here), an unknown model or adapter 404 with code `model_not_found`.
Auth is the ingress's: an API key or JWT as `Authorization: Bearer ...` (the client's `api_key`).

Usage counts: `prompt_tokens` are the prompt's ids as the model's tokenizer makes them (special
tokens included; a chat prompt is its rendered template, `app.data.chat_template`),
`completion_tokens` the ids generated (an end-of-sequence id included; with a stop string, up to
the token that completed it, although the text ends before the stop string).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import json
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.stop_strings import visible_text
from serve.protocol import APIError, ModelRequestError, ModelServerError, raise_if_refused

log = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1"
ADAPTER_SEPARATOR = ":"

# ============================================================================ wire shapes


class OpenAIRequest(BaseModel):
    """OpenAI request bodies: unknown keys are errors (400 naming them) rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    """A served model, or `<model>:<adapter>`."""
    user: str | None = None
    """Accepted and ignored (OpenAI's end-user id)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    """Send a last chunk (empty `choices`) carrying `usage`."""


class SamplingFields(OpenAIRequest):
    max_tokens: int | None = Field(None, ge=1)
    """Tokens to generate at most (default 16 for completions, the model's `max_new_tokens` for chat)."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    """0 = greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=256)
    """Not OpenAI's (send it in `extra_body`): sample among the k most likely tokens (0 = all)."""
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    """Up to 4 stop strings: the text ends before the first one (not included), finish_reason `stop`."""
    n: int = 1
    """Choices per request: only 1."""
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    """One prompt (a list of exactly one string is accepted too)."""
    echo: bool = False
    """Only false: the prompt is not repeated in the answer."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id ... are accepted; only role and content are rendered

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens (set one of them)."""


class EmbeddingRequest(OpenAIRequest):
    input: str | list[str]
    """A text or a list of texts (token-id arrays are not supported)."""
    encoding_format: Literal["float", "base64"] = "float"
    """`base64`: each vector as little-endian float32 bytes, base64-encoded (the openai client's default)."""


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error"}


def openai_status(status: int) -> int:
    """The status a /v1 route answers for one of ours: a field the model refuses (our 422) is OpenAI's 400."""
    return 400 if status == 422 else status


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    if code is None and status == 404 and param == "model":
        code = "model_not_found"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def is_openai_path(scope: dict) -> bool:
    """Whether a request addresses the /v1 routes (below the app's route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


PARAM_NAMES = {"max_new_tokens": "max_tokens"}
"""Replica field names -> the OpenAI request's."""


def openai_param(field: str | None, endpoint: str) -> str | None:
    """The request field a replica's error names, as the OpenAI request calls it."""
    if field is None:
        return None
    if endpoint == "embeddings" and field.startswith("texts"):
        return "input" + field[len("texts"):]
    return PARAM_NAMES.get(field, field)


def usage(prompt_tokens: int, completion_tokens: int | None = None) -> dict:
    out = {"prompt_tokens": prompt_tokens}
    if completion_tokens is not None:
        out["completion_tokens"] = completion_tokens
    out["total_tokens"] = prompt_tokens + (completion_tokens or 0)
    return out


def completion_body(kind: str, rid: str, created: int, model: str, text: str, finish: str, use: dict) -> dict:
    """A whole (non-streamed) answer: kind `text_completion` or `chat.completion`."""
    if kind == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice], "usage": use}


def stream_chunk(kind: str, rid: str, created: int, model: str, text: str | None = None,
                 finish: str | None = None, role: bool = False, use: dict | None = None) -> dict:
    """One streamed chunk. Chat (`chat.completion.chunk`): the first carries `delta.role`, then
    `delta.content` pieces, the last an empty delta and `finish_reason`; completions
    (`text_completion`): `text` pieces, the last "" with `finish_reason`. A usage chunk
    (`use`) has no choices."""
    if use is not None:
        choices = []
    elif kind == "chat.completion.chunk":
        delta: dict = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    out = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def sse(data: dict | str) -> bytes:
    """One server-sent event as OpenAI sends them: `data: <json>` (or `data: [DONE]`) and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n".encode()


DONE = "[DONE]"


def embedding_item(index: int, vector: list[float], encoding: str) -> dict:
    value: Any = vector
    if encoding == "base64":
        value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return {"object": "embedding", "index": index, "embedding": value}


class StreamText:
    """The text of one streamed generation as it may be shown: pieces in, the new visible part
    out, holding back what may still become a stop string (`app.stop_strings.visible_text`)."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.shown, self.stopped = stops, "", 0, False

    def add(self, piece: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.text += piece
        visible, self.stopped = visible_text(self.text, self.stops, final)
        new, self.shown = visible[self.shown:], max(self.shown, len(visible))
        return new


# ============================================================================ routes


ModelCall = Callable[..., Awaitable[tuple[dict, str]]]


def install_openai_routes(api: FastAPI, *, served: dict, call: ModelCall,
                          pick: Callable[[str, Request], tuple[Any, str]], translate: Callable, record: Callable,
                          dependencies_read: list, dependencies_use: list, request_timeout_s: float,
                          check_items: Callable[[int, str], None]) -> None:
    """Add the /v1 routes to `api` (see the module docstring); the model calls, routing, auth
    dependencies and outcome records are `make_api`'s."""
    created_at = int(time.time())

    def resolve(name: str) -> tuple[str, str | None]:
        """`model` or `model:adapter` -> (served model, adapter); 404 naming what is unknown."""
        model, _, adapter = name.partition(ADAPTER_SEPARATOR)
        if model not in served:
            raise APIError(404, f"The model {name!r} does not exist (served: {sorted(served)})", "model")
        if adapter:
            known = served[model].adapters or {}
            if adapter not in known:
                raise APIError(404, f"The model {model!r} has no adapter {adapter!r} "
                                    f"(adapters: {sorted(known) or 'none'})", "model")
        return model, adapter or None

    def refused(err: APIError, endpoint: str) -> APIError:
        """A replica's refusal as the /v1 error (field renamed, 422 -> 400)."""
        param = openai_param(err.field, endpoint)
        message = err.message if err.field is None else f"{param}: {err.detail}"
        return APIError(openai_status(err.status), message, param, err.detail, err.headers)

    def check_n(body: SamplingFields) -> None:
        if body.n != 1:
            raise APIError(400, f"n: only n=1 is supported, not {body.n}", "n")

    @api.get(f"{OPENAI_PREFIX}/models", name="openai_models", dependencies=dependencies_read)
    async def list_models() -> dict:
        data = []
        for name, m in served.items():
            data.append({"id": name, "object": "model", "created": created_at, "owned_by": "temper",
                         "root": name, "parent": None})
            for adapter in sorted(m.adapters or {}):
                data.append({"id": f"{name}{ADAPTER_SEPARATOR}{adapter}", "object": "model", "created": created_at,
                             "owned_by": "temper", "root": name, "parent": name})
        return {"object": "list", "data": data}

    def generation_args(body: SamplingFields, max_tokens: int, adapter: str | None,
                        prompt: str, messages: list | None) -> tuple:
        # generate(prompt, max_new_tokens, temperature, top_k, seed, top_p, stop, adapter, messages)
        return (prompt, max_tokens, body.temperature, body.top_k, body.seed, body.top_p, body.stops(), adapter, messages)

    async def complete(body: SamplingFields, request: Request, kind: str, prompt: str, messages: list | None,
                       default_max: int):
        check_n(body)
        if len(body.stops()) > 4:
            raise APIError(400, "stop: at most 4 stop strings", "stop")
        model, adapter = resolve(body.model)
        cap = served[model].max_new_tokens
        max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max, cap)
        if max_tokens > cap:
            raise APIError(400, f"max_tokens: at most {cap} for model {model!r} (serve.models[].max_new_tokens)",
                           "max_tokens")
        args = generation_args(body, max_tokens, adapter, prompt, messages)
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream(model, request, args, kind, rid, body.model, body.stops(), include_usage)
        try:
            out, _route = await call(model, "generate", request, *args)
        except APIError as err:
            raise refused(err, "chat" if messages is not None else "completions") from None
        use = usage(out["prompt_tokens"], len(out["tokens"]))
        return completion_body(kind, rid, created_at, body.model, out["text"], out["finish_reason"], use)

    @api.post(f"{OPENAI_PREFIX}/completions", name="openai_completions", dependencies=dependencies_use)
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request, not {len(prompt)}", "prompt")
            prompt = prompt[0]
        if body.echo:
            raise APIError(400, "echo: only false is supported", "echo")
        return await complete(body, request, "text_completion", prompt, None, 16)

    @api.post(f"{OPENAI_PREFIX}/chat/completions", name="openai_chat", dependencies=dependencies_use)
    async def chat(body: ChatRequest, request: Request):
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "max_completion_tokens: set it or max_tokens, not both", "max_completion_tokens")
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
        model, _ = resolve(body.model)
        return await complete(body, request, "chat.completion", "", messages, served[model].max_new_tokens)

    @api.post(f"{OPENAI_PREFIX}/embeddings", name="openai_embeddings", dependencies=dependencies_use)
    async def embeddings(body: EmbeddingRequest, request: Request):
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise APIError(400, "input: no texts: send at least one", "input")
        check_items(len(texts), "input")
        model, adapter = resolve(body.model)
        if adapter is not None:
            raise APIError(400, f"model: adapters serve completions only; {body.model!r} names one", "model")
        try:
            out, _route = await call(model, "embed", request, texts, False)
        except APIError as err:
            raise refused(err, "embeddings") from None
        tokens = sum(out["token_counts"])
        return {"object": "list", "model": body.model, "usage": usage(tokens),
                "data": [embedding_item(i, v, body.encoding_format) for i, v in enumerate(out["embeddings"])]}

    async def stream(model: str, request: Request, args: tuple, kind: str, rid: str, name: str,
                     stops: list[str], include_usage: bool) -> StreamingResponse:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        handle, route = pick(model, request)
        t0 = time.perf_counter()
        deadline = t0 + request_timeout_s
        gen = handle.options(stream=True).generate_stream.remote(*args)
        endpoint = "chat" if kind == "chat.completion" else "completions"
        try:  # errors before the first event still get a proper status code
            head = raise_if_refused(await asyncio.wait_for(gen.__anext__(), request_timeout_s))
        except (ModelRequestError, ModelServerError, BackPressureError, DeploymentUnavailableError, asyncio.TimeoutError) as err:
            gen.cancel()
            api_err = translate(model, route, err, t0)
            raise (refused(api_err, endpoint) if isinstance(err, ModelRequestError) else api_err) from None
        except StopAsyncIteration:
            raise APIError(500, f"model {model!r} ended the stream before it started") from None
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

        def chunk(**kw) -> bytes:
            return sse(stream_chunk(chunk_kind, rid, created_at, name, **kw))

        async def events():
            shown = StreamText(stops)
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            generated, eos = 0, False
            if chunk_kind == "chat.completion.chunk":
                yield chunk(text="", role=True)
            try:
                while True:
                    batch = raise_if_refused(await asyncio.wait_for(gen.__anext__(), max(deadline - time.perf_counter(), 0.001)))
                    new = ""  # one chunk for the tokens of one message (the replica sends them in lists)
                    for item in batch:
                        if isinstance(item, dict):  # hf causal LM: {token, text, stop}
                            piece, eos = item["text"], item["stop"]
                        else:  # built-in GPT: a byte id
                            piece = utf8.decode(bytes([item]))
                        new += shown.add(piece)
                    generated += len(batch)
                    if new:
                        yield chunk(text=new)
            except StopAsyncIteration:
                record(model, route, head["version"], "ok", (time.perf_counter() - t0) * 1000)
                new = shown.add(utf8.decode(b"", final=True), final=True)
                if new:
                    yield chunk(text=new)
                yield chunk(finish="stop" if shown.stopped or eos else "length")
                if include_usage:
                    yield chunk(use=usage(head["prompt_tokens"], generated))
                yield sse(DONE)
            except (ModelServerError, asyncio.TimeoutError) as err:
                gen.cancel()
                api_err = translate(model, route, err, t0)
                yield sse(openai_error_body(api_err.status, api_err.message))
            except Exception as err:  # the response has started: report in-band, log the trace
                log.exception("stream %s of model %s failed", rid, model)
                record(model, route, head["version"], "server_error", (time.perf_counter() - t0) * 1000)
                yield sse(openai_error_body(500, f"internal error ({type(err).__name__}): {str(err)[:300]}"))

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
