"""Continuous batching, model side: `RunningBatch`, the sequences decoding together.

One `step` makes one token for every running sequence and lets new sequences join: the ones
already running feed their last token through the decoder (one batched forward with the KV
cache), the newcomers are prefilled and their cache rows stacked under the running ones
(`join` of the decoders in `app.inference`), then every sequence picks its next token with its
own sampling params and random generator. A sequence that is done (its `max_new_tokens`, an
end-of-sequence id, a stop string, or cancelled by its caller) leaves the batch at the start of
the next step, so a long generation never holds a short one back and a newcomer never waits for
the running ones to finish.

Synchronous and free of asyncio and Serve: `generate_steps` (in-process generation) runs every
row through it, and the replica's decode loop (`serve/decode_loop.py`) steps it in a worker
thread while requests come and go.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.inference import HFCacheDecoder, NonFiniteOutputError, SamplingParams, make_decoder, next_token
from app.stop_strings import find_stop


@dataclass(eq=False)
class DecodeSequence:
    """One generation in a running batch."""

    row: np.ndarray
    """(T,) int64 prompt token ids."""
    params: SamplingParams
    adapter: str | None = None
    """LoRA adapter the row is generated with (None: the base model)."""
    tokens: list[int] = field(default_factory=list)
    """The new token ids so far (an end-of-sequence id included)."""
    done: bool = False
    cancelled: bool = False
    """Set by the caller (it went away): the sequence leaves the batch at the next step."""
    error: Exception | None = None
    """Why the sequence failed (non-finite logits); it is done."""
    joined_step: int | None = None
    """The batch's step number at which the sequence was prefilled and made its first token."""
    batch_size: int = 0
    """Sequences in the batch at that step (itself included)."""
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)


class RunningBatch:
    """The sequences of one model decoding together, one token each per `step`."""

    def __init__(self, pred, use_kv_cache: bool | None = None):
        self.pred = pred
        self.use_kv_cache = use_kv_cache
        self.running: list[DecodeSequence] = []
        """In the decoder's row order."""
        self.steps = 0
        """Decode steps run so far."""
        self._decoder = None
        self._decoder_rows: list[DecodeSequence] = []

    def __len__(self) -> int:
        return len(self.running)

    @property
    def live(self) -> int:
        """Sequences that will take part in the next step."""
        return sum(not (s.done or s.cancelled) for s in self.running)

    def retire(self) -> list[DecodeSequence]:
        """Drop the done and cancelled sequences (their cache rows go at the next decoder call);
        the dropped ones."""
        gone = [s for s in self.running if s.done or s.cancelled]
        if gone:
            self.running = [s for s in self.running if not (s.done or s.cancelled)]
        return gone

    def step(self, joining: list[DecodeSequence] = ()) -> list[DecodeSequence]:
        """One decode step: the running sequences and `joining` (prefilled now) each make one
        token (appended to `tokens`; `done` set when it was the last). Returns the sequences that
        took part, running ones first."""
        joining = [s for s in joining if s.params.max_new_tokens > 0 and not s.cancelled]
        self.retire()
        parts = []
        if self.running:
            live = {id(s) for s in self.running}
            keep = [j for j, s in enumerate(self._decoder_rows) if id(s) in live]  # rows the decoder keeps, in order
            last = np.asarray([s.tokens[-1] for s in self.running], dtype=np.int64)
            parts.append(self._decoder.step(last, np.asarray(keep)))
        else:
            self._decoder = None  # every row left: newcomers start a fresh cache
        if joining:
            rows = [s.row for s in joining]
            adapters = [s.adapter for s in joining] if any(s.adapter for s in joining) else None
            if self._decoder is None:
                self._decoder = make_decoder(self.pred, self.use_kv_cache)
                add = self._decoder.start
            else:
                add = self._decoder.join
            if isinstance(self._decoder, HFCacheDecoder):
                parts.append(add(rows, adapters))
            elif adapters is not None:
                raise ValueError(f"LoRA adapters need a torch hf causal LM; backend {self.pred.backend!r} has none")
            else:
                parts.append(add(rows))
            self.running += joining
            for s in joining:
                s.joined_step, s.batch_size = self.steps, len(self.running)
        self._decoder_rows = list(self.running)
        if not parts:
            return []
        logits = np.concatenate(parts) if len(parts) > 1 else parts[0]  # (B, V), rows in `running` order
        for s, row in zip(self.running, logits):
            try:
                token = next_token(row, s.params, s.rng)
            except NonFiniteOutputError as err:
                s.error, s.done = err, True
                continue
            s.tokens.append(token)
            s.done = self._finished(s)
        self.steps += 1
        return list(self.running)

    def _finished(self, s: DecodeSequence) -> bool:
        p = s.params
        return (len(s.tokens) >= p.max_new_tokens or s.tokens[-1] in self.pred.stop_ids
                or (bool(p.stop) and find_stop(self.pred.token_text(s.tokens), p.stop) is not None))
