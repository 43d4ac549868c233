"""Text datasets from the user's files: jsonl, csv, parquet or plain text, read into memory.

Every row is checked as it is read; a bad one (missing field, wrong type, empty text, unknown
label) is an error naming the file, the 1-based line (parquet: the 1-based row) and the field,
or, with `skip_bad_rows`, is counted and its reason kept. Rows are then split into train / val
deterministically, or come from separate train and val files, and are tokenized with the
model folder's own tokenizer.

This module is the small-file path: it holds the whole file in memory. Larger files (above
`data.stream_above_mb`, or with `data.stream: true`) are streamed through Ray Data by
app/data/stream.py, whose datasource reads with the readers here and checks every record with
`check_row` and splits it with `_hash_fraction`, so both paths give the same rows, the same
split and the same bad-row messages.

Expected config section (wired by the caller): `data: {kind: jsonl | csv | parquet | text,
path | train_path + val_path, text_field, text_pair_field, label_field, labels, max_length,
val_fraction, seed, skip_bad_rows, stream, stream_above_mb}`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from app.errors import TemperError

FileKind = Literal["jsonl", "csv", "parquet", "text"]
FILE_KINDS: tuple[str, ...] = ("jsonl", "csv", "parquet", "text")
# How many bad-row reasons a skipping read keeps to show the user.
MAX_REASONS = 5


class DataFileError(TemperError, ValueError):
    """A data file (or one of its rows) that cannot be used; the message names file, line, field."""


@dataclass(frozen=True)
class Fields:
    """Which columns hold what. `text_pair_field` and `label_field` are optional; `labels`, when
    given, is the closed set of allowed label values (anything else is an unknown label)."""

    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str | None = None
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Example:
    """One good row. `label` is the label as a string (integer labels are written in decimal)."""

    text: str
    text_pair: str | None
    label: str | None
    file: str
    line: int

    @property
    def key(self) -> tuple[str, str | None]:
        """What makes two rows the same example (duplicates, train/val overlap)."""
        return (self.text, self.text_pair)


@dataclass
class ReadResult:
    """The good rows of a file and, with skip_bad_rows, how many were bad and why."""

    examples: list[Example]
    bad_rows: int = 0
    reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    labels: list[str] | None  # label names, id = position; None without a label field
    bad_rows: int = 0
    reasons: list[str] = field(default_factory=list)


class BadRow(Exception):
    """Raised by `check_row`; `str()` is the full 'file:line: field ...: reason' message."""


# ---------------------------------------------------------------------------------------------
# Rows


def check_row(record: dict[str, Any], fields: Fields, file: str, line: int) -> Example:
    """One record (a dict of column -> value) as an Example, or BadRow naming file, line, field."""

    def bad(name: str, reason: str) -> BadRow:
        return BadRow(f"{file}:{line}: field {name!r}: {reason}")

    def text_value(name: str) -> str:
        if name not in record or record[name] is None:
            raise bad(name, "missing")
        value = record[name]
        if not isinstance(value, str):
            raise bad(name, f"expected a string, got {type(value).__name__} {value!r:.40}")
        if not value.strip():
            raise bad(name, "empty text")
        return value

    text = text_value(fields.text_field)
    pair = text_value(fields.text_pair_field) if fields.text_pair_field else None
    label = None
    if fields.label_field:
        name = fields.label_field
        if name not in record or record[name] is None:
            raise bad(name, "missing")
        value = record[name]
        # bool is an int subclass, but True is not a class id
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise bad(name, f"expected a string or integer label, got {type(value).__name__} {value!r:.40}")
        label = str(value).strip() if isinstance(value, str) else str(value)
        if not label:
            raise bad(name, "empty label")
        if fields.labels is not None and label not in fields.labels:
            raise bad(name, f"unknown label {label!r} (labels: {', '.join(fields.labels)})")
    return Example(text=text, text_pair=pair, label=label, file=file, line=line)


# ---------------------------------------------------------------------------------------------
# Readers: each yields (line, record) with the 1-based line (parquet: row) the record starts on.
# jsonl and csv use Python's own parsers, streamed line by line, because pyarrow's readers do not
# report source line numbers (and pyarrow.json gives up on the whole file at one bad line); the
# numbers are what a user needs to fix the row.


def _jsonl_records(path: Path, fields: Fields) -> Iterator[tuple[int, dict | BadRow]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, BadRow(f"{path}:{line_no}: not valid JSON ({e.msg})")
                continue
            if not isinstance(record, dict):
                yield line_no, BadRow(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                continue
            yield line_no, record


def _csv_records(path: Path, fields: Fields) -> Iterator[tuple[int, dict | BadRow]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataFileError(f"{path}:1: empty file, expected a header line")
        for name in _wanted(fields):
            if name not in header:
                raise DataFileError(f"{path}:1: field {name!r}: no such column (columns: {', '.join(header)})")
        start = reader.line_num + 1
        for row in reader:
            line_no, start = start, reader.line_num + 1  # a quoted value may span lines
            if not row:
                continue
            if len(row) > len(header):
                yield line_no, BadRow(f"{path}:{line_no}: {len(row)} values for {len(header)} columns")
                continue
            # csv has no types: every value is a string, an empty cell is an empty text; columns
            # missing at the end of a short row are missing fields
            yield line_no, dict(zip(header, row))


def _parquet_records(path: Path, fields: Fields) -> Iterator[tuple[int, dict | BadRow]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataFileError(f"{path}: not a readable parquet file ({e})") from e
    columns = parquet.schema_arrow.names
    wanted = _wanted(fields)
    for name in wanted:
        if name not in columns:
            raise DataFileError(f"{path}: field {name!r}: no such column (columns: {', '.join(columns)})")
    row = 0
    for batch in parquet.iter_batches(columns=wanted, batch_size=8192):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _text_records(path: Path, fields: Fields) -> Iterator[tuple[int, dict | BadRow]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if text.strip():  # blank lines separate paragraphs; they are not rows
                yield line_no, {fields.text_field: text}


_READERS = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": _parquet_records, "text": _text_records}


def _wanted(fields: Fields) -> list[str]:
    return [name for name in (fields.text_field, fields.text_pair_field, fields.label_field) if name]


def read_examples(path: str | Path, kind: str, fields: Fields, *, skip_bad_rows: bool = False) -> ReadResult:
    """All good rows of one file. A bad row raises DataFileError unless `skip_bad_rows`."""
    path = Path(path)
    if kind not in FILE_KINDS:
        raise DataFileError(f"data kind {kind!r} is not one of {', '.join(FILE_KINDS)}")
    if kind == "text" and (fields.text_pair_field or fields.label_field):
        raise DataFileError(f"{path}: a text file has one text per line: no text_pair_field or label_field")
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    return collect_rows(path, _READERS[kind](path, fields), lambda record, line: check_row(record, fields, str(path), line),
                        skip_bad_rows)


def collect_rows(path: Path, records: Iterator[tuple[int, dict | BadRow]], check, skip_bad_rows: bool) -> ReadResult:
    """The good rows of one file: `check(record, line)` makes each an example or raises BadRow; a
    bad row raises DataFileError unless `skip_bad_rows`, which counts it and keeps its reason."""
    result = ReadResult(examples=[])
    try:
        for line, record in records:
            try:
                if isinstance(record, BadRow):
                    raise record
                result.examples.append(check(record, line))
            except BadRow as e:
                if not skip_bad_rows:
                    raise DataFileError(f"{e} (skip_bad_rows counts such rows instead)") from None
                result.bad_rows += 1
                if len(result.reasons) < MAX_REASONS:
                    result.reasons.append(str(e))
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not result.examples:
        raise DataFileError(f"{path}: no usable rows" + (f" ({result.bad_rows} bad)" if result.bad_rows else ""))
    return result


# ---------------------------------------------------------------------------------------------
# Splits


def _hash_fraction(key: tuple[str, str | None], seed: int) -> float:
    """A stable number in [0, 1) for an example's content."""
    digest = hashlib.sha256(json.dumps([seed, *key]).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, val), each row going to val when the hash of (seed, its text) < val_fraction.

    Hashing the content, not the position, keeps the split stable when rows are added or
    reordered, and puts exact duplicates on the same side (no train/val leak from them). The
    val share is therefore close to, not exactly, `val_fraction`.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataFileError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = [], []
    for ex in examples:
        (val if _hash_fraction(ex.key, seed) < val_fraction else train).append(ex)
    if not train or not val:
        raise DataFileError(
            f"val_fraction {val_fraction} of {len(examples)} rows left the "
            f"{'train' if not train else 'val'} split empty; use more rows or give train_path + val_path"
        )
    return train, val


