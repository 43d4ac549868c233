"""The artifact formats a registered version can have: the one list that the config (compress
methods, serving backends), the artifact writer and the inference loaders all read."""

from __future__ import annotations

import typing
from typing import Literal

ArtifactFormat = Literal["torch_fp32", "torch_bf16", "torch_fp16", "torch_int8", "onnx_fp32", "onnx_int8", "onnx_int8_static"]
"""Every format; a trained version is `torch_fp32`, compression produces the others."""

FORMATS: tuple[str, ...] = typing.get_args(ArtifactFormat)

COMPRESSED_FORMATS: tuple[str, ...] = tuple(f for f in FORMATS if f != "torch_fp32")
"""What `compress` can produce from a trained version."""

ONNX_FORMATS: tuple[str, ...] = tuple(f for f in FORMATS if f.startswith("onnx_"))
"""Formats served by ONNX Runtime from a `model.onnx` file."""

WEIGHT_FILES: dict[str, str] = {
    fmt: "model.onnx" if fmt in ONNX_FORMATS else "model_int8.safetensors" if fmt == "torch_int8" else "model.safetensors"
    for fmt in FORMATS
}
"""The file an artifact folder of each format holds its weights in (next to its config.json)."""

CompressMethod = Literal[COMPRESSED_FORMATS]  # type: ignore[valid-type]
