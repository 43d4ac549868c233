"""Text datasets (`data.kind: jsonl | csv | parquet | text | docstrings`) as training batches for an `hf` model.

Each worker reads and tokenizes the text once (app/data/files.py: small files, held in memory;
app/data/docstrings.py: the standard library's docstrings) with the model folder's own tokenizer. Like the built-in datasets, a train batch is a pure
function of (seed, step, rank), so a resumed run sees the batches it would have seen. A batch
is padded to its own longest member, not to `max_length`, and travels packed
(app/models/hf_task.py): x (B, 2 | 3, T) = input_ids, attention_mask[, token_type_ids].

Targets: classification, the label ids (B,); causal LM, the next token at each position (B, T)
with -100 (cross-entropy's ignore_index) after the last real token and on padding; embedding,
the packed pairs of the texts (B, 2 | 3, T), padded to the same T as x: the `text_pair` field
when the data has one, else the same text again (two dropout views of one text, as in
unsupervised SimCSE), for the in-batch contrastive loss. Texts and pairs are tokenized apart:
each is embedded on its own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

from app.config.data import DocstringsDataConfig, FileDataConfig, TextDataConfig
from app.config.model import HFModelConfig
from app.data.files import Fields, Splits, Tokenized, load_splits, tokenize

Batch = tuple[torch.Tensor, torch.Tensor]
IGNORE_INDEX = -100


def read_splits(cfg: TextDataConfig) -> Splits:
    """Train and val examples of a text data section (file rows: bad ones raise, or are counted with skip_bad_rows)."""
    if isinstance(cfg, DocstringsDataConfig):
        from app.data.docstrings import docstring_splits

        return docstring_splits(cfg)
    if cfg.format == "instructions":
        from app.data.instructions import instruction_splits

        return instruction_splits(cfg)
    fields = Fields(cfg.text_field, cfg.text_pair_field, cfg.label_field, tuple(cfg.labels) if cfg.labels else None)
    return load_splits(
        cfg.kind, fields, path=cfg.path, train_path=cfg.train_path, val_path=cfg.val_path,
        val_fraction=cfg.val_fraction, seed=cfg.seed, skip_bad_rows=cfg.skip_bad_rows,
    )


def pad_batch(tok: Tokenized, idx: np.ndarray | list[int], pad_id: int, task: str, pairs: Tokenized | None = None) -> Batch:
    """Rows `idx` of `tok`, right-padded to their longest member -> (packed x, targets).
    `pairs` (embedding): the pair of each text; x and the targets are padded to one length."""
    from app.models.hf_task import pack

    rows = [int(i) for i in idx]
    longest = max(len(t.input_ids[i]) for t in (tok, pairs) if t is not None for i in rows)

    def matrix(lists: list[list[int]], fill: int) -> torch.Tensor:
        out = torch.full((len(rows), longest), fill, dtype=torch.long)
        for r, i in enumerate(rows):
            out[r, : len(lists[i])] = torch.tensor(lists[i], dtype=torch.long)
        return out

    def packed(t: Tokenized) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        types = matrix(t.token_type_ids, 0) if t.token_type_ids is not None else None
        ids, mask = matrix(t.input_ids, pad_id), matrix(t.attention_mask, 0)
        return pack(ids, mask, types), ids, mask

    x, ids, mask = packed(tok)
    if task == "sequence_classification":
        return x, torch.tensor([tok.labels[i] for i in rows], dtype=torch.long)  # type: ignore[index]
    if task == "embedding":
        if pairs is None:
            raise ValueError("an embedding batch needs the pairs of its texts")
        return x, packed(pairs)[0]
    # next token at each position; nothing to predict after the last real token or on padding
    target = torch.full_like(ids, IGNORE_INDEX)
    target[:, :-1] = torch.where(mask[:, 1:] == 1, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    return x, target


class FileTextData:
    """Tokenized train / val examples of the user's files or the docstrings (see the module docstring)."""

    def __init__(self, cfg: TextDataConfig, model: HFModelConfig):
        from app.models.hf import load_tokenizer

        self.cfg, self.task = cfg, model.task
        self.kind = "classifier" if model.task == "sequence_classification" else "lm" if model.task == "causal_lm" else "embedding"
        splits = read_splits(cfg)
        tokenizer = load_tokenizer(model.path)
        self.labels = splits.labels
        self.bad_rows, self.reasons = splits.bad_rows, splits.reasons
        self.n_train, self.n_val = len(splits.train), len(splits.val)
        self.train_pairs = self.val_pairs = None
        self.instructions = isinstance(cfg, FileDataConfig) and cfg.format == "instructions"
        if self.instructions:  # token ids with completion-only labels (app/data/instructions.py)
            from app.data.instructions import encode_all, pack_rows

            self.train = encode_all(splits.train, tokenizer, cfg.max_length)
            self.val = encode_all(splits.val, tokenizer, cfg.max_length)
            if not self.train.input_ids or not self.val.input_ids:
                raise ValueError(f"data.max_length {cfg.max_length} leaves no completion tokens in the "
                                 f"{'train' if not self.train.input_ids else 'val'} split")
            self.n_train, self.n_val = len(self.train.input_ids), len(self.val.input_ids)
            # packing: fixed rows of whole examples; a train batch draws rows instead of examples
            self.rows = (pack_rows([len(ids) for ids in self.train.input_ids], cfg.max_length, cfg.seed) if cfg.packing
                         else [[i] for i in range(self.n_train)])
        elif model.task == "embedding":  # texts and pairs apart (see the module docstring)
            self.train, self.train_pairs = (tokenize(part, tokenizer, cfg.max_length) for part in _texts_and_pairs(splits.train))
            self.val, self.val_pairs = (tokenize(part, tokenizer, cfg.max_length) for part in _texts_and_pairs(splits.val))
        else:
            self.train = tokenize(splits.train, tokenizer, cfg.max_length, splits.labels)
            self.val = tokenize(splits.val, tokenizer, cfg.max_length, splits.labels)
        # padded positions are masked out, so any id works where the tokenizer has no pad token
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def describe(self) -> dict:
        source = "standard-library docstrings" if self.cfg.kind == "docstrings" else f"{self.cfg.kind} files"
        out = {"dataset": source, "train_rows": self.n_train, "val_rows": self.n_val}
        if self.labels is not None:
            out["labels"] = len(self.labels)
        if self.bad_rows:
            out["bad_rows_skipped"] = self.bad_rows
        if self.instructions:
            out["format"] = "instructions"
            if self.cfg.packing:
                out["packed_rows"] = len(self.rows)
            if self.train.dropped + self.val.dropped:
                out["dropped_no_completion_left"] = self.train.dropped + self.val.dropped
        return out

    def train_batch(self, seed: int, step: int, rank: int, batch_size: int) -> Batch:
        if self.instructions:
            from app.data.instructions import batch

            idx = np.random.default_rng([seed, step, rank]).integers(0, len(self.rows), size=batch_size)
            return batch(self.train, [self.rows[i] for i in idx], self.pad_id)
        idx = np.random.default_rng([seed, step, rank]).integers(0, self.n_train, size=batch_size)
        return pad_batch(self.train, idx, self.pad_id, self.task, self.train_pairs)

    def val_batches(self, n_batches: int, batch_size: int) -> Iterator[Batch]:
        """The val set in order, at most n_batches batches (fewer when the set is smaller)."""
        for start in range(0, min(self.n_val, n_batches * batch_size), batch_size):
            if self.instructions:
                from app.data.instructions import batch

                yield batch(self.val, [[i] for i in range(start, min(start + batch_size, self.n_val))], self.pad_id)
                continue
            yield pad_batch(self.val, range(start, min(start + batch_size, self.n_val)), self.pad_id, self.task, self.val_pairs)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        if self.instructions:
            return next(self.val_batches(1, batch_size))[0]
        x, _ = pad_batch(self.val, range(min(batch_size, self.n_val)), self.pad_id, "causal_lm")
        return x


def _texts_and_pairs(examples: list) -> tuple[list, list]:
    """(the texts alone, their pairs alone: the text_pair field, or the same text without one)."""
    texts = [replace(ex, text_pair=None) for ex in examples]
    pairs = [replace(ex, text=ex.text_pair if ex.text_pair is not None else ex.text, text_pair=None) for ex in examples]
    return texts, pairs


def file_digest(cfg: FileDataConfig) -> str:
    """sha256 (16 hex) over the bytes of the section's files: what a trained version was trained on."""
    import hashlib

    digest = hashlib.sha256()
    for path in (cfg.path, cfg.train_path, cfg.val_path):
        if path is not None:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]
