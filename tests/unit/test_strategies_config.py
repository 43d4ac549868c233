"""Strategy configuration: the DeepSpeed config is derived from ours; bad combinations name the key."""

from __future__ import annotations

import pytest

from app.config.base import ConfigError
from app.config.jobs import TrainJob, parse_config
from pipelines.strategies import deepspeed_config
from pipelines.optimization import lr_factor, param_groups

BASE = {"name": "t", "model": {"kind": "gpt"}, "data": {"name": "lm-code"}}


def _job(**train) -> TrainJob:
    return TrainJob.model_validate({**BASE, "train": train})


def test_deepspeed_config_follows_our_config():
    cfg = deepspeed_config(_job(strategy="zero3", precision="bf16", batch_size=6, grad_accum_steps=3,
                                grad_clip=0.5, offload_optimizer=True, offload_params=True))
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["train_micro_batch_size_per_gpu"] == 6 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    fp16 = deepspeed_config(_job(strategy="zero2", precision="fp16", use_gpu=True))
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    assert fp16["zero_optimization"] == {"stage": 2}


@pytest.mark.parametrize("train,key", [
    ({"strategy": "ddp", "offload_optimizer": True}, "train.offload_optimizer"),
    ({"strategy": "zero2", "offload_params": True}, "train.offload_params"),
    ({"strategy": "zero4"}, "train.strategy"),
    ({"strategy": "fsdp", "precision": "fp16"}, "train.precision"),
    ({"pause_at_step": 500, "steps": 100, "warmup_steps": 5}, "train.pause_at_step"),
    ({"grad_accum_steps": 0}, "train.grad_accum_steps"),
])
def test_bad_strategy_settings_name_the_key(train, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config("train", {**BASE, "train": train})


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_factor(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_weight_decay_skips_norms_and_biases():
    from app.models import build_model

    model = build_model(_job().model)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
