"""What one batch of a model replica is and how each kind runs: the request records the batch
queues hold, the checks that turn a request's JSON into model inputs (naming the bad field), and
the plain batch functions (`run_classify_batch`, `run_lm_batch`, `run_text_batch`). No Serve here:
`serve/replica.py` owns the deployment that queues requests and calls these; tests call them
directly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.inference import (
    Predictor,
    SamplingParams,
    TextPredictor,
    TokenLimitError,
    classify,
    generate_text,
    score_text,
)
from app.stop_strings import find_stop
from serve.protocol import ModelRequestError


@dataclass
class ClassifyRequest:
    """One predict request inside a batch: its images (N, C, H, W) float32 and top_k."""

    images: np.ndarray
    top_k: int
    enqueued: float = 0.0
    """time.perf_counter() when it entered the replica (queue-wait metric)."""


@dataclass
class LMRequest:
    """One lm request inside a batch: `score` (rows = texts) or `generate` (one row = prompt)."""

    op: Literal["score", "generate"]
    rows: list[np.ndarray]  # each (T,) int64 byte ids
    top_k: int = 5
    max_new_tokens: int = 0
    enqueued: float = 0.0


@dataclass
class GenerateItem:
    """One validated generation request (what the decode loop runs as a `DecodeSequence`)."""

    row: np.ndarray  # (T,) int64 prompt byte ids
    params: SamplingParams
    enqueued: float = 0.0
    adapter: str | None = None
    """LoRA adapter the row is generated with (None: the base model)."""


@dataclass
class TextRequest:
    """One hf text request inside a batch: its texts' token ids (unpadded, `TextPredictor.encode`)."""

    op: Literal["embed", "classify"]
    ids: dict[str, list[list[int]]]
    top_k: int = 1
    enqueued: float = 0.0


TEXT_SUB_BATCH = 32  # texts per forward pass inside a text batch (grouped by length) ...
TEXT_SUB_BATCH_TOKENS = 256
"""... and padded tokens per forward pass. A dynamic batch holds whatever arrived together, short
and long texts mixed; one forward over all of it pads every text to the longest. Measured with
all-MiniLM-L6-v2 int8 on ORT (2-core CPU, 1 thread), 512 docstrings in arrival batches of 32: one
padded forward per batch 36 texts/s; sorted sub-batches of at most 256 padded tokens 94-105
texts/s, as fast as sorting all 512 texts at once (102)."""


def encode_texts(pred: TextPredictor, texts: list, truncate: bool) -> dict[str, list[list[int]]]:
    """Validated texts -> token ids; raises ModelRequestError naming `texts.<i>`."""
    if not texts:
        raise ModelRequestError(422, "texts", "no texts: send at least one")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ModelRequestError(422, f"texts.{i}", f"a text must be a string, not {type(text).__name__}")
        if not text.strip():
            raise ModelRequestError(422, f"texts.{i}", "text is empty")
    try:
        return pred.encode(list(texts), truncate=truncate)
    except TokenLimitError as err:
        raise ModelRequestError(
            422, f"texts.{err.index}",
            f"text has {err.tokens} tokens; the limit is {err.limit}: shorten it, or send truncate: true to cut it",
        ) from None


def run_text_batch(pred: TextPredictor, requests: list[TextRequest]) -> list[dict]:
    """Every text of every request through the model, in sub-batches of similar length; per
    request {embeddings} or {outputs, probabilities}, or {"error"} for non-finite outputs."""
    from app.compression.hf_onnx import length_sorted_batches
    from app.inference import softmax

    merged: dict[str, list[list[int]]] = {key: [row for r in requests for row in r.ids[key]] for key in requests[0].ids}
    n = len(merged["input_ids"])
    out: np.ndarray | None = None
    for idx in length_sorted_batches([len(row) for row in merged["input_ids"]], TEXT_SUB_BATCH, TEXT_SUB_BATCH_TOKENS):
        y = pred.run(pred.pad(merged, idx))
        if out is None:
            out = np.empty((n, y.shape[1]), dtype=np.float32)
        out[idx] = y
    results, start = [], 0
    for r in requests:
        mine = out[start:start + len(r.ids["input_ids"])]
        start += len(mine)
        if not np.isfinite(mine).all():
            results.append({"error": NON_FINITE})
        elif r.op == "embed":
            results.append({"embeddings": mine.tolist()})
        else:
            probs = softmax(mine.astype(np.float64))
            names = pred.labels or [str(i) for i in range(probs.shape[1])]
            top = [np.argsort(-row)[:r.top_k] for row in probs]
            results.append({
                "outputs": [names[int(t[0])] for t in top],
                "probabilities": [[{"label": names[int(i)], "probability": float(row[i])} for i in t]
                                  for row, t in zip(probs, top)],
            })
    return results


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


