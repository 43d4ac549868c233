"""Distributed training recipe: Ray Train's TorchTrainer runs `train_loop_per_worker` on every rank.

Reads top to bottom: setup (validate config, seed, model, data, optimizer, schedule, AMP)
-> resume (from `ray.train.get_checkpoint()`) -> train (step, log, eval + report, checkpoint)
-> done. The driver side (`fit`) builds the trainer and copies the final checkpoint's
consolidated weights to a durable artifact folder the registry points at; `fit_in_process`
runs the same loop without a TorchTrainer, in this process (a Tune trial) or in each process of
a caller's process group (one rank each). The module is over 500
lines and one idea, one training run: the worker loop, its checkpoint helpers and `fit` share the
checkpoint layout and the loop config. (What a worker trains, without Ray: pipelines/optimization.py.)

Resume: re-running a job with the same `name` and `storage_path` continues from its latest
checkpoint (Ray Train restores it); model, optimizer, scheduler, scaler, RNG and the step count
(which is also the data position, since batches are a function of (seed, step, rank)) come back.
File data streamed through Ray Data (app/data/stream.py) is the exception: `fit` hands the train
Dataset to the TorchTrainer, each worker iterates its shard, and a resumed run starts an epoch over.
"""

from __future__ import annotations

import json
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
from ray.train import UserCallback

from app.artifacts import read_meta, save_fp32
from app.config.jobs import TrainJob
from app.config.base import ConfigError, config_hash
from app.data import build_data, train_batches
from app.compression.distillation import distillation_loss, embedding_distillation_loss, in_batch_contrastive_loss
from app.evaluation import eval_sums, embedding_sums, metric_kind, metrics_from_sums, task_loss, training_metric
from app.models import build_model
from pipelines.optimization import build_optimizer, build_train_model, lr_factor
from app import telemetry
from app.logs import emit, env_format, line_logger
from app.progress import progress_path, write_progress

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
ADAPTER_DIR = "adapter"


# ----------------------------------------------------------------------------- pieces


def _say(msg: str) -> None:
    """One progress line. Ray Train patches `print` to tee into its logger, which doubled every
    line; writing to the real stdout (streamed to the driver by Ray) prints it once."""
    print(msg, file=sys.__stdout__, flush=True)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- worker


