"""Predictors: one call shape over every artifact format, used by evaluation and by Serve.

`load_predictor(artifact_uri)` reads the artifact's `config.json`, builds the right backend,
and returns a `Predictor` whose `logits(x)` maps numpy inputs to numpy logits:
- classifier (vit): float32 (B, 1, H, W) -> (B, num_classes)
- lm (gpt):         int64 (B, T) byte ids -> (B, T, 256)

Task helpers (`classify`, `score_text`, `generate_text`) turn logits into answers and are
what the batched Serve replica calls on a whole batch.

`hf` artifacts (a `transformers` model from a local folder) load as a `TextPredictor`: texts
in, tokenized with the folder's own tokenizer, batches padded to their longest member; out
embeddings (N, H), class probabilities (N, C) or causal-LM logits, through torch (fp32 / int8 /
half) or ONNX Runtime (fp32 / int8) alike.

Generation for serving (`generate_steps`) decodes a batch of prompts of different lengths one
token per step for every active row, with greedy / temperature / top-k sampling per row:
- torch backends use a KV cache (`KVCacheDecoder`): prompts are left-padded, padding keys are
  masked and each row's RoPE positions start at its first real byte, so a row computes what it
  would alone; once a row outgrows `block_size` the context slides and that step recomputes
  the window, exactly as the no-cache path does;
- ONNX backends recompute the (cropped) context every step (`RecomputeDecoder`, rows grouped by
  length): the exported graph has no cache inputs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch

from app.artifacts import HALF_DTYPES, WEIGHT_FILES, ArtifactError, load_fp32, load_half, load_int8, local_path, read_meta
from app.config.formats import ONNX_FORMATS
from app.config.jobs import TrainJob

log = logging.getLogger(__name__)

Task = Literal["classifier", "lm"]


@dataclass
class Predictor:
    backend: str
    task: Task
    job: TrainJob
    _torch_model: torch.nn.Module | None = None
    _ort_session: object | None = None
    _input_dtype: torch.dtype | None = None  # half-precision models take half-precision images

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self._ort_session is not None:
            return self._ort_session.run(["logits"], {"input": x})[0]
        t = torch.from_numpy(x)
        if self._input_dtype is not None and t.is_floating_point():
            t = t.to(self._input_dtype)
        with torch.inference_mode():
            return self._torch_model(t).float().numpy()

    @property
    def supports_kv_cache(self) -> bool:
        """Torch GPTs decode with a KV cache (`GPT.forward_kv`); ONNX graphs recompute."""
        return self.task == "lm" and self._torch_model is not None and hasattr(self._torch_model, "forward_kv")

    @property
    def block_size(self) -> int:
        return self.job.model.block_size if self.task == "lm" else 0

    def input_shape(self) -> tuple[int, ...]:
        m = self.job.model
        return (m.in_channels, m.image_size, m.image_size) if self.task == "classifier" else (m.block_size,)


def _ort_session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(os.environ.get("OMP_NUM_THREADS", 0)) or torch.get_num_threads())
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, sess_options=opts, providers=providers)


def load_predictor(artifact_uri: str, expect_backend: str | None = None) -> "Predictor | TextPredictor":
    """A predictor for the artifact at `artifact_uri` (its format decides the backend; an `hf`
    model gives a `TextPredictor`)."""
    job, meta = read_meta(artifact_uri)
    fmt = meta["format"]
    if expect_backend is not None and fmt != expect_backend:
        raise ArtifactError(f"{artifact_uri} holds backend {fmt!r}, but {expect_backend!r} was asked for")
    if job.model.kind == "hf":
        return _load_text_predictor(artifact_uri, job, meta)
    task: Task = "lm" if job.model.kind == "gpt" else "classifier"
    if fmt == "torch_fp32":
        return Predictor(fmt, task, job, _torch_model=load_fp32(artifact_uri)[0])
    if fmt == "torch_int8":
        return Predictor(fmt, task, job, _torch_model=load_int8(artifact_uri)[0])
    if fmt in HALF_DTYPES:
        model, _, dtype = load_half(artifact_uri)
        return Predictor(fmt, task, job, _torch_model=model, _input_dtype=dtype)
    if fmt in ONNX_FORMATS:
        path = str(local_path(artifact_uri) / WEIGHT_FILES[fmt])
        return Predictor(fmt, task, job, _ort_session=_ort_session(path))
    raise ArtifactError(f"{artifact_uri}: unknown artifact format {fmt!r}")


# ----------------------------------------------------------------------------- hf text models


class TokenLimitError(ValueError):
    """A text with more tokens than the model takes, and the caller did not ask to truncate."""

    def __init__(self, index: int, tokens: int, limit: int):
        super().__init__(f"text {index} has {tokens} tokens; the limit is {limit} (or ask to truncate)")
        self.index, self.tokens, self.limit = index, tokens, limit


@dataclass
class TextPredictor:
    """An `hf` artifact as texts -> numbers (see the module docstring).

    `max_tokens` is the job's `data.max_length` (special tokens included): what the model was
    trained and measured with. A longer text is an error unless the call asks to truncate.
    """

    backend: str
    task: str  # embedding | sequence_classification | causal_lm
    job: TrainJob
    tokenizer: object
    labels: list[str] | None = None  # class names in id order (sequence_classification)
    _torch_model: torch.nn.Module | None = None
    _ort_session: object | None = None

    @property
    def max_tokens(self) -> int:
        return self.job.data.max_length

    # what a served route reports (as `Predictor` has them): one text of up to max_tokens, no KV cache
    supports_kv_cache = False

    @property
    def block_size(self) -> int:
        return self.max_tokens

    def input_shape(self) -> tuple[int, ...]:
        return (self.max_tokens,)

    def encode(self, texts: list[str], *, pairs: list[str] | None = None, truncate: bool = False) -> dict[str, list[list[int]]]:
        """Token ids (and token types) per text, unpadded; raises TokenLimitError for a text over
        `max_tokens` unless `truncate`."""
        enc = self.tokenizer(list(texts), list(pairs) if pairs is not None else None, padding=False,
                             truncation=truncate, max_length=self.max_tokens if truncate else None)
        if not truncate:
            for i, row in enumerate(enc["input_ids"]):
                if len(row) > self.max_tokens:
                    raise TokenLimitError(i, len(row), self.max_tokens)
        out = {"input_ids": enc["input_ids"]}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    def pad(self, enc: dict[str, list[list[int]]], rows) -> dict[str, np.ndarray]:
        """Rows `rows` of `encode`'s output right-padded to their longest: int64 (B, T) arrays
        input_ids, attention_mask, token_type_ids (zeros where the tokenizer makes none)."""
        rows = [int(i) for i in rows]
        width = max(len(enc["input_ids"][i]) for i in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        types = np.zeros((len(rows), width), dtype=np.int64)
        for b, i in enumerate(rows):
            n = len(enc["input_ids"][i])
            ids[b, :n], mask[b, :n] = enc["input_ids"][i], 1
            if "token_type_ids" in enc:
                types[b, :n] = enc["token_type_ids"][i]
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """One padded batch -> the task's output: embeddings (B, H), logits (B, C) or (B, T, V)."""
        if self._ort_session is not None:
            names = [i.name for i in self._ort_session.get_inputs()]
            return self._ort_session.run(None, {n: batch[n] for n in names})[0]
        from app.models.hf_task import pack

        x = pack(*(torch.from_numpy(batch[n]) for n in ("input_ids", "attention_mask", "token_type_ids")))
        with torch.inference_mode():
            return self._torch_model(x).float().numpy()

    def forward(self, texts: list[str], *, pairs: list[str] | None = None, truncate: bool = False,
                batch_size: int = 32) -> np.ndarray:
        """Embeddings (N, H) or class logits (N, C) of `texts`, in order; batches of similar
        length (padding to the longest of a batch is most of the waste otherwise)."""
        if self.task == "causal_lm":
            raise ValueError("forward gives one vector per text; a causal LM gives logits per token (run)")
        if not texts:
            raise ValueError("no texts")
        from app.compression.hf_onnx import length_sorted_batches

        enc = self.encode(texts, pairs=pairs, truncate=truncate)
        out: np.ndarray | None = None
        for idx in length_sorted_batches([len(r) for r in enc["input_ids"]], batch_size):
            y = self.run(self.pad(enc, idx))
            if out is None:
                out = np.empty((len(texts), y.shape[1]), dtype=np.float32)
            out[idx] = y
        return out

    def embed(self, texts: list[str], *, truncate: bool = False) -> np.ndarray:
        """(N, H) float32 embeddings (normalised when the model's pooling normalises)."""
        if self.task != "embedding":
            raise ValueError(f"embed needs model.task 'embedding', this model is {self.task!r}")
        return self.forward(texts, truncate=truncate)

    def classify(self, texts: list[str], *, top_k: int = 1, truncate: bool = False) -> list[dict]:
        """Per text: the most likely label and the top-k (label, probability), labels by name."""
        if self.task != "sequence_classification":
            raise ValueError(f"classify needs model.task 'sequence_classification', this model is {self.task!r}")
        probs = softmax(self.forward(texts, truncate=truncate))
        names = self.labels or [str(i) for i in range(probs.shape[1])]
        out = []
        for row in probs:
            order = np.argsort(-row)[:top_k]
            out.append({"label": names[order[0]], "top_k": [{"label": names[i], "probability": float(row[i])} for i in order]})
        return out


