"""Every parallelism strategy x precision on the tiny GPT with 2 workers: trains, checkpoints and
lands on DDP fp32's loss, and in fp32 also pauses and resumes (the resume path does not depend on
the precision: the same checkpoint code, with bf16 casts done after loading); consolidated weights equal the sharded state;
sharded strategies hold less per rank; ZeRO-2 with the optimizer offloaded to the CPU trains
like ZeRO-2; a killed worker is recovered from a checkpoint.

Runs are shared by the module's tests (the exact-resume test reuses the matrix's resumed runs):
5 paused-and-resumed fp32 runs, 5 straight bf16 runs, straight fp32 runs of ddp, fsdp and zero2
and the ZeRO-Offload run. They run the worker loop on two local ranks (tests/local_ranks.py: the
same loop, checkpoint layout and gloo process group as Ray Train's workers, without starting
Ray Train's actors for each of 19 fits); the killed worker is Ray Train's own recovery, on Ray.

Tolerances (final val_loss after 2K optimizer steps vs DDP fp32, same seed):
- fp32: 1e-4 relative. All strategies do the same fp32 math; only the order of the gradient
  reduction (all-reduce vs reduce-scatter, DeepSpeed's flat buckets) differs, which moves a
  loss of ~4.3 by ~1e-6 here.
- bf16: 1% relative. bf16 keeps 8 mantissa bits (relative rounding 2^-8 ~ 0.4% per cast); torch
  autocast (ddp), FSDP's MixedPrecisionPolicy and DeepSpeed's bf16 module cast round in different
  places, so their losses drift apart by ~0.1-0.3% over a few steps; 1% leaves margin without
  hiding a real bug (a wrong LR, a lost gradient or a stale shard moves the loss by > 2%).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from app.artifacts import load_fp32
from app.config.jobs import TrainJob
from app.data import build_data
from app.evaluation import eval_sums, metrics_from_sums
from pipelines.train import TrainResult, fit
from local_ranks import LocalRanks

pytestmark = pytest.mark.ray

K = 4  # optimizer steps before the pause; runs go to 2K
STRATEGIES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]
PRECISIONS = ["fp32", "bf16"]
TOL = {"fp32": 1e-4, "bf16": 1e-2}


def _job(root: Path, name: str, strategy: str, precision: str, **train) -> TrainJob:
    return TrainJob.model_validate({
        "name": name, "storage_path": str(root),
        "model": {"kind": "gpt", "n_layer": 2, "d_model": 64, "n_head": 4, "block_size": 32},
        "data": {"name": "lm-code", "max_bytes": 200_000},
        "train": {"num_workers": 2, "cpus_per_worker": 1, "strategy": strategy, "precision": precision,
                  "steps": 2 * K, "batch_size": 8, "grad_accum_steps": 2, "warmup_steps": 2,
                  "eval_every": K, "checkpoint_every": K, "log_every": K, "eval_batches": 4, **train},
    })


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every fit of the matrix, run up front one after the other on two local ranks (the loop a
    Ray Train worker runs, without Ray's start-up per fit: tests/local_ranks.py); tests read them."""
    root = tmp_path_factory.mktemp("strategies")
    plan = {("resumed", s, "fp32"): [_job(root, f"resumed-{s}-fp32", s, "fp32", pause_at_step=K),
                                     _job(root, f"resumed-{s}-fp32", s, "fp32")] for s in STRATEGIES}
    for s, p in [(s, "bf16") for s in STRATEGIES] + [("ddp", "fp32"), ("zero2", "fp32"), ("fsdp", "fp32")]:
        plan[("straight", s, p)] = _job(root, f"straight-{s}-{p}", s, p)
    # ZeRO-Offload: the optimizer state and step on the CPU, with our torch optimizer (no C++ build).
    plan["offload"] = _job(root, "offload-zero2-fp32", "zero2", "fp32", offload_optimizer=True)
    with LocalRanks(2) as ranks:
        result = ranks.fit_all(plan)
    yield ((lambda s, p: result(("straight", s, p))), (lambda s, p: result(("resumed", s, p))),
           (lambda: result("offload")))


