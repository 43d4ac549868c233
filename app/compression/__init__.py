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

`hf` models (app/compression/hf_onnx.py does the work): `onnx_fp32` is the export with ONNX
Runtime's transformer fusions applied where the family is a checked one (BERT-shaped
encoders), `onnx_int8` ORT dynamic int8 of that graph, `onnx_int8_static` ORT static int8 of
the plain export calibrated on the user's training texts (feed-forward down-projections kept
fp32); the torch formats work on them as on the built-ins. An `hf` classifier's class labels
travel in each variant's meta.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from app.artifacts import WEIGHT_FILES, class_labels, load_fp32, quantize_dynamic_int8, read_meta, save_half, save_int8, write_meta

log = logging.getLogger(__name__)
CALIBRATION_TEXTS = 128  # training texts the static int8 of an hf model is calibrated on


def _source_extra(src: str | Path) -> dict:
    """What every variant's meta carries from its source: the source path, an hf classifier's labels."""
    job, meta = read_meta(src)
    labels = class_labels(job, meta)
    return {"source": str(src), **({"labels": labels} if labels else {})}


def to_torch_int8(src: str | Path, dst: str | Path) -> Path:
    """fp32 artifact -> torch_int8 artifact."""
    model, job = load_fp32(src)
    return save_int8(dst, quantize_dynamic_int8(model), job, _source_extra(src))


def _hf_to_onnx(src: str | Path, dst: str | Path, fmt: str) -> Path:
    """fp32 `hf` artifact -> an ONNX artifact of format `fmt` (see the module docstring)."""
    import shutil
    import tempfile

    from app.compression import hf_onnx
    from app.data.text import read_splits
    from app.models.hf import load_tokenizer

    model, job = load_fp32(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    out = dst / WEIGHT_FILES[fmt]
    extra = _source_extra(src)
    with tempfile.TemporaryDirectory() as tmp:
        plain = hf_onnx.export_hf_onnx(model, job.model.task, Path(tmp) / "model.onnx")
        graph = plain
        if fmt != "onnx_int8_static" and model.config.model_type in hf_onnx.ORT_MODEL_FAMILIES:
            report = hf_onnx.fuse_hf_onnx(plain, Path(tmp) / "model.fused.onnx", model.config)
            graph, extra["fusions"] = Path(tmp) / "model.fused.onnx", report.matched
        if fmt == "onnx_fp32":
            shutil.copyfile(graph, out)
        elif fmt == "onnx_int8":
            hf_onnx.quantize_dynamic_onnx(graph, out)
        else:
            texts = [ex.text for ex in read_splits(job.data).train[:CALIBRATION_TEXTS]]
            calibration = hf_onnx.TokenizedCalibration(
                load_tokenizer(job.model.path), texts, hf_onnx.onnx_input_names(model), max_length=job.data.max_length)
            hf_onnx.quantize_static_onnx(plain, out, calibration,
                                         nodes_to_exclude=hf_onnx.ffn_down_projections(plain, model.config))
            extra["calibration_texts"] = len(texts)
    write_meta(dst, job, fmt, extra)
    return dst


def export_onnx(src: str | Path, dst: str | Path, opset: int = 17) -> Path:
    """fp32 artifact -> onnx_fp32 artifact (model.onnx, input `input`, output `logits`; an `hf`
    model: its token inputs and task output, fused where ORT knows the family)."""
    from app.data import build_data  # example input of the right shape and dtype

    if read_meta(src)[0].model.kind == "hf":
        return _hf_to_onnx(src, dst, "onnx_fp32")
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


def ort_int8_needs_reduce_range() -> bool:
    """True on x86-64 CPUs without VNNI (AVX2 / AVX-512 only). There ONNX Runtime's int8 MatMul
    multiplies u8 activations by s8 weights with an instruction (vpmaddubsw) that adds pairs of
    products into int16 and can saturate; ORT's quantization guide advises 7-bit weights
    (`reduce_range`) on such CPUs. Measured on the quickstart ViT on an AVX2 machine without VNNI:
    val_accuracy 0.902 with 8-bit per-channel weights, 0.969 (= fp32) with `reduce_range`."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" not in flags and "avx_vnni" not in flags


def to_onnx_int8(src: str | Path, dst: str | Path) -> Path:
    """fp32 artifact -> onnx_int8 artifact (ORT dynamic int8, per-channel weights; 7-bit where
    the CPU's int8 MatMul can saturate, see `ort_int8_needs_reduce_range`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if read_meta(src)[0].model.kind == "hf":
        return _hf_to_onnx(src, dst, "onnx_int8")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".fp32-onnx")
    export_onnx(src, tmp)
    dst.mkdir(parents=True, exist_ok=True)
    # ORT's recommended pre-processing (shape inference + graph optimisation) before quantizing.
    prepped = tmp / "model.prep.onnx"
    quant_pre_process(str(tmp / WEIGHT_FILES["onnx_fp32"]), str(prepped), auto_merge=True)
    reduce_range = ort_int8_needs_reduce_range()
    quantize_dynamic(
        str(prepped), str(dst / WEIGHT_FILES["onnx_int8"]),
        weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
    )
    job, _ = read_meta(tmp)
    write_meta(dst, job, "onnx_int8", {"source": str(src), "reduce_range": reduce_range})
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return dst


def to_onnx_int8_static(src: str | Path, dst: str | Path, calibration_batches: int = 8) -> Path:
    """fp32 artifact -> onnx_int8_static artifact (QDQ; activations calibrated on training batches)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from app.data import build_data

    if read_meta(src)[0].model.kind == "hf":
        return _hf_to_onnx(src, dst, "onnx_int8_static")
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
        return save_half(dst, model, job, fmt, _source_extra(src))
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