def _load_text_predictor(artifact_uri: str, job: TrainJob, meta: dict) -> TextPredictor:
    from app.artifacts import class_labels
    from app.models.hf import load_tokenizer

    fmt = meta["format"]
    common = {"backend": fmt, "task": job.model.task, "job": job, "tokenizer": load_tokenizer(job.model.path),
              "labels": class_labels(job, meta)}
    if fmt == "torch_fp32":
        return TextPredictor(**common, _torch_model=load_fp32(artifact_uri)[0])
    if fmt == "torch_int8":
        return TextPredictor(**common, _torch_model=load_int8(artifact_uri)[0])
    if fmt in HALF_DTYPES:
        return TextPredictor(**common, _torch_model=load_half(artifact_uri)[0])
    if fmt in ONNX_FORMATS:
        return TextPredictor(**common, _ort_session=_ort_session(str(local_path(artifact_uri) / WEIGHT_FILES[fmt])))
    raise ArtifactError(f"{artifact_uri}: unknown artifact format {fmt!r}")


# ----------------------------------------------------------------------------- tasks


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classify(pred: Predictor, images: np.ndarray, top_k: int) -> list[dict]:
    """images (B, C, H, W) -> per sample: predicted class and top-k (class, probability)."""
    probs = softmax(pred.logits(images.astype(np.float32)))
    out = []
    for row in probs:
        order = np.argsort(-row)[:top_k]
        out.append({"label": int(order[0]), "top_k": [{"label": int(i), "probability": float(row[i])} for i in order]})
    return out


