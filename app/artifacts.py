"""Model artifacts on disk: what a registry version's `artifact_uri` points at.

An artifact is a folder holding `config.json` (the resolved TrainJob that built the model,
its hash, and the artifact format) and one weights file:

| format       | file                      | content                                              |
|--------------|---------------------------|------------------------------------------------------|
| torch_fp32   | model.safetensors         | full fp32 state dict                                 |
| torch_int8   | model_int8.safetensors    | int8 Linear weights + per-channel scales/zero points, |
|              |                           | other tensors fp32 (dynamic int8 quantization)       |
| onnx_fp32    | model.onnx                | ONNX graph with weights inside (ONNX Runtime)        |
| onnx_int8    | model.onnx                | ORT dynamic int8 (QDQ-free integer ops)              |
| onnx_int8_static | model.onnx            | ORT static int8 (QDQ, activation ranges calibrated)  |
| torch_bf16 / torch_fp16 | model.safetensors | weights cast to half precision (GPU serving)     |

Weights are never pickled: safetensors or ONNX protobuf only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from app.config.base import config_hash
from app.errors import TemperError
from app.config.formats import WEIGHT_FILES
from app.config.jobs import TrainJob
from app.config.registry import redact_secrets
from app.models import build_model

HALF_DTYPES = {"torch_bf16": torch.bfloat16, "torch_fp16": torch.float16}


class ArtifactError(TemperError, ValueError):
    """An artifact folder that is missing, incomplete or of another format."""


class UnsafeCheckpointError(ArtifactError):
    """A checkpoint file whose unpickling would call something other than state classes."""


def refuse_unsafe_pickles(folder: Path, allowed: frozenset[str]) -> None:
    """Refuse every torch-saved file under `folder` whose pickle names a global beyond what torch's
    `weights_only` loader accepts and the `allowed` names (module.qualname). Only the pickle's
    opcodes are read (torch.serialization.get_unsafe_globals_in_checkpoint): nothing in the file
    runs. For files a library unpickles with `weights_only=False` (DeepSpeed's checkpoint engine
    does), so that a crafted file cannot run code on resume."""
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in (".pt", ".pth", ".bin")):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (ValueError, RuntimeError) as err:  # not torch.save's zip format: a bare pickle
            raise UnsafeCheckpointError(f"{path}: refused, not a torch.save checkpoint ({err})") from None
        unsafe = sorted(set(found) - allowed)
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path}: refused: unpickling it would call {', '.join(unsafe)}, which is not model or "
                "optimizer state; the file was not loaded (was the checkpoint folder written by someone else?)"
            )


def _onnx_tensors(graph) -> list:
    """Every TensorProto a graph holds: initializers, sparse initializers' values and indices, and
    tensor attributes of nodes, in subgraphs (If / Loop / Scan bodies) too."""
    found = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        found += [sparse.values, sparse.indices]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                found.append(attr.t)
            found += list(attr.tensors)
            if attr.HasField("g"):
                found += _onnx_tensors(attr.g)
            for sub in attr.graphs:
                found += _onnx_tensors(sub)
    return found


def refuse_outside_external_data(path: str | Path) -> None:
    """Refuse an ONNX file whose tensors read external data from outside the file's own folder.

    ONNX stores large weights in side files named by a `location` string; ONNX Runtime opens
    whatever that names, so a crafted model could point at `../../etc/shadow` or an absolute path
    and carry another file's bytes into its weights (and so into the model's outputs). Only a
    relative location that stays inside the artifact folder is accepted. The graph is read
    without its external data (`load_external_data=False`), so nothing is opened to check.
    """
    import onnx

    path = Path(path)
    folder = path.parent.resolve()
    model = onnx.load(str(path), load_external_data=False)
    for tensor in _onnx_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise ArtifactError(
                f"{path}: refused: tensor {tensor.name!r} reads external data from {location!r}, outside the "
                f"artifact folder {folder}; the model was not loaded"
            )


def local_path(artifact_uri: str) -> Path:
    """The local folder of an artifact URI (`file://` or a plain path)."""
    path = artifact_uri.removeprefix("file://")
    if "://" in path:
        raise ArtifactError(f"artifact_uri {artifact_uri!r}: only local paths are supported for loading here")
    return Path(path)


def write_meta(folder: Path, job: TrainJob, fmt: str, extra: dict[str, Any] | None = None) -> None:
    meta = {
        "format": fmt,
        "config_hash": config_hash(job),
        "job": redact_secrets(job.model_dump(mode="json")),
        **(extra or {}),
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(folder: str | Path) -> tuple[TrainJob, dict[str, Any]]:
    """(the TrainJob that built the model, the whole meta dict) of an artifact folder."""
    path = local_path(str(folder)) / "config.json"
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: not a Temper model artifact")
    meta = json.loads(path.read_text())
    return TrainJob.model_validate(meta["job"]), meta


def save_fp32(folder: str | Path, model: nn.Module | dict[str, torch.Tensor], job: TrainJob,
              extra: dict[str, Any] | None = None) -> Path:
    """Write model.safetensors (from a module or a full state dict) + config.json; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(state, str(folder / WEIGHT_FILES["torch_fp32"]))
    write_meta(folder, job, "torch_fp32", extra)
    return folder


