"""Continuous batching, serving side: `DecodeLoop`, the asyncio task of a replica that owns the
running batch of one loaded version.

Each turn of the loop admits waiting requests (while fewer than `max_batch_size` sequences
run), runs one `RunningBatch.step` in a worker thread (the running sequences make their next
token, the admitted ones are prefilled and make their first), hands every request its new
token through its own queue, and lets finished sequences go. A reader takes its tokens in lists
(`token_batches`): the first alone, then what was made within its stream interval. A request
arriving while others decode therefore joins at the next step rather than waiting for them to finish, and a short
generation leaves as soon as it is done. The loop starts with the first request and ends when
nothing runs or waits; a hot-swapped version gets a loop of its own while the old one finishes
what it runs, so one batch never mixes versions.

LoRA: a sequence's adapter is pinned (loaded, not evictable) from its admission to its exit;
rows of different adapters share the batch (peft's mixed-batch forward, see
`app.models.adapters`). A caller that goes away (its generator closed or cancelled) marks its
sequence cancelled and it leaves at the next step.
"""

from __future__ import annotations

import asyncio
from collections import Counter as CountMap
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from app.decode_batch import DecodeSequence, RunningBatch
from app.models.adapters import AdapterError, AdapterSet

_END = object()  # a request's queue: no more tokens


@dataclass(eq=False)
class DecodeRequest:
    """A sequence waiting for or decoding in the loop, and the queue its tokens go to."""

    seq: DecodeSequence
    kind: str
    """The entry point that asked ('generate', 'generate_stream'): the admissions are counted per kind."""
    enqueued: float
    """time.perf_counter() when it entered the replica (queue-wait metric)."""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pinned: bool = False
    waker: asyncio.Future | None = None
    """Set while the reader waits out its stream interval: the sequence's end resolves it early."""

    def put(self, item) -> None:
        """Hand the reader a token, `_END` or the error that failed the sequence (the last two
        end its wait for the stream interval)."""
        self.queue.put_nowait(item)
        if (item is _END or isinstance(item, BaseException)) and self.waker is not None and not self.waker.done():
            self.waker.set_result(None)


class DecodeStats:
    """What the decode loops of one replica did (what tests assert continuous batching on)."""

    def __init__(self) -> None:
        self.steps: CountMap[int] = CountMap()
        """Decode steps by the number of sequences they ran."""
        self.joined_running = 0
        """Requests admitted into a batch that was already decoding (the continuous part)."""

    def snapshot(self) -> dict:
        return {"steps": sum(self.steps.values()), "step_size_counts": dict(sorted(self.steps.items())),
                "max_step_size": max(self.steps, default=0), "joined_running": self.joined_running}


class DecodeLoop:
    """The running batch of one loaded version (see the module docstring)."""

    def __init__(self, pred, adapters: AdapterSet | None, max_batch_size: Callable[[], int],
                 stats: DecodeStats | None = None,
                 on_step: Callable[[list[DecodeSequence], list[DecodeRequest]], None] | None = None):
        self.pred, self.adapters, self.max_batch_size = pred, adapters, max_batch_size
        self.stats = stats if stats is not None else DecodeStats()
        self.on_step = on_step
        """Called after each step with the sequences it ran and the requests it admitted (metrics)."""
        self._batch = RunningBatch(pred)
        self._waiting: deque[DecodeRequest] = deque()
        self._requests: dict[int, DecodeRequest] = {}  # id(seq) -> its request, while admitted
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> int:
        return self._batch.live

    async def token_batches(self, seq: DecodeSequence, kind: str, enqueued: float,
                            interval_s: float = 0.0) -> AsyncIterator[list[int]]:
        """Queue `seq` and yield its new token ids in lists as the steps make them: the first token
        alone as soon as it is made, then at most one list per `interval_s` holding every token
        made meanwhile (0: each list holds what was made when the previous one was taken).
        Raises the error that failed the sequence (non-finite logits, an adapter that does not
        load) after yielding the tokens made before it."""
        req = DecodeRequest(seq, kind, enqueued)
        self._waiting.append(req)
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        loop = asyncio.get_running_loop()
        last = None  # loop time of the previous list
        try:
            while True:
                items = [await req.queue.get()]
                wait = last + interval_s - loop.time() if last is not None else 0.0
                if wait > 0 and not seq.done:  # wait out the interval, or until the sequence ends
                    req.waker = loop.create_future()
                    timer = loop.call_later(wait, lambda f=req.waker: f.done() or f.set_result(None))
                    try:
                        await req.waker
                    finally:
                        timer.cancel()
                        req.waker = None
                while not req.queue.empty():
                    items.append(req.queue.get_nowait())
                batch, end = [], None
                for item in items:
                    if item is _END or isinstance(item, BaseException):
                        end = item
                        break
                    batch.append(item)
                if batch:
                    last = loop.time()
                    yield batch
                if end is _END:
                    return
                if end is not None:
                    raise end
        finally:
            if not seq.done:  # the caller went away: free its row at the next step
                seq.cancelled = True

    async def _run(self) -> None:
        try:
            while self._waiting or self._batch.live:
                room = self.max_batch_size() - self._batch.live
                admitted = []
                while self._waiting and len(admitted) < room:
                    req = self._waiting.popleft()
                    if not req.seq.cancelled:
                        admitted.append(req)
                joined_running = len(admitted) if self._batch.live else 0
                for req in admitted:
                    self._requests[id(req.seq)] = req
                try:
                    stepped = await asyncio.to_thread(self._step, admitted)
                except Exception as err:  # the batch is lost: every sequence in it fails with the error
                    self._fail_all(err)
                    continue
                self.stats.joined_running += joined_running
                for req in admitted:
                    if req.seq.error is not None and req.seq not in stepped:  # its adapter did not load
                        req.put(req.seq.error)
                        self._requests.pop(id(req.seq), None)
                for seq in stepped:
                    req = self._requests[id(seq)]
                    if seq.error is not None:
                        req.put(seq.error)
                    else:
                        req.put(seq.tokens[-1])
                        if seq.done:
                            req.put(_END)
                if stepped:
                    self.stats.steps[len(stepped)] += 1
                if self.on_step is not None:
                    self.on_step(stepped, admitted)
        finally:
            self._task = None
            self._batch.retire()  # no step of this loop runs now: drop what finished, unpin it all
            self._release(list(self._requests.values()))

    def _step(self, admitted: list[DecodeRequest]) -> list[DecodeSequence]:
        """(worker thread) pin the admitted sequences' adapters, drop the finished sequences, step."""
        joining = []
        for req in admitted:
            try:
                self._pin(req)
            except AdapterError as err:  # this request fails alone (handed its error after the step)
                req.seq.error, req.seq.done = err, True
                continue
            joining.append(req.seq)
        self._release([self._requests[id(s)] for s in self._batch.retire()])
        return self._batch.step(joining)

    def _pin(self, req: DecodeRequest) -> None:
        name = req.seq.adapter
        if name is None:
            return
        if self.adapters is None:
            raise AdapterError(f"adapter {name!r} asked for, but this model serves none")
        self.adapters.acquire(name)
        req.pinned = True

    def _release(self, reqs: list[DecodeRequest]) -> None:
        for req in reqs:
            self._requests.pop(id(req.seq), None)
            if req.pinned:
                req.pinned = False
                self.adapters.release(req.seq.adapter)

    def _fail_all(self, err: Exception) -> None:
        for req in list(self._requests.values()):
            if not req.seq.done:
                req.seq.error, req.seq.done = err, True
                req.put(err)
        self._release(list(self._requests.values()))
        self._batch = RunningBatch(self.pred)
