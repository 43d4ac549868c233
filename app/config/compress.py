"""The `compress` section: post-training compression of a registered version."""

from __future__ import annotations

from pydantic import Field

from app.config.base import Section
from app.config.formats import CompressMethod


class CompressConfig(Section):
    """Post-training compression of a registered version; each method becomes a new version."""

    methods: list[CompressMethod] = Field(default_factory=lambda: ["torch_int8", "onnx_int8"], min_length=1)
    """Variants to produce: `torch_int8` (dynamic int8 Linear layers), `onnx_fp32` (ONNX Runtime), `onnx_int8` (ORT dynamic int8), `onnx_int8_static` (ORT static QDQ int8, calibrated), `torch_bf16` / `torch_fp16` (half-precision weights for GPU serving)."""
    eval_batches: int = Field(16, ge=1)
    """Validation batches used to score each variant (and the source, for the delta)."""
    eval_batch_size: int = Field(64, ge=1)
    """Samples per evaluation batch."""
    latency_iters: int = Field(50, ge=1)
    """Timed batch-1 forward passes per variant (after warmup) for the latency metric."""
    max_quality_drop: float = Field(0.05, ge=0)
    """A variant whose relative quality drop vs its source exceeds this is still registered but tagged `rejected`."""
