"""Hugging Face `transformers` models from a local folder: load, pool, count.

A folder is accepted only if it can be loaded without running anything but `transformers`'
own code: safetensors weights (pickled `*.bin` / `*.pt` files can execute code when loaded),
no `auto_map` (custom modelling code shipped in the folder), nothing fetched from a hub
(`local_files_only=True` everywhere). Three tasks:

- `embedding`: `AutoModel` + pooling. The pooling follows the folder's sentence-transformers
  files when present (`modules.json`, `1_Pooling/config.json`: mean / cls / max, and a
  `Normalize` module), which reproduces sentence-transformers' own embeddings exactly;
  otherwise the caller's `pooling` / `normalize` arguments.
- `sequence_classification`: `AutoModelForSequenceClassification`; the label names come from
  the folder's head when it has one, else from the caller (who takes them from the data).
- `causal_lm`: `AutoModelForCausalLM`.

Expected config section (wired by the caller):
`model: {kind: hf, path: FOLDER, task: embedding | sequence_classification | causal_lm,
pooling: mean | cls | max (optional), normalize: bool (optional)}`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from app.errors import TemperError

HFTask = Literal["embedding", "sequence_classification", "causal_lm"]
HF_TASKS: tuple[str, ...] = ("embedding", "sequence_classification", "causal_lm")
PoolingMode = Literal["mean", "cls", "max"]
POOLING_MODES: tuple[str, ...] = ("mean", "cls", "max")

# Weight files that `torch.load` unpickles (and so may run code from the file).
_PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
# sentence-transformers' pooling flags and the mode each one means here.
_ST_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": None,
    "pooling_mode_weightedmean_tokens": None,
    "pooling_mode_lasttoken": None,
}


class HFModelError(TemperError, ValueError):
    """A local Hugging Face folder that cannot be loaded as asked (the message says why)."""


@dataclass(frozen=True)
class EmbeddingPooling:
    """How token states become one vector: `mode` over the unmasked tokens, then optional L2."""

    mode: PoolingMode
    normalize: bool
    # The folder's `sentence_bert_config.json` max_seq_length, if any (sentence-transformers
    # truncates to it); None when the folder does not say.
    max_seq_length: int | None = None


@dataclass(frozen=True)
class ModelCost:
    """Size and forward cost of a model, for the start-up line."""

    params: int
    non_embedding_params: int
    flops_per_token: int
    seq_len: int

    def line(self) -> str:
        return (
            f"{self.params / 1e6:.2f}M parameters ({self.non_embedding_params / 1e6:.2f}M non-embedding), "
            f"~{self.flops_per_token / 1e6:.1f} MFLOPs/token forward at {self.seq_len} tokens"
        )


# ---------------------------------------------------------------------------------------------
# Folder checks


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFModelError(f"{path}: not valid JSON ({e})") from e


def check_folder(path: str | Path, *, trust_remote_code: bool = False) -> Path:
    """The folder as a Path, after refusing what must not be loaded (see the module docstring)."""
    if str(path).startswith("package:"):
        raise HFModelError(
            f"{path}: a package, not a folder yet; app.models.sources.with_model_folder(job) extracts it "
            "(the CLI does so for every verb that reads a model section)"
        )
    folder = Path(path)
    if trust_remote_code:
        raise HFModelError(
            f"{folder}: trust_remote_code is refused: Temper loads only models whose code ships "
            "with transformers"
        )
    if not folder.is_dir():
        raise HFModelError(f"{folder}: no such model folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise HFModelError(f"{folder}: no config.json: not a transformers model folder")
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if file.is_file():
            data = _read_json(file)
            if isinstance(data, dict) and "auto_map" in data:
                raise HFModelError(
                    f"{file}: key 'auto_map' asks for custom model code from the folder "
                    "(trust_remote_code), which is refused; use a model whose architecture ships "
                    "with transformers"
                )
    safetensors = sorted(p.name for p in folder.glob("*.safetensors"))
    if safetensors or (folder / "model.safetensors.index.json").is_file():
        return folder
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLED_SUFFIXES)
    if pickled:
        raise HFModelError(
            f"{folder}: only pickled weights ({', '.join(pickled)}); Temper loads safetensors only, "
            "since unpickling can run code. Convert once in a Python you trust: "
            f"model = AutoModel.from_pretrained(folder, use_safetensors=False) (or "
            f"model.load_state_dict(torch.load('{pickled[0]}', weights_only=True))), then "
            "model.save_pretrained(folder, safe_serialization=True)"
        )
    raise HFModelError(f"{folder}: no weights (*.safetensors) in the folder")


def read_embedding_pooling(
    path: str | Path, *, pooling: str | None = None, normalize: bool | None = None
) -> EmbeddingPooling:
    """The pooling for an embedding model in `path`.

    With sentence-transformers files in the folder they decide; an explicit `pooling` or
    `normalize` that disagrees with them is an error (rather than silently different vectors).
    Without them: `pooling` (default mean) and `normalize` (default False).
    """
    folder = Path(path)
    if pooling is not None and pooling not in POOLING_MODES:
        raise HFModelError(f"pooling {pooling!r} is not one of {', '.join(POOLING_MODES)}")
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return EmbeddingPooling(mode=pooling or "mean", normalize=bool(normalize))

    modules = _read_json(modules_file)
    mode: str | None = None
    folder_normalize = False
    for module in modules:
        kind = module.get("type")
        if kind == _ST_TRANSFORMER:
            continue
        if kind == _ST_NORMALIZE:
            folder_normalize = True
        elif kind == _ST_POOLING:
            pool_file = folder / module["path"] / "config.json"
            if not pool_file.is_file():
                raise HFModelError(f"{modules_file}: pooling module config {pool_file} is missing")
            mode = _pooling_mode(pool_file, _read_json(pool_file))
        else:
            raise HFModelError(
                f"{modules_file}: module type {kind!r} is not supported (Temper reproduces "
                "Transformer, Pooling and Normalize modules only)"
            )
    if mode is None:
        raise HFModelError(f"{modules_file}: no {_ST_POOLING} module")
    if pooling is not None and pooling != mode:
        raise HFModelError(
            f"pooling {pooling!r} disagrees with the folder's sentence-transformers config "
            f"({mode!r}); drop the pooling key to use the folder's"
        )
    if normalize is not None and normalize != folder_normalize:
        raise HFModelError(
            f"normalize={normalize} disagrees with {modules_file} (normalize={folder_normalize}); "
            "drop the normalize key to use the folder's"
        )
    max_seq_length = None
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_seq_length = _read_json(st_config).get("max_seq_length")
    return EmbeddingPooling(mode=mode, normalize=folder_normalize, max_seq_length=max_seq_length)  # type: ignore[arg-type]


def _pooling_mode(pool_file: Path, config: dict) -> str:
    on = [key for key in _ST_POOLING_FLAGS if config.get(key)]
    if len(on) != 1:
        raise HFModelError(f"{pool_file}: expected exactly one pooling_mode_* flag set, found {on or 'none'}")
    mode = _ST_POOLING_FLAGS[on[0]]
    if mode is None:
        raise HFModelError(f"{pool_file}: {on[0]} is not supported (mean, cls or max)")
    return mode


# ---------------------------------------------------------------------------------------------
# Pooling


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: EmbeddingPooling) -> torch.Tensor:
    """hidden (B, T, H), attention_mask (B, T) 1 for real tokens -> (B, H), as sentence-transformers."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    if pooling.mode == "mean":
        out = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    elif pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "max":
        out = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
    else:
        raise HFModelError(f"pooling {pooling.mode!r} is not one of {', '.join(POOLING_MODES)}")
    return F.normalize(out, p=2, dim=1) if pooling.normalize else out


