"""The `data` section: a built-in dataset of the built-in models (`name: lm-code | digits`), or text
for an `hf` model (`kind`): the user's files (`jsonl | csv | parquet | text`) or the standard
library's docstrings (`docstrings`); and the check that the model and the data fit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from app.config.base import Section


class DataConfig(Section):
    """A built-in dataset. Nothing is downloaded: both ship with Python or scikit-learn."""

    name: Literal["lm-code", "digits"]
    """`lm-code`: the Python standard library's own .py files as bytes; `digits`: scikit-learn's 8x8 digits."""
    max_bytes: int = Field(4_000_000, ge=10_000)
    """lm-code only: cap on corpus bytes read (files taken in sorted path order)."""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Share of files (lm-code, by path hash) or samples (digits, by index hash) held out for validation."""
    split_seed: int = 0
    """Salt of the deterministic train/val split hash."""


class FileDataConfig(Section):
    """Text examples from the user's files, tokenized with the `hf` model folder's own tokenizer."""

    kind: Literal["jsonl", "csv", "parquet", "text"]
    """File format; `text` is one example per non-blank line (field `text_field`)."""
    format: Literal["text", "instructions"] = "text"
    """`text`: each row is a text (`text_field`, ...). `instructions` (jsonl, `model.task: causal_lm`): each row is `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}` (at least one assistant turn) or `{"prompt": "...", "completion": "..."}`; the loss is on the assistant / completion tokens only. Messages are rendered with the tokenizer's chat template when the folder has one (`tokenizer.chat_template`), otherwise with the plain template `### System:\\n{content}\\n\\n` / `### User:\\n{content}\\n\\n` / `### Assistant:\\n{content}<eos>\\n\\n` (each assistant turn is followed by the tokenizer's eos token, when it has one, and trained on). A prompt / completion row is `{prompt}{completion}<eos>` with no template (put any separator in the texts). Examples longer than `max_length` are cut at the end."""
    packing: bool = False
    """format `instructions`, training batches only: pack several examples into each row of up to `max_length` tokens (whole examples, greedy in a seeded order). Each example attends only to itself (a block-diagonal causal mask) and its positions restart at 0, so a packed row computes what its examples would alone; validation batches are not packed."""
    path: str | None = None
    """One file, split into train / val by a hash of each row's content (`val_fraction`, `seed`)."""
    train_path: str | None = None
    """Train file (with `val_path`, instead of `path`)."""
    val_path: str | None = None
    """Validation file (with `train_path`)."""
    text_field: str = Field("text", min_length=1)
    """Column (jsonl key, csv header, parquet column) holding the text."""
    text_pair_field: str | None = None
    """Column holding a second text (sentence pairs: tokenized as one input, the pair after a separator)."""
    label_field: str | None = None
    """Column holding the class label (string or integer); needed by `model.task: sequence_classification`."""
    labels: list[str] | None = None
    """The allowed labels, in id order; default: the sorted labels seen in train (others are bad rows)."""
    max_length: int = Field(128, ge=2, le=65536)
    """Tokens per example; longer examples are truncated (`python -m app data stats` counts them)."""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Share of rows held out for validation when a single `path` is given."""
    seed: int = 0
    """Salt of the train/val split hash."""
    skip_bad_rows: bool = False
    """Count and report bad rows (missing field, wrong type, empty text, unknown label) instead of failing on the first."""
    stream: bool | Literal["auto"] = "auto"
    """Stream the files through Ray Data (read in blocks, checked and tokenized by Ray tasks, sharded to the Ray Train workers) instead of reading them into each worker's memory: `auto` streams when the files together exceed `stream_above_mb`; `true` / `false` force it. `format: instructions` is always read into memory. Streamed, the driver first makes one pass over the files (bad rows, row counts, labels, the val rows evaluated), and a resumed run starts its epoch over."""
    stream_above_mb: float = Field(256.0, gt=0)
    """`stream: auto` streams above this many MB (10^6 bytes) of files, together."""

    @model_validator(mode="after")
    def _files(self) -> "FileDataConfig":
        if (self.path is None) == (self.train_path is None and self.val_path is None):
            raise ValueError("data: give either data.path, or data.train_path and data.val_path")
        if self.path is None and (self.train_path is None or self.val_path is None):
            raise ValueError("data.train_path and data.val_path go together")
        for key in ("path", "train_path", "val_path"):
            value = getattr(self, key)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"data.{key}: no such file {value!r}")
            if value is not None:
                # absolute from where the job was given: Ray workers run in other folders
                setattr(self, key, os.path.abspath(value))
        if self.kind == "text" and (self.text_pair_field or self.label_field):
            raise ValueError("data.kind 'text' has one text per line: no data.text_pair_field or data.label_field")
        if self.format == "instructions":
            if self.kind != "jsonl":
                raise ValueError(f"data.format 'instructions' reads jsonl rows (messages or prompt / completion), not data.kind {self.kind!r}")
            if self.text_pair_field or self.label_field or self.labels:
                raise ValueError("data.format 'instructions' takes no data.text_pair_field, data.label_field or data.labels")
            if self.stream is True:
                raise ValueError("data.stream: instruction rows are read into memory (streaming covers text and "
                                 "labelled rows); set data.stream to false or auto")
        elif self.packing:
            raise ValueError("data.packing packs instruction examples: it needs data.format 'instructions'")
        if self.labels is not None:
            if not self.label_field:
                raise ValueError("data.labels needs data.label_field")
            if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
                raise ValueError(f"data.labels must be at least two distinct names, got {self.labels}")
        return self


