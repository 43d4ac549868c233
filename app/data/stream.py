"""File datasets streamed through Ray Data: files larger than one machine's memory.

When: `data.stream: true`, or `auto` (the default) when the files together exceed
`data.stream_above_mb`. Below that, app/data/files.py reads them into each worker's memory.
The module is over 500 lines and one idea, a file's rows through Ray Data from the read task to a
worker's batches: the datasource, the survey and the worker-side reader share one row format and
one split hash, which separate modules would have to re-agree on.

Reading: `FileRowsDatasource` is a Ray Data datasource whose read task streams one jsonl / csv /
text file (one task per file: a line number needs every line before it, and a quoted csv value
may span lines), or one parquet row group (its first row number comes from the file's metadata),
in blocks of `BLOCK_ROWS` rows. It uses the in-memory path's readers and its `check_row`, so a bad
row gets the same 'file:line: field ...: reason' text either way, and the same content hash
(`_hash_fraction`) puts each row into the same split. A bad row becomes a row with a `bad`
reason and no fields, so the check below sees every one in file order.

Survey: before training the driver makes one streamed pass (`survey`): each block is reduced by a
Ray task to a small summary (good rows per split, labels, bad rows and their first reasons, the
first val rows) and the driver merges the summaries in file order; files of a few MB
(`SMALL_FILES_MB`) are read by the driver itself, block by block, to the same summaries.
So without `skip_bad_rows` the first bad row in the files is the error, as in memory (after the
whole pass, not at that row); with it, the count and the first `MAX_REASONS` reasons are printed
and kept. A classifier's labels are `data.labels`, else the sorted labels this pass saw in train
(at most `MAX_LABELS`).
Validation is small and materialized: the first `eval_batches x batch_size` val rows in file
order, the rows the in-memory path evaluates on, travel to every worker in the loop config.

Training: `train_dataset` keeps the good train rows and tokenizes them with the model folder's
own tokenizer in `map_batches`; the driver hands it to the TorchTrainer (`datasets={"train":
...}`), Ray Train splits it into equal shares, one per worker (`streaming_split`), and each worker
iterates its shard epoch after epoch (`StreamedTextData.stream_batches`), mixing rows in a local
shuffle buffer of `SHUFFLE_BATCHES` batches (beyond that, the file's order is the order seen).
Resume: the step count, model and optimizer come back, but the data position does not: the
resumed run starts an epoch at the beginning of its shard, so rows of the interrupted epoch are
seen again. (Skipping the consumed batches would mean reading them, and the order of blocks
from parallel read tasks is not fixed, so the skipped rows would not be the same ones anyway.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn

from app.config.data import FileDataConfig
from app.config.model import HFModelConfig
from app.data.files import (
    MAX_REASONS, BadRow, DataFileError, Example, Fields, Tokenized, _hash_fraction, _READERS, _wanted, check_row, tokenize,
)

# Rows per block a read task yields: a few thousand keeps a task's memory small and its
# blocks big enough that Ray's per-block overhead does not dominate.
BLOCK_ROWS = 4096
# Distinct labels a streamed classifier may collect from its train rows; more is refused
# (likely the wrong column), and `data.labels` lifts the limit.
MAX_LABELS = 1000
# The local shuffle buffer of a worker's shard, in batches.
SHUFFLE_BATCHES = 16


def should_stream(cfg: FileDataConfig) -> bool:
    """Whether a file data section is read through Ray Data (see the module docstring)."""
    if getattr(cfg, "format", "text") == "instructions":
        return False  # instruction rows (chat rendering, packing) have only the in-memory reader
    if cfg.stream != "auto":
        return bool(cfg.stream)
    size = sum(os.path.getsize(p) for p in (cfg.path, cfg.train_path, cfg.val_path) if p is not None)
    return size > cfg.stream_above_mb * 1e6


def _fields(cfg: FileDataConfig, labels: list[str] | None = None) -> Fields:
    given = labels if labels is not None else cfg.labels
    return Fields(cfg.text_field, cfg.text_pair_field, cfg.label_field, tuple(given) if given else None)


# ---------------------------------------------------------------------------------------------
# Reading


def _schema():
    import pyarrow as pa

    return pa.schema([("file", pa.int32()), ("line", pa.int64()), ("val", pa.bool_()), ("text", pa.string()),
                      ("text_pair", pa.string()), ("label", pa.string()), ("bad", pa.string())])


def _parquet_group_records(path: Path, fields: Fields, group: int, first_row: int) -> Iterator[tuple[int, dict]]:
    """(1-based row, record) of one parquet row group, numbered as `_parquet_records` numbers the file."""
    import pyarrow.parquet as pq

    row = first_row - 1
    for batch in pq.ParquetFile(path).iter_batches(row_groups=[group], columns=_wanted(fields), batch_size=BLOCK_ROWS):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def rows_blocks(records: Iterator[tuple[int, Any]], path: str, file_index: int, fields: Fields,
                split: str | None, val_fraction: float, seed: int):
    """pyarrow blocks of at most BLOCK_ROWS checked rows; `split` is 'train' / 'val' for a whole
    file, None to split each row by its content hash (as `split_examples` does)."""
    rows: list[tuple] = []
    try:
        for line, record in records:
            try:
                if isinstance(record, BadRow):
                    raise record
                ex = check_row(record, fields, path, line)
                is_val = split == "val" if split is not None else _hash_fraction(ex.key, seed) < val_fraction
                row = (file_index, line, is_val, ex.text, ex.text_pair, ex.label, None)
            except BadRow as e:
                row = (file_index, line, None, None, None, None, str(e))
            rows.append(row)
            if len(rows) >= BLOCK_ROWS:
                yield _block(rows)
                rows = []
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if rows:
        yield _block(rows)


def _block(rows: list[tuple]):
    """A pyarrow block of checked rows (file, line, val, text, text_pair, label, bad)."""
    import pyarrow as pa

    schema = _schema()
    return pa.table([pa.array(list(col), f.type) for col, f in zip(zip(*rows), schema)], schema=schema)


class FileRowsDatasource(Datasource):
    """A Ray Data datasource over `files`, each (path, 'train' | 'val' | None = split by hash); one
    read task per text file or parquet row group. File-level problems (a missing column, an
    unreadable parquet file) are raised when it is built, on the driver, before any task runs."""

    def __init__(self, kind: str, files: list[tuple[str, str | None]], fields: Fields, val_fraction: float, seed: int):
        super().__init__()
        self.kind, self.files, self.fields, self.val_fraction, self.seed = kind, files, fields, val_fraction, seed
        self.pieces: list[tuple[int, int | None, int, int]] = []  # (file index, row group, its first row, bytes)
        for index, (path, _) in enumerate(files):
            if kind == "parquet":
                meta = _parquet_metadata(path, fields)
                first = 1
                for g in range(meta.num_row_groups):
                    self.pieces.append((index, g, first, meta.row_group(g).total_byte_size))
                    first += meta.row_group(g).num_rows
            else:
                try:
                    next(iter(_READERS[kind](Path(path), fields)), None)  # a csv header must name the columns
                except UnicodeDecodeError as e:
                    raise DataFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
                self.pieces.append((index, None, 1, os.path.getsize(path)))

    def estimate_inmemory_data_size(self) -> int:
        return sum(piece[-1] for piece in self.pieces)

    def read_piece(self, index: int, group: int | None, first: int):
        """The blocks of one piece: what a read task runs."""
        path, split = self.files[index]
        records = (_parquet_group_records(Path(path), self.fields, group, first) if group is not None
                   else _READERS[self.kind](Path(path), self.fields))
        return rows_blocks(records, path, index, self.fields, split, self.val_fraction, self.seed)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        tasks = []
        for index, group, first, size in self.pieces:
            meta = BlockMetadata(num_rows=None, size_bytes=size, input_files=[self.files[index][0]], exec_stats=None)
            read = partial(self.read_piece, index, group, first)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def _parquet_metadata(path: str, fields: Fields):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataFileError(f"{path}: not a readable parquet file ({e})") from e
    columns = parquet.schema_arrow.names
    for name in _wanted(fields):
        if name not in columns:
            raise DataFileError(f"{path}: field {name!r}: no such column (columns: {', '.join(columns)})")
    return parquet.metadata


# ---------------------------------------------------------------------------------------------
# Survey: one pass, block summaries merged in file order


def summarize_block(block, keep_val: int) -> dict:
    """What the driver needs from one block of checked rows (JSON-friendly)."""
    rows = block.to_pylist()
    good = [r for r in rows if r["bad"] is None]
    bad = [r for r in rows if r["bad"] is not None]
    val = [r for r in good if r["val"]]
    first_val_label: dict[str, list[int]] = {}
    for r in val:
        if r["label"] is not None and r["label"] not in first_val_label:
            first_val_label[r["label"]] = [r["file"], r["line"]]
    rows_per_file: dict[str, int] = {}
    for r in good:
        rows_per_file[str(r["file"])] = rows_per_file.get(str(r["file"]), 0) + 1
    return {
        "train": len(good) - len(val),
        "val": len(val),
        "rows_per_file": rows_per_file,
        "bad": len(bad),
        "bad_rows": [[r["file"], r["line"], r["bad"]] for r in bad[:MAX_REASONS]],
        "train_labels": sorted({r["label"] for r in good if not r["val"] and r["label"] is not None})[: MAX_LABELS + 1],
        "first_val_label": first_val_label,
        "val_rows": [[r["file"], r["line"], r["text"], r["text_pair"], r["label"]] for r in val[:keep_val]],
    }


@dataclass
class Survey:
    """The merged block summaries of one pass over some files."""

    n_train: int = 0
    n_val: int = 0
    rows_per_file: dict[int, int] = field(default_factory=dict)
    bad_rows: int = 0
    first_bad: list[tuple] = field(default_factory=list)  # (file index, line, reason): the first MAX_REASONS
    train_labels: set[str] = field(default_factory=set)
    first_val_label: dict[str, tuple[int, int]] = field(default_factory=dict)  # label -> (file index, line)
    val_rows: list[tuple] = field(default_factory=list)  # (file index, line, text, pair, label): the first keep_val


def merge_summaries(summaries: Iterable[dict], keep_val: int, where: str, label_field: str | None) -> Survey:
    """One Survey from block summaries in any order: whatever is 'first' is sorted by (file, line).
    `where` names the files in the error about too many labels."""
    out = Survey()
    for s in summaries:
        out.n_train += s["train"]
        out.n_val += s["val"]
        for f, n in s["rows_per_file"].items():
            out.rows_per_file[int(f)] = out.rows_per_file.get(int(f), 0) + n
        out.bad_rows += s["bad"]
        out.first_bad = sorted(out.first_bad + [tuple(b) for b in s["bad_rows"]])[:MAX_REASONS]
        out.train_labels.update(s["train_labels"])
        if len(out.train_labels) > MAX_LABELS:
            raise DataFileError(f"{where}: field {label_field!r}: more than {MAX_LABELS} distinct labels in the train "
                                "rows; a streamed classifier needs its labels before training: give them in id order "
                                "as data.labels (or check that label_field is the class column)")
        for label, at in s["first_val_label"].items():
            out.first_val_label[label] = min(out.first_val_label.get(label, tuple(at)), tuple(at))
        out.val_rows = sorted(out.val_rows + [tuple(r) for r in s["val_rows"]], key=lambda r: r[:2])[:keep_val]
    return out


def ray_summaries(source: FileRowsDatasource, keep_val: int) -> Iterator[dict]:
    """Summaries of every block of `source`, each computed by a Ray task next to its block."""
    import pyarrow as pa

    def summarize(block):
        return pa.table({"summary": [json.dumps(summarize_block(block, keep_val))]})

    ds = read_dataset(source).map_batches(summarize, batch_size=None, batch_format="pyarrow")
    try:
        for row in ds.iter_rows():
            yield json.loads(row["summary"])
    except Exception as e:  # noqa: BLE001 -- re-raised below, as the data error it wraps or as it is
        raise _data_error_inside(e) or e


def _data_error_inside(err: BaseException) -> DataFileError | None:
    """The DataFileError a Ray task raised (a read task: a file that is not UTF-8), which reaches the
    driver wrapped (a RayTaskError holding it as `.cause`), its message followed by lines that Ray
    Data's retry logic appends; our messages are one line, so the first line is ours."""
    seen: BaseException | None = err
    while seen is not None:
        inner = getattr(seen, "cause", seen)
        if isinstance(inner, DataFileError):
            return DataFileError(str(inner.args[0] if inner.args else inner).split("\n", 1)[0])
        seen = seen.__cause__
    return None


