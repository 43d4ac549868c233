"""ONNX Runtime variants of an `hf` model: export, transformer fusions, int8, and a batched runner.

Every variant is made by ONNX Runtime's or torch's own tools (nothing hand-rolled):

- `export_hf_onnx`: `torch.onnx.export` (the TorchScript-based exporter, opset 17) of the task's
  output with dynamic batch and sequence axes: an embedding model's pooled vector (pooling and
  normalisation inside the graph), a classifier's logits, a causal LM's logits without a cache.
  The model is called through a wrapper that passes keywords, because transformers' forward
  takes more positional parameters than the three inputs. The dynamo exporter also works but
  took 65 s instead of 10 s on all-MiniLM-L6-v2, and its graph clashes with ORT when the output
  is called `embedding` ("Duplicate definition of name"), hence `sentence_embedding`.
- `fuse_hf_onnx`: `onnxruntime.transformers.optimizer.optimize_model` with the model family from
  the config's `model_type`, reporting which fusions matched (an unmatched pattern silently
  leaves the graph as it was, so the counts are the only proof a fusion happened).
- `quantize_dynamic_onnx` / `quantize_static_onnx`: ORT's quantizer, dynamic (weights int8,
  activations quantized per batch at run time) or static (activation ranges calibrated on the
  user's texts through `TokenizedCalibration`). Measured on all-MiniLM-L6-v2, 1 thread, 384
  docstrings, on a loaded 2-core AVX2 machine (so speeds are rough): dynamic int8 with QInt8
  per-channel weights ran at ~1.7-3x fp32 with mean cosine 0.992 and recall@10 0.90; per-tensor
  weights fell to cosine 0.955; QUInt8 weights (sentence-transformers' avx2 preset) kept 0.993
  but ran slower (58 vs 82 texts/s); on the fused graph or the plain export, int8 ran within
  noise of each other. Hence the defaults: dynamic, QInt8, per-channel.
- `quantize_torch_int8`: torch's dynamic int8 of every Linear.
- `OnnxEmbedder`: texts -> embeddings through an ORT session, with texts sorted by token length
  and each batch padded to its own longest text (sorting by length before batching took int8
  all-MiniLM-L6-v2 from 127 to 291 docstrings/s at 1 thread: padding dominates otherwise).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from app.errors import TemperError
from app.models.hf import SentenceEmbedder

log = logging.getLogger(__name__)

OPSET = 17
# The graph's output name per task (see the module docstring for why not `embedding`).
OUTPUT_NAMES = {"embedding": "sentence_embedding", "sequence_classification": "logits", "causal_lm": "logits"}
# transformers `model_type` -> the family name ORT's transformer optimizer knows, for the models
# whose fused graph was checked against torch here: BERT-shaped encoders. Decoders are left
# unfused: the optimizer's gpt2 family on a Llama export fuses a RotaryEmbedding node that
# fails at batch > 1 ("position_ids dimension 0 should be of size batch_size, got 1").
ORT_MODEL_FAMILIES = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert", "electra": "bert",
}


class HFCompressionError(TemperError, ValueError):
    """An `hf` model or graph that cannot be compressed as asked (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Export


class _KeywordForward(nn.Module):
    """Calls the wrapped model with keywords and returns the one tensor the task exports."""

    def __init__(self, model: nn.Module, task: str, input_names: list[str]):
        super().__init__()
        self.model = model
        self.task = task
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs))
        if self.task == "embedding":
            return self.model(**kwargs)  # (B, H), pooled by SentenceEmbedder
        if self.task == "causal_lm":
            return self.model(**kwargs, use_cache=False).logits  # (B, T, V)
        return self.model(**kwargs).logits  # (B, num_labels)


def onnx_input_names(model: nn.Module) -> list[str]:
    """The graph's inputs: ids and mask, plus token type ids where the model takes them (BERT)."""
    core = model.encoder if isinstance(model, SentenceEmbedder) else model
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(core.forward).parameters:
        names.append("token_type_ids")
    return names


