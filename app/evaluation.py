"""Quality metrics shared by training, compression and benchmarks.

The primary metric of each task decides "better": digits (classifier) -> val_accuracy (max),
lm-code (lm) -> val_loss (min; perplexity = exp(val_loss)). Metrics are keyed by `metric_kind`:
the built-in model kinds (`vit`, `gpt`) and, for `hf` models, the task (`classifier`, `lm`).
Targets equal to -100 (padding in a causal LM batch) are not scored.

An `hf` embedding model's PRIMARY metric, `mean_cosine`, is measured by compression: a variant's
vectors against its fp32 source's. Its training runs (distillation to a teacher's vectors, or
in-batch contrastive) report `val_loss` (their objective on the val texts, the metric training
selects on: TRAINING), `val_mean_cosine` (of each text's vector to its target: the teacher's, or
its pair's) and `val_accuracy` (in-batch retrieval: the target of text i is the most similar of
the batch's targets).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

PRIMARY = {
    "vit": ("val_accuracy", "max"),
    "gpt": ("val_loss", "min"),
    "classifier": ("val_accuracy", "max"),
    "lm": ("val_loss", "min"),
    # an hf embedding model: mean cosine of a variant's vectors to its fp32 source's (1.0 for the source)
    "embedding": ("mean_cosine", "max"),
}
# What training runs report and select on (early stopping, sweeps): PRIMARY, but val_loss for
# an embedding model (mean_cosine is compression's, to the fp32 source).
TRAINING = {**PRIMARY, "embedding": ("val_loss", "min")}
IGNORE_INDEX = -100  # cross-entropy's default ignore_index


def metric_kind(model_cfg) -> str:
    """The key of PRIMARY for a model section: a built-in kind, or an `hf` model's task kind."""
    if model_cfg.kind != "hf":
        return model_cfg.kind
    return {"sequence_classification": "classifier", "causal_lm": "lm"}.get(model_cfg.task, model_cfg.task)


def primary_metric(model_kind: str) -> tuple[str, str]:
    """(metric name, 'max' or 'min') of a model family."""
    return PRIMARY[model_kind]


def training_metric(model_kind: str) -> tuple[str, str]:
    """(metric name, 'max' or 'min') that training runs of a model family report and select on."""
    return TRAINING[model_kind]


def task_loss(model_kind: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: next token for gpt / lm (B, T, V) logits, class for vit / classifier (B, C) logits."""
    logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def eval_sums(model_kind: str, logits_fn: Callable, batches: Iterable) -> np.ndarray:
    """[loss_sum, correct, count] over batches; logits_fn maps a torch input to logits (torch or numpy).

    Sums (not means) so that ranks can all-reduce them before dividing.
    """
    loss_sum = correct = count = 0.0
    for x, y in batches:
        logits = logits_fn(x)
        logits = torch.as_tensor(logits).float()
        flat = logits.reshape(-1, logits.size(-1))
        target = y.reshape(-1)
        loss_sum += F.cross_entropy(flat, target, reduction="sum").item()
        scored = target != IGNORE_INDEX
        correct += ((flat.argmax(-1) == target) & scored).sum().item()
        count += scored.sum().item()
    return np.array([loss_sum, correct, count], dtype=np.float64)


def embedding_sums(pred: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, scale: float) -> np.ndarray:
    """[loss_sum, cosine_sum, correct, count] of one batch of embeddings pred, target (B, H) and
    its mean loss; correct: rows whose own target is the most similar of the batch's."""
    from app.compression.distillation import similarity_logits

    pred, target = pred.float(), target.float()
    n = pred.size(0)
    cosine = F.cosine_similarity(pred, target, dim=-1).sum().item()
    hits = (similarity_logits(pred, target, scale).argmax(-1) == torch.arange(n)).sum().item()
    return np.array([loss.item() * n, cosine, hits, n], dtype=np.float64)


def metrics_from_sums(model_kind: str, sums: np.ndarray) -> dict[str, float]:
    if model_kind == "embedding":
        loss_sum, cosine_sum, hits, count = (float(v) for v in sums)
        if count == 0:
            raise ValueError("evaluation saw no samples")
        return {"val_loss": loss_sum / count, "val_mean_cosine": cosine_sum / count, "val_accuracy": hits / count}
    loss_sum, correct, count = (float(v) for v in sums)
    if count == 0:
        raise ValueError("evaluation saw no samples")
    loss = loss_sum / count
    out = {"val_loss": loss}
    if model_kind in ("gpt", "lm"):
        out["val_perplexity"] = math.exp(min(loss, 50.0))
        out["val_byte_accuracy" if model_kind == "gpt" else "val_token_accuracy"] = correct / count
    else:
        out["val_accuracy"] = correct / count
    return out


def quality_drop(model_kind: str, source: dict[str, float], variant: dict[str, float]) -> float:
    """Relative quality loss of a variant vs its source (positive = worse)."""
    name, mode = primary_metric(model_kind)
    a, b = source[name], variant[name]
    if mode == "max":
        return (a - b) / max(abs(a), 1e-12)
    return (b - a) / max(abs(a), 1e-12)