def train_loop_per_worker(loop_config: dict) -> None:
    from pipelines.callbacks import TrainState, build_callbacks
    from pipelines.session import current
    from pipelines.strategies import build_strategy

    # --- setup: the worker re-validates what the driver sent (a dict crossed a process boundary)
    job = TrainJob.model_validate(loop_config["job"])
    log_format = loop_config.get("log_format", "text")  # TEMPER_LOG_FORMAT of the driver (see fit)
    report_log = line_logger("temper.train")
    tc = job.train
    session = current()  # Ray Train's, or a local one (fit_in_process)
    rank, world = session.rank_and_world()
    device = session.device()
    _write_pid(job, rank)
    torch.manual_seed(tc.seed)  # same init on every rank and for every strategy

    # first: an hf classifier's head takes its labels from the data
    if loop_config.get("streamed") is not None:  # file data streamed through Ray Data: this worker's shard
        from app.data.stream import StreamedTextData

        data = StreamedTextData(job.data, job.model, loop_config["streamed"], session.dataset_shard("train"))
    else:
        data = build_data(job.data, job.model)
    model = build_train_model(job, device, labels=getattr(data, "labels", None))

    pooler = getattr(model, "encoder", None) and getattr(model.encoder, "pooler", None)
    if metric_kind(job.model) == "embedding" and pooler is not None:
        # BERT's pooler (tanh over [CLS]) is not part of the pooled vector: no gradient reaches
        # it, and DDP refuses parameters that get none. Frozen, it is saved as loaded.
        pooler.requires_grad_(False)

    strategy = build_strategy(job, model, lambda m: build_optimizer(m, tc), device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        strategy.optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
    )
    callbacks = build_callbacks(job, model)
    state = TrainState(job, strategy, rank, world)
    teacher = _load_teacher(job, loop_config.get("teacher_artifact"), device)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        if tc.finetune != "full":
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            _say(f"[train] {tc.finetune}: r {tc.lora.r}, alpha {tc.lora.alpha}, {n_train} trainable parameters "
                 f"({n_train / n_params:.2%} of {n_params}); the base is frozen")
        _say(f"[train] {job.name}: {job.model.kind} {n_params / 1e6:.2f}M params, {world} workers on {device.type}, "
             f"strategy {tc.strategy}, precision {tc.precision}, data {data.describe()}, config {config_hash(job)}")
        if job.model.kind == "hf":
            from app.models.hf import model_cost

            _say(f"[train] {job.model.path}: {model_cost(model.get_base_model() if tc.finetune != 'full' else model, job.data.max_length).line()}")

    # --- resume
    start_step, seeded = 0, False
    with session.checkpoint_dir() as ckpt_dir:
        if ckpt_dir is not None:
            start_step = _load_checkpoint(ckpt_dir, job, strategy, scheduler, callbacks)
            if rank == 0:
                _say(f"[train] resumed from checkpoint at step {start_step}")
    if ckpt_dir is None and loop_config.get("initial_checkpoint"):  # this run has none yet: seed it from another run's (PBT)
        start_step = _load_checkpoint(Path(loop_config["initial_checkpoint"]), job, strategy, scheduler, callbacks)
        seeded = True
        if rank == 0:
            _say(f"[train] started from {loop_config['initial_checkpoint']} at step {start_step}")
    state.step = state.resumed_from = start_step
    for cb in callbacks:
        cb.on_setup(state)

    kind = metric_kind(job.model)
    metric_name, _ = training_metric(kind)
    progress = progress_path(job.storage_path, job.name)  # rank 0's latest numbers, for the HTTP control plane
    if rank == 0:
        write_progress(progress, {"run": job.name, "step": start_step, "steps": tc.steps, "metric": metric_name})
    tags = {"run": job.name, "rank": str(rank)}

    if start_step >= tc.steps or state.should_stop:  # finished (or stopped early): report the final evaluation once more
        metrics = {"step": start_step, "start_step": start_step, **_evaluate(job, strategy, data, rank, world, teacher),
                   **_memory_metrics(strategy, world)}
        if seeded:  # started from another run's final checkpoint: this run still ends with one of its own
            _report_checkpoint(job, strategy, scheduler, callbacks, start_step, metrics, rank)
        else:
            session.report(metrics)
        return

    # --- train
    t_log, seen_since_log, tokens_since_log, steps_since_log, loss_acc = time.perf_counter(), 0, 0, 0, 0.0
    t_start = time.perf_counter()
    batches = train_batches(data, tc.seed, start_step * tc.grad_accum_steps, rank, tc.batch_size)
    for step in range(start_step, tc.steps):
        strategy.train()
        step_loss = 0.0
        for micro in range(tc.grad_accum_steps):
            # In memory, batches are a function of (seed, micro-batch index, rank): the step count is the
            # data position. Streamed, they come from this worker's shard (app/data/stream.py).
            x, y = (t.to(device) for t in next(batches))
            if kind == "embedding":
                loss = embedding_loss(job, *embedding_targets(strategy.forward, teacher, x, y))
            elif teacher is None:
                loss = task_loss(kind, strategy.forward(x), y)
            else:
                logits = strategy.forward(x)
                with torch.no_grad():
                    soft = teacher(x)
                loss = distillation_loss(logits, soft, y, tc.distill.alpha, tc.distill.temperature)
            strategy.backward(loss, last_micro=micro == tc.grad_accum_steps - 1)
            step_loss += loss.item() / tc.grad_accum_steps
            seen_since_log += x.shape[0]
            if not x.is_floating_point():  # token ids (B, T); images and features are float
                tokens_since_log += x.numel()
        info = strategy.step()
        scheduler.step()
        done = step + 1
        state.step = done
        callback_metrics: dict[str, float] = {}
        for cb in callbacks:  # model-mutating callbacks (pruning masks) first, then observers
            callback_metrics.update(cb.on_step_end(state))
        loss_acc += step_loss
        steps_since_log += 1

        if done % tc.log_every == 0 or done == tc.steps:
            now = time.perf_counter()
            rate = seen_since_log / max(now - t_log, 1e-9)
            avg_loss = loss_acc / steps_since_log
            telemetry.set_gauge(telemetry.TRAIN_LOSS, avg_loss, tags)
            telemetry.set_gauge(telemetry.TRAIN_SAMPLES_PER_S, rate, tags)
            telemetry.set_gauge(telemetry.TRAIN_STEP, done, tags)
            if tokens_since_log:
                tokens_rate = tokens_since_log / max(now - t_log, 1e-9)
                telemetry.set_gauge(telemetry.TRAIN_TOKENS_PER_S, tokens_rate, tags)
            if rank == 0:
                per_step = (now - t_start) / (done - start_step)
                write_progress(progress, {"step": done, "steps": tc.steps, "loss": avg_loss, "lr": scheduler.get_last_lr()[0],
                                          "samples_per_s": rate * world, "eta_s": per_step * (tc.steps - done)})
                if log_format == "json":
                    emit(report_log, "train_step", {
                        "run": job.name, "step": done, "steps": tc.steps, "loss": avg_loss, "lr": scheduler.get_last_lr()[0],
                        "grad_norm": info.grad_norm, "samples_per_s": rate * world, "eta_s": per_step * (tc.steps - done)}, "json")
                elif log_format != "off":
                    _say(f"[train] step {done}/{tc.steps} loss {avg_loss:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                         f"grad_norm {info.grad_norm:.3f} {rate * world:.0f} samples/s eta {_fmt_eta(per_step * (tc.steps - done))}")
            t_log, seen_since_log, tokens_since_log, steps_since_log, loss_acc = now, 0, 0, 0, 0.0

        pausing = done == tc.pause_at_step
        if done % tc.eval_every == 0 or done == tc.steps or pausing:
            metrics = {"step": done, "start_step": start_step, "train_loss": step_loss, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": info.grad_norm, **callback_metrics, **_evaluate(job, strategy, data, rank, world, teacher)}
            for cb in callbacks:
                metrics.update(cb.on_eval_end(state, metrics))
            metrics.update(_memory_metrics(strategy, world))
            if rank == 0:
                value = metrics[metric_name]
                write_progress(progress, {"metric_value": value, "eval_step": done})
                telemetry.set_gauge(telemetry.EVAL_METRIC, value, {"run": job.name, "metric": metric_name})
                if log_format == "json":  # the whole report: what Ray Train records for this step
                    emit(report_log, "train_report", {"run": job.name, **metrics}, "json")
                elif log_format != "off":
                    _say(f"[eval] step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_")))
            if done % tc.checkpoint_every == 0 or done == tc.steps or pausing or state.should_stop:
                _report_checkpoint(job, strategy, scheduler, callbacks, done, metrics, rank)
            else:
                session.report(metrics)
        if state.should_stop:
            if rank == 0:
                _say(f"[train] stopped early at step {done} (train.callbacks early_stopping)")
            return
        if pausing:
            if rank == 0:
                _say(f"[train] paused at step {done} (train.pause_at_step); re-run the job to continue to {tc.steps}")
            return


