"""LoRA adapters (peft) on an `hf` causal LM: wrap for training, save, load, merge.

`train.finetune: lora` freezes every weight of the base model and adds peft LoRA layers
(`train.lora`: r, alpha, dropout, target_modules); only those train. `qlora` does the same over
a base loaded in 4 bits (NF4, bitsandbytes, CUDA only). The model stays a PeftModel without a
task type, whose forward hands its arguments to the base model unchanged, so the packed-batch
forward of app/models/hf_task.py keeps working (`model(x)` -> logits) and so do transformers'
keyword calls (generation).

An adapter artifact (format `lora_adapter`) is peft's own folder layout, `adapter_config.json`
+ `adapter_model.safetensors`, next to Temper's `config.json` (the job, whose `model.path` is
the base folder). `load_adapter(folder)` gives base + adapter; `merge_adapter` folds the
adapter into the base weights (peft `merge_and_unload`) as a plain fp32 artifact.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from app.models.hf_imports import lean_transformers

ADAPTER_FORMAT = "lora_adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def peft_lora_config(job):
    """peft's LoraConfig from `train.lora`."""
    lean_transformers()
    from peft import LoraConfig

    lc = job.train.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      bias="none", task_type=None)


def load_qlora_base(job, device: torch.device) -> nn.Module:
    """The base causal LM in 4-bit NF4 (bitsandbytes) on `device`, prepared for k-bit training."""
    lean_transformers()
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from app.models.hf import check_folder
    from app.models.hf_task import as_task_model

    if device.type != "cuda":
        raise ValueError(f"train.finetune: qlora needs CUDA; this worker runs on {device.type}")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        check_folder(job.model.path), quantization_config=quant, device_map={"": device.index or 0},
        local_files_only=True, trust_remote_code=False, use_safetensors=True)
    # Non-reentrant activation checkpointing: torch warns that the reentrant default will change.
    return as_task_model(prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False}))


def apply_lora(model: nn.Module, job) -> nn.Module:
    """`model` (base weights frozen) with fresh LoRA adapters; only adapter parameters require grad."""
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, peft_lora_config(job))
    except ValueError as e:  # e.g. "Target modules {'qq_proj'} not found in the base model"
        raise ValueError(f"train.lora.target_modules: {e}") from None
    return peft_model


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def adapter_state(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a (consolidated) state dict of a PeftModel that are adapter weights."""
    names = trainable_names(model)
    return {k: v for k, v in full.items() if k in names}


def save_adapter(folder: str | Path, model: nn.Module, state: dict[str, torch.Tensor]) -> Path:
    """peft's adapter files of `model` (a PeftModel, possibly sharded) with weights `state`."""
    folder = Path(folder)
    model.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model-card stub
    return folder


def count_adapter_params(folder: str | Path) -> int:
    """Parameters in an adapter folder's safetensors file."""
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(Path(folder) / "adapter_model.safetensors")).values())


def load_adapter(folder: str | Path) -> tuple[nn.Module, object]:
    """(base + adapter as a PeftModel in eval mode, the TrainJob) of a `lora_adapter` artifact.

    The base is the job's `model.path` folder (loaded as app.models.build_model does: safetensors,
    no remote code); the adapter's weights come from its safetensors file only."""
    lean_transformers()
    from peft import PeftModel

    from app.artifacts import ArtifactError, local_path, read_meta
    from app.models import build_model

    path = local_path(str(folder))
    job, meta = read_meta(path)
    if meta["format"] != ADAPTER_FORMAT:
        raise ArtifactError(f"{folder} holds format {meta['format']!r}, not {ADAPTER_FORMAT!r}")
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise ArtifactError(f"{folder}: adapter files missing: {', '.join(missing)}")
    base = build_model(job.model)
    model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
    return model.eval(), job


def merge_adapter(src: str | Path, dst: str | Path) -> Path:
    """A torch_fp32 artifact in `dst`: the base weights with the adapter of `src` merged in."""
    from app.artifacts import read_meta, save_fp32

    model, job = load_adapter(src)
    _, meta = read_meta(src)
    merged = model.merge_and_unload()
    return save_fp32(dst, merged, job, {"merged_from": str(src), "step": meta.get("step"), "metrics": meta.get("metrics", {})})
