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


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated layers as (name, module): FSDP shards each one on its own, and
    pruning's default targets are the Linear weights inside them.

    The built-in models keep them in `blocks`. A `transformers` model lists, in
    `_no_split_modules`, the layer classes that must stay whole on one device (its decoder or
    encoder layer, for some families the embeddings too); transformers and Accelerate wrap FSDP
    units by that same list."""
    if isinstance(model, (GPT, ViT)):
        return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    classes: set[str] = set()
    for m in model.modules():
        classes |= set(getattr(m, "_no_split_modules", None) or ())
    # by the class's ancestry: FSDP2 swaps a sharded module's class for a subclass (FSDPBertLayer)
    blocks = [(n, m) for n, m in model.named_modules() if n and any(c.__name__ in classes for c in type(m).__mro__)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no layer classes (_no_split_modules): no transformer blocks found")
    return blocks


def block_linear_weights(model: nn.Module) -> list[str]:
    """Parameter names of every Linear weight inside the transformer blocks: attention and MLP
    projections; never the embeddings or the output head, which sit outside the blocks."""
    return [f"{name}.{sub}.weight" for name, block in transformer_blocks(model)
            for sub, m in block.named_modules() if sub and isinstance(m, nn.Linear)]


__all__ = ["GPT", "ViT", "block_linear_weights", "build_model", "transformer_blocks"]
