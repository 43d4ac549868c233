"""Batched model replicas: `BatchedModelServer`, one deployment per (model, traffic route).

One idea, although over 500 lines: the deployment that owns a loaded version and feeds its batch
queues. What a batch holds and how each kind runs (request records, input checks, the plain batch
functions) is `serve/batches.py`; the ingress and deploy code live in `serve/ingress.py` and
`serve/deploy.py`.

Read top to bottom:
1. `BatchStats`, `BatchGate`, `BatchSettings`: batch-size counts, the gate that admits requests
   into a batch queue, and the settings `reconfigure` changes live;
2. `BatchedModelServer`: resolves a registry version ref, loads it, runs batches. Batch size,
   batch wait and the version ref live in `user_config`, so `reconfigure` changes them live;
   an alias ref is also re-resolved every `alias_poll_interval_s` (poll, not push: the registry
   does not know who serves its versions), and a moved alias is hot-swapped: load new ->
   switch -> drop old, while the old version keeps answering. A batch takes one snapshot of the
   loaded version, so a swap never mixes versions within a batch (generation: each loaded
   version has its own decode loop, the old one finishing what it runs).

`hf` text models (embedding, sequence_classification) answer `embed` / `classify_texts`: the
replica tokenizes with the model folder's own tokenizer (refusing a text over the token limit
unless the request asks to truncate) and the `text` queue runs every text of the batch's
requests together, in sub-batches of similar length each padded to its longest member.
An `hf` causal LM answers `score` / `generate` / `generate_stream` as the built-in GPT does,
through the same `lm` queue and decode loop, on its tokenizer's ids: a prompt over the token limit is refused, a generation ends at an end-of-sequence id, and
streamed events carry each token's text (`TokenPieces`) instead of a bare byte id.

Generation also takes `top_p`, stop strings (a row ends at the token completing one; the answer's
text ends before it), chat `messages` (rendered by `app.data.chat_template`) and a LoRA `adapter`
of the model's `serve.models[].adapters`: the loaded version's `AdapterSet` loads it on first use and
evicts the least recently used one past `max_adapters`. Rows of different adapters (and of the
base) share a batch: peft's mixed-batch LoRA applies each row's own adapter, and each row's KV
cache entries are computed with it, so no batch is split per adapter.

Batching: three `@serve.batch` queues: `predict` (classifiers), `text` (hf embed / classify)
and `lm` (scoring). A request that finds its replica idle (nothing else in flight) skips the
queue and runs at once: waiting `batch_wait_timeout_s` for company that is not coming would
only add latency. Generation (`generate`, answered in one piece, and `generate_stream`) is
batched continuously instead (`serve/decode_loop.py`): one decode loop per loaded version owns
the running batch, a request joins it at the next decode step (up to `max_batch_size`
sequences) and leaves it as soon as it is done, so nobody waits for a longer generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter as CountMap
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from app import telemetry
from app.artifact_roots import check_under_roots
from app.config.registry import RegistryConfig
from app.config.serve import ServedModel, registered_adapter_ref
from app.data.chat_template import ChatFormatError, render_chat
from app.inference import NonFiniteOutputError, Predictor, SamplingParams, TextPredictor, load_predictor
from app.decode_batch import DecodeSequence
from app.models.adapters import AdapterError, AdapterSet, registered_adapter_folder
from serve.batches import (
    LM_TASKS,
    NON_FINITE,
    ClassifyRequest,
    GenerateItem,
    LMRequest,
    TextRequest,
    TokenPieces,
    encode_texts,
    generated,
    images_from_inputs,
    lm_row,
    run_classify_batch,
    run_lm_batch,
    run_text_batch,
    tokens_from_text,
)
from serve.decode_loop import DecodeLoop, DecodeStats
from serve.protocol import ModelRequestError, ModelServerError

log = logging.getLogger(__name__)

class BatchStats:
    """Counts of batch sizes seen by one replica (what tests assert real batching on)."""

    def __init__(self) -> None:
        self.sizes: CountMap[int] = CountMap()
        self.by_method: dict[str, CountMap[int]] = {}
        self.unqueued = 0
        """Requests that found the replica idle and ran at once, without the batch queue (and its wait)."""

    def record(self, size: int, method: str = "-", unqueued: bool = False) -> None:
        self.sizes[size] += 1
        self.by_method.setdefault(method, CountMap())[size] += 1
        self.unqueued += unqueued

    def snapshot(self) -> dict:
        return {
            "batches": sum(self.sizes.values()),
            "max_batch_size_seen": max(self.sizes, default=0),
            "batch_size_counts": dict(sorted(self.sizes.items())),
            "by_method": {m: dict(sorted(c.items())) for m, c in sorted(self.by_method.items())},
            "unqueued": self.unqueued,
        }


# ============================================================================ model server


class BatchGate:
    """Keeps requests out of a `@serve.batch` queue while one of its batches computes.

    Since Ray made `@serve.batch` concurrent (ray-project/ray#53096, `max_concurrent_batches`),
    its loop forms the next batch as soon as requests arrive, even while the running batch still
    holds the only slot: requests arriving during a long batch (a 64-token generation) became
    many batches of 1 or 2 queued behind it (measured: mean batch 1.5 with 32 requests in the
    replica). Held here until the running batch is done, they enter the queue together and
    Serve forms one batch of them, up to `max_batch_size`.
    """

    def __init__(self) -> None:
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def admit(self) -> None:
        await self._idle.wait()

    @contextlib.contextmanager
    def running(self):
        self._running += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()


class BatchSettings(BaseModel):
    """The live part of a served route: Serve passes it to `reconfigure` as `user_config`."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(ge=1, le=1024)
    """Largest dynamic batch (requests)."""
    batch_wait_timeout_s: float = Field(ge=0, le=10)
    """Wait for more requests after the first of a batch."""
    stream_interval_s: float = Field(ServedModel.model_fields["stream_interval_s"].default, ge=0, le=10)
    """Streamed generation: the tokens made within this long after a stream's previous message go as one message."""
    version: str
    """Registry version number or alias to serve (the route)."""


@dataclass(frozen=True)
class LoadedVersion:
    """A loaded registry version; a batch takes one snapshot so a hot swap never mixes versions."""

    version: int
    backend: str
    artifact_uri: str
    predictor: Predictor = field(repr=False)
    adapters: AdapterSet | None = field(default=None, repr=False)
    """The LoRA adapters served on this version's base (loaded on first use): each version has its
    own, so a hot swap starts with none loaded."""


def _batched(run_batch):
    """A `@serve.batch` queue (its settings changed live by `reconfigure`) in front of `run_batch`."""

    async def batch(requests: list) -> list[dict]:
        return await run_batch(requests)

    return serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)(batch)