def example_inputs(input_names: list[str], vocab_size: int, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """A (batch, seq) example with the last row padded, so the mask path is traced with real work."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, vocab_size), (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(batch, seq, dtype=torch.long)}
    return {name: out[name] for name in input_names}


def _causal_padding_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None,
                         attention_mask=None, **kwargs) -> torch.Tensor:
    """(B, 1, Q, KV) bool mask, causal and padding, from tensors only (no cache: KV positions are
    the query positions), so the traced graph keeps its batch and sequence axes dynamic."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is not causal_mask_function or kv_offset:
        raise HFCompressionError(
            "ONNX export of a causal LM supports plain causal attention without a cache only "
            "(no sliding-window or chunked attention)"
        )
    causal = cache_position[None, :] <= cache_position[:, None]  # (Q, KV)
    mask = causal[None, None]  # (1, 1, Q, KV)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, Q, KV)
    return mask


@contextmanager
def _traceable_sdpa_masks():
    """Swap transformers' SDPA mask builder for `_causal_padding_mask` while exporting.

    transformers 4.57 (with torch >= 2.6) builds a decoder's 4-D mask with `torch.vmap`, which
    the TorchScript tracer cannot follow (`RuntimeError: unordered_map::at`), and its variant for
    older torch bakes the example's length into the graph as a constant. The dynamo exporter
    handles the vmap but took 127 s for a 2-layer Llama here. Restored on exit."""
    from transformers import masking_utils

    mapping = masking_utils.AttentionMaskInterface._global_mapping
    saved = mapping.get("sdpa")
    mapping["sdpa"] = _causal_padding_mask
    try:
        yield
    finally:
        mapping["sdpa"] = saved


def export_hf_onnx(model: nn.Module, task: str, path: str | Path, *, opset: int = OPSET) -> Path:
    """`model` (as `app.models.hf.load_hf_model` returns it for `task`) -> one ONNX file at `path`."""
    if task not in OUTPUT_NAMES:
        raise HFCompressionError(f"task {task!r} is not one of {', '.join(OUTPUT_NAMES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = onnx_input_names(model)
    output = OUTPUT_NAMES[task]
    axes = {name: {0: "batch", 1: "seq"} for name in names}
    axes[output] = {0: "batch", 1: "seq"} if task == "causal_lm" else {0: "batch"}
    wrapper = _KeywordForward(model.eval(), task, names).eval()
    example = example_inputs(names, model.config.vocab_size)
    with warnings.catch_warnings(), torch.no_grad(), _traceable_sdpa_masks():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes
        torch.onnx.export(
            wrapper, tuple(example.values()), str(path), input_names=names, output_names=[output],
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )
    return path


# ---------------------------------------------------------------------------------------------
# Fusions


@dataclass(frozen=True)
class FusionReport:
    """What ORT's transformer optimizer did: the family it used and each fused op's count."""

    family: str
    fused: dict[str, int]

    @property
    def matched(self) -> dict[str, int]:
        return {op: n for op, n in self.fused.items() if n}


def ort_family(model_type: str) -> str:
    try:
        return ORT_MODEL_FAMILIES[model_type]
    except KeyError:
        raise HFCompressionError(
            f"model_type {model_type!r} has no checked ONNX Runtime fusion family "
            f"(checked: {', '.join(sorted(ORT_MODEL_FAMILIES))}); use the unfused export"
        ) from None


def fuse_hf_onnx(src: str | Path, dst: str | Path, config, *, opt_level: int = 0) -> FusionReport:
    """Fuse attention / LayerNorm / GELU patterns of the graph at `src` into ORT's contrib ops.

    `config` is the model's transformers config (family, heads, hidden size). `opt_level=0` runs
    only the Python pattern fusions and leaves the rest to the session's own optimizer at load,
    so the saved graph stays free of CPU-specific kernels and quantizable.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    family = ort_family(config.model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(
            str(src), model_type=family, num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size, opt_level=opt_level, use_gpu=False,
        )
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    opt.save_model_to_file(str(dst))
    report = FusionReport(family=family, fused={k: int(v) for k, v in opt.get_fused_operator_statistics().items()})
    log.info("ORT fusions (%s): %s", family, report.matched or "none matched")
    return report


# ---------------------------------------------------------------------------------------------
# Quantization


def _has_contrib_ops(path: str | Path) -> bool:
    import onnx

    return any(node.domain == "com.microsoft" for node in onnx.load(str(path), load_external_data=False).graph.node)


def quantize_dynamic_onnx(
    src: str | Path, dst: str | Path, *, per_channel: bool = True, weight_type: str = "QInt8",
    op_types: list[str] | None = None,
) -> Path:
    """ORT dynamic int8 (QOperator format: MatMulInteger / DynamicQuantizeLinear; ORT has no
    dynamic QDQ). A fused graph holds contrib ops whose output types ORT's shape inference does
    not know; `DefaultTensorType` FLOAT tells the quantizer what they are."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    extra = {"DefaultTensorType": TensorProto.FLOAT} if _has_contrib_ops(src) else {}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(src), str(dst), per_channel=per_channel, weight_type=QuantType[weight_type],
        op_types_to_quantize=op_types, extra_options=extra,
    )
    return Path(dst)


class TokenizedCalibration:
    """Calibration data for ORT's static quantizer (its `get_next` / `rewind` reader protocol):
    the user's texts as tokenized batches, each padded to its own longest text."""

    def __init__(self, tokenizer, texts: list[str], input_names: list[str], *, max_length: int, batch_size: int = 16):
        self.batches = [
            _pad_batch(tokenizer, _token_ids(tokenizer, texts[i : i + batch_size], max_length), input_names)
            for i in range(0, len(texts), batch_size)
        ]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.batches):
            return None
        self._next += 1
        return self.batches[self._next - 1]

    def rewind(self) -> None:
        self._next = 0