class SentenceEmbedder(nn.Module):
    """A transformers encoder followed by pooling: token ids -> one vector per text."""

    def __init__(self, encoder: nn.Module, pooling: EmbeddingPooling):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    @property
    def config(self):
        return self.encoder.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask (B, T) -> embeddings (B, H)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:  # decoders (Llama) take no token types
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state  # (B, T, H)
        return pool(hidden, attention_mask, self.pooling)


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """The folder's own tokenizer (AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer

    folder = check_folder(path, trust_remote_code=trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise HFModelError(f"{folder}: cannot load its tokenizer: {e}") from e


def load_hf_model(
    path: str | Path,
    task: str,
    *,
    label_names: list[str] | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The model in a local folder, ready for `task` (see the module docstring).

    `label_names` (sequence_classification): required when the folder has no classification
    head (a fresh head with that many outputs is added); when it has one they must equal its
    labels, in order. The names end up in `model.config.id2label`.
    """
    if task not in HF_TASKS:
        raise HFModelError(f"task {task!r} is not one of {', '.join(HF_TASKS)}")
    folder = check_folder(path, trust_remote_code=trust_remote_code)
    if task != "embedding" and (pooling is not None or normalize is not None):
        raise HFModelError(f"pooling / normalize apply to task 'embedding' only, not {task!r}")
    if task != "sequence_classification" and label_names is not None:
        raise HFModelError(f"label names apply to task 'sequence_classification' only, not {task!r}")
    common = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True, "output_loading_info": True}
    try:
        with _transformers_errors_only():
            return _from_folder(folder, task, common, label_names, pooling, normalize)
    except (OSError, ValueError) as e:
        if isinstance(e, HFModelError):
            raise
        # e.g. "Unrecognized configuration class ... for this kind of AutoModel"
        raise HFModelError(f"{folder}: cannot load as {task}: {e}") from e