def local_summaries(source: FileRowsDatasource, keep_val: int) -> Iterator[dict]:
    """The same summaries with every read task run in this process, one after another (small
    files, and tests without Ray)."""
    for task in source.get_read_tasks(1):
        for block in task():
            yield summarize_block(block, keep_val)


SMALL_FILES_MB = 64.0
"""Files up to this many MB (10^6 bytes) together are small: starting a Ray task costs seconds (a
new worker process imports the readers, and a tokenizing one loads the tokenizer), while one pass
over a few MB takes about a second. So the survey reads small files in the driver's process, and
their Dataset keeps one read task per piece, tokenizing in the same task (`read_dataset`). Above
it, Ray tasks read the pieces in parallel, next to the data."""


def read_dataset(source: FileRowsDatasource):
    """The Ray Dataset of `source`'s blocks. For small files one block stream per piece: Ray Data
    would otherwise split each read task's output into enough blocks for twice the cluster's CPUs
    (a 200-row file into 8 blocks), each tokenized by its own task, a worker process that loads
    the tokenizer first: 39 s against 18 s for a first pass over such a file on 2 cores, where
    read and tokenize then run fused in one task."""
    import ray.data

    if _small(source.files):
        return ray.data.read_datasource(source, override_num_blocks=len(source.pieces))
    return ray.data.read_datasource(source)