def quantize_static_onnx(
    src: str | Path, dst: str | Path, calibration: TokenizedCalibration, *, quant_format: str = "QDQ",
    per_channel: bool = True, op_types: Iterable[str] = ("MatMul", "Gemm"), nodes_to_exclude: Iterable[str] = (),
) -> Path:
    """ORT static int8: weights int8 (per-channel), activations uint8 with ranges from MinMax
    calibration on `calibration`. Only MatMul / Gemm by default: norms and softmax stay fp32;
    `nodes_to_exclude` (e.g. `ffn_down_projections`) stay fp32 too.

    On all-MiniLM-L6-v2 (docstrings for calibration) quantizing every MatMul kept mean cosine
    only 0.93 to fp32 (QDQ or QOperator alike; dynamic int8: 0.992); leaving the 6 feed-forward
    down-projections in fp32 gave 0.993 and recall@10 0.91. MinMax is the only calibration that
    works here: ORT's histogram calibrators (Percentile, Entropy) stack every batch's
    activations into one array, and these batches differ in length."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):  # ORT checks the base class
        def get_next(self):
            return calibration.get_next()

        def rewind(self):
            calibration.rewind()

    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    calibration.rewind()
    quantize_static(
        str(src), str(dst), _Reader(), quant_format=QuantFormat[quant_format], per_channel=per_channel,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types),
        nodes_to_exclude=list(nodes_to_exclude),
    )
    return Path(dst)


def ffn_down_projections(path: str | Path, config) -> list[str]:
    """Names of the MatMuls whose weight is (intermediate_size, hidden_size): each block's
    feed-forward down-projection. Its input, the activation after GELU / SwiGLU, has outlier
    channels that a single static int8 range per tensor cannot hold."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    down = [config.intermediate_size, config.hidden_size]
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(shapes.get(i) == down for i in n.input)]


def quantize_torch_int8(model: nn.Module) -> nn.Module:
    """torch dynamic int8 of every Linear (per-channel weights), on a copy."""
    from app.artifacts import quantize_dynamic_int8

    return quantize_dynamic_int8(model)


# ---------------------------------------------------------------------------------------------
# Running


