"""Predictors: one call shape over every artifact format, used by evaluation and by Serve.

`load_predictor(artifact_uri)` reads the artifact's `config.json`, builds the right backend,
and returns a `Predictor` whose `logits(x)` maps numpy inputs to numpy logits:
- classifier (vit): float32 (B, 1, H, W) -> (B, num_classes)
- lm (gpt):         int64 (B, T) byte ids -> (B, T, 256)

Task helpers (`classify`, `score_text`, `generate_text`) turn logits into answers and are
what the batched Serve replica calls on a whole batch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from app.artifacts import WEIGHT_FILES, ArtifactError, load_fp32, load_int8, local_path, read_meta
from app.config import TrainJob

log = logging.getLogger(__name__)

Task = Literal["classifier", "lm"]


@dataclass
class Predictor:
    backend: str
    task: Task
    job: TrainJob
    _torch_model: torch.nn.Module | None = None
    _ort_session: object | None = None

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self._ort_session is not None:
            return self._ort_session.run(["logits"], {"input": x})[0]
        with torch.inference_mode():
            return self._torch_model(torch.from_numpy(x)).float().numpy()

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


def load_predictor(artifact_uri: str, expect_backend: str | None = None) -> Predictor:
    """A predictor for the artifact at `artifact_uri` (its format decides the backend)."""
    job, meta = read_meta(artifact_uri)
    fmt = meta["format"]
    if expect_backend is not None and fmt != expect_backend:
        raise ArtifactError(f"{artifact_uri} holds backend {fmt!r}, but {expect_backend!r} was asked for")
    task: Task = "lm" if job.model.kind == "gpt" else "classifier"
    if fmt == "torch_fp32":
        return Predictor(fmt, task, job, _torch_model=load_fp32(artifact_uri)[0])
    if fmt == "torch_int8":
        return Predictor(fmt, task, job, _torch_model=load_int8(artifact_uri)[0])
    if fmt in ("onnx_fp32", "onnx_int8"):
        path = str(local_path(artifact_uri) / WEIGHT_FILES[fmt])
        return Predictor(fmt, task, job, _ort_session=_ort_session(path))
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


def time_batch(pred: Predictor, x: np.ndarray, iters: int, warmup: int = 5) -> float:
    """Median milliseconds of one `logits(x)` call."""
    for _ in range(warmup):
        pred.logits(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        pred.logits(x)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))
