"""Pruning math as pure functions: masks from weights, no training loop, no Ray.

Every function works on *row views*: a tensor holding rows [row_offset, row_offset + n) of a
weight of `full_shape`. Under DDP/ZeRO a view is the whole weight; under FSDP2 (which shards
dim 0) it is this rank's shard. Anything that must see all rows (a global threshold, a head
score) goes through `reduce`, a sum-all-reduce over the ranks holding shards (identity when the
view is the whole weight), so the masks are the ones a single process would compute on the
consolidated model (`torch.nn.utils.prune` cannot do this: it fails on DTensor shards).

Kinds:
- unstructured: smallest |w| zeroed, per layer or with one global threshold over all targets;
- rows: output channels with the smallest L2 norm zeroed (structured; the rows can be removed);
- heads: attention heads with the smallest L2 norm of their q/k/v rows zeroed (qkv rows + proj columns);
- N:M (2:4): in every group of M consecutive inputs of a row, the N largest |w| kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class RowView:
    """Rows [row_offset, row_offset + local.shape[0]) of a weight whose full shape is full_shape."""

    local: torch.Tensor
    row_offset: int
    full_shape: tuple[int, ...]

    @property
    def full_numel(self) -> int:
        return math.prod(self.full_shape)


# ----------------------------------------------------------------------------- schedule


def cubic_sparsity(step: int, start: int, end: int, initial: float, final: float, every: int) -> float:
    """Zhu & Gupta (2017) gradual schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3.

    Constant `initial` before `start` (0 = no pruning yet), `final` from `end` on; between them it
    moves only at multiples of `every` after `start`, so masks change at a known cadence.
    """
    if step < start:
        return 0.0 if initial == 0 else initial
    if step >= end:
        return final
    t = start + ((step - start) // every) * every
    frac = (t - start) / max(1, end - start)
    return final + (initial - final) * (1.0 - frac) ** 3


# ----------------------------------------------------------------------------- thresholds


def kth_smallest(groups: list[torch.Tensor], ks: torch.Tensor, reduce: Reduce = no_reduce, iters: int = 48) -> torch.Tensor:
    """Per group g, a threshold t_g with (#values <= t_g summed over ranks) >= ks[g], found by bisection.

    `groups[g]` is this rank's share of group g's values (non-negative scores). Each iteration
    all-reduces one count vector, so a global k-th value over sharded tensors costs `iters` small
    collectives and never gathers the values themselves.
    """
    n = len(groups)
    # Scores are >= 0, so the sum over ranks of local maxima bounds the global maximum from above.
    hi = reduce(torch.tensor([float(g.max()) if g.numel() else 0.0 for g in groups], dtype=torch.float64))
    lo = torch.full((n,), -1e-12, dtype=torch.float64)
    ks = ks.to(torch.float64)
    for _ in range(iters):
        mid = (lo + hi) / 2
        counts = torch.tensor([float((g.double() <= mid[i]).sum()) for i, g in enumerate(groups)], dtype=torch.float64)
        counts = reduce(counts)
        enough = counts >= ks
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid)
    return hi


# ----------------------------------------------------------------------------- masks


def unstructured_masks(views: dict[str, RowView], sparsity: float, scope: str, reduce: Reduce = no_reduce) -> dict[str, torch.Tensor]:
    """Zero the `sparsity` fraction of smallest |w|, per layer (`scope='layer'`) or over all targets ('global')."""
    names = list(views)
    scores = [views[n].local.detach().abs().float().flatten() for n in names]
    if scope == "global":
        total = sum(views[n].full_numel for n in names)
        t = kth_smallest([torch.cat(scores)], torch.tensor([math.floor(sparsity * total)], dtype=torch.float64), reduce)
        thresholds = t.repeat(len(names))
    else:
        ks = torch.tensor([math.floor(sparsity * views[n].full_numel) for n in names], dtype=torch.float64)
        thresholds = kth_smallest(scores, ks, reduce)
    if sparsity <= 0:
        return {n: torch.ones_like(views[n].local, dtype=torch.bool) for n in names}
    return {n: views[n].local.detach().abs().double() > thresholds[i] for i, n in enumerate(names)}


def row_masks(views: dict[str, RowView], sparsity: float, reduce: Reduce = no_reduce) -> dict[str, torch.Tensor]:
    """Per layer, zero the `sparsity` fraction of output rows with the smallest L2 norm."""
    names = list(views)
    scores = [views[n].local.detach().float().norm(dim=1) for n in names]
    ks = torch.tensor([math.floor(sparsity * views[n].full_shape[0]) for n in names], dtype=torch.float64)
    thresholds = kth_smallest(scores, ks, reduce)
    out = {}
    for i, n in enumerate(names):
        keep_rows = scores[i].double() > thresholds[i] if sparsity > 0 else torch.ones_like(scores[i], dtype=torch.bool)
        out[n] = keep_rows[:, None].expand_as(views[n].local).clone()
    return out


def head_masks(qkv: RowView, proj: RowView, n_head: int, sparsity: float, reduce: Reduce = no_reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero whole attention heads: a head owns rows h*hd..(h+1)*hd of each of q, k, v in `qkv`
    (3C, C) and columns h*hd..(h+1)*hd of `proj` (C, C). Score = L2 norm of its q/k/v rows."""
    C = qkv.full_shape[1]
    hd = C // n_head
    rows = torch.arange(qkv.row_offset, qkv.row_offset + qkv.local.shape[0])
    head_of_row = (rows % C) // hd  # (local rows,)
    sq = qkv.local.detach().float().pow(2).sum(dim=1)
    head_sq = torch.zeros(n_head, dtype=torch.float64).index_add_(0, head_of_row, sq.double())
    head_sq = reduce(head_sq)
    n_prune = math.floor(sparsity * n_head)
    pruned = torch.argsort(head_sq)[:n_prune]
    keep_head = torch.ones(n_head, dtype=torch.bool)
    keep_head[pruned] = False
    qkv_mask = keep_head[head_of_row][:, None].expand_as(qkv.local).clone()
    proj_cols = keep_head.repeat_interleave(hd)  # (C,)
    proj_mask = proj_cols[None, :].expand_as(proj.local).clone()
    return qkv_mask, proj_mask


def nm_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n largest |w| in every group of m consecutive inputs (dim 1) of each row."""
    rows, cols = w.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs in_features divisible by {m}, got {cols}")
    groups = w.detach().abs().reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def is_nm(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of m consecutive inputs of each row has at most n non-zeros."""
    rows, cols = w.shape
    return bool(((w.reshape(rows, cols // m, m) != 0).sum(dim=2) <= n).all())


def sparsity_of(tensors) -> float:
    """Fraction of exact zeros over tensors."""
    zeros = total = 0
    for t in tensors:
        zeros += int((t == 0).sum())
        total += t.numel()
    return zeros / max(1, total)