@contextlib.contextmanager
def _transformers_errors_only():
    """transformers warns, on the console, about every weight it initialises fresh ("You should
    probably TRAIN this model"); `_check_missing` decides about those here (refused, or a head the
    task adds on purpose), so only transformers' errors are shown while a folder loads."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _from_folder(folder: Path, task: str, common: dict, label_names, pooling, normalize) -> nn.Module:
    from app.models.hf_imports import lean_transformers

    lean_transformers()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "embedding":
        spec = read_embedding_pooling(folder, pooling=pooling, normalize=normalize)
        encoder, info = AutoModel.from_pretrained(folder, **common)
        # the pooler (BERT's tanh over [CLS]) is never used by the pooling here
        _check_missing(folder, task, info, fresh=("pooler.",))
        return SentenceEmbedder(encoder, spec)
    if task == "causal_lm":
        model, info = AutoModelForCausalLM.from_pretrained(folder, **common)
        _check_missing(folder, task, info, fresh=())
        return model
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    labels = _classification_labels(folder, config, label_names)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        **common,
    )
    # without a head in the folder the head is new (initialised here, trained by the caller)
    head = () if has_classification_head(config) else ("classifier.", "pre_classifier.", "score.", "pooler.")
    _check_missing(folder, task, info, fresh=head)
    return model


def _check_missing(folder: Path, task: str, info: dict, fresh: tuple[str, ...]) -> None:
    """Refuse a model whose weights the folder does not hold (transformers would initialise them
    randomly and only warn), except the `fresh` parameter prefixes the task adds on purpose."""
    # a prefix matches at the top level or under the base model's name ("bert.pooler.dense.weight")
    missing = [key for key in info["missing_keys"] if not any(key.startswith(p) or f".{p}" in key for p in fresh)]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise HFModelError(
            f"{folder}: cannot load as {task}: weights not in the folder: {shown} "
            "(was it saved for another task?)"
        )


def load_hf_config(path: str | Path):
    """The folder's transformers config (checked folder, local files only)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(check_folder(path), local_files_only=True, trust_remote_code=False)


def has_classification_head(config) -> bool:
    return any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))


def _classification_labels(folder: Path, config, label_names: list[str] | None) -> list[str]:
    if has_classification_head(config):
        folder_labels = [config.id2label[i] for i in range(config.num_labels)]
        if label_names is not None and list(label_names) != folder_labels:
            raise HFModelError(
                f"{folder}: its classification head has labels {folder_labels}, the data has "
                f"{list(label_names)}; relabel the data or start from a folder without a head"
            )
        return folder_labels
    if not label_names:
        raise HFModelError(
            f"{folder}: no classification head in the folder, so the label names must come from "
            "the data (label_field)"
        )
    if len(set(label_names)) != len(label_names):
        raise HFModelError(f"label names repeat: {list(label_names)}")
    return [str(name) for name in label_names]


# ---------------------------------------------------------------------------------------------
# Size and cost