def score_text(pred: Predictor, tokens: np.ndarray, top_k: int) -> list[dict]:
    """tokens (B, T) of one length -> mean next-byte NLL over the text and top-k next bytes."""
    logits = pred.logits(tokens.astype(np.int64))  # (B, T, V)
    logp = np.log(softmax(logits) + 1e-12)
    out = []
    for b in range(tokens.shape[0]):
        nll = -float(np.mean(logp[b, np.arange(tokens.shape[1] - 1), tokens[b, 1:]])) if tokens.shape[1] > 1 else None
        last = np.exp(logp[b, -1])
        order = np.argsort(-last)[:top_k]
        out.append({
            "nll": nll,
            "perplexity": float(np.exp(nll)) if nll is not None else None,
            "next": [{"byte": int(i), "text": bytes([int(i)]).decode("latin-1"), "probability": float(last[i])} for i in order],
        })
    return out


def generate_text(pred: Predictor, tokens: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy continuation of (B, T) prompts of one length; returns (B, max_new_tokens) new bytes.

    No KV cache yet: each step re-runs the (cropped) context. Works with every backend.
    """
    ctx = tokens.astype(np.int64)
    new = []
    for _ in range(max_new_tokens):
        logits = pred.logits(ctx[:, -pred.block_size:])[:, -1, :]
        nxt = logits.argmax(-1).astype(np.int64)[:, None]
        new.append(nxt)
        ctx = np.concatenate([ctx, nxt], axis=1)
    return np.concatenate(new, axis=1) if new else np.zeros((tokens.shape[0], 0), dtype=np.int64)


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class SamplingParams:
    """How one row is continued."""

    max_new_tokens: int
    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely bytes only (0 = all)."""
    seed: int | None = None
    """Seed of this row's sampler: the same seed gives the same text whatever else is in the batch."""


class NonFiniteOutputError(ValueError):
    """The model produced NaN or infinite logits (a broken version): never turned into tokens."""


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One byte id from a row of next-token logits (V,)."""
    if not np.isfinite(logits).all():
        raise NonFiniteOutputError("the model produced non-finite logits")
    if params.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < z.shape[0]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    return int(rng.choice(z.shape[0], p=p / p.sum()))


class KVCacheDecoder:
    """Batched incremental decoding of a torch GPT with a KV cache (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, block_size: int):
        self.model, self.block_size = model, block_size

    def start(self, rows: list[np.ndarray]) -> np.ndarray:
        """Prefill the prompts (each cropped to its last block_size bytes); next-token logits (B, V)."""
        self.ctx = [list(map(int, r[-self.block_size:])) for r in rows]
        return self._prefill()

    def _prefill(self) -> np.ndarray:
        from app.models.gpt import decode_mask

        lens = [len(c) for c in self.ctx]
        B, T = len(lens), max(lens)
        idx = torch.zeros((B, T), dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        valid = torch.zeros((B, T), dtype=torch.bool)
        for b, (c, n) in enumerate(zip(self.ctx, lens)):  # left padding: real bytes end at T
            idx[b, T - n:] = torch.tensor(c, dtype=torch.long)
            pos[b, T - n:] = torch.arange(n)
            valid[b, T - n:] = True
        with torch.inference_mode():
            logits, self.cache = self.model.forward_kv(idx, pos, decode_mask(valid, T), None, last_only=True)
        self.valid, self.next_pos = valid, torch.tensor(lens, dtype=torch.long)
        return logits[:, -1].float().numpy()

    def step(self, tokens: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """Feed one new byte per kept row (`keep`: indices of the rows still decoding, in order)."""
        if keep is not None and len(keep) != len(self.ctx):
            sel = torch.as_tensor(keep, dtype=torch.long)
            self.cache = [(k.index_select(0, sel), v.index_select(0, sel)) for k, v in self.cache]
            self.valid, self.next_pos = self.valid.index_select(0, sel), self.next_pos.index_select(0, sel)
            self.ctx = [self.ctx[i] for i in keep]
        for c, t in zip(self.ctx, tokens):
            c.append(int(t))
        if int(self.next_pos.max()) >= self.block_size:
            # A row outgrew the context: slide every row's window and recompute it (what the
            # no-cache path does each step), so results stay identical to it.
            self.ctx = [c[-self.block_size:] for c in self.ctx]
            return self._prefill()
        from app.models.gpt import decode_mask

        self.valid = torch.cat([self.valid, torch.ones((len(self.ctx), 1), dtype=torch.bool)], dim=1)
        idx = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).view(-1, 1)
        with torch.inference_mode():
            logits, self.cache = self.model.forward_kv(idx, self.next_pos.view(-1, 1), decode_mask(self.valid, 1), self.cache)
        self.next_pos = self.next_pos + 1
        return logits[:, -1].float().numpy()


class RecomputeDecoder:
    """Decoding by re-running the cropped context each step (any backend, e.g. ONNX Runtime)."""

    def __init__(self, pred: "Predictor"):
        self.pred = pred

    def start(self, rows: list[np.ndarray]) -> np.ndarray:
        self.ctx = [list(map(int, r)) for r in rows]
        return self._logits()

    def step(self, tokens: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        if keep is not None:
            self.ctx = [self.ctx[i] for i in keep]
        for c, t in zip(self.ctx, tokens):
            c.append(int(t))
        return self._logits()

    def _logits(self) -> np.ndarray:
        n = self.pred.block_size
        windows = [c[-n:] for c in self.ctx]
        out = np.empty((len(windows), self.pred.job.model.vocab_size), dtype=np.float32)
        by_len: dict[int, list[int]] = {}
        for i, w in enumerate(windows):
            by_len.setdefault(len(w), []).append(i)
        for members in by_len.values():  # one forward per length: the graph takes no padding mask
            x = np.asarray([windows[i] for i in members], dtype=np.int64)
            out[members] = self.pred.logits(x)[:, -1, :]
        return out


def make_decoder(pred: "Predictor", use_kv_cache: bool | None = None):
    """KV cache for torch backends (default), recompute otherwise or when `use_kv_cache=False`."""
    if use_kv_cache is None:
        use_kv_cache = pred.supports_kv_cache
    if use_kv_cache and not pred.supports_kv_cache:
        raise ValueError(f"backend {pred.backend!r} has no KV-cache decode path")
    return KVCacheDecoder(pred._torch_model, pred.block_size) if use_kv_cache else RecomputeDecoder(pred)


def generate_steps(
    pred: "Predictor", rows: list[np.ndarray], params: list[SamplingParams], use_kv_cache: bool | None = None
) -> Iterator[list[int | None]]:
    """Continue every row; yields once per step a list with each row's new byte id (None once a
    row has its `max_new_tokens`). Rows that are done leave the batch (their cache rows are dropped)."""
    if len(rows) != len(params):
        raise ValueError(f"{len(rows)} rows but {len(params)} sampling params")
    if not rows:
        return
    decoder = make_decoder(pred, use_kv_cache)
    rngs = [np.random.default_rng(p.seed) for p in params]
    produced = [0] * len(rows)
    active = [i for i, p in enumerate(params) if p.max_new_tokens > 0]
    if not active:
        return
    logits = decoder.start([rows[i] for i in active])
    while True:
        tokens = [next_token(logits[j], params[i], rngs[i]) for j, i in enumerate(active)]
        out: list[int | None] = [None] * len(rows)
        for i, t in zip(active, tokens):
            out[i] = t
            produced[i] += 1
        yield out
        keep = [j for j, i in enumerate(active) if produced[i] < params[i].max_new_tokens]
        if not keep:
            return
        active = [active[j] for j in keep]
        logits = decoder.step(np.asarray([tokens[j] for j in keep], dtype=np.int64), np.asarray(keep))


def generate_tokens(
    pred: "Predictor", rows: list[np.ndarray], params: list[SamplingParams], use_kv_cache: bool | None = None
) -> list[list[int]]:
    """`generate_steps` run to the end: every row's new byte ids."""
    out: list[list[int]] = [[] for _ in rows]
    for step in generate_steps(pred, rows, params, use_kv_cache):
        for i, t in enumerate(step):
            if t is not None:
                out[i].append(t)
    return out


def median_ms(call, iters: int, warmup: int = 5) -> float:
    """Median milliseconds of `call()` over `iters` runs, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def time_batch(pred: Predictor, x: np.ndarray, iters: int, warmup: int = 5) -> float:
    """Median milliseconds of one `logits(x)` call."""
    return median_ms(lambda: pred.logits(x), iters, warmup)
