"""Training losses of distillation and of embedding models, pure functions.

Logits (Hinton et al. 2015):

loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when
T changes. Works for classifier logits (B, C) and language-model logits (B, T, V) (per token).

Embeddings (B, H): `embedding_distillation_loss` pulls a student's vectors to the teacher's
(mean squared error, or 1 - cosine similarity); `in_batch_contrastive_loss` is the multiple
negatives ranking loss (sentence-transformers' MultipleNegativesRankingLoss): row i of
scale * cos(anchors, positives) is a classification whose right answer is column i, the other
rows' positives being its negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    s = student.float().reshape(-1, student.size(-1))
    t = teacher.float().reshape(-1, teacher.size(-1))
    ce = F.cross_entropy(s, targets.reshape(-1))
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                  log_target=True, reduction="batchmean")
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl


def embedding_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """student, teacher (B, H) -> `mse` (mean over B and H) or `cosine` (mean of 1 - cos over B)."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"embedding distillation loss {kind!r} is not 'mse' or 'cosine'")


def similarity_logits(anchors: torch.Tensor, positives: torch.Tensor, scale: float) -> torch.Tensor:
    """anchors (B, H), positives (B, H) -> scale * cosine similarity (B, B)."""
    return scale * F.normalize(anchors.float(), dim=-1) @ F.normalize(positives.float(), dim=-1).T


def in_batch_contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean cross-entropy of each anchor over all positives of the batch, the right one on the diagonal."""
    logits = similarity_logits(anchors, positives, scale)
    return F.cross_entropy(logits, torch.arange(logits.size(0), device=logits.device))