def class_labels(job: TrainJob, meta: dict[str, Any]) -> list[str] | None:
    """The class names of an `hf` sequence_classification artifact, in id order: the meta's
    `labels` when written there, else the data section's `labels`, else the labels the training
    files give (read again: the same sorted labels seen in train that training used)."""
    if job.model.kind != "hf" or job.model.task != "sequence_classification":
        return None
    if meta.get("labels"):
        return list(meta["labels"])
    if job.data.labels:
        return list(job.data.labels)
    from app.data.text import read_splits

    return read_splits(job.data).labels


def _build(job: TrainJob, meta: dict[str, Any]) -> nn.Module:
    """The untrained model of an artifact (an `hf` classifier with its class labels)."""
    return build_model(job.model, labels=class_labels(job, meta))


def load_fp32(folder: str | Path) -> tuple[nn.Module, TrainJob]:
    """The fp32 model of a torch_fp32 artifact, in eval mode."""
    job, meta = read_meta(folder)
    if meta["format"] != "torch_fp32":
        raise ArtifactError(f"{folder} holds format {meta['format']!r}, not 'torch_fp32'")
    model = _build(job, meta)
    model.load_state_dict(load_file(str(local_path(str(folder)) / WEIGHT_FILES["torch_fp32"])), strict=True)
    return model.eval(), job


# ----------------------------------------------------------------------------- half precision


def save_half(folder: str | Path, model: nn.Module, job: TrainJob, fmt: str, extra: dict[str, Any] | None = None) -> Path:
    """Weights cast to bf16/fp16 (half the bytes; for GPU serving, where half-precision matmuls are fast)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = HALF_DTYPES[fmt]
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()},
              str(folder / WEIGHT_FILES[fmt]))
    write_meta(folder, job, fmt, extra)
    return folder


def load_half(folder: str | Path) -> tuple[nn.Module, TrainJob, torch.dtype]:
    job, meta = read_meta(folder)
    if meta["format"] not in HALF_DTYPES:
        raise ArtifactError(f"{folder} holds format {meta['format']!r}, not torch_bf16/torch_fp16")
    dtype = HALF_DTYPES[meta["format"]]
    model = _build(job, meta).to(dtype)
    model.load_state_dict(load_file(str(local_path(str(folder)) / WEIGHT_FILES[meta["format"]])), strict=True)
    return model.eval(), job, dtype


# ----------------------------------------------------------------------------- int8


def _dynamic_linear_cls():
    return torch.ao.nn.quantized.dynamic.Linear


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every nn.Linear (per-channel weights), on a copy."""
    import copy
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, but still the fast CPU path in 2.13.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def save_int8(folder: str | Path, qmodel: nn.Module, job: TrainJob, extra: dict[str, Any] | None = None) -> Path:
    """Write a dynamically quantized model as safetensors (int8 weights, scales, zero points)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    qlinear = _dynamic_linear_cls()
    linear_names = set()
    for name, mod in qmodel.named_modules():
        if isinstance(mod, qlinear):
            w, b = mod._packed_params._weight_bias()
            linear_names.add(name)
            tensors[f"{name}.weight_int8"] = w.int_repr().contiguous()
            tensors[f"{name}.weight_scale"] = w.q_per_channel_scales().to(torch.float64).contiguous()
            tensors[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().to(torch.int64).contiguous()
            if b is not None:
                tensors[f"{name}.bias"] = b.detach().float().contiguous()
    for key, value in qmodel.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in linear_names or key.endswith("_packed_params") or not isinstance(value, torch.Tensor):
            continue
        if ".".join(key.split(".")[:-2]) in linear_names:  # _packed_params._packed_params
            continue
        tensors[key] = value.detach().float().contiguous()
    save_file(tensors, str(folder / WEIGHT_FILES["torch_int8"]))
    write_meta(folder, job, "torch_int8", extra)
    return folder


def load_int8(folder: str | Path) -> tuple[nn.Module, TrainJob]:
    """Rebuild the dynamic int8 model of a torch_int8 artifact (exact stored int8 values)."""
    job, meta = read_meta(folder)
    if meta["format"] != "torch_int8":
        raise ArtifactError(f"{folder} holds format {meta['format']!r}, not 'torch_int8'")
    tensors = load_file(str(local_path(str(folder)) / WEIGHT_FILES["torch_int8"]))
    float_model = _build(job, meta).eval()
    linear_names = {n for n, m in float_model.named_modules() if isinstance(m, nn.Linear)}
    plain = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in linear_names}
    missing, unexpected = float_model.load_state_dict(plain, strict=False)
    bad_missing = [k for k in missing if k.rsplit(".", 1)[0] not in linear_names]
    if bad_missing or unexpected:
        raise ArtifactError(f"{folder}: int8 weights do not fit the model (missing {bad_missing}, unexpected {unexpected})")
    qmodel = quantize_dynamic_int8(float_model)
    for name, mod in qmodel.named_modules():
        if isinstance(mod, _dynamic_linear_cls()):
            qweight = torch._make_per_channel_quantized_tensor(
                tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_zero_point"], 0
            )
            mod.set_weight_bias(qweight, tensors.get(f"{name}.bias"))
    return qmodel.eval(), job


def artifact_size_bytes(folder: str | Path) -> int:
    """Bytes of the weights file(s) of an artifact (config.json excluded)."""
    _, meta = read_meta(folder)
    path = local_path(str(folder))
    main = path / WEIGHT_FILES[meta["format"]]
    return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith(main.name))