def embedding_targets(forward, teacher, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors of the texts x, what they are pulled to) of an embedding batch, each (B, H):
    the teacher's vectors of the same texts when distilling, else the vectors of their pairs y
    (texts and pairs in one forward: (2B, ...) in, split in two)."""
    if teacher is not None:
        with torch.no_grad():
            target = teacher(x)
        return forward(x), target
    if x.shape != y.shape:  # the data pads texts and their pairs to one length
        raise ValueError(f"an embedding batch holds texts {tuple(x.shape)} and pairs {tuple(y.shape)} of different shapes")
    return forward(torch.cat([x, y])).chunk(2)


def embedding_loss(job: TrainJob, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """train.distill.loss (mse | cosine) to the teacher's vectors, else in-batch contrastive."""
    if job.train.distill is not None:
        return embedding_distillation_loss(pred, target, job.train.distill.loss)
    return in_batch_contrastive_loss(pred, target, job.train.contrastive_scale)


def _report_checkpoint(job: TrainJob, strategy, scheduler, callbacks, step: int, metrics: dict, rank: int) -> None:
    """Write this rank's part of the step's checkpoint and report it with the metrics."""
    from pipelines.session import current

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _save_checkpoint(folder, job, strategy, scheduler, callbacks, step, metrics, rank)
        # Every rank reports its part (FSDP/ZeRO shards); Ray merges them into one folder.
        current().report(metrics, folder if any(folder.iterdir()) else None, f"checkpoint_step{step:08d}")
    seconds = time.perf_counter() - t0
    telemetry.set_gauge(telemetry.TRAIN_CHECKPOINT_S, seconds, {"run": job.name, "rank": str(rank)})