class DocstringsDataConfig(Section):
    """Unlabeled text that ships with Python: the docstrings of its standard library, for an `hf` model."""

    kind: Literal["docstrings"]
    """Text source: module, class and function docstrings of this Python's standard library (40+ characters, whitespace collapsed, each distinct text once)."""
    max_texts: int = Field(2000, ge=10)
    """How many docstrings to take: a fixed sample (files in the order of a hash of their path), so the same Python gives the same texts."""
    max_length: int = Field(128, ge=2, le=65536)
    """Tokens per example; longer docstrings are truncated (`python -m app data stats` counts them)."""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Share of the texts held out for validation, by a hash of each text's content."""
    seed: int = 0
    """Salt of the train/val split hash."""


TextDataConfig = FileDataConfig | DocstringsDataConfig
"""Text read with an `hf` model folder's own tokenizer."""
TEXT_DATA = (FileDataConfig, DocstringsDataConfig)


def _data_kind(value: Any) -> str:
    """Which data class a section is: built-in when it has `name`, docstrings or files by `kind`."""
    if isinstance(value, dict):
        return "builtin-data" if "name" in value else "docstrings-data" if value.get("kind") == "docstrings" else "file-data"
    return {DataConfig: "builtin-data", DocstringsDataConfig: "docstrings-data"}.get(type(value), "file-data")


DataSection = Annotated[
    Union[
        Annotated[DataConfig, Tag("builtin-data")],
        Annotated[FileDataConfig, Tag("file-data")],
        Annotated[DocstringsDataConfig, Tag("docstrings-data")],
    ],
    Discriminator(_data_kind),
]
"""The `data` section: a built-in dataset (`name`), files or docstrings (`kind`)."""

# The built-in model kind each built-in dataset trains.
BUILTIN_PAIRS = {"lm-code": "gpt", "digits": "vit"}


def check_model_fits_data(model: Any, data: DataConfig | TextDataConfig) -> None:
    """Raise ValueError naming the keys when the model section cannot train on the data section."""
    if isinstance(data, DataConfig):
        want = BUILTIN_PAIRS[data.name]
        if model.kind != want:
            hint = " (an hf model reads text: data.kind jsonl | csv | parquet | text | docstrings)" if model.kind == "hf" else ""
            raise ValueError(f"model.kind {model.kind!r} does not fit data.name {data.name!r} (needs {want!r}){hint}")
        return
    if model.kind != "hf":
        what = "standard-library docstrings" if isinstance(data, DocstringsDataConfig) else "a file dataset"
        raise ValueError(
            f"data.kind {data.kind!r} ({what}) needs model.kind 'hf' (its tokenizer reads the text); "
            f"model.kind {model.kind!r} trains on data.name {[n for n, k in BUILTIN_PAIRS.items() if k == model.kind][0]!r}"
        )
    if isinstance(data, DocstringsDataConfig):
        if model.task == "sequence_classification":
            raise ValueError("model.task 'sequence_classification' needs labelled data; data.kind 'docstrings' has no labels")
        return
    if data.format == "instructions":
        if model.task != "causal_lm":
            raise ValueError(f"data.format 'instructions' trains a causal LM (model.task 'causal_lm'), not model.task {model.task!r}")
        return
    if model.task == "sequence_classification" and not data.label_field:
        raise ValueError("model.task 'sequence_classification' needs data.label_field (the column with the class)")
    if model.task != "sequence_classification" and data.label_field:
        raise ValueError(f"data.label_field is for model.task 'sequence_classification', not {model.task!r}")
    if not data.text_field:
        raise ValueError(f"model.task {model.task!r} needs data.text_field (the column with the text)")
