"""How far a compressed `hf` variant is from its source, as pure functions on arrays.

- embedding: cosine of each variant vector to the source's vector for the same text (mean and
  minimum), and recall@k of the source's nearest neighbours (does the variant still rank the
  same texts closest?);
- classification: accuracy and macro-F1 against the labels;
- causal LM: perplexity from the logits.
"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_to_reference(emb: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """emb, ref (N, H), row i of each the same text -> (mean, minimum) cosine over the rows."""
    if emb.shape != ref.shape:
        raise ValueError(f"embeddings {emb.shape} and reference {ref.shape} differ in shape")
    cos = (_unit(emb) * _unit(ref)).sum(axis=1)
    return float(cos.mean()), float(cos.min())


def nearest_neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of each row's k most cosine-similar other rows, most similar first."""
    if not 0 < k < len(emb):
        raise ValueError(f"k={k} needs 0 < k < the number of rows ({len(emb)})")
    unit = _unit(emb)
    sims = unit @ unit.T  # (N, N)
    np.fill_diagonal(sims, -np.inf)  # a text is not its own neighbour
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def recall_at_k(emb: np.ndarray, ref: np.ndarray, k: int = 10) -> float:
    """Mean over rows of |variant's k nearest neighbours & reference's k nearest| / k."""
    if emb.shape[0] != ref.shape[0]:
        raise ValueError(f"{emb.shape[0]} embeddings against {ref.shape[0]} reference rows")
    got, want = nearest_neighbours(emb, k), nearest_neighbours(ref, k)
    return float(np.mean([len(set(g) & set(w)) / k for g, w in zip(got.tolist(), want.tolist())]))


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of `pred` (N,) class ids equal to `labels` (N,)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float((pred == labels).mean())


def macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class that appears in
    neither `pred` nor `labels` is left out (its F1 is undefined)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    n = num_classes if num_classes is not None else int(max(pred.max(), labels.max())) + 1
    scores = []
    for c in range(n):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def perplexity(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> float:
    """exp(mean next-token cross-entropy): logits (B, T, V) at position t predict input_ids[:, t+1];
    targets where the mask is 0 (padding) are not counted."""
    logits = np.asarray(logits, dtype=np.float64)[:, :-1]  # (B, T-1, V)
    targets = np.asarray(input_ids)[:, 1:]  # (B, T-1)
    mask = np.ones_like(targets, dtype=bool) if attention_mask is None else np.asarray(attention_mask)[:, 1:].astype(bool)
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))  # (B, T-1)
    nll = log_z - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return float(np.exp(nll[mask].mean()))