def _load_teacher(job: TrainJob, artifact: str | None, device):
    """The frozen teacher for distillation (every rank holds a full copy; it is only run forward)."""
    if job.train.distill is None:
        return None
    if artifact is None:
        raise ValueError("train.distill is set but the driver resolved no teacher artifact")
    from app.artifacts import load_fp32

    teacher, teacher_job = load_fp32(artifact)
    if job.model.kind == "hf" and job.model.task == "embedding":
        check_embedding_teacher(teacher_job, job)
    elif teacher_job.data.name != job.data.name:
        raise ValueError(f"train.distill.teacher was trained on {teacher_job.data.name!r}, the student on {job.data.name!r}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


def check_embedding_teacher(teacher_job: TrainJob, job: TrainJob) -> None:
    """An embedding teacher reads the student's token ids and its vectors are the student's
    targets: the same task, vocabulary and vector width."""
    from app.models.hf import load_hf_config, load_tokenizer

    name = job.train.distill.teacher
    if teacher_job.model.kind != "hf" or teacher_job.model.task != "embedding":
        raise ValueError(f"train.distill.teacher {name!r} is not an hf embedding model; an embedding student needs one")
    if load_tokenizer(teacher_job.model.path).get_vocab() != load_tokenizer(job.model.path).get_vocab():
        raise ValueError(f"train.distill.teacher {name!r} ({teacher_job.model.path}) and model.path {job.model.path} "
                         "have different tokenizers; the teacher embeds the student's token ids")
    widths = load_hf_config(teacher_job.model.path).hidden_size, load_hf_config(job.model.path).hidden_size
    if widths[0] != widths[1]:
        raise ValueError(f"train.distill.teacher {name!r} has {widths[0]}-wide vectors, the student {widths[1]}; "
                         "mse / cosine distillation compares them one to one")


def _write_pid(job: TrainJob, rank: int) -> None:
    """storage/<name>/workers/rank<r>.pid: which process holds which rank (ops, failure tests)."""
    folder = Path(job.storage_path).resolve() / job.name / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.pid").write_text(str(os.getpid()))


def _memory_metrics(strategy, world: int) -> dict[str, float]:
    """Per-rank parameter / gradient / optimizer-state bytes, gathered so rank 0 reports all ranks."""
    mine = strategy.memory()
    keys = sorted(mine)
    local = torch.tensor([float(mine[k]) for k in keys], dtype=torch.float64)
    if world > 1:
        gathered = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
    else:
        gathered = [local]
    out = {}
    for r, row in enumerate(gathered):
        for k, v in zip(keys, row.tolist()):
            out[f"mem_rank{r}_{k}"] = v
    return out


def _evaluate(job: TrainJob, strategy, data, rank: int, world: int, teacher=None) -> dict[str, float]:
    """Each rank scores its share of the fixed val batches; sums are all-reduced.

    Sharded strategies need every rank in every forward (FSDP all-gathers, ZeRO-3 gathers),
    so all ranks run the same number of forwards: batches are dealt round-robin and a rank
    with none left runs a dummy forward on batch 0 and ignores it.
    """
    strategy.train(False)
    kind = metric_kind(job.model)
    batches = list(data.val_batches(job.train.eval_batches, job.train.batch_size))
    per_rank = math.ceil(len(batches) / world)
    sums = np.zeros(4 if kind == "embedding" else 3)  # embedding_sums / eval_sums
    with torch.no_grad():
        for i in range(per_rank):
            idx = i * world + rank
            x, y = batches[idx] if idx < len(batches) else batches[0]
            x, y = x.to(strategy.device), y.to(strategy.device)
            if kind == "embedding":
                pred, target = (t.float().cpu() for t in embedding_targets(strategy.forward, teacher, x, y))
                batch_sums = embedding_sums(pred, target, embedding_loss(job, pred, target), job.train.contrastive_scale)
            else:
                logits = strategy.forward(x).float().cpu()
                batch_sums = eval_sums(kind, lambda _: logits, [(x.cpu(), y.cpu())])
            if idx < len(batches):
                sums += batch_sums
    sums = torch.from_numpy(sums)
    if world > 1:
        dist.all_reduce(sums)
    return metrics_from_sums(kind, sums.numpy())


def _save_checkpoint(folder: Path, job: TrainJob, strategy, scheduler, callbacks, step: int, metrics: dict, rank: int) -> None:
    strategy.save(folder)                 # every rank: its shard (DCP / DeepSpeed), or rank 0 (DDP)
    full = strategy.full_state_dict()     # a collective: every rank takes part
    if rank == 0 and job.train.finetune != "full":
        # adapters: the checkpoint's weights are the adapter's alone (the base is model.path, frozen),
        # also written in peft's layout (adapter/), which the artifact is made of
        from app.models.lora import adapter_state, save_adapter

        full = adapter_state(strategy.module, full)
        save_adapter(folder / ADAPTER_DIR, strategy.module, full)
    if rank == 0:
        save_fp32(folder, full, job, {"step": step, "metrics": metrics, "strategy": job.train.strategy})
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "callbacks": [cb.state_dict() for cb in callbacks], **strategy.extra_state()}, folder / TRAINER_STATE)


