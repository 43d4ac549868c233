"""What a worker trains, without Ray: the model (with LoRA / QLoRA adapters when
`train.finetune` asks), its AdamW optimizer and the learning-rate schedule.

Kept apart from the Ray Train loop so a single process (a unit test, a benchmark's bare torch
loop, a check on a CUDA machine) builds exactly what a Ray Train worker builds.
"""

from __future__ import annotations

import math

import torch

from app.config.jobs import TrainJob
from app.models import build_model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (Linear, Embedding); none on norms, biases and position tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "pos_emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    """AdamW over the parameters that train (frozen ones, e.g. a LoRA base, are not in it)."""
    return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)


def build_train_model(job: TrainJob, device, labels=None) -> torch.nn.Module:
    """The model a worker trains: built from its section, and with `train.finetune: lora | qlora`
    a PeftModel over the frozen base (qlora: loaded in 4 bits on `device`)."""
    if job.train.finetune == "full":
        return build_model(job.model, labels=labels)
    from app.models.lora import apply_lora, load_qlora_base

    base = load_qlora_base(job, device) if job.train.finetune == "qlora" else build_model(job.model)
    return apply_lora(base, job)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
