"""Pruning math (no Ray): schedules, thresholds, and sharded masks equal to whole-tensor masks."""

from __future__ import annotations

import threading

import pytest
import torch

from app.compression.pruning import (
    RowView, cubic_sparsity, head_masks, is_nm, kth_smallest, nm_mask, row_masks, sparsity_of, unstructured_masks,
)
from app.config.base import ConfigError
from app.config.jobs import parse_config


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(16 * (i + 1), 32, generator=g) for i in range(3)}


def _whole(ws):
    return {k: RowView(v, 0, tuple(v.shape)) for k, v in ws.items()}


def _two_ranks(fn, ws):
    """Run fn(views, reduce) as two 'ranks' holding the top and bottom half of every weight's rows,
    with a real sum-reduce between them (threads + barrier), and stitch the masks back together."""
    halves = [{k: RowView(v[: v.shape[0] // 2], 0, tuple(v.shape)) for k, v in ws.items()},
              {k: RowView(v[v.shape[0] // 2:], v.shape[0] // 2, tuple(v.shape)) for k, v in ws.items()}]
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def reducer(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        return reduce

    def run(rank):
        out[rank] = fn(halves[rank], reducer(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {k: torch.cat([out[0][k], out[1][k]]) for k in ws}


def test_cubic_schedule_is_zhu_gupta():
    s = [cubic_sparsity(t, start=10, end=50, initial=0.0, final=0.8, every=10) for t in range(0, 60)]
    assert s[:10] == [0.0] * 10 and s[50:] == [0.8] * 10
    assert s[30] == pytest.approx(0.8 + (0.0 - 0.8) * (1 - 0.5) ** 3)
    assert s[31] == s[30]  # moves only every 10 steps
    assert all(a <= b for a, b in zip(s, s[1:]))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_masks_hit_the_target_and_shards_agree(scope):
    ws = _weights()
    whole = unstructured_masks(_whole(ws), 0.6, scope)
    kept = sum(int(m.sum()) for m in whole.values())
    total = sum(m.numel() for m in whole.values())
    assert abs(1 - kept / total - 0.6) < 0.005
    if scope == "layer":
        assert all(abs(1 - float(m.float().mean()) - 0.6) < 0.01 for m in whole.values())
    sharded = _two_ranks(lambda v, r: unstructured_masks(v, 0.6, scope, r), ws)
    assert all(torch.equal(sharded[k], whole[k]) for k in ws)
    # the smallest weights are the ones removed
    flat = torch.cat([w.abs().flatten() for w in ws.values()]) if scope == "global" else ws["w0"].abs().flatten()
    pruned = torch.cat([(~m).flatten() for m in whole.values()]) if scope == "global" else (~whole["w0"]).flatten()
    assert flat[pruned].max() <= flat[~pruned].min()


def test_row_masks_remove_lowest_norm_rows_and_shards_agree():
    ws = _weights(1)
    whole = row_masks(_whole(ws), 0.25)
    for k, m in whole.items():
        rows_kept = m.all(dim=1)
        assert (m.any(dim=1) == rows_kept).all()  # whole rows
        assert int((~rows_kept).sum()) == ws[k].shape[0] // 4
        norms = ws[k].norm(dim=1)
        assert norms[~rows_kept].max() <= norms[rows_kept].min()
    sharded = _two_ranks(lambda v, r: row_masks(v, 0.25, r), ws)
    assert all(torch.equal(sharded[k], whole[k]) for k in ws)


def test_head_masks_zero_whole_heads_in_qkv_and_proj():
    torch.manual_seed(0)
    C, H = 32, 4
    qkv, proj = torch.randn(3 * C, C), torch.randn(C, C)
    qkv[: C // H] *= 0.01  # head 0's q rows tiny -> head 0 has the lowest score
    qm, pm = head_masks(RowView(qkv, 0, (3 * C, C)), RowView(proj, 0, (C, C)), H, 0.25)
    dead = ~qm.reshape(3, H, C // H, C).all(dim=(0, 2, 3))
    assert dead.tolist() == [True, False, False, False]
    assert (~pm[:, : C // H]).all() and pm[:, C // H:].all()


def test_two_four_pattern():
    w = torch.randn(8, 16)
    m = nm_mask(w)
    assert is_nm(w * m) and float(m.float().mean()) == 0.5
    assert not is_nm(torch.ones(8, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.randn(4, 6))


def test_kth_smallest_and_sparsity_of():
    vals = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.7])
    t = kth_smallest([vals], torch.tensor([2.0]))
    assert float(t[0]) == pytest.approx(0.3, abs=1e-6)  # float32 0.3 itself
    assert sparsity_of([torch.tensor([0.0, 1.0, 0.0, 2.0])]) == 0.5


@pytest.mark.parametrize("cb,key", [
    ({"name": "magnitude_pruning", "kind": "2:4", "final_sparsity": 0.7}, "final_sparsity"),
    ({"name": "magnitude_pruning", "end_step": 500}, "train.callbacks.0"),
    ({"name": "magnitude_pruning", "targets": "(["}, "targets"),
    ({"name": "magnitude_pruning", "kind": "blocks"}, "train.callbacks.0.kind"),
    ({"name": "nope"}, "train.callbacks.0"),
])
def test_bad_callback_configs_name_the_key(cb, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config("train", {"name": "t", "model": {"kind": "gpt"}, "data": {"name": "lm-code"}, "train": {"callbacks": [cb]}})