def _small(files: list[tuple[str, str | None]]) -> bool:
    return sum(os.path.getsize(path) for path, _ in files) <= SMALL_FILES_MB * 1e6


def _default_summaries(files: list[tuple[str, str | None]]):
    return local_summaries if _small(files) else ray_summaries


def survey(kind: str, files: list[tuple[str, str | None]], fields: Fields, val_fraction: float, seed: int,
           keep_val: int, *, skip_bad_rows: bool, summaries=None) -> Survey:
    """One streamed pass over `files` (by `summaries`, default: `SMALL_FILES_MB`); raises the
    first bad row (without `skip_bad_rows`) and a file without usable rows, as app/data/files.py does."""
    source = FileRowsDatasource(kind, files, fields, val_fraction, seed)
    summaries = summaries or _default_summaries(files)
    where = ", ".join(path for path, split in files if split != "val")
    result = merge_summaries(summaries(source, keep_val), keep_val, where, fields.label_field)
    if result.first_bad and not skip_bad_rows:
        raise DataFileError(f"{result.first_bad[0][2]} (skip_bad_rows counts such rows instead)")
    for index, (path, _) in enumerate(files):
        if not result.rows_per_file.get(index):
            raise DataFileError(f"{path}: no usable rows" + (f" ({result.bad_rows} bad)" if result.bad_rows else ""))
    return result