def load_splits(
    kind: str,
    fields: Fields,
    *,
    path: str | Path | None = None,
    train_path: str | Path | None = None,
    val_path: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_bad_rows: bool = False,
) -> Splits:
    """Train and val examples from `path` (split by `val_fraction`, `seed`) or from `train_path`
    + `val_path`. Label names are `fields.labels` when given, else the sorted labels of train;
    a val label not seen in train is then an unknown label too."""
    if (path is None) == (train_path is None and val_path is None):
        raise DataFileError("give either path, or train_path and val_path")
    if path is None and (train_path is None or val_path is None):
        raise DataFileError("train_path and val_path go together")
    bad, reasons = 0, []

    def read(p: str | Path, f: Fields) -> list[Example]:
        nonlocal bad
        result = read_examples(p, kind, f, skip_bad_rows=skip_bad_rows)
        bad += result.bad_rows
        reasons.extend(result.reasons[: MAX_REASONS - len(reasons)])
        return result.examples

    if path is not None:
        train, val = split_examples(read(path, fields), val_fraction, seed)
    else:
        train = read(train_path, fields)
        if fields.label_field and fields.labels is None:
            # val labels must be ones the model is trained on
            seen = tuple(sorted({ex.label for ex in train}))  # type: ignore[type-var]
            val = read(val_path, Fields(fields.text_field, fields.text_pair_field, fields.label_field, seen))
        else:
            val = read(val_path, fields)
    labels = None
    if fields.label_field:
        labels = list(fields.labels) if fields.labels is not None else sorted({ex.label for ex in train})  # type: ignore[type-var]
        if path is not None and fields.labels is None:
            unseen = sorted({ex.label for ex in val} - set(labels))  # type: ignore[type-var]
            if unseen:
                first = next(ex for ex in val if ex.label in unseen)
                raise DataFileError(
                    f"{first.file}:{first.line}: field {fields.label_field!r}: label {first.label!r} occurs "
                    "only in the val split; give the label names (labels) or more rows"
                )
    return Splits(train=train, val=val, labels=labels, bad_rows=bad, reasons=reasons)


# ---------------------------------------------------------------------------------------------
# Tokenization


@dataclass
class Tokenized:
    """Per example token ids (no padding: a batch is padded to its own longest member)."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int] | None


def tokenize(examples: list[Example], tokenizer, max_length: int, labels: list[str] | None = None) -> Tokenized:
    """Token ids from the model's own tokenizer, truncated to `max_length` (pairs: longest first)."""
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair for ex in examples] if examples and examples[0].text_pair is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
    label_ids = None
    if labels is not None:
        index = {name: i for i, name in enumerate(labels)}
        label_ids = [index[ex.label] for ex in examples]  # type: ignore[index]
    return Tokenized(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        token_type_ids=enc.get("token_type_ids"),
        labels=label_ids,
    )
