"""Distributed training recipe: Ray Train's TorchTrainer runs `train_loop_per_worker` on every rank.

Reads top to bottom: setup (validate config, seed, model, data, optimizer, schedule, AMP)
-> resume (from `ray.train.get_checkpoint()`) -> train (step, log, eval + report, checkpoint)
-> done. The driver side (`fit`) builds the trainer and copies the final checkpoint's
consolidated weights to a durable artifact folder the registry points at.

Resume: re-running a job with the same `name` and `storage_path` continues from its latest
checkpoint (Ray Train restores it); model, optimizer, scheduler, scaler, RNG and the step count
(which is also the data position, since batches are a function of (seed, step, rank)) come back.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from app.artifacts import save_fp32
from app.config import TrainJob, config_hash
from app.data import build_data
from app.evaluation import eval_sums, metrics_from_sums, primary_metric, task_loss
from app.models import build_model
from app import telemetry

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- pieces


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (Linear, Embedding); none on norms, biases and position tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "pos_emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _say(msg: str) -> None:
    """One progress line. Ray Train patches `print` to tee into its logger, which doubled every
    line; writing to the real stdout (streamed to the driver by Ray) prints it once."""
    print(msg, file=sys.__stdout__, flush=True)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- worker


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    # --- setup: the worker re-validates what the driver sent (STYLE lesson 2)
    job = TrainJob.model_validate(loop_config["job"])
    tc = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)

    model = build_model(job.model).to(device)
    data = build_data(job.data, job.model)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
    )
    amp_dtype = _DTYPES.get(tc.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        _say(f"[train] {job.name}: {job.model.kind} {n_params / 1e6:.2f}M params, {world} workers on {device.type}, "
              f"precision {tc.precision}, data {data.describe()}, config {config_hash(job)}")

    # --- resume
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            start_step = _load_checkpoint(Path(ckpt_dir), job, model, optimizer, scheduler, scaler, device)
        if rank == 0:
            _say(f"[train] resumed from checkpoint at step {start_step}")

    # --- wrap: DDP after the weights are final (loaded), so every rank starts identical
    engine = ray.train.torch.prepare_model(model) if world > 1 else model

    kind = job.model.kind
    metric_name, _ = primary_metric(kind)
    tags = {"run": job.name, "rank": str(rank)}
    m_loss = telemetry.gauge(telemetry.TRAIN_LOSS, ("run", "rank"))
    m_rate = telemetry.gauge(telemetry.TRAIN_SAMPLES_PER_S, ("run", "rank"))
    m_step = telemetry.gauge(telemetry.TRAIN_STEP, ("run", "rank"))
    m_eval = telemetry.gauge(telemetry.EVAL_METRIC, ("run", "metric"))

    if start_step >= tc.steps:  # already finished: report the final evaluation once more
        metrics = _evaluate(job, engine, data, rank, world, device, amp_dtype)
        ray.train.report({"step": start_step, "start_step": start_step, **metrics})
        return

    # --- train
    t_log, seen_since_log, steps_since_log, loss_acc = time.perf_counter(), 0, 0, 0.0
    t_start = time.perf_counter()
    for step in range(start_step, tc.steps):
        engine.train()
        x, y = (t.to(device) for t in data.train_batch(tc.seed, step, rank, tc.batch_size))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = task_loss(kind, engine(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tc.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        done = step + 1
        loss_acc += loss.item()
        seen_since_log += x.shape[0]
        steps_since_log += 1

        if done % tc.log_every == 0 or done == tc.steps:
            now = time.perf_counter()
            rate = seen_since_log / max(now - t_log, 1e-9)
            avg_loss = loss_acc / steps_since_log
            m_loss.set(avg_loss, tags)
            m_rate.set(rate, tags)
            m_step.set(done, tags)
            if rank == 0:
                per_step = (now - t_start) / (done - start_step)
                _say(f"[train] step {done}/{tc.steps} loss {avg_loss:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                      f"{rate * world:.0f} samples/s eta {_fmt_eta(per_step * (tc.steps - done))}")
            t_log, seen_since_log, steps_since_log, loss_acc = now, 0, 0, 0.0

        if done % tc.eval_every == 0 or done == tc.steps:
            metrics = {"step": done, "start_step": start_step, "train_loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                       **_evaluate(job, engine, data, rank, world, device, amp_dtype)}
            if rank == 0:
                m_eval.set(metrics[metric_name], {"run": job.name, "metric": metric_name})
                _say(f"[eval] step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_")))
            if done % tc.checkpoint_every == 0 or done == tc.steps:
                with tempfile.TemporaryDirectory() as tmp:
                    if rank == 0:  # DDP state is identical on every rank; rank 0 writes it
                        _save_checkpoint(Path(tmp), job, model, optimizer, scheduler, scaler, done, metrics)
                    ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
                    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_step{done:08d}")
            else:
                ray.train.report(metrics)


def _evaluate(job: TrainJob, engine, data, rank: int, world: int, device, amp_dtype) -> dict[str, float]:
    """Each rank scores its share of the fixed val batches; sums are all-reduced."""
    engine.eval()
    batches = [b for i, b in enumerate(data.val_batches(job.train.eval_batches, job.train.batch_size)) if i % world == rank]

    def logits_fn(x):
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return engine(x.to(device)).float().cpu()

    sums = torch.from_numpy(eval_sums(job.model.kind, logits_fn, batches))
    if world > 1:
        dist.all_reduce(sums)
    return metrics_from_sums(job.model.kind, sums.numpy())


def _save_checkpoint(folder: Path, job, model, optimizer, scheduler, scaler, step: int, metrics: dict) -> None:
    save_fp32(folder, model, job, {"step": step, "metrics": metrics})
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state()},
        folder / TRAINER_STATE,
    )


def _load_checkpoint(folder: Path, job: TrainJob, model, optimizer, scheduler, scaler, device) -> int:
    from safetensors.torch import load_file

    from app.artifacts import read_meta

    saved_job, meta = read_meta(folder)
    if saved_job.model != job.model or saved_job.data != job.data:
        raise ValueError(
            f"the checkpoint in {folder} was written for another model/data config "
            f"(config {meta['config_hash']}); give the job a new `name` to start fresh"
        )
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
    state = torch.load(folder / TRAINER_STATE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    return int(state["step"])


# ----------------------------------------------------------------------------- driver


@dataclass
class TrainResult:
    """What a finished training run produced."""

    metrics: dict[str, float]
    checkpoint_path: str
    artifact_path: str
    step: int
    config_hash: str


def fit(job: TrainJob) -> TrainResult:
    """Run the job on the connected Ray cluster; returns metrics and a durable fp32 artifact."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = Path(job.storage_path).resolve()
    tc = job.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=str(storage / "train"),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_last),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {job.name!r} finished without a checkpoint")
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    step = int(metrics.get("step", tc.steps))
    chash = config_hash(job)
    # Ray Train rotates checkpoints (keep_last); the registry needs a folder that stays.
    artifact = storage / job.name / "artifacts" / f"trained-{chash}-step{step:08d}"
    with result.checkpoint.as_directory() as ckpt_dir:
        if not artifact.exists():
            tmp = artifact.with_name(artifact.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in ("model.safetensors", "config.json"):
                shutil.copy2(Path(ckpt_dir) / name, tmp / name)
            os.replace(tmp, artifact)
    return TrainResult(metrics=metrics, checkpoint_path=result.checkpoint.path, artifact_path=str(artifact),
                       step=step, config_hash=chash)
