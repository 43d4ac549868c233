"""Several LoRA adapters on one loaded `hf` causal LM: loaded by name on first use, evicted
least-recently-used above a limit, and applied per row of a batch.

Adapters are `peft` folders (`adapter_config.json` + `adapter_model.safetensors`, as
`save_pretrained` writes them); pickled adapter weights (`adapter_model.bin`) are refused.
The first adapter wraps the base model in a `peft.PeftModel`, which replaces its target
`Linear` layers by LoRA layers in place; later adapters are added to those layers
(`load_adapter`) and evicted ones removed (`delete_adapter`). The base weights are shared:
one copy of the model serves the base and every adapter.

Which adapter a row uses: peft's mixed-batch forward (`adapter_names=[name per row]`, with
`"__base__"` for rows without one) computes each row with its own adapter in one forward
pass. peft passes `adapter_names` to its layers through forward hooks it registers and
removes around each `PeftModel.forward` call; with several batches computing at once in
worker threads (generation steps, scoring) such shared per-call hooks would leak into each
other, so here every LoRA layer carries one permanent hook that reads the names of the rows
from a context variable, which each thread sets around its own forward call
(`row_adapters`). A call that sets none runs the base model exactly (every row `"__base__"`),
so the base keeps answering as before any adapter was loaded.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch.nn as nn

from app.errors import TemperError

log = logging.getLogger(__name__)

BASE = "__base__"
"""peft's name for "no adapter" in a mixed batch."""

_ROWS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("temper_lora_rows", default=None)


class AdapterError(TemperError, ValueError):
    """An adapter that cannot be used as asked (the message names it and says why)."""


@contextlib.contextmanager
def row_adapters(names: list[str | None] | None) -> Iterator[None]:
    """Forward calls inside the block use adapter `names[i]` for row i (None: the base model)."""
    token = _ROWS.set(None if names is None else [BASE if n is None else n for n in names])
    try:
        yield
    finally:
        _ROWS.reset(token)


def _rows_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x = args[0] if args else kwargs["x"]
    names = _ROWS.get()
    if names is None or len(names) != x.shape[0]:
        names = [BASE] * x.shape[0]
    return args, {**kwargs, "adapter_names": names}


def check_adapter_folder(path: str | Path, name: str) -> Path:
    """The peft adapter folder of adapter `name`, after refusing what must not be loaded."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"adapter {name!r}: {folder} has no adapter_config.json (not a peft adapter folder)")
    if not (folder / "adapter_model.safetensors").is_file():
        pickled = sorted(p.name for p in folder.glob("adapter_model.*"))
        raise AdapterError(
            f"adapter {name!r}: {folder} has no adapter_model.safetensors"
            + (f" (only {', '.join(pickled)}: pickled weights are refused, since unpickling can run code;"
               " save it with save_pretrained(..., safe_serialization=True))" if pickled else ""))
    return folder


@dataclass
class AdapterStats:
    loads: int = 0
    evictions: int = 0


def registered_adapter_folder(record: dict, model: str, name: str) -> str:
    """The folder of a registered adapter version (its registry record), for adapter `name` of `model`."""
    from app.artifacts import local_path
    from app.models.lora import ADAPTER_FORMAT

    if record["format"] != ADAPTER_FORMAT:
        raise AdapterError(f"adapter {name!r}: {model} v{record['version']} is a {record['format']!r} version, "
                           f"not a {ADAPTER_FORMAT!r} one (what train.finetune: lora registers)")
    return str(local_path(record["artifact_uri"]))


class AdapterSet:
    """The LoRA adapters of one loaded base causal LM (see the module docstring).

    `sources` maps adapter name -> peft folder; `max_loaded` adapters stay loaded at most (an
    adapter used by a running request is never evicted: the set then holds more until it is
    released). `acquire(name)` loads it when needed and pins it; `release(name)` unpins it.
    Loading and eviction take a lock; forward passes do not (they read adapters that are
    pinned, so nothing they use changes under them).
    """

    def __init__(self, base: nn.Module, sources: dict[str, str], max_loaded: int):
        if max_loaded < 1:
            raise AdapterError(f"max_loaded must be at least 1, not {max_loaded}")
        self.base, self.sources, self.max_loaded = base, dict(sources), max_loaded
        self.peft_model = None
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.pins: dict[str, int] = {}
        self.stats = AdapterStats()
        self._lock = threading.Lock()

    def acquire(self, name: str) -> None:
        """Load adapter `name` if it is not loaded (evicting the least recently used unpinned
        one above `max_loaded`) and pin it until `release`. Raises AdapterError for an unknown name."""
        if name not in self.sources:
            raise AdapterError(f"unknown adapter {name!r} (adapters: {sorted(self.sources)})")
        with self._lock:
            if name not in self.loaded:
                self._load(name)
            self.loaded.move_to_end(name)
            self.pins[name] = self.pins.get(name, 0) + 1
            self._evict()

    def release(self, name: str) -> None:
        with self._lock:
            self.pins[name] -= 1
            if not self.pins[name]:
                del self.pins[name]
            self._evict()

    def snapshot(self) -> dict:
        return {"configured": sorted(self.sources), "loaded": list(self.loaded), "max_loaded": self.max_loaded,
                "loads": self.stats.loads, "evictions": self.stats.evictions}

    def _load(self, name: str) -> None:
        from peft import PeftModel

        folder = check_adapter_folder(self.sources[name], name)
        try:
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name, is_trainable=False)
            else:
                self.peft_model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise AdapterError(f"adapter {name!r}: cannot load {folder} onto this base model: {err}") from err
        self.peft_model.eval()
        self._hook_lora_layers()
        self.loaded[name] = None
        self.stats.loads += 1
        log.info("LoRA adapter %s loaded from %s (%d loaded)", name, folder, len(self.loaded))

    def _hook_lora_layers(self) -> None:
        from peft.tuners.lora import LoraLayer

        for module in self.base.modules():
            if isinstance(module, LoraLayer) and not getattr(module, "_temper_rows_hook", False):
                module.register_forward_pre_hook(_rows_hook, with_kwargs=True)
                module._temper_rows_hook = True

    def _evict(self) -> None:
        while len(self.loaded) > self.max_loaded:
            victim = next((n for n in self.loaded if n not in self.pins), None)
            if victim is None:
                return  # all in use: evicted once released
            self.peft_model.delete_adapter(victim)
            del self.loaded[victim]
            self.stats.evictions += 1
            log.info("LoRA adapter %s evicted (least recently used; max_adapters %d)", victim, self.max_loaded)
