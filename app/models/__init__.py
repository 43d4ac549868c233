"""Built-in model families, built from their config section."""

from __future__ import annotations

import torch.nn as nn

from app.config import GPTConfig, ViTConfig
from app.models.gpt import GPT
from app.models.vit import ViT


def build_model(cfg: GPTConfig | ViTConfig) -> nn.Module:
    """The model a config section describes (weights freshly initialised)."""
    if isinstance(cfg, GPTConfig):
        return GPT(cfg)
    if isinstance(cfg, ViTConfig):
        return ViT(cfg)
    raise TypeError(f"unknown model config {type(cfg).__name__}")


__all__ = ["GPT", "ViT", "build_model"]