# ---------------------------------------------------------------------------------------------
# The driver's side: survey, labels, the train Dataset


def survey_files(cfg: FileDataConfig, keep_val: int, summaries=None) -> dict:
    """The summary every worker receives (labels, row counts, bad rows, the first `keep_val` val
    rows in file order), checked as `load_splits` checks the in-memory rows."""
    fields = _fields(cfg)
    if cfg.path is not None:
        s = survey(cfg.kind, [(cfg.path, None)], fields, cfg.val_fraction, cfg.seed, keep_val,
                   skip_bad_rows=cfg.skip_bad_rows, summaries=summaries)
        if not s.n_train or not s.n_val:
            raise DataFileError(
                f"val_fraction {cfg.val_fraction} of {s.n_train + s.n_val} rows left the "
                f"{'train' if not s.n_train else 'val'} split empty; use more rows or give train_path + val_path"
            )
        if cfg.label_field and cfg.labels is None:
            unseen = sorted((at, label) for label, at in s.first_val_label.items() if label not in s.train_labels)
            if unseen:
                (_, line), label = unseen[0]
                raise DataFileError(f"{cfg.path}:{line}: field {cfg.label_field!r}: label {label!r} occurs "
                                    "only in the val split; give the label names (labels) or more rows")
        bad, first_bad, n_train, n_val, seen, val_rows = s.bad_rows, s.first_bad, s.n_train, s.n_val, s.train_labels, s.val_rows
    else:
        t = survey(cfg.kind, [(cfg.train_path, "train")], fields, cfg.val_fraction, cfg.seed, 0,
                   skip_bad_rows=cfg.skip_bad_rows, summaries=summaries)
        seen = t.train_labels
        # val labels must be ones the model is trained on
        val_fields = _fields(cfg, sorted(seen)) if cfg.label_field and cfg.labels is None else fields
        v = survey(cfg.kind, [(cfg.val_path, "val")], val_fields, cfg.val_fraction, cfg.seed, keep_val,
                   skip_bad_rows=cfg.skip_bad_rows, summaries=summaries)
        bad, first_bad = t.bad_rows + v.bad_rows, (t.first_bad + v.first_bad)[:MAX_REASONS]
        n_train, n_val, val_rows = t.n_train, v.n_val, [(1, *row[1:]) for row in v.val_rows]
    labels = (list(cfg.labels) if cfg.labels is not None else sorted(seen)) if cfg.label_field else None
    return {"labels": labels, "n_train": n_train, "n_val": n_val, "bad_rows": bad,
            "reasons": [reason for _, _, reason in first_bad], "val_rows": [list(row) for row in val_rows]}