def resume_conflict(folder: Path, job: TrainJob) -> str | None:
    """Why `job` cannot resume from the checkpoint in `folder` (None when it can)."""
    saved_job, meta = read_meta(folder)
    if saved_job.model != job.model or saved_job.data != job.data:
        return (f"the checkpoint in {folder} was written for another model/data config "
                f"(config {meta['config_hash']}); give the job a new `name` to start fresh")
    if saved_job.train.strategy != job.train.strategy or saved_job.train.num_workers != job.train.num_workers:
        return (f"the checkpoint in {folder} holds train.strategy {saved_job.train.strategy!r} state of "
                f"{saved_job.train.num_workers} workers; this run asks for {job.train.strategy!r} with "
                f"{job.train.num_workers}. Resume with the same values, or start fresh under a new `name` "
                "(the consolidated model.safetensors in the checkpoint loads into any strategy)")
    return None


def refuse_incompatible_resume(job: TrainJob, run_dir: Path) -> None:
    """Fail in the driver, before any worker starts, when the run's newest checkpoint was written
    by another model, data, strategy or worker count (the worker checks again when it loads it)."""
    # zero-padded steps: name order is step order; a folder without a readable meta (a missing
    # or half-written config.json: ArtifactError, a pydantic or JSON ValueError) is skipped
    for folder in sorted(run_dir.glob("checkpoint_step*"), reverse=True):
        try:
            why = resume_conflict(folder, job)
        except (ValueError, KeyError, OSError):
            continue
        if why:
            raise ConfigError(why)
        return


