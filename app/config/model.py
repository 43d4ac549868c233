"""The `model` section, chosen by `kind`: the built-in architectures (`gpt`, `vit`) or a Hugging
Face `transformers` model from a local folder (`hf`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from app.config.base import Section


BUILD_FILE = "temper-build.json"
"""Written into a folder `model.build` made: the architecture, tokenizer and pre-training it came from."""


class GPTConfig(Section):
    """A byte-level GPT-style decoder (RoPE, RMSNorm, SwiGLU, SDPA attention)."""

    kind: Literal["gpt"] = "gpt"
    """Model family; `gpt` pairs with the `lm-code` dataset."""
    vocab_size: int = Field(256, ge=2)
    """Vocabulary size; 256 for byte-level text."""
    block_size: int = Field(128, ge=8, le=8192)
    """Context length in tokens (sequence length used for training and the serving cap)."""
    n_layer: int = Field(4, ge=1, le=64)
    """Number of transformer blocks."""
    n_head: int = Field(4, ge=1)
    """Attention heads per block; must divide `d_model`."""
    d_model: int = Field(128, ge=8)
    """Residual stream width."""
    ffn_mult: float = Field(2.75, gt=0)
    """SwiGLU hidden width as a multiple of `d_model` (rounded up to a multiple of 8)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention output and MLP output during training."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base frequency."""
    use_flash_attn: bool = True
    """Use flash-attn when it is importable and the model runs on CUDA in fp16/bf16; SDPA otherwise."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "GPTConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"model.n_head ({self.n_head}) must divide model.d_model ({self.d_model})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("model.d_model / model.n_head must be even for RoPE")
        return self


class ViTConfig(Section):
    """A small vision transformer for 8x8 single-channel images (scikit-learn digits)."""

    kind: Literal["vit"] = "vit"
    """Model family; `vit` pairs with the `digits` dataset."""
    image_size: int = Field(8, ge=2)
    """Side of the square input image in pixels."""
    patch_size: int = Field(2, ge=1)
    """Side of a square patch; must divide `image_size`."""
    in_channels: int = Field(1, ge=1)
    """Input channels."""
    num_classes: int = Field(10, ge=2)
    """Number of output classes."""
    n_layer: int = Field(2, ge=1, le=32)
    """Number of transformer blocks."""
    n_head: int = Field(4, ge=1)
    """Attention heads per block; must divide `d_model`."""
    d_model: int = Field(64, ge=8)
    """Token width."""
    ffn_mult: float = Field(2.0, gt=0)
    """MLP hidden width as a multiple of `d_model`."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout during training."""

    @model_validator(mode="after")
    def _shapes(self) -> "ViTConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"model.patch_size ({self.patch_size}) must divide model.image_size ({self.image_size})")
        if self.d_model % self.n_head:
            raise ValueError(f"model.n_head ({self.n_head}) must divide model.d_model ({self.d_model})")
        return self


class PretrainConfig(Section):
    """Next-token training of a freshly built model on the `lm-code` text (the Python standard library's own `.py` files, cut into chunks), before any job uses it."""

    max_bytes: int = Field(2_000_000, ge=10_000)
    """Cap on the standard-library bytes read (files in sorted path order)."""
    steps: int = Field(300, ge=0)
    """Optimizer steps (0: the random weights as they are)."""
    batch_size: int = Field(16, ge=1)
    """Chunks per step."""
    max_length: int = Field(128, ge=8)
    """Tokens per chunk."""
    lr: float = Field(3e-3, gt=0.0)
    """Peak learning rate (AdamW, warmup then cosine decay)."""
    seed: int = 0
    """Seed of the weights' initialisation and of the batches."""


class HFBuildConfig(Section):
    """`model.path` made on first use instead of given: a causal LM of `architecture` with random weights and a byte-level BPE tokenizer trained here, pre-trained briefly (`pretrain`), saved as a transformers folder (safetensors)."""

    architecture: dict[str, Any]
    """transformers config keys, with `model_type` (e.g. `{model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}`); `vocab_size` and the special token ids come from the tokenizer."""
    tokenizer_vocab_size: int = Field(1024, ge=300, le=65536)
    """Byte-level BPE vocabulary size, trained on the pre-training text and the job's data file."""
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    """Pre-training on the standard library's code, in this process (one worker, Temper's own training loop)."""

    @model_validator(mode="after")
    def _architecture(self) -> "HFBuildConfig":
        model_type = self.architecture.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise ValueError("model.build.architecture: needs model_type, a transformers model type such as 'llama'")
        for key in ("auto_map", "vocab_size"):
            if key in self.architecture:
                why = ("custom model code (trust_remote_code) is refused" if key == "auto_map"
                       else "it is the trained tokenizer's size")
                raise ValueError(f"model.build.architecture.{key}: not allowed here ({why})")
        return self