def _final(runs, strategy: str, precision: str) -> TrainResult:
    """The matrix's finished run of (strategy, precision): resumed in fp32, straight in bf16."""
    straight, resumed, _ = runs
    return resumed(strategy, precision)[1] if precision == "fp32" else straight(strategy, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_trains_checkpoints_resumes_and_matches_ddp_fp32(runs, strategy, precision):
    straight, resumed, _ = runs
    reference = straight("ddp", "fp32").metrics["val_loss"]
    final = _final(runs, strategy, precision)
    assert final.step == 2 * K and any(Path(final.checkpoint_path).iterdir())  # ended with a checkpoint
    loss = final.metrics["val_loss"]
    assert loss < 5.6  # learning (byte-level entropy starts at ln 256 = 5.55)
    if precision == "fp32":
        paused = resumed(strategy, precision)[0]
        assert paused.step == K and paused.metrics["start_step"] == 0
        assert final.metrics["start_step"] == K, "did not resume from the paused checkpoint"
        assert loss < paused.metrics["val_loss"]
    assert abs(loss - reference) <= TOL[precision] * reference, f"{strategy}/{precision}: {loss} vs ddp fp32 {reference}"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2"])
def test_exact_resume_equals_straight_run(runs, strategy):
    straight, resumed, _ = runs
    a = straight(strategy, "fp32").metrics
    b = resumed(strategy, "fp32")[1].metrics
    # Model, optimizer moments, scheduler, RNG and data position all come back: same numbers.
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_consolidated_weights_load_into_the_plain_model(runs, strategy, precision):
    result = _final(runs, strategy, precision)
    model, job = load_fp32(result.artifact_path)  # no torch.distributed needed
    data = build_data(job.data, job.model)
    with torch.no_grad():
        plain = metrics_from_sums("gpt", eval_sums("gpt", model, data.val_batches(job.train.eval_batches, job.train.batch_size)))
    # fp32: the very same weights and math; bf16: the sharded eval ran in bf16, the plain model in fp32.
    assert plain["val_loss"] == pytest.approx(result.metrics["val_loss"], rel=TOL[precision])


def test_zero_offload_trains_like_zero2(runs):
    straight, _, offload = runs
    result = offload()
    assert result.step == 2 * K and result.metrics["val_loss"] < 5.6
    # The same fp32 math as ZeRO-2 without offload, only stepped on the CPU copy of the partition.
    reference = straight("zero2", "fp32").metrics["val_loss"]
    assert result.metrics["val_loss"] == pytest.approx(reference, rel=TOL["fp32"])


def _per_rank_bytes(result: TrainResult, rank: int) -> float:
    m = result.metrics
    return sum(m[f"mem_rank{rank}_{k}"] for k in ("param_bytes", "grad_bytes", "optimizer_bytes"))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sharded_strategies_hold_less_per_rank(runs, precision):
    ddp = _per_rank_bytes(_final(runs, "ddp", precision), 0)
    ratio = {s: max(_per_rank_bytes(_final(runs, s, precision), r) for r in (0, 1)) / ddp for s in STRATEGIES}
    assert ratio["fsdp"] <= 0.55, ratio                      # params, grads and Adam moments all halved
    assert ratio["zero1"] < ratio["ddp"] == 1.0, ratio       # optimizer state partitioned
    assert ratio["zero2"] <= ratio["zero1"], ratio           # + gradients partitioned
    # ZeRO-3 also partitions the module's parameters; in fp32 DeepSpeed keeps a second fp32
    # master copy of the partition, so it only beats ZeRO-2 clearly under bf16.
    assert ratio["zero3"] <= (0.55 if precision == "bf16" else 0.7), ratio


def test_killed_worker_resumes_from_checkpoint(ray_cluster, tmp_path):
    job = _job(tmp_path, "failover", "ddp", "fp32", steps=160, eval_every=10, checkpoint_every=10,
               log_every=50, max_failures=1, grad_accum_steps=1)
    run_dir = tmp_path / "train" / "failover"
    pid_file = tmp_path / "failover" / "workers" / "rank1.pid"
    killed: dict = {}

    def registered_step() -> int:
        # A checkpoint counts once Ray Train's controller has registered it (a folder on disk
        # may still be in flight): the controller records those in this snapshot.
        try:
            snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
            return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return 0

    def kill_rank1_after_a_registered_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if registered_step() >= 20 and pid_file.exists():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_rank1_after_a_registered_checkpoint, daemon=True)
    watcher.start()
    result = fit(job)
    watcher.join(timeout=5)
    assert "pid" in killed, "the worker was never killed (no checkpoint appeared in time)"
    assert int(pid_file.read_text()) != killed["pid"], "rank 1 was not restarted in a new process"
    assert result.step == 160
    assert result.metrics["start_step"] >= 20, "the run restarted from step 0 instead of its checkpoint"
