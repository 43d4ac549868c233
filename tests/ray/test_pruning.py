"""Pruning callbacks under ddp, fsdp, zero1, zero2 and zero3 with 2 workers, checked on the consolidated weights.

One run per strategy carries four `magnitude_pruning` callbacks on disjoint weights, so every
kind is exercised under every strategy: global unstructured (mlp.gate), rows (mlp.up), 2:4
(mlp.down) and heads (attn.qkv + attn.proj). The schedule ends at step 8 of 16, so the last 8
steps check that masked weights stay zero while the rest keep training. The fits run the worker
loop on two local ranks (tests/local_ranks.py), one after the other, without Ray Train's start-up
per fit; pruning under Ray Train workers is covered by tests/ray/test_hf_train.py and the e2e runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.compression.pruning import is_nm
from app.config.jobs import TrainJob
from local_ranks import LocalRanks

pytestmark = pytest.mark.ray

N_HEAD, D = 4, 64
CALLBACKS = [
    {"name": "magnitude_pruning", "kind": "unstructured", "scope": "global", "final_sparsity": 0.5,
     "end_step": 8, "update_every": 2, "targets": r"blocks\.\d+\.mlp\.gate\.weight"},
    {"name": "magnitude_pruning", "kind": "rows", "final_sparsity": 0.5, "end_step": 8, "update_every": 2,
     "targets": r"blocks\.\d+\.mlp\.up\.weight"},
    {"name": "magnitude_pruning", "kind": "2:4", "start_step": 2, "end_step": 8, "targets": r"blocks\.\d+\.mlp\.down\.weight"},
    {"name": "magnitude_pruning", "kind": "heads", "final_sparsity": 0.5, "end_step": 8, "update_every": 4,
     "targets": r"blocks\.\d+\.attn\.qkv\.weight"},
]


def _job(root: Path, name: str, strategy: str, **train) -> TrainJob:
    return TrainJob.model_validate({
        "name": name, "storage_path": str(root),
        "model": {"kind": "gpt", "n_layer": 2, "d_model": D, "n_head": N_HEAD, "block_size": 32},
        "data": {"name": "lm-code", "max_bytes": 200_000},
        "train": {"num_workers": 2, "strategy": strategy, "steps": 16, "batch_size": 8, "warmup_steps": 2,
                  "eval_every": 4, "checkpoint_every": 8, "log_every": 8, "keep_last": 2, "callbacks": CALLBACKS, **train},
    })


def _weights(root: Path, name: str, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(root / "train" / name / f"checkpoint_step{step:08d}" / "model.safetensors"))


def _zero_fraction(sd: dict, part: str) -> float:
    ws = [v for k, v in sd.items() if part in k]
    return sum(float((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


STRATEGIES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]


@pytest.fixture(scope="module")
def ranks():
    """Two local ranks running the worker loop (tests/local_ranks.py) for every fit of the module."""
    with LocalRanks(2) as r:
        yield r


@pytest.fixture(scope="module")
def runs(ranks, tmp_path_factory):
    """The module's pruned fits, run up front one after the other: (root, result(key))."""
    root = tmp_path_factory.mktemp("pruning")
    result = ranks.fit_all({
        **{s: _job(root, f"prune-{s}", s) for s in STRATEGIES},
        "straight": _job(root, "straight", "ddp"),
        "resumed": [_job(root, "resumed", "ddp", pause_at_step=4), _job(root, "resumed", "ddp")],
    })
    yield root, result


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_pruning_kind_reaches_its_target_on_consolidated_weights(runs, strategy):
    root, result_of = runs
    result, name = result_of(strategy), f"prune-{strategy}"
    final = _weights(root, name, 16)
    for part in ("mlp.gate", "mlp.up", "mlp.down", "attn.qkv", "attn.proj"):
        assert abs(_zero_fraction(final, part) - 0.5) <= 0.01, (strategy, part, _zero_fraction(final, part))
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)  # measured across shards = consolidated

    for layer in range(2):
        up = final[f"blocks.{layer}.mlp.up.weight"]
        rows_zero = (up == 0).all(dim=1)
        assert int(rows_zero.sum()) == up.shape[0] // 2  # whole output rows, not scattered weights
        assert is_nm(final[f"blocks.{layer}.mlp.down.weight"], 2, 4)
        qkv = final[f"blocks.{layer}.attn.qkv.weight"].reshape(3, N_HEAD, D // N_HEAD, D)
        dead = (qkv == 0).flatten(2).all(dim=2).all(dim=0)  # (heads,): q, k and v rows all zero
        assert int(dead.sum()) == N_HEAD // 2
        proj = final[f"blocks.{layer}.attn.proj.weight"].reshape(D, N_HEAD, D // N_HEAD)
        assert torch.equal((proj == 0).all(dim=2).all(dim=0), dead)  # the same heads' output columns

    # The schedule ended at step 8; 8 more optimizer steps changed the surviving weights but no zero moved.
    at_end = _weights(root, name, 8)
    for key in at_end:
        if any(p in key for p in ("mlp.gate", "mlp.up", "mlp.down", "attn.qkv", "attn.proj")):
            assert torch.equal(at_end[key] == 0, final[key] == 0), key
    gate = "blocks.0.mlp.gate.weight"
    assert not torch.equal(at_end[gate], final[gate])


def test_resume_mid_schedule_continues_it(runs):
    root, result_of = runs
    straight = result_of("straight")
    paused, resumed = result_of("resumed")
    assert 0.0 < paused.metrics["sparsity"] < 0.5  # stopped mid-schedule
    assert resumed.metrics["start_step"] == 4
    a, b = _weights(root, "straight", 16), _weights(root, "resumed", 16)
    # Restarting the schedule (or losing masks) would prune other weights or let zeros regrow.
    for key in a:
        assert torch.equal(a[key] == 0, b[key] == 0), key
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert resumed.metrics["val_loss"] == pytest.approx(straight.metrics["val_loss"], rel=1e-5)


def test_early_stopping_ends_the_run_with_a_checkpoint_and_stays_stopped(ranks, tmp_path):
    def job():
        return TrainJob.model_validate({
            "name": "early", "storage_path": str(tmp_path),
            "model": {"kind": "vit", "d_model": 16, "n_layer": 1, "n_head": 2}, "data": {"name": "digits"},
            "train": {"num_workers": 2, "steps": 200, "batch_size": 16, "warmup_steps": 2, "eval_every": 5,
                      "checkpoint_every": 50, "log_every": 50,
                      # min_delta 1.0: no evaluation can count as an improvement after the first
                      "callbacks": [{"name": "early_stopping", "metric": "val_loss", "patience": 2, "min_delta": 1.0}]},
        })

    first = ranks.fit(job())
    assert first.step == 15  # evaluations at 5 (best), 10 and 15 (no improvement twice) -> stop
    assert (tmp_path / "train" / "early" / "checkpoint_step00000015").is_dir()
    again = ranks.fit(job())
    # Stopped stays stopped: the re-run restores step 15 and trains no further (the result carries
    # the metrics of the latest checkpoint, still the step-15 one).
    assert again.step == 15
    assert sorted(p.name for p in (tmp_path / "train" / "early").glob("checkpoint_step*")) == ["checkpoint_step00000015"]