def _changed_keys(made: dict, asked: dict, prefix: str) -> list[str]:
    """The dotted keys whose values differ between two config trees (nested dicts compared key by key)."""
    out = []
    for key in sorted(set(made) | set(asked)):
        old, new = made.get(key), asked.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += _changed_keys(old, new, f"{prefix}.{key}")
        elif old != new:
            out.append(f"{prefix}.{key}")
    return out


class HFModelConfig(Section):
    """A `transformers` model in a local folder: safetensors weights only, no custom code, nothing downloaded."""

    kind: Literal["hf"] = "hf"
    """Model family; `hf` pairs with a text dataset (`data.kind`: files or docstrings), tokenized with the folder's own tokenizer."""
    path: str
    """Local folder with config.json, *.safetensors weights and the tokenizer files (e.g. from `save_pretrained`); or `package:<import_name>`, an installed package whose `extract_model(dir)` ships the folder (extracted once into `<storage_path>/models/<import_name>/`)."""
    task: Literal["embedding", "sequence_classification", "causal_lm"]
    """`embedding` (encoder + pooling), `sequence_classification` (a head over the labels of the data) or `causal_lm`."""
    pooling: Literal["mean", "cls", "max"] | None = None
    """embedding only: pooling over tokens; default: the folder's sentence-transformers config, else mean."""
    normalize: bool | None = None
    """embedding only: L2-normalise the vectors; default: the folder's sentence-transformers config, else false."""
    build: HFBuildConfig | None = None
    """causal_lm only: make `model.path` (a new folder) on first use from an architecture config, and pre-train it briefly; a folder made so before is used as it is."""

    @model_validator(mode="after")
    def _folder(self) -> "HFModelConfig":
        # The cheap checks here; app.models.hf.check_folder (refusing pickled weights and custom
        # code, with how to convert) runs when the model is built.
        if self.task != "embedding" and (self.pooling is not None or self.normalize is not None):
            raise ValueError(f"model.pooling / model.normalize apply to model.task 'embedding', not {self.task!r}")
        if self.build is not None:
            if self.task != "causal_lm":
                raise ValueError(f"model.build makes causal LMs; model.task is {self.task!r}")
            if self.path.startswith("package:"):
                raise ValueError("model.build: model.path must be the folder to build, not a package")
            folder = Path(self.path)
            self.path = os.path.abspath(self.path)
            if not folder.exists():
                return self  # made before any work starts (pipelines/build_base.py)
            if not (folder / BUILD_FILE).is_file():
                raise ValueError(f"model.path: {str(folder)!r} exists and was not made by model.build; "
                                 "give a new folder to build into, or drop model.build to use this one")
            made_of = json.loads((folder / BUILD_FILE).read_text()).get("build", {})
            changed = _changed_keys(made_of, self.build.model_dump(mode="json"), "model.build")
            if changed:
                raise ValueError(f"model.path: {str(folder)!r} was built from another model.build ({', '.join(changed)} "
                                 "differ); give a new folder, or delete this one to build it again")
        if self.path.startswith("package:"):
            # the folder is extracted when a job first uses it (app/models/sources.py); here only
            # that the package is installed and can extract one
            from app.models.sources import import_model_package

            import_model_package(self.path.removeprefix("package:"))
            return self
        folder = Path(self.path)
        if not folder.is_dir():
            raise ValueError(f"model.path: no such folder {self.path!r}")
        if not (folder / "config.json").is_file():
            raise ValueError(f"model.path: {self.path!r} has no config.json (not a transformers model folder)")
        if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").is_file():
            raise ValueError(
                f"model.path: {self.path!r} has no *.safetensors weights (Temper does not unpickle *.bin; "
                "convert with model.save_pretrained(folder, safe_serialization=True))"
            )
        self.path = os.path.abspath(self.path)  # absolute from where the job was given: Ray workers run in other folders
        return self


ModelConfig = Annotated[Union[GPTConfig, ViTConfig, HFModelConfig], Field(discriminator="kind")]
