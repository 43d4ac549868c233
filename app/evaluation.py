"""Quality metrics shared by training, compression and benchmarks.

The primary metric of each task decides "better": digits (classifier) -> val_accuracy (max),
lm-code (lm) -> val_loss (min; perplexity = exp(val_loss)).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

PRIMARY = {"vit": ("val_accuracy", "max"), "gpt": ("val_loss", "min")}


def primary_metric(model_kind: str) -> tuple[str, str]:
    """(metric name, 'max' or 'min') of a model family."""
    return PRIMARY[model_kind]


def task_loss(model_kind: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: next byte for gpt (B, T, V) logits, class for vit (B, C) logits."""
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
        correct += (flat.argmax(-1) == target).sum().item()
        count += target.numel()
    return np.array([loss_sum, correct, count], dtype=np.float64)


def metrics_from_sums(model_kind: str, sums: np.ndarray) -> dict[str, float]:
    loss_sum, correct, count = (float(v) for v in sums)
    if count == 0:
        raise ValueError("evaluation saw no samples")
    loss = loss_sum / count
    out = {"val_loss": loss}
    if model_kind == "gpt":
        out["val_perplexity"] = math.exp(min(loss, 50.0))
        out["val_byte_accuracy"] = correct / count
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