def lm_row(pred: Predictor | TextPredictor, text: str, field: str) -> np.ndarray:
    """A text as the (T,) int64 token ids the language model reads: UTF-8 bytes for the built-in
    GPT (at most block_size), the folder tokenizer's ids for an hf causal LM (at most its token
    limit, special tokens included). Raises ModelRequestError naming `field`."""
    if not text:
        raise ModelRequestError(422, field, "text is empty")
    if isinstance(pred, TextPredictor):
        row = np.asarray(pred.tokenize(text), dtype=np.int64)
        if len(row) > pred.max_tokens:
            raise ModelRequestError(422, field, f"text has {len(row)} tokens; the limit is {pred.max_tokens}")
        return row
    row = tokens_from_text(text)
    if len(row) > pred.block_size:
        raise ModelRequestError(422, field, f"text is {len(row)} bytes; 1 to {pred.block_size} (block_size) are accepted")
    return row


def finish_reason(pred: Predictor | TextPredictor, tokens: list[int]) -> str:
    """'stop' when a generation ended at an end-of-sequence token, else 'length'."""
    return "stop" if tokens and tokens[-1] in pred.stop_ids else "length"


def generated(pred: Predictor | TextPredictor, tokens: list[int], params: SamplingParams) -> tuple[str, str]:
    """(text, finish_reason) of one finished generation: the text cut before a stop string
    (finish_reason 'stop'), 'stop' also at an end-of-sequence token, else 'length'."""
    text = pred.token_text(tokens)
    cut = find_stop(text, params.stop) if params.stop else None
    if cut is not None:
        return text[:cut], "stop"
    return text, finish_reason(pred, tokens)


class TokenPieces:
    """The text each new token of one generated row adds (an hf causal LM streams these): the
    decoded text of all tokens so far minus what was handed out; a trailing incomplete character
    (decoded as U+FFFD) is held back until the token that completes it."""

    def __init__(self, pred: TextPredictor):
        self.pred, self.tokens, self.text = pred, [], ""

    def add(self, token: int) -> dict:
        self.tokens.append(token)
        text = self.pred.token_text(self.tokens)
        piece = "" if text.endswith("\ufffd") else text[len(self.text):]
        self.text += piece
        return {"token": token, "text": piece, "stop": token in self.pred.stop_ids}


NON_FINITE = "the model produced non-finite outputs (NaN/inf): this version is broken"


def run_classify_batch(pred: Predictor, requests: list[ClassifyRequest]) -> list[dict]:
    """All images of all requests in one forward pass; per request {outputs, probabilities},
    or {"error": message} for a request whose outputs are not finite."""
    images = np.concatenate([r.images for r in requests], axis=0)  # (sum N, C, H, W)
    results = classify(pred, images, max(r.top_k for r in requests))
    out, start = [], 0
    for r in requests:
        mine = results[start:start + len(r.images)]
        start += len(r.images)
        if not all(math.isfinite(p["probability"]) for x in mine for p in x["top_k"]):
            out.append({"error": NON_FINITE})
            continue
        out.append({
            "outputs": [x["label"] for x in mine],
            "probabilities": [x["top_k"][:r.top_k] for x in mine],
        })
    return out


LM_TASKS = ("lm", "causal_lm")  # the built-in GPT, an hf causal LM: what score / generate serve

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

    Each (op, length, max_new_tokens) group runs as one numpy batch, without padding. The
    server scores through here; it generates through its decode loop (`serve/decode_loop.py`:
    KV cache, continuous batching, streaming). A score whose NLL is not finite comes back as {"error": ...}.
    """
    out: list[list] = [[None] * len(r.rows) for r in requests]
    for (op, _length, max_new), members in group_lm_rows(requests).items():
        x = np.stack([requests[i].rows[j] for i, j in members])  # (G, T)
        if op == "score":
            results = score_text(pred, x, max(requests[i].top_k for i, _ in members))
            for (i, j), res in zip(members, results):
                finite = res["nll"] is None or math.isfinite(res["nll"])
                finite = finite and all(math.isfinite(n["probability"]) for n in res["next"])
                res["next"] = res["next"][:requests[i].top_k]
                out[i][j] = res if finite else {"error": NON_FINITE}
        else:
            new = generate_text(pred, x, max_new)  # (G, max_new)
            for (i, j), row in zip(members, new):
                out[i][j] = [int(t) for t in row]
    return out