def ort_session(path: str | Path, *, threads: int = 1):
    """A CPU InferenceSession with `threads` intra-op threads and full graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]


def _pad_batch(tokenizer, ids: list[list[int]], input_names: list[str]) -> dict[str, np.ndarray]:
    """Right-pad `ids` to the longest in the list: ids, mask and (zero) token types, int64."""
    width = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = np.full((len(ids), width), pad, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    out = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
    return {name: out[name] for name in input_names}


def length_sorted_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Indices grouped into batches of similar length (longest first), so padding stays small: at
    most `batch_size` texts, and with `max_tokens`, at most that many padded tokens (texts x the
    batch's longest), so long texts go in smaller batches."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if max_tokens is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches, start = [], 0
    while start < len(order):
        # the first (longest) text sets the padded length; one text per batch at least
        size = max(1, min(batch_size, max_tokens // max(1, lengths[order[start]])))
        batches.append(order[start : start + size])
        start += size
    return batches


class OnnxEmbedder:
    """Texts -> embeddings (N, H) through an exported embedding graph, in the texts' order."""

    def __init__(self, path: str | Path, tokenizer, *, max_length: int, threads: int = 1, batch_size: int = 32):
        self.session = ort_session(path, threads=threads)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], batch)[0]

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            raise HFCompressionError("no texts to embed")
        ids = _token_ids(self.tokenizer, texts, self.max_length)
        out: np.ndarray | None = None
        for idx in length_sorted_batches([len(row) for row in ids], self.batch_size):
            vectors = self.run(_pad_batch(self.tokenizer, [ids[i] for i in idx], self.input_names))
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=vectors.dtype)
            out[idx] = vectors
        return out


def onnx_forward(session, tokenizer, texts: list[str], *, max_length: int) -> np.ndarray:
    """One padded batch of `texts` through a session: its single output (logits or embeddings)."""
    names = [i.name for i in session.get_inputs()]
    return session.run(None, _pad_batch(tokenizer, _token_ids(tokenizer, texts, max_length), names))[0]


# ---------------------------------------------------------------------------------------------
# All variants at once


@dataclass
class HFVariants:
    """The files `compress_hf` wrote (None where a variant was not asked for) and the fusions."""

    onnx_fp32: Path
    onnx_fused_fp32: Path | None = None
    onnx_int8: Path | None = None
    onnx_int8_static: Path | None = None
    fusions: FusionReport | None = None


def compress_hf(
    model: nn.Module, task: str, out_dir: str | Path, *, fuse: bool = True, dynamic_int8: bool = True,
    calibration: TokenizedCalibration | None = None, per_channel: bool = True,
    on_step: Callable[[str], None] = lambda step: None,
) -> HFVariants:
    """Export `model`, then fuse (BERT-shaped encoders only, see ORT_MODEL_FAMILIES), then
    quantize: dynamic int8 of the fused graph when fusing, else of the plain export; static int8
    when `calibration` is given (always from the plain export, since the static quantizer's
    shape inference does not know the fused contrib ops), its feed-forward down-projections
    kept fp32. torch int8 needs no file: `quantize_torch_int8(model)`."""
    out = Path(out_dir)
    on_step("export")
    variants = HFVariants(onnx_fp32=export_hf_onnx(model, task, out / "model.onnx"))
    source = variants.onnx_fp32
    if fuse and model.config.model_type not in ORT_MODEL_FAMILIES:
        log.info("no ORT fusions for model_type %r (checked families: %s): quantizing the plain export",
                 model.config.model_type, ", ".join(sorted(ORT_MODEL_FAMILIES)))
    elif fuse:
        on_step("fuse")
        variants.fusions = fuse_hf_onnx(variants.onnx_fp32, out / "model.fused.onnx", model.config)
        variants.onnx_fused_fp32 = source = out / "model.fused.onnx"
    if dynamic_int8:
        on_step("dynamic int8")
        variants.onnx_int8 = quantize_dynamic_onnx(source, out / "model.int8.onnx", per_channel=per_channel)
    if calibration is not None:
        on_step("static int8")
        variants.onnx_int8_static = quantize_static_onnx(
            variants.onnx_fp32, out / "model.int8-static.onnx", calibration, per_channel=per_channel,
            nodes_to_exclude=ffn_down_projections(variants.onnx_fp32, model.config),
        )
    return variants
