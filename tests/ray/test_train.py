"""Ray Train: a real 2-worker DDP run on the tiny model learns, checkpoints, and resumes; resuming it
with another model config or strategy is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.config.base import ConfigError
from app.config.jobs import TrainJob
from app.data import build_data
from app.evaluation import eval_sums, metrics_from_sums
from app.models import build_model
from pipelines.train import fit

pytestmark = pytest.mark.ray


def _job(tmp_path: Path, steps: int) -> TrainJob:
    return TrainJob.model_validate({
        "name": "tiny-digits", "storage_path": str(tmp_path),
        "model": {"kind": "vit", "d_model": 32, "n_layer": 1, "n_head": 2},
        "data": {"name": "digits"},
        "train": {"num_workers": 2, "cpus_per_worker": 1, "steps": steps, "batch_size": 32, "lr": 2e-2,
                  "warmup_steps": 5, "eval_every": 20, "checkpoint_every": 20, "log_every": 20, "keep_last": 2},
    })


def test_two_workers_learn_resume_from_their_step_and_refuse_another_config(ray_cluster, tmp_path):
    job = _job(tmp_path, steps=40)

    # Loss before training, on the same val batches and the same seeded init the workers use.
    torch.manual_seed(job.train.seed)
    untrained = build_model(job.model).eval()
    data = build_data(job.data, job.model)
    with torch.no_grad():
        before = metrics_from_sums("vit", eval_sums("vit", untrained, data.val_batches(job.train.eval_batches, 32)))

    first = fit(job)
    assert first.step == 40 and first.metrics["start_step"] == 0
    assert first.metrics["val_loss"] < 0.8 * before["val_loss"], (before, first.metrics)
    assert first.metrics["val_accuracy"] > before["val_accuracy"] + 0.2
    artifact = Path(first.artifact_path)
    meta = json.loads((artifact / "config.json").read_text())
    assert meta["format"] == "torch_fp32" and meta["config_hash"] == first.config_hash
    assert (artifact / "model.safetensors").stat().st_size > 10_000

    # Same name + storage, more steps: Ray Train hands back the step-40 checkpoint.
    second = fit(_job(tmp_path, steps=60))
    assert second.metrics["start_step"] == 40, "the run restarted from step 0 instead of resuming"
    assert second.step == 60
    ckpts = sorted(p.name for p in (tmp_path / "train" / "tiny-digits").glob("checkpoint_step*"))
    assert ckpts == ["checkpoint_step00000040", "checkpoint_step00000060"]  # keep_last: 2
    assert second.artifact_path != first.artifact_path and Path(first.artifact_path).is_dir()

    # The same job once more: finished, so its result comes back from the step-60 checkpoint's stored
    # report (start_step 40); a second pass through the workers would have reported start_step 60.
    third = fit(_job(tmp_path, steps=60))
    assert (third.metrics, third.step, third.artifact_path) == (second.metrics, 60, second.artifact_path)
    assert sorted(p.name for p in (tmp_path / "train" / "tiny-digits").glob("checkpoint_step*")) == ckpts

    # Resuming this run with another model config or strategy is refused by the driver before any
    # worker starts: a config error (one line in the CLI), not a Ray Train failure from inside a worker.
    more = _job(tmp_path, steps=80)
    with pytest.raises(ConfigError, match="another model/data config"):
        fit(more.model_copy(update={"model": more.model.model_copy(update={"d_model": 64})}))
    with pytest.raises(ConfigError, match="holds train.strategy 'ddp' state of 2 workers"):
        fit(more.model_copy(update={"train": more.train.model_copy(update={"strategy": "zero2"})}))
    assert sorted(p.name for p in (tmp_path / "train" / "tiny-digits").glob("checkpoint_step*")) == ckpts