def _load_checkpoint(folder: Path, job: TrainJob, strategy, scheduler, callbacks) -> int:
    if why := resume_conflict(folder, job):
        raise ValueError(why)
    strategy.load(folder)
    state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    # The saved scheduler carries the old peak lr (and the optimizer its weight decay). This job's
    # values win: the same on a plain resume, the mutated ones after a PBT exploit.
    tc = job.train
    scheduler.base_lrs = [tc.lr for _ in scheduler.base_lrs]
    factor = lr_factor(scheduler.last_epoch, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
    for group in strategy.optimizer.param_groups:
        group["lr"] = tc.lr * factor  # what LambdaLR computes at this step
        if group.get("weight_decay", 0.0) > 0.0:
            group["weight_decay"] = tc.weight_decay
    strategy.load_extra_state(state)
    saved_callbacks = state.get("callbacks", [])
    if len(saved_callbacks) != len(callbacks):
        raise ValueError(f"the checkpoint in {folder} holds {len(saved_callbacks)} callback states, train.callbacks lists "
                         f"{len(callbacks)}: resume with the same callbacks or start under a new `name`")
    for cb, cb_state in zip(callbacks, saved_callbacks):
        cb.load_state_dict(cb_state)
    torch.set_rng_state(state["torch_rng"])
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


class ForwardReports(UserCallback):
    """A Ray Train run callback that hands every report (rank 0's metrics + the persisted
    checkpoint's path) to a `ray.util.queue.Queue`: how a Tune trial sees its inner run's
    evaluations as they happen. `put` blocks, so training waits until the trial took the report."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        import ray

        self.queue.put({"metrics": dict(metrics[0]), "checkpoint": checkpoint.path if checkpoint else None,
                        # the run's controller (this callback runs inside it): lets the trial abort the run
                        "controller": ray.get_runtime_context().current_actor})


def import_pretrained(job: TrainJob) -> TrainResult:
    """`train.steps: 0`: the `hf` model as it is, written as the fp32 artifact a finished training
    run leaves (save_fp32's layout, so compression and serving treat both alike). Nothing trains,
    so nothing runs on Ray Train workers; no val metrics are measured (compression measures the
    source it starts from)."""
    chash = config_hash(job)
    artifact = Path(job.storage_path).resolve() / job.name / "artifacts" / f"imported-{chash}"
    if not artifact.exists():
        labels = None
        if job.model.task == "sequence_classification":
            from app.models.hf import HFModelError, has_classification_head, load_hf_config

            if not has_classification_head(load_hf_config(job.model.path)):
                raise HFModelError(f"train.steps 0: {job.model.path} has no classification head to import; "
                                   "train one on the labelled data (train.steps >= 1)")
            labels = read_labels(job.data)
        tmp = artifact.with_name(artifact.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_fp32(tmp, build_model(job.model, labels=labels), job, {"step": 0, "metrics": {}, "imported_from": job.model.path})
        os.replace(tmp, artifact)
    print(f"[import] {job.model.path} as it is: {artifact}", flush=True)  # the driver: no Ray Train print patch here
    return TrainResult(metrics={}, checkpoint_path="", artifact_path=str(artifact), step=0, config_hash=chash)


def read_labels(data) -> list[str] | None:
    """The class names a classifier trains on: in memory, or from one streamed pass over large files."""
    from app.config.data import FileDataConfig
    from app.data.stream import should_stream, survey_files
    from app.data.text import read_splits

    if isinstance(data, FileDataConfig) and should_stream(data):
        return survey_files(data, keep_val=0)["labels"]
    return read_splits(data).labels


def cut_student(job: TrainJob, teacher_artifact: str) -> TrainJob:
    """`train.distill.student_layers`: the job with model.path set to a new hf folder holding the
    registered teacher cut to those layers (app.models.hf.save_student_folder), written once into
    `<storage_path>/<name>/students/` (named after the teacher artifact and the layers, so a
    re-run finds it and resumes under the same config)."""
    import hashlib
    import json

    from app.artifacts import load_fp32, local_path
    from app.models.hf import save_student_folder

    layers = job.train.distill.student_layers
    teacher_job, _ = read_meta(teacher_artifact)
    same_model = [json.loads((Path(m.path) / "config.json").read_text()) for m in (teacher_job.model, job.model)]
    if same_model[0] != same_model[1]:
        raise ValueError(f"train.distill.student_layers cuts the teacher, so model.path ({job.model.path}) must hold the "
                         f"teacher's model ({teacher_job.model.path}); to distill into another folder, leave student_layers out")
    tag = hashlib.sha256(str(local_path(teacher_artifact).resolve()).encode()).hexdigest()[:12]
    folder = Path(job.storage_path).resolve() / job.name / "students" / f"{tag}-layers{'-'.join(map(str, layers))}"
    if not folder.exists():
        teacher, _ = load_fp32(teacher_artifact)
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_student_folder(teacher, teacher_job.model.path, layers, tmp)
        os.replace(tmp, folder)
    print(f"[train] student: layers {layers} of the teacher in {folder}", flush=True)  # the driver
    return job.model_copy(update={"model": job.model.model_copy(update={"path": str(folder)})})


def fit(job: TrainJob, teacher_artifact: str | None = None, *, report_to=None, resume_from: str | None = None) -> TrainResult:
    """Run the job on the connected Ray cluster; returns metrics and a durable fp32 artifact.

    `teacher_artifact`: the fp32 artifact folder of the distillation teacher (resolved from the
    registry by the caller when `train.distill` is set). `report_to`: a `ray.util.queue.Queue`
    that receives every report as it happens (Tune trials). `resume_from`: a checkpoint folder
    (readable by every worker) to start from when this run has none of its own yet: a PBT exploit
    continues another trial's checkpoint. Ray Train V2 dropped `resume_from_checkpoint`, so the
    loop loads it itself."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from app.config.data import FileDataConfig
    from app.data.stream import should_stream, survey_files, train_dataset

    storage = Path(job.storage_path).resolve()
    tc = job.train
    refuse_incompatible_resume(job, storage / "train" / job.name)
    if report_to is None and (done := finished_run(job, storage / "train" / job.name)) is not None:
        return done
    # Progress and report lines: text for people (default), or TEMPER_LOG_FORMAT=json for one JSON
    # object per line (a step line per log_every, a report line per evaluation) for log pipelines.
    loop_config = {"job": job.model_dump(mode="json"), "teacher_artifact": teacher_artifact, "initial_checkpoint": resume_from,
                   "log_format": env_format(default="text")}
    datasets = None
    if isinstance(job.data, FileDataConfig) and should_stream(job.data):
        # one streamed pass checks the rows and keeps the val rows; Ray Train shards the train Dataset
        summary = survey_files(job.data, keep_val=tc.eval_batches * tc.batch_size)
        loop_config["streamed"] = summary
        datasets = {"train": train_dataset(job.data, job.model, summary["labels"])}
        skipped = f", {summary['bad_rows']} bad rows skipped: " + "; ".join(summary["reasons"]) if summary["bad_rows"] else ""
        print(f"[data] streaming {job.data.kind} files through Ray Data: {summary['n_train']} train rows, "
              f"{summary['n_val']} val rows{skipped}", flush=True)  # the driver: no Ray Train print patch here
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker},
            placement_strategy=tc.placement,
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=str(storage / "train"),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_last),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            callbacks=[ForwardReports(report_to)] if report_to is not None else None,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {job.name!r} finished without a checkpoint")
    labels = loop_config["streamed"]["labels"] if datasets is not None else None
    with result.checkpoint.as_directory() as ckpt_dir:
        return _durable_result(job, result.metrics, Path(ckpt_dir), result.checkpoint.path, labels)


