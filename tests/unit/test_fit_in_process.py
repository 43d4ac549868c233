"""`fit_in_process`: the training loop in this process without Ray (what a one-worker Tune trial
runs): every evaluation reported as it happens with its checkpoint, checkpoints in Ray Train's
layout rotated to `keep_last`, a paused run resumed to the very numbers of a straight one, and
ZeRO-2 over the same loop on a one-rank process group landing on DDP's loss."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config.jobs import TrainJob
from pipelines.train import fit_in_process, runs_in_process


def _job(root: Path, name: str, strategy: str = "ddp", **train) -> TrainJob:
    return TrainJob.model_validate({
        "name": name, "storage_path": str(root),
        "model": {"kind": "gpt", "n_layer": 1, "d_model": 32, "n_head": 2, "block_size": 32},
        "data": {"name": "lm-code", "max_bytes": 100_000},
        "train": {"num_workers": 1, "strategy": strategy, "steps": 8, "batch_size": 8, "warmup_steps": 2,
                  "eval_every": 2, "checkpoint_every": 2, "log_every": 4, "eval_batches": 2, "keep_last": 2, **train}})


def test_reports_checkpoints_and_exact_resume(tmp_path):
    seen: list[tuple[int, str | None]] = []
    straight = fit_in_process(_job(tmp_path, "straight"), on_report=lambda m, c: seen.append((int(m["step"]), c)))
    run_dir = tmp_path / "train" / "straight"
    assert [s for s, _ in seen] == [2, 4, 6, 8]
    assert [Path(c).name for _, c in seen] == [f"checkpoint_step{s:08d}" for s in (2, 4, 6, 8)]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_step00000006", "checkpoint_step00000008"]  # keep_last 2
    assert straight.step == 8 and straight.checkpoint_path == str(run_dir / "checkpoint_step00000008")
    assert (Path(straight.artifact_path) / "model.safetensors").is_file()

    paused = fit_in_process(_job(tmp_path, "resumed", pause_at_step=4))
    resumed = fit_in_process(_job(tmp_path, "resumed"))
    assert paused.step == 4 and resumed.step == 8 and resumed.metrics["start_step"] == 4
    assert resumed.metrics["val_loss"] == pytest.approx(straight.metrics["val_loss"], rel=1e-6)
    assert resumed.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"], rel=1e-6)

    again = fit_in_process(_job(tmp_path, "resumed"))  # finished: nothing trains, the result is the same
    assert again.step == 8 and again.artifact_path == resumed.artifact_path


def test_zero2_on_one_rank_lands_on_ddp(tmp_path):
    ddp = fit_in_process(_job(tmp_path, "ddp"))
    zero2 = fit_in_process(_job(tmp_path, "zero2", "zero2"))
    assert zero2.metrics["val_loss"] == pytest.approx(ddp.metrics["val_loss"], rel=1e-4)


def test_only_one_worker_on_data_in_memory(tmp_path):
    two = _job(tmp_path, "two", num_workers=2)
    assert runs_in_process(_job(tmp_path, "one")) and not runs_in_process(two)
    with pytest.raises(ValueError, match="num_workers is 2"):
        fit_in_process(two)
