"""Model families, built from their config section: the built-in `gpt` and `vit`, and `hf`
(a `transformers` model from a local folder, packed-batch callable: see app/models/hf_task.py)."""

from __future__ import annotations

import torch.nn as nn

from app.config.model import GPTConfig, HFModelConfig, ViTConfig
from app.models.gpt import GPT
from app.models.vit import ViT


def build_model(cfg: GPTConfig | ViTConfig | HFModelConfig, labels: list[str] | None = None) -> nn.Module:
    """The model a config section describes: built-ins freshly initialised, `hf` loaded from its
    folder. `labels`: the class names of the data, for an `hf` sequence_classification model
    (a folder without a head gets a fresh one with these outputs)."""
    if isinstance(cfg, GPTConfig):
        return GPT(cfg)
    if isinstance(cfg, ViTConfig):
        return ViT(cfg)
    if isinstance(cfg, HFModelConfig):
        from app.models.hf import load_hf_model
        from app.models.hf_task import as_task_model

        model = load_hf_model(
            cfg.path,
            cfg.task,
            label_names=labels if cfg.task == "sequence_classification" else None,
            pooling=cfg.pooling,
            normalize=cfg.normalize,
        )
        return as_task_model(model)
    raise TypeError(f"unknown model config {type(cfg).__name__}")


__all__ = ["GPT", "ViT", "build_model"]