def finished_run(job: TrainJob, run_dir: Path) -> TrainResult | None:
    """The result of this run as Ray Train stored it, when its newest checkpoint is already at
    `train.steps` and was written by this very config (its hash): a re-run of a finished job (the
    same `run` command again) then starts no workers. Starting them only to load the last
    checkpoint and evaluate it once more cost a fit's whole start-up (controller, workers, process
    group: ~15-25 s on 2 cores) for the metrics the checkpoint already holds. A run stopped
    earlier, one whose `train.steps` or other settings changed since, goes through the workers as
    before; so does streamed data whose artifact is gone (its labels need a pass over the files)."""
    from ray.train import Result

    if not run_dir.is_dir():
        return None
    try:
        result = Result.from_path(str(run_dir))
    except (RuntimeError, OSError, ValueError):  # no snapshot yet (the first run died early), unreadable
        return None
    step = (result.metrics or {}).get("step")
    if result.checkpoint is None or not isinstance(step, (int, float)) or step < job.train.steps:
        return None
    with result.checkpoint.as_directory() as ckpt_dir:
        try:
            _, meta = read_meta(Path(ckpt_dir))
        except (ValueError, KeyError, OSError):  # unreadable: the workers' resume reports it
            return None
        if meta.get("config_hash") != config_hash(job):  # another lr, eval or callback setting: evaluated anew
            return None
        if _streams(job) and not durable_artifact_path(job, int(step)).exists():
            return None
        print(f"[train] {job.name}: already finished at step {int(step)} ({result.checkpoint.path}); not trained again",
              flush=True)
        return _durable_result(job, result.metrics, Path(ckpt_dir), result.checkpoint.path, None)


def durable_artifact_path(job: TrainJob, step: int) -> Path:
    """Where the fp32 weights (or the adapter) of this job's checkpoint at `step` are kept for the registry."""
    kind = "lora" if job.train.finetune != "full" else "trained"
    return Path(job.storage_path).resolve() / job.name / "artifacts" / f"{kind}-{config_hash(job)}-step{step:08d}"