def model_cost(model: nn.Module, seq_len: int) -> ModelCost:
    """Parameter count and forward FLOPs per token at `seq_len` tokens of context.

    FLOPs/token ~= 2 * N + 4 * n_layer * d_model * seq_len (the PaLM appendix's count, forward
    only): 2 FLOPs per weight per token for every matmul weight (N = parameters outside the
    embedding tables, plus a causal LM's output head when it is tied to the token embedding,
    since that matmul still runs), and the attention term: scores Q.K^T and the weighted sum
    over V, each 2 * d_model * seq_len per layer. Norms, softmax and biases are ignored.
    """
    config = model.config
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    unique = {id(p): p for p in model.parameters()}
    params = sum(p.numel() for p in unique.values())
    non_embedding = sum(p.numel() for key, p in unique.items() if key not in embedding_ids)
    matmul = non_embedding
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is not None and id(head.weight) in embedding_ids:
        matmul += head.weight.numel()
    flops = 2 * matmul + 4 * config.num_hidden_layers * config.hidden_size * seq_len
    return ModelCost(params=params, non_embedding_params=non_embedding, flops_per_token=flops, seq_len=seq_len)


@torch.no_grad()
def embed_texts(
    model: SentenceEmbedder, tokenizer, texts: list[str], *, max_length: int, batch_size: int = 32
) -> torch.Tensor:
    """Embeddings (N, H) of `texts`, in order; each batch padded to its own longest text."""
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out.append(model(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}))
    return torch.cat(out) if out else torch.empty(0, model.config.hidden_size)


# ---------------------------------------------------------------------------------------------
# A student cut from a teacher's layers


def _layer_list_prefix(encoder: nn.Module) -> str:
    """The state-dict prefix of the encoder's stack of layers ("encoder.layer." for BERT), found
    as the one ModuleList as long as config.num_hidden_layers."""
    n = encoder.config.num_hidden_layers
    found = [name for name, m in encoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise HFModelError(
            f"{type(encoder).__name__}: cannot tell its stack of {n} layers (ModuleLists of that length: {found or 'none'})"
        )
    return found[0] + "."


def keep_layers(encoder: nn.Module, layers: list[int]) -> nn.Module:
    """A new encoder of the same class and config with only `layers` of `encoder` (in order):
    embeddings and everything outside the layer stack copied, layer i of `layers` becomes layer
    j = its position (DistilBERT's initialisation of a student from every other teacher layer)."""
    import copy

    n = encoder.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise HFModelError(f"train.distill.student_layers {layers}: {bad} not among the teacher's {n} layers (0..{n - 1})")
    prefix = _layer_list_prefix(encoder)
    config = copy.deepcopy(encoder.config)
    config.num_hidden_layers = len(layers)
    student = type(encoder)(config)
    new_index = {str(old): str(new) for new, old in enumerate(layers)}
    state = {}
    for key, value in encoder.state_dict().items():
        if not key.startswith(prefix):
            state[key] = value
            continue
        index, rest = key[len(prefix):].split(".", 1)
        if index in new_index:
            state[f"{prefix}{new_index[index]}.{rest}"] = value
    student.load_state_dict(state, strict=True)
    return student


def save_student_folder(teacher: SentenceEmbedder, teacher_folder: str | Path, layers: list[int], out: str | Path) -> Path:
    """A normal hf folder in `out`: `teacher`'s encoder cut to `layers` (safetensors, config.json
    with the reduced num_hidden_layers), with the tokenizer and sentence-transformers pooling files
    of `teacher_folder`, so the student tokenizes and pools as the teacher does."""
    import shutil

    source, out = check_folder(teacher_folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keep_layers(teacher.encoder, layers).save_pretrained(out, safe_serialization=True)
    weights = {"config.json", "model.safetensors.index.json"}
    for item in source.iterdir():
        if item.is_file() and item.name not in weights and item.suffix != ".safetensors" and item.suffix not in _PICKLED_SUFFIXES:
            shutil.copy2(item, out / item.name)
    if (source / "modules.json").is_file():  # the pooling module's folder (1_Pooling/config.json)
        for module in _read_json(source / "modules.json"):
            if module.get("path") and (source / module["path"]).is_dir():
                shutil.copytree(source / module["path"], out / module["path"], dirs_exist_ok=True)
    return out