def train_source(cfg: FileDataConfig, labels: list[str] | None) -> FileRowsDatasource:
    """The datasource of the train rows: `path` (split by hash) or `train_path`."""
    fields = _fields(cfg, labels if cfg.label_field else None)
    files = [(cfg.path, None)] if cfg.path is not None else [(cfg.train_path, "train")]
    return FileRowsDatasource(cfg.kind, files, fields, cfg.val_fraction, cfg.seed)


def train_dataset(cfg: FileDataConfig, model: HFModelConfig, labels: list[str] | None):
    """The good train rows, tokenized by `TokenizeRows` in `map_batches` (a Ray task per block)."""
    tokenize_rows = TokenizeRows(model.path, model.task, cfg.max_length, labels, cfg.text_pair_field is not None)
    return read_dataset(train_source(cfg, labels)).map_batches(tokenize_rows, batch_format="pyarrow", batch_size=None)


@lru_cache(maxsize=2)
def _tokenizer(path: str):
    """One tokenizer per model folder and process (Ray reuses its worker processes across tasks)."""
    from app.models.hf import load_tokenizer

    return load_tokenizer(path)


class TokenizeRows:
    """A block of checked rows -> its good train rows as token id lists (+ label id; + the pair's ids
    for an embedding model, tokenized apart: each is embedded on its own)."""

    def __init__(self, model_path: str, task: str, max_length: int, labels: list[str] | None, has_pair: bool):
        self.model_path, self.task, self.max_length, self.labels, self.has_pair = model_path, task, max_length, labels, has_pair

    def __call__(self, block):
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = pc.and_(pc.is_null(block["bad"]), pc.invert(block["val"].fill_null(True)))
        rows = block.filter(keep).to_pylist()
        if not rows:  # tokenize a stand-in row and keep none: every block gets the same columns and types
            label = self.labels[0] if self.labels else None
            return self(_block([(0, 0, False, "x", "x" if self.has_pair else None, label, None)])).slice(0, 0)
        examples = [Example(r["text"], r["text_pair"], r["label"], "", r["line"]) for r in rows]
        tokenizer = _tokenizer(self.model_path)
        cols: dict[str, Any] = {"file": pa.array([r["file"] for r in rows], pa.int32()),
                                "line": pa.array([r["line"] for r in rows], pa.int64())}
        if self.task == "embedding":
            texts = [Example(ex.text, None, None, "", ex.line) for ex in examples]
            pairs = [Example(ex.text_pair if ex.text_pair is not None else ex.text, None, None, "", ex.line) for ex in examples]
            cols.update(_token_columns(tokenize(texts, tokenizer, self.max_length), ""))
            cols.update(_token_columns(tokenize(pairs, tokenizer, self.max_length), "pair_"))
        else:
            labels = self.labels if self.task == "sequence_classification" else None
            tok = tokenize(examples, tokenizer, self.max_length, labels)
            cols.update(_token_columns(tok, ""))
            if tok.labels is not None:
                cols["label_id"] = pa.array(tok.labels, pa.int64())
        return pa.table(cols)


def _token_columns(tok: Tokenized, prefix: str) -> dict:
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    cols = {f"{prefix}input_ids": pa.array(tok.input_ids, ids), f"{prefix}attention_mask": pa.array(tok.attention_mask, ids)}
    if tok.token_type_ids is not None:
        cols[f"{prefix}token_type_ids"] = pa.array(tok.token_type_ids, ids)
    return cols


