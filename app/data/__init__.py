"""Datasets: the built-ins here (nothing is downloaded) and text for `hf` models (app/data/text.py:
the user's files, or the standard library's docstrings from app/data/docstrings.py).

- `lm-code`: the Python standard library's own `.py` files as a byte stream. Files are read
  in sorted path order up to `max_bytes`; each file goes to train or val by a hash of its
  path relative to the stdlib root (stable across machines with the same Python).
- `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images); each sample goes to
  train or val by a hash of its index.

Batches are a pure function of (seed, step, rank): a resumed run sees exactly the batches it
would have seen, so the data position is just the step count.
"""

from __future__ import annotations

import hashlib
import itertools
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from app.config.data import TEXT_DATA, DataConfig, TextDataConfig
from app.config.model import GPTConfig, HFModelConfig, ViTConfig

Batch = tuple[torch.Tensor, torch.Tensor]


def _hash_fraction(key: str, salt: int) -> float:
    """A stable number in [0, 1) for a key."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _step_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, rank])


@lru_cache(maxsize=4)
def _stdlib_bytes(max_bytes: int, val_fraction: float, salt: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(train bytes, val bytes, number of files) of the stdlib corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val, total, nfiles = [], [], 0, 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")):
            continue
        try:
            blob = path.read_bytes()
        except OSError:
            continue
        if not blob:
            continue
        blob = blob[: max_bytes - total]
        (val if _hash_fraction(rel, salt) < val_fraction else train).append(blob)
        total += len(blob)
        nfiles += 1
        if total >= max_bytes:
            break
    if not train or not val:
        raise RuntimeError(f"lm-code corpus under {root} is too small for data.max_bytes={max_bytes}")
    join = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)  # noqa: E731
    return join(train), join(val), nfiles


def stdlib_text(max_bytes: int, salt: int = 0, val_fraction: float = 0.1) -> str:
    """The train part of the `lm-code` corpus as text (files joined by newlines), for tokenizers
    and models that read text rather than bytes."""
    train, _, _ = _stdlib_bytes(max_bytes, val_fraction, salt)
    return train.tobytes().decode("utf-8", errors="replace")


class LMCodeData:
    """Next-byte prediction windows of length block_size."""

    kind = "lm"

    def __init__(self, cfg: DataConfig, block_size: int):
        self.block_size = block_size
        self.train, self.val, self.n_files = _stdlib_bytes(cfg.max_bytes, cfg.val_fraction, cfg.split_seed)

    def describe(self) -> dict:
        return {"dataset": "lm-code", "files": self.n_files, "train_bytes": int(self.train.size), "val_bytes": int(self.val.size)}

    def _windows(self, stream: np.ndarray, starts: np.ndarray) -> Batch:
        idx = starts[:, None] + np.arange(self.block_size + 1)[None, :]
        chunk = torch.from_numpy(stream[idx].astype(np.int64))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def train_batch(self, seed: int, step: int, rank: int, batch_size: int) -> Batch:
        starts = _step_rng(seed, step, rank).integers(0, self.train.size - self.block_size - 1, size=batch_size)
        return self._windows(self.train, starts)

    def val_batches(self, n_batches: int, batch_size: int) -> Iterator[Batch]:
        """Evenly spaced fixed windows over the val stream: the same for every caller."""
        total = n_batches * batch_size
        starts = np.linspace(0, self.val.size - self.block_size - 2, total).astype(np.int64)
        for i in range(n_batches):
            yield self._windows(self.val, starts[i * batch_size:(i + 1) * batch_size])

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        return next(self.val_batches(1, batch_size))[0]


@lru_cache(maxsize=2)
def _digits(val_fraction: float, salt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    labels = d.target.astype(np.int64)
    is_val = np.array([_hash_fraction(str(i), salt) < val_fraction for i in range(len(labels))])
    return images[~is_val], labels[~is_val], images[is_val], labels[is_val]


class DigitsData:
    """scikit-learn digits as (B, 1, 8, 8) float images and int labels."""

    kind = "classifier"

    def __init__(self, cfg: DataConfig):
        self.x_train, self.y_train, self.x_val, self.y_val = _digits(cfg.val_fraction, cfg.split_seed)

    def describe(self) -> dict:
        return {"dataset": "digits", "train_samples": int(len(self.y_train)), "val_samples": int(len(self.y_val))}

    def train_batch(self, seed: int, step: int, rank: int, batch_size: int) -> Batch:
        idx = _step_rng(seed, step, rank).integers(0, len(self.y_train), size=batch_size)
        return torch.from_numpy(self.x_train[idx]), torch.from_numpy(self.y_train[idx])

    def val_batches(self, n_batches: int, batch_size: int) -> Iterator[Batch]:
        """The val set in order, at most n_batches batches (fewer when the set is smaller)."""
        for start in range(0, min(len(self.y_val), n_batches * batch_size), batch_size):
            sl = slice(start, start + batch_size)
            yield torch.from_numpy(self.x_val[sl]), torch.from_numpy(self.y_val[sl])

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        return torch.from_numpy(self.x_val[:batch_size])


def train_batches(data, seed: int, start: int, rank: int, batch_size: int) -> Iterator[Batch]:
    """A worker's micro-batches from micro-batch `start` on. In-memory data: `train_batch(seed, i,
    rank, batch_size)` for i = start, start + 1, ..., a pure function of the index, so a resumed run
    continues exactly. Streamed file data (app/data/stream.py): this worker's shard of the Ray
    Dataset, epoch after epoch (a resumed run starts an epoch over)."""
    if hasattr(data, "stream_batches"):  # StreamedTextData (not imported here: it imports Ray Data)
        return ((x, y) for x, y, _ in data.stream_batches(seed, rank, batch_size))
    return (data.train_batch(seed, i, rank, batch_size) for i in itertools.count(start))


def build_data(data: DataConfig | TextDataConfig, model: GPTConfig | ViTConfig | HFModelConfig):
    """The dataset of a data section: a built-in one, or text for an `hf` model (app/data/text.py)."""
    if isinstance(data, TEXT_DATA):
        from app.data.text import FileTextData

        return FileTextData(data, model)
    if data.name == "lm-code":
        return LMCodeData(data, model.block_size)
    return DigitsData(data)