def _durable_result(job: TrainJob, reported: dict, ckpt_dir: Path, ckpt_path: str, labels: list | None) -> TrainResult:
    """The run's result, its final checkpoint's weights copied to an artifact folder that stays
    (checkpoints rotate with keep_last; the registry points at the artifact)."""
    tc = job.train
    metrics = {k: float(v) for k, v in reported.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    step = int(metrics.get("step", tc.steps))
    chash = config_hash(job)
    adapter = tc.finetune != "full"
    artifact = durable_artifact_path(job, step)
    if not artifact.exists():
        tmp = artifact.with_name(artifact.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if adapter:  # peft's adapter files, and the meta with the adapter format
            from app.artifacts import write_meta
            from app.models.lora import ADAPTER_FILES, ADAPTER_FORMAT

            for name in ADAPTER_FILES:
                shutil.copy2(ckpt_dir / ADAPTER_DIR / name, tmp / name)
            _, meta = read_meta(ckpt_dir)
            write_meta(tmp, job, ADAPTER_FORMAT, {k: v for k, v in meta.items() if k not in ("format", "config_hash", "job")})
        else:
            for name in ("model.safetensors", "config.json"):
                shutil.copy2(ckpt_dir / name, tmp / name)
        if labels:  # streamed data: loading the artifact then needs no second pass over the files for its class names
            meta = json.loads((tmp / "config.json").read_text())
            (tmp / "config.json").write_text(json.dumps({**meta, "labels": labels}, indent=2, sort_keys=True))
        os.replace(tmp, artifact)
    return TrainResult(metrics=metrics, checkpoint_path=ckpt_path, artifact_path=str(artifact), step=step, config_hash=chash)


def _streams(job: TrainJob) -> bool:
    """Whether the job's data is streamed through Ray Data (sharded to Ray Train workers)."""
    from app.config.data import FileDataConfig
    from app.data.stream import should_stream

    return isinstance(job.data, FileDataConfig) and should_stream(job.data)


def runs_in_process(job: TrainJob) -> bool:
    """Whether `fit_in_process` can run the job on its own: one worker, and data read into memory."""
    return job.train.num_workers == 1 and not _streams(job)


def fit_in_process(job: TrainJob, teacher_artifact: str | None = None, *, on_report=None,
                   resume_from: str | None = None) -> TrainResult:
    """A run of the same loop in this process, without a TorchTrainer: what a Tune trial with
    `train.num_workers: 1` runs (the trial's process is already a Ray worker holding the run's
    CPUs). With `train.num_workers` N > 1, each of N processes that already share a process group
    of N ranks (as torchrun sets up) calls it and runs its rank. Checkpoints go where Ray Train
    puts them (pipelines/session.py), every rank's part merged into one folder; a re-run resumes
    from the newest; `on_report(metrics, checkpoint path or None)` sees every report as it happens.
    `resume_from` as in `fit`."""
    from pipelines.session import LocalSession, local

    tc = job.train
    if _streams(job):
        raise ValueError(f"{job.name}: fit_in_process runs on data read into memory; streamed data is sharded to Ray Train workers by Ray Data")
    if not dist.is_initialized():
        if tc.num_workers != 1:
            raise ValueError(f"{job.name}: train.num_workers is {tc.num_workers}: fit_in_process runs one worker, or one "
                             "rank in each process of a process group of that size")
        # FSDP and DeepSpeed shard over a process group: here one of one rank, in memory (no
        # port), kept for the process's life (DeepSpeed caches its groups across engines).
        # DeepSpeed also reads the launcher's variables even when handed a group.
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        dist.init_process_group("nccl" if tc.use_gpu and torch.cuda.is_available() else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    elif dist.get_world_size() != tc.num_workers:
        raise ValueError(f"{job.name}: train.num_workers is {tc.num_workers}, but this process is in a process group "
                           f"of {dist.get_world_size()} ranks")
    rank, world = dist.get_rank(), dist.get_world_size()
    session = LocalSession(Path(job.storage_path).resolve() / "train" / job.name, tc.keep_last, tc.use_gpu, on_report,
                           rank=rank, world=world)
    loop_config = {"job": job.model_dump(mode="json"), "teacher_artifact": teacher_artifact, "initial_checkpoint": resume_from,
                   "log_format": env_format(default="text")}
    with local(session):
        train_loop_per_worker(loop_config)
    found = session.checkpoints()
    if not found:
        raise RuntimeError(f"training run {job.name!r} finished without a checkpoint")
    def result() -> TrainResult:
        return _durable_result(job, session.latest_metrics or {}, found[-1], str(found[-1]), None)

    if world == 1:
        return result()
    # rank 0 writes the artifact; the other ranks wait for it, then find it and return the same result
    written = result() if rank == 0 else None
    dist.barrier()
    return written if written is not None else result()