@serve.deployment
class BatchedModelServer:
    """One registry model version behind `@serve.batch` (`predict`: classifier, `lm`/`generate`: language model).

    Callers use the validating entry points `classify`, `score`, `generate` and
    `generate_stream` (an async generator: call it with `handle.options(stream=True)`); they
    enqueue into the batched methods, so one forward pass serves many concurrent requests.
    """

    def __init__(self, model: str, backend: str | None, max_new_tokens: int, registry: dict,
                 alias_poll_interval_s: float = 5.0, adapters: dict[str, str] | None = None, max_adapters: int = 4,
                 max_ongoing_requests: int | None = None):
        """`max_ongoing_requests`: the route's, when this server runs inside the ingress (serve.single_hop);
        None in a deployment of its own, whose Serve setting is read live."""
        import ray

        self._max_ongoing = max_ongoing_requests
        self.adapter_sources = dict(adapters or {})
        self.max_adapters = max_adapters
        self.model = model
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.alias_poll_interval_s = alias_poll_interval_s
        reg = RegistryConfig.model_validate(registry)
        self._artifact_roots = reg.artifact_roots
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
        self._target_ref: str | None = None  # the ref the last reconfigure asked for
        self._cap_checked: BatchSettings | None = None
        self._poller: asyncio.Task | None = None
        self._poll_error: str | None = None
        self._swaps = 0
        self._inflight = 0
        self._gates = {name: BatchGate() for name in ("predict", "text", "lm")}
        # The batch queues, this instance's own: `@serve.batch` on a method keeps one queue per
        # process for the class, shared by its instances, so two servers in one process (with
        # serve.single_hop every route runs in the ingress replica) would batch each other's
        # requests and share their batch settings.
        self.predict = _batched(self._predict_batch)
        self.text = _batched(self._text_batch)
        self.lm = _batched(self._lm_batch)
        self._decode: tuple[LoadedVersion, DecodeLoop] | None = None
        self._decode_stats = DecodeStats()
        self._stats = BatchStats()
        # The Serve application this replica belongs to, a tag of its batch metrics: two
        # applications may serve the same model ("-" outside a replica: unit tests).
        try:
            self._app = serve.get_replica_context().app_name or "-"
        except Exception:  # noqa: BLE001 - no replica context
            self._app = "-"
        self._batch_hist = telemetry.histogram(
            telemetry.SERVE_BATCH_SIZE, tuple(telemetry.BATCH_BOUNDARIES), ("model", "app", "method")
        )
        self._wait_hist = telemetry.histogram(
            telemetry.SERVE_QUEUE_WAIT_MS, tuple(telemetry.LATENCY_BOUNDARIES_MS), ("model", "app", "route", "method")
        )
        self._tokens = telemetry.counter(telemetry.SERVE_GENERATED_TOKENS, ("model", "route"))

    # ---- version and settings

    async def reconfigure(self, user_config: dict) -> None:
        """Apply batch settings and (re)load the version when its ref resolves to another one.

        A ref that does not resolve or load raises and leaves the replica as it was.
        """
        settings = BatchSettings.model_validate(user_config)
        previous, self._target_ref = self._target_ref, settings.version
        try:
            await self._load(settings.version)
        except BaseException:
            self._target_ref = previous
            raise
        for method in (self.predict, self.text, self.lm):
            method.set_max_batch_size(settings.max_batch_size)
            method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._settings = settings
        telemetry.set_gauge(telemetry.SERVE_SERVED_VERSION, self._loaded.version, {"model": self.model, "route": settings.version},
                            slot="served")
        if self._poller is None:  # started here: reconfigure runs on the replica's event loop
            self._poller = asyncio.create_task(self._poll_alias())

    async def _load(self, ref: str) -> bool:
        """Serve what `ref` resolves to now; True when a new version was swapped in.

        Nothing is swapped when `ref` stopped being the replica's target while this waited (an
        alias poll that started before a reconfigure to another ref must not undo it).
        """
        async with self._swap:
            if ref != self._target_ref:
                return False
            record = await self._registry.get_version.remote(self.model, ref)
            if self._loaded is not None and record["version"] == self._loaded.version:
                return False
            check_under_roots(record["artifact_uri"], self._artifact_roots)
            pred = await asyncio.to_thread(load_predictor, record["artifact_uri"], self.backend)
            if ref != self._target_ref:
                return False
            old = self._loaded
            adapters = await self._adapter_folders()
            self._loaded = LoadedVersion(record["version"], pred.backend, record["artifact_uri"], pred,
                                         self._adapter_set(pred, record["version"], adapters))
            self._swaps += old is not None
            log.info(
                "model %s (%s): serving version %s (%s, %s)%s", self.model, ref, record["version"], pred.backend,
                record["artifact_uri"], f", replacing version {old.version}" if old else "",
            )
            return True

    async def _adapter_folders(self) -> dict[str, str]:
        """Adapter name -> peft folder: a configured folder as it is, a `version:<ref>` source resolved
        in the registry now (an alias follows its current version at each load of the base)."""
        out = {}
        for name, source in self.adapter_sources.items():
            ref = registered_adapter_ref(source)
            if ref is None:
                out[name] = source
                continue
            record = await self._registry.get_version.remote(self.model, ref)
            check_under_roots(record["artifact_uri"], self._artifact_roots)
            out[name] = registered_adapter_folder(record, self.model, name)
        return out

    def _adapter_set(self, pred: Predictor | TextPredictor, version: int, folders: dict[str, str]) -> AdapterSet | None:
        """The (empty) adapter set of a newly loaded version, when adapters are configured."""
        if not self.adapter_sources:
            return None
        if not (isinstance(pred, TextPredictor) and pred.supports_kv_cache):
            raise ValueError(f"model {self.model!r} version {version}: serve.models[].adapters need an hf causal_lm "
                             f"on a torch backend, not a {pred.task!r} model on {pred.backend!r}")
        return AdapterSet(pred._torch_model, folders, self.max_adapters)

    async def _poll_alias(self) -> None:
        """Re-resolve an alias ref every `alias_poll_interval_s`; a moved alias is hot-swapped."""
        while True:
            await asyncio.sleep(self.alias_poll_interval_s)
            ref = self._target_ref
            if ref is None or ref.isdigit():  # a version number never moves
                continue
            try:
                if await self._load(ref):
                    telemetry.set_gauge(telemetry.SERVE_SERVED_VERSION, self._loaded.version, {"model": self.model, "route": ref},
                                        slot="served")
                self._poll_error = None
            except Exception as err:  # registry away, alias removed, version unloadable: keep serving
                message = str(getattr(err, "cause", None) or err)
                if message != self._poll_error:
                    log.warning("model %s: alias %r not re-resolved, still serving version %s: %s",
                                self.model, ref, self._loaded.version, message)
                self._poll_error = message

    def check_health(self) -> None:
        if self._loaded is None:
            raise RuntimeError(f"model {self.model!r}: no version loaded")

    def _current(self) -> LoadedVersion:
        if self._loaded is None:
            raise RuntimeError(f"model {self.model!r}: no version loaded (reconfigure was not called)")
        return self._loaded

    @property
    def _route(self) -> str:
        return self._settings.version if self._settings else "-"

    def _live_max_ongoing_requests(self) -> int | None:
        """This replica's max_ongoing_requests as Serve applies it now (None outside a replica), or
        the route's own inside the ingress.

        Read at request time, not in `reconfigure`: Serve refreshes the replica context only after
        `reconfigure` returns, so there it would still hold the previous deployment config.
        """
        if self._max_ongoing is not None:
            return self._max_ongoing
        try:
            config = serve.get_replica_context()._deployment_config
        except Exception:  # not in a replica (unit tests), or Serve moved the private field
            return None
        return getattr(config, "max_ongoing_requests", None)

    def _check_batch_cap(self) -> None:
        """Warn once per settings when Serve's max_ongoing_requests caps max_batch_size (ray #43288).

        Our config refuses that combination; a hand-edited `serve deploy` file can still reach it,
        and Serve would silently never form a batch larger than max_ongoing_requests.
        """
        settings = self._settings
        if settings is None or self._cap_checked is settings:
            return
        self._cap_checked = settings
        cap = self._batch_cap(settings)
        if cap and cap["effective_max_batch_size"] < settings.max_batch_size:
            log.warning(
                "model %s (%s): max_batch_size %d is above max_ongoing_requests %d, so Serve never forms "
                "larger batches; raise max_ongoing_requests (deployment option) or lower "
                "user_config.max_batch_size", self.model, settings.version, settings.max_batch_size,
                cap["max_ongoing_requests"],
            )

    def _record_batch(self, method: str, enqueued: list[float], unqueued: bool) -> None:
        self._check_batch_cap()
        now = time.perf_counter()
        self._stats.record(len(enqueued), method, unqueued)
        self._batch_hist.observe(len(enqueued), tags={"model": self.model, "app": self._app, "method": method})
        for t in enqueued:
            self._wait_hist.observe(
                (now - t) * 1000, tags={"model": self.model, "app": self._app, "route": self._route, "method": method}
            )

    # ---- batched methods: a list of requests in, a list of results out (same order)

    async def _compute(self, method: str, run_batch, requests: list, gated: bool):
        """(the loaded version, `run_batch(predictor, requests)`), recorded as one batch of
        `method`. Off the event loop: the replica keeps taking requests (and answering health
        checks) while a batch computes."""
        loaded = self._current()
        self._record_batch(method, [r.enqueued for r in requests], unqueued=not gated)
        with self._gate(method, gated):
            results = await asyncio.to_thread(run_batch, loaded.predictor, requests)
        return loaded, results

    async def _predict_batch(self, requests: list[ClassifyRequest], gated: bool = True) -> list[dict]:
        loaded, results = await self._compute("predict", run_classify_batch, requests, gated)
        return [self._tag(loaded, r, len(requests)) for r in results]

    async def _text_batch(self, requests: list[TextRequest], gated: bool = True) -> list[dict]:
        loaded, results = await self._compute("text", run_text_batch, requests, gated)
        return [self._tag(loaded, r, len(requests)) for r in results]

    async def _lm_batch(self, requests: list[LMRequest], gated: bool = True) -> list[dict]:
        loaded, results = await self._compute("lm", run_lm_batch, requests, gated)
        out = []
        for r in results:
            bad = next((x["error"] for x in r if isinstance(x, dict) and "error" in x), None)
            out.append(self._tag(loaded, {"error": bad} if bad else {"results": r}, len(requests)))
        return out

    # ---- generation: continuous batching (serve/decode_loop.py), one decode loop per loaded version

    def _decode_loop(self) -> tuple[LoadedVersion, DecodeLoop]:
        """The loaded version and its decode loop (a hot swap starts a new loop; the old one
        finishes what it runs)."""
        loaded = self._current()
        if self._decode is None or self._decode[0] is not loaded:
            self._decode = (loaded, DecodeLoop(loaded.predictor, loaded.adapters, self._decode_batch_cap,
                                               self._decode_stats, self._on_decode_step))
        return self._decode

    def _decode_batch_cap(self) -> int:
        self._check_batch_cap()
        settings = self._settings
        cap = self._batch_cap(settings) if settings is not None else {}
        return cap.get("effective_max_batch_size", settings.max_batch_size if settings is not None else 16)

    def _on_decode_step(self, stepped: list[DecodeSequence], admitted: list) -> None:
        """Metrics of one decode step: the admissions per entry point (a batch formed: its size
        and each request's queue wait), the step's running batch size and its new tokens."""
        for kind in ("generate", "generate_stream"):
            mine = [r.enqueued for r in admitted if r.kind == kind]
            if mine:
                self._record_batch(kind, mine, unqueued=False)
        if stepped:
            self._batch_hist.observe(len(stepped), tags={"model": self.model, "app": self._app, "method": "decode_step"})
            self._tokens.inc(sum(s.error is None for s in stepped), tags={"model": self.model, "route": self._route})

    async def _token_batches(self, loop: DecodeLoop, seq: DecodeSequence, kind: str, enqueued: float,
                             interval_s: float = 0.0) -> AsyncIterator[list[int]]:
        self._inflight += 1
        try:
            async with contextlib.aclosing(loop.token_batches(seq, kind, enqueued, interval_s)) as batches:
                async for batch in batches:
                    yield batch
        finally:
            self._inflight -= 1

    def _tag(self, loaded: LoadedVersion, result: dict, batch_size: int) -> dict:
        if "error" in result:
            return ModelServerError(500, result["error"], loaded.version, loaded.backend).as_failure()
        return {"version": loaded.version, "backend": loaded.backend, "route": self._route, "batch_size": batch_size, **result}

    # ---- admission: alone in the replica -> run at once (no batch wait, and without closing the
    # gate: a burst right behind it forms its own batch instead of waiting for it); otherwise wait
    # at the queue's gate while one of its batches computes, then join the next batch

    def _gate(self, name: str, gated: bool):
        return self._gates[name].running() if gated else contextlib.nullcontext()

    async def _run(self, direct, batched, gate: str, request):
        self._inflight += 1
        try:
            if self._inflight == 1:
                return (await direct([request], gated=False))[0]
            await self._gates[gate].admit()
            return await batched(request)
        finally:
            self._inflight -= 1

    # ---- validating entry points (what the ingress and HandleClient call). A refused request
    # comes back as {"refused": {status, field, message}} and a failed one as {"failed": {...}}
    # rather than as an exception (see serve.protocol).

    def _need_task(self, task: str | tuple[str, ...], endpoint: str) -> Predictor | TextPredictor:
        pred = self._current().predictor
        tasks = (task,) if isinstance(task, str) else task
        if pred.task not in tasks:
            other = {"classifier": "predict", "embedding": "embed", "sequence_classification": "classify"}.get(
                pred.task, "score or generate")
            wanted = " or ".join(repr(t) for t in tasks)
            raise ModelRequestError(
                400, "model", f"model {self.model!r} is a {pred.task!r} model, {endpoint} needs a {wanted} model (use {other})"
            )
        return pred

    async def classify(self, inputs: list, top_k: int = 3) -> dict:
        """inputs: images as nested lists / arrays -> {version, backend, route, outputs, probabilities}."""
        try:
            pred = self._need_task("classifier", "predict")
            images = images_from_inputs(list(inputs), pred.input_shape())
        except ModelRequestError as err:
            return err.as_refusal()
        request = ClassifyRequest(images, int(top_k), time.perf_counter())
        return await self._run(self._predict_batch, self.predict, "predict", request)

    async def embed(self, texts: list, truncate: bool = False) -> dict:
        """texts -> {version, backend, route, embeddings: (N, H) as lists} (an hf embedding model)."""
        try:
            pred = self._need_task("embedding", "embed")
            request = TextRequest("embed", encode_texts(pred, texts, bool(truncate)), enqueued=time.perf_counter())
        except ModelRequestError as err:
            return err.as_refusal()
        out = await self._run(self._text_batch, self.text, "text", request)
        if "embeddings" in out:  # each text's token count (special tokens included): OpenAI's usage
            out["token_counts"] = [len(ids) for ids in request.ids["input_ids"]]
        return out

    async def classify_texts(self, texts: list, top_k: int = 1, truncate: bool = False) -> dict:
        """texts -> {version, backend, route, outputs: [label], probabilities: [[{label, probability}]]}
        (an hf sequence_classification model)."""
        try:
            pred = self._need_task("sequence_classification", "classify")
            if not isinstance(top_k, int) or top_k < 1:
                raise ModelRequestError(422, "top_k", "must be at least 1")
            request = TextRequest("classify", encode_texts(pred, texts, bool(truncate)), int(top_k), time.perf_counter())
        except ModelRequestError as err:
            return err.as_refusal()
        return await self._run(self._text_batch, self.text, "text", request)

    async def score(self, texts: list[str], top_k: int = 5) -> dict:
        """texts -> {version, backend, route, outputs: [{nll, perplexity, next: [...]}, ...]}
        (an hf causal LM adds per-token `logprobs`; see `app.inference.score_text`)."""
        try:
            pred = self._need_task(LM_TASKS, "score")
            if not texts:
                raise ModelRequestError(422, "texts", "no texts: send at least one")
            rows = [lm_row(pred, text, f"texts.{i}") for i, text in enumerate(texts)]
        except ModelRequestError as err:
            return err.as_refusal()
        out = await self._run(self._lm_batch, self.lm, "lm", LMRequest("score", rows, top_k=int(top_k), enqueued=time.perf_counter()))
        if "failed" in out:
            return out
        return {"version": out["version"], "backend": out["backend"], "route": out["route"], "outputs": out["results"]}

    def _generation_item(self, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
                         seed: int | None, top_p: float = 1.0, stop: list[str] | None = None,
                         adapter: str | None = None, messages: list | None = None) -> GenerateItem:
        pred = self._need_task(LM_TASKS, "generate")
        if not 0 < float(top_p) <= 1:
            raise ModelRequestError(422, "top_p", "must be above 0 and at most 1")
        stop = list(stop or [])
        if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ModelRequestError(422, "stop", "at most 4 stop strings, each non-empty")
        if adapter is not None and adapter not in self.adapter_sources:
            raise ModelRequestError(404, "model", f"model {self.model!r} has no adapter {adapter!r} "
                                                  f"(adapters: {sorted(self.adapter_sources) or 'none'})")
        chat = False
        if messages is not None:
            tokenizer = getattr(pred, "tokenizer", None)
            try:
                prompt = render_chat(tokenizer, messages)
            except ChatFormatError as err:
                raise ModelRequestError(422, err.field, err.message) from None
            chat = True
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ModelRequestError(422, "max_new_tokens", f"must be between 1 and {self.max_new_tokens} for model {self.model!r}")
        if not 0 <= float(temperature) <= 10:
            raise ModelRequestError(422, "temperature", "must be between 0 and 10")
        if not isinstance(top_k, int) or not 0 <= top_k <= 256:
            raise ModelRequestError(422, "top_k", "must be between 0 and 256")
        if not prompt:
            raise ModelRequestError(422, "prompt", "prompt is empty")
        if isinstance(pred, TextPredictor):
            if chat:  # either template's text holds the special tokens already (its own, or the plain template's bos / eos)
                row = np.asarray(pred.tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=np.int64)
                if len(row) > pred.max_tokens:
                    raise ModelRequestError(422, "messages", f"the chat has {len(row)} tokens; the limit is {pred.max_tokens}")
            else:
                row = lm_row(pred, prompt, "prompt" if messages is None else "messages")
            positions = pred.max_positions
            if positions is not None and len(row) + max_new_tokens > positions:
                raise ModelRequestError(
                    422, "max_new_tokens",
                    f"the prompt has {len(row)} tokens: with {max_new_tokens} new ones it would pass the model's "
                    f"{positions} positions (max_position_embeddings); at most {positions - len(row)}")
        else:
            row = tokens_from_text(prompt)  # the GPT sees the last block_size bytes of a longer prompt
        params = SamplingParams(int(max_new_tokens), float(temperature), int(top_k), seed, float(top_p), tuple(stop))
        return GenerateItem(row, params, time.perf_counter(), adapter)

    async def _load_adapter(self, item: GenerateItem) -> None:
        """Load the item's adapter now (first use), so a broken adapter fails this request alone
        rather than the batch it would join; the batch pins it again (loading it anew if it was
        evicted meanwhile)."""
        adapters = self._current().adapters
        if item.adapter is None or adapters is None or item.adapter in adapters.loaded:
            return
        try:
            await asyncio.to_thread(adapters.acquire, item.adapter)
        except AdapterError as err:
            loaded = self._current()
            raise ModelServerError(500, str(err), loaded.version, loaded.backend) from None
        adapters.release(item.adapter)

    async def generate(self, prompt: str, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0,
                       seed: int | None = None, top_p: float = 1.0, stop: list[str] | None = None,
                       adapter: str | None = None, messages: list | None = None) -> dict:
        """prompt (or chat `messages`) -> {version, backend, route, tokens: [new token ids], text,
        finish_reason, prompt_tokens, adapter}; the text ends before a stop string."""
        try:
            item = self._generation_item(prompt, max_new_tokens, temperature, top_k, seed, top_p, stop, adapter, messages)
            await self._load_adapter(item)
        except (ModelRequestError, ModelServerError) as err:
            return err.as_refusal() if isinstance(err, ModelRequestError) else err.as_failure()
        loaded, loop = self._decode_loop()
        seq = DecodeSequence(item.row, item.params, item.adapter)
        try:
            tokens = [t async for batch in self._token_batches(loop, seq, "generate", item.enqueued) for t in batch]
        except NonFiniteOutputError:
            return ModelServerError(500, NON_FINITE, loaded.version, loaded.backend).as_failure()
        except AdapterError as err:
            return ModelServerError(500, str(err), loaded.version, loaded.backend).as_failure()
        text, finish = generated(loaded.predictor, tokens, item.params)
        return {"version": loaded.version, "backend": loaded.backend, "route": self._route, "tokens": tokens,
                "text": text, "finish_reason": finish, "prompt_tokens": len(item.row), "adapter": item.adapter,
                "batch_size": seq.batch_size}

    async def generate_stream(self, prompt: str, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0,
                              seed: int | None = None, top_p: float = 1.0, stop: list[str] | None = None,
                              adapter: str | None = None, messages: list | None = None) -> AsyncIterator:
        """Streaming generation: yields {version, backend, route, prompt_tokens} first, then lists
        of new tokens: byte ids as ints (hf causal LM: {token, text, stop} each). The first token
        comes alone as soon as its decode step is done, then one list per `stream_interval_s` at
        most with every token made meanwhile. A refusal or failure is yielded as its dict
        ({"refused": ...} / {"failed": ...}) and ends the stream. The row ends at a stop string;
        trimming the shown text is the caller's (`app.stop_strings.visible_text`).

        Why lists: every item of a streamed Serve call crosses the replica -> ingress -> HTTP
        proxy hops as its own object, at a CPU cost in each. Measured on 2 cores with a 4-layer,
        256-wide Llama at 32 concurrent streams: 345 tokens/s with one item per token, 524 with
        items gathered over 0.25 s, 773 with a stream's tokens in two items. Ray Serve LLM's
        own default interval, 50 ms, changed nothing there (342): under that load a decode step
        took longer than 50 ms, so every message still held one token. Hence 0.25 s by default:
        four text updates a second per stream."""
        try:
            item = self._generation_item(prompt, max_new_tokens, temperature, top_k, seed, top_p, stop, adapter, messages)
            await self._load_adapter(item)
        except (ModelRequestError, ModelServerError) as err:
            yield err.as_refusal() if isinstance(err, ModelRequestError) else err.as_failure()
            return
        loaded, loop = self._decode_loop()
        yield {"version": loaded.version, "backend": loaded.backend, "route": self._route, "prompt_tokens": len(item.row)}
        # the built-in GPT streams byte ids (the ingress decodes UTF-8); an hf causal LM streams
        # {token, text, stop}, decoded here with the folder's tokenizer
        pieces = TokenPieces(loaded.predictor) if isinstance(loaded.predictor, TextPredictor) else None
        seq = DecodeSequence(item.row, item.params, item.adapter)
        try:
            interval = self._settings.stream_interval_s if self._settings is not None else 0.0
            async for batch in self._token_batches(loop, seq, "generate_stream", item.enqueued, interval):
                yield batch if pieces is None else [pieces.add(token) for token in batch]
        except NonFiniteOutputError:
            yield ModelServerError(500, NON_FINITE, loaded.version, loaded.backend).as_failure()
        except AdapterError as err:
            yield ModelServerError(500, str(err), loaded.version, loaded.backend).as_failure()

    async def info(self) -> dict:
        """What /api/v1/models lists for this route."""
        loaded, settings = self._current(), self._settings
        pred = loaded.predictor
        return {
            "model": self.model, "version": loaded.version, "backend": loaded.backend, "task": pred.task,
            "artifact_uri": loaded.artifact_uri, "input_shape": list(pred.input_shape()),
            "block_size": pred.block_size, "max_new_tokens": self.max_new_tokens,
            "kv_cache": pred.supports_kv_cache, "ref": settings.version, "max_batch_size": settings.max_batch_size,
            "batch_wait_timeout_s": settings.batch_wait_timeout_s, "alias_poll_interval_s": self.alias_poll_interval_s,
            "adapters": loaded.adapters.snapshot() if loaded.adapters is not None else None,
            **self._batch_cap(settings),
        }

    def _batch_cap(self, settings: BatchSettings) -> dict:
        """max_ongoing_requests as Serve applies it, and the largest batch that can therefore form."""
        live = self._live_max_ongoing_requests()
        if live is None:
            return {}
        return {"max_ongoing_requests": live, "effective_max_batch_size": min(settings.max_batch_size, live)}

    async def stats(self) -> dict:
        """Batch sizes this replica ran, plus the version and backend answering."""
        loaded = self._current()
        return {
            **self._stats.snapshot(), "version": loaded.version, "backend": loaded.backend, "route": self._route,
            "swaps": self._swaps, "alias_poll_error": self._poll_error, "inflight": self._inflight,
            "decode": self._decode_stats.snapshot(),
            "replica": serve.get_replica_context().replica_id.unique_id,
        }
