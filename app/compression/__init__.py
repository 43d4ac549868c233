"""Post-training compression as plain functions: each takes an fp32 artifact folder and writes a
new artifact folder of another format. Evaluation and registration live in
`pipelines/compress.py`; these functions only transform.

- `torch_int8`: dynamic int8 quantization of every nn.Linear with per-channel weight scales
  (`torch.ao.quantization.quantize_dynamic`; still present and the fastest CPU path in torch
  2.13, torchao 0.18's eager `quantize_` was ~10x slower on CPU).
- `onnx_fp32`: ONNX export (TorchScript-based exporter, one self-contained file, dynamic batch
  and sequence axes) run by ONNX Runtime.
- `onnx_int8`: ONNX Runtime dynamic int8 quantization of the exported graph (per-channel).
- `onnx_int8_static`: ONNX Runtime static int8 in QDQ format: weights per-channel, activation
  ranges calibrated on training batches, MatMul/Gemm only (norms and softmax stay fp32).
  torch.ao's eager static int8 needs QuantStub/DeQuantStub around every non-Linear op (RMSNorm,
  SDPA, RoPE), which has no quantized kernel: the static path here is ORT's.
- `torch_bf16` / `torch_fp16`: weights cast to half precision for GPU serving.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from app.artifacts import WEIGHT_FILES, load_fp32, quantize_dynamic_int8, save_half, save_int8, write_meta

log = logging.getLogger(__name__)


def to_torch_int8(src: str | Path, dst: str | Path) -> Path:
    """fp32 artifact -> torch_int8 artifact."""
    model, job = load_fp32(src)
    return save_int8(dst, quantize_dynamic_int8(model), job, {"source": str(src)})


def export_onnx(src: str | Path, dst: str | Path, opset: int = 17) -> Path:
    """fp32 artifact -> onnx_fp32 artifact (model.onnx, input `input`, output `logits`)."""
    from app.data import build_data  # example input of the right shape and dtype

    model, job = load_fp32(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    example = build_data(job.data, job.model).example_input(2)
    if job.model.kind == "gpt":
        axes = {"input": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    else:
        axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(dst / WEIGHT_FILES["onnx_fp32"]),
            input_names=["input"], output_names=["logits"], dynamic_axes=axes,
            opset_version=opset, dynamo=False,
        )
    write_meta(dst, job, "onnx_fp32", {"source": str(src), "opset": opset})
    return dst


def to_onnx_int8(src: str | Path, dst: str | Path) -> Path:
    """fp32 artifact -> onnx_int8 artifact (ORT dynamic int8, per-channel weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from app.artifacts import read_meta

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".fp32-onnx")
    export_onnx(src, tmp)
    dst.mkdir(parents=True, exist_ok=True)
    # ORT's recommended pre-processing (shape inference + graph optimisation) before quantizing.
    prepped = tmp / "model.prep.onnx"
    quant_pre_process(str(tmp / WEIGHT_FILES["onnx_fp32"]), str(prepped), auto_merge=True)
    quantize_dynamic(
        str(prepped), str(dst / WEIGHT_FILES["onnx_int8"]),
        weight_type=QuantType.QInt8, per_channel=True,
    )
    job, _ = read_meta(tmp)
    write_meta(dst, job, "onnx_int8", {"source": str(src)})
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return dst


def to_onnx_int8_static(src: str | Path, dst: str | Path, calibration_batches: int = 8) -> Path:
    """fp32 artifact -> onnx_int8_static artifact (QDQ; activations calibrated on training batches)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from app.artifacts import read_meta
    from app.data import build_data

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".fp32-onnx")
    export_onnx(src, tmp)
    job, _ = read_meta(tmp)
    data = build_data(job.data, job.model)
    feeds = [{"input": data.train_batch(job.train.seed, i, 0, 32)[0].numpy()} for i in range(calibration_batches)]

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    prepped = tmp / "model.prep.onnx"
    quant_pre_process(str(tmp / WEIGHT_FILES["onnx_fp32"]), str(prepped), auto_merge=True)
    dst.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(prepped), str(dst / WEIGHT_FILES["onnx_int8_static"]), Batches(),
        quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"],
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
    )
    write_meta(dst, job, "onnx_int8_static", {"source": str(src), "calibration_batches": calibration_batches})
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return dst


def to_half(fmt: str):
    def convert(src: str | Path, dst: str | Path) -> Path:
        model, job = load_fp32(src)
        return save_half(dst, model, job, fmt, {"source": str(src)})
    convert.__doc__ = f"fp32 artifact -> {fmt} artifact"
    return convert


METHODS = {
    "torch_int8": to_torch_int8,
    "onnx_fp32": export_onnx,
    "onnx_int8": to_onnx_int8,
    "onnx_int8_static": to_onnx_int8_static,
    "torch_bf16": to_half("torch_bf16"),
    "torch_fp16": to_half("torch_fp16"),
}