def _tokenized(batch: dict, prefix: str) -> Tokenized:
    """A Tokenized of one collated batch's columns (lists of ids per row)."""

    def lists(name: str):
        return [list(map(int, row)) for row in batch[name]] if name in batch else None

    return Tokenized(input_ids=lists(f"{prefix}input_ids"), attention_mask=lists(f"{prefix}attention_mask"),
                     token_type_ids=lists(f"{prefix}token_type_ids"), labels=_ints(batch.get("label_id")))


def _ints(values) -> list[int] | None:
    return None if values is None else [int(v) for v in values]


# ---------------------------------------------------------------------------------------------
# The worker's side


class _PadBatch(NumpyBatchCollateFn):
    """A batch of the shard (numpy columns of token id lists) -> (packed x, targets, (file, line) ids),
    padded by app/data/text.py's `pad_batch`: the same packing and targets as the in-memory path."""

    def __init__(self, pad_id: int, task: str):
        super().__init__()
        self.pad_id, self.task = pad_id, task

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from app.data.text import pad_batch

        tok = _tokenized(batch, "")
        pairs = _tokenized(batch, "pair_") if self.task == "embedding" else None
        x, y = pad_batch(tok, range(len(tok.input_ids)), self.pad_id, self.task, pairs)
        ids = torch.from_numpy(np.stack([batch["file"], batch["line"]], axis=1).astype(np.int64))
        return x, y, ids


class StreamedTextData:
    """A worker's view of streamed file data: its shard of the train Dataset, batched and padded
    as app/data/text.py pads (same packing, same targets), and the val rows the driver surveyed."""

    def __init__(self, cfg: FileDataConfig, model: HFModelConfig, summary: dict, shard):
        from app.models.hf import load_tokenizer

        self.cfg, self.task, self.shard = cfg, model.task, shard
        self.kind = "classifier" if model.task == "sequence_classification" else "lm" if model.task == "causal_lm" else "embedding"
        self.labels = summary["labels"]
        self.bad_rows, self.reasons = summary["bad_rows"], summary["reasons"]
        self.n_train, self.n_val = summary["n_train"], summary["n_val"]
        tokenizer = load_tokenizer(model.path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        paths = [cfg.path] if cfg.path is not None else [cfg.train_path, cfg.val_path]
        val = [Example(text, pair, label, paths[f], line) for f, line, text, pair, label in summary["val_rows"]]
        self.val_pairs = None
        if model.task == "embedding":
            from app.data.text import _texts_and_pairs

            self.val, self.val_pairs = (tokenize(part, tokenizer, cfg.max_length) for part in _texts_and_pairs(val))
        else:
            self.val = tokenize(val, tokenizer, cfg.max_length, self.labels)
        self.n_val_kept = len(val)

    def describe(self) -> dict:
        out = {"dataset": f"{self.cfg.kind} files, streamed", "train_rows": self.n_train, "val_rows": self.n_val}
        if self.labels is not None:
            out["labels"] = len(self.labels)
        if self.bad_rows:
            out["bad_rows_skipped"] = self.bad_rows
        return out

    def stream_batches(self, seed: int, rank: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This worker's micro-batches, epoch after epoch over its shard: (packed x, targets, the
        (file index, line) of each row (B, 2)). Raises when an epoch yields no full batch."""
        collate = _PadBatch(self.pad_id, self.task)
        epoch = 0
        while True:
            n = 0
            shuffle_seed = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
            for batch in self.shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, drop_last=True,
                                                       local_shuffle_buffer_size=SHUFFLE_BATCHES * batch_size,
                                                       local_shuffle_seed=shuffle_seed):
                n += 1
                yield batch
            if n == 0:
                raise DataFileError(f"{self.cfg.path or self.cfg.train_path}: this worker's share of the {self.n_train} "
                                    f"train rows holds no full batch of {batch_size}; use a smaller train.batch_size "
                                    "or fewer workers")
            epoch += 1

    def val_batches(self, n_batches: int, batch_size: int) -> Iterator:
        """The surveyed val rows in file order, at most n_batches batches."""
        from app.data.text import pad_batch

        for start in range(0, min(self.n_val_kept, n_batches * batch_size), batch_size):
            idx = range(start, min(start + batch_size, self.n_val_kept))
            yield pad_batch(self.val, idx, self.pad_id, self.task, self.val_pairs)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        from app.data.text import pad_batch

        x, _ = pad_batch(self.val, range(min(batch_size, self.n_val_kept)), self.pad_id, "causal_lm")
        return x
