"""A `transformers` model as a Temper training model: one packed LongTensor in, one tensor out.

The training loop, the strategies (DDP, FSDP, DeepSpeed) and evaluation call `model(x)` with a
single tensor, as for the built-in models. A text batch is three aligned (B, T) tensors, so it
travels packed as x (B, 2 | 3, T): input_ids, attention_mask and (encoders) token_type_ids.
`as_task_model` swaps the model's class for a subclass whose `forward` unpacks such an x and
returns the logits (classification (B, C), causal LM (B, T, V)) or, for an embedder, the
vectors (B, H); any other call (keywords, as transformers' own code makes) goes to the original
`forward`. Subclassing instead of wrapping keeps parameter names, and so the consolidated
`model.safetensors`, exactly those of the Auto class: it loads back with `load_state_dict`.

Packed examples (`data.packing`): the attention-mask row may carry segment numbers 1, 2, ... (0 =
padding) instead of 1s. `forward` then builds a block-diagonal causal 4D mask (a token sees the
earlier tokens of its own example only) and position ids restarting at 0 for each example, so
each example computes what it would alone (transformers takes a prepared 4D mask as it is).

Tied weights (a causal LM's output head sharing the token embedding, `tie_word_embeddings`):
`state_dict()` leaves out the second name of a shared tensor (safetensors refuses to write two
names for one storage; transformers' `save_pretrained` drops the same key), and
`load_state_dict` fills it back from the first.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn as nn


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) tensors -> x (B, 2 | 3, T) int64."""
    parts = [input_ids, attention_mask] + ([token_type_ids] if token_type_ids is not None else [])
    return torch.stack([p.long() for p in parts], dim=1)


def unpack(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x (B, 2 | 3, T) -> the keyword arguments of a transformers forward."""
    out = {"input_ids": x[:, 0], "attention_mask": x[:, 1]}
    if x.size(1) == 3:
        out["token_type_ids"] = x[:, 2]
    return out


def tied_names(model: nn.Module) -> dict[str, str]:
    """{second name: first name} of parameters that share one tensor (tied weights)."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def segment_attention(segments: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """segments (B, T): example number per token (0 = padding) -> (4D mask (B, 1, T, T), position ids (B, T)).

    The mask lets a token attend to itself and the earlier tokens of its own example; boolean
    (True = attend) for SDPA, additive float (0 / dtype min) for eager attention."""
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal  # (B, T, T); padding sees padding: no empty rows
    index = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    positions = index - torch.cummax(index * starts, dim=1).values  # (B, T): 0 at each example's first token
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask[:, None], positions
    if attn_implementation != "sdpa":
        raise ValueError(f"packed examples need sdpa or eager attention, this model uses {attn_implementation!r}")
    return allowed[:, None], positions


class _PackedForward:
    """Mixed in before the transformers class (see the module docstring)."""

    def forward(self, *args, **kwargs):
        x = args[0] if len(args) == 1 and not kwargs else None
        if not (isinstance(x, torch.Tensor) and x.dim() == 3):
            return super().forward(*args, **kwargs)
        kwargs = unpack(x)
        if kwargs["attention_mask"].max() > 1:
            kwargs["attention_mask"], kwargs["position_ids"] = segment_attention(
                kwargs["attention_mask"], getattr(self.config, "_attn_implementation", "sdpa"), self.dtype)
        if "token_type_ids" in kwargs and not hasattr(self.config, "type_vocab_size"):
            del kwargs["token_type_ids"]  # decoders (Llama) have no token types; some tokenizers still make them
        out = super().forward(**kwargs)
        return out if isinstance(out, torch.Tensor) else out.logits

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for name in tied_names(self):
            sd.pop(prefix + name, None)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        for name, source in tied_names(self).items():
            if name not in state_dict and source in state_dict:
                state_dict[name] = state_dict[source]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@lru_cache(maxsize=None)
def _packed_class(cls: type) -> type:
    def forward(self, *args, **kwargs):
        return _PackedForward.forward(self, *args, **kwargs)

    # code that reads the signature (which inputs does this model take? e.g. the ONNX export's
    # token_type_ids check) sees the original one
    forward.__signature__ = inspect.signature(cls.forward)
    namespace = {"forward": forward, "__module__": __name__, "__qualname__": cls.__qualname__}
    return type(cls.__name__, (_PackedForward, cls), namespace)


def as_task_model(model: nn.Module) -> nn.Module:
    """The same model object, now also callable as `model(x)` with a packed batch."""
    if not isinstance(model, _PackedForward):
        model.__class__ = _packed_class(type(model))
    return model
