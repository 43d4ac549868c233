"""Streamed file data (app/data/stream.py) against the in-memory path (app/data/files.py) on the
same jsonl / csv / parquet files: the same examples, the same split, the same val rows, the same
bad-row errors and skip counts, the same token ids and padded batches. The datasource's read tasks
and the block summaries run here in-process, without Ray (the Ray Data run: tests/ray/test_stream_train.py);
blocks are made small so that every file spans several blocks (and the parquet file several row groups)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from app.config.data import FileDataConfig
from app.config.model import HFModelConfig
from app.data import stream
from app.data.files import DataFileError, Fields, load_splits
from app.data.stream import local_summaries, should_stream, survey_files, train_source
from app.data.text import FileTextData, pad_batch
from hf_folders import sentiment_rows, tiny_bert

KEEP_VAL = 10  # eval_batches x batch_size of a small job


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(stream, "BLOCK_ROWS", 7)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


def _rows(n: int = 60) -> list[dict]:
    rows = sentiment_rows(n)
    for i, row in enumerate(rows):
        row["text"] += f" {i}"  # distinct texts: the hash split spreads them
    return rows


def write(tmp_path, kind: str, rows: list, name: str = "d"):
    """`rows` (dicts; a str is written as a raw jsonl line) as a file of `kind`."""
    path = tmp_path / f"{name}.{kind}"
    if kind == "jsonl":
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    elif kind == "csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([[r.get("text", ""), r.get("label", "")] for r in rows])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"text": [r.get("text") for r in rows], "label": [r.get("label") for r in rows]})
        pq.write_table(table, path, row_group_size=9)
    return path


def config(**kw) -> FileDataConfig:
    return FileDataConfig.model_validate({"label_field": "label", "val_fraction": 0.25, "seed": 3, "stream": True, **kw})


def streamed_train_rows(cfg: FileDataConfig, labels) -> list[dict]:
    """The good train rows the read tasks yield, in file order (each task run here, in order)."""
    rows = [r for task in train_source(cfg, labels).get_read_tasks(1) for block in task() for r in block.to_pylist()]
    return [r for r in rows if r["bad"] is None and not r["val"]]


def in_memory(cfg: FileDataConfig):
    fields = Fields(cfg.text_field, cfg.text_pair_field, cfg.label_field, tuple(cfg.labels) if cfg.labels else None)
    return load_splits(cfg.kind, fields, path=cfg.path, train_path=cfg.train_path, val_path=cfg.val_path,
                       val_fraction=cfg.val_fraction, seed=cfg.seed, skip_bad_rows=cfg.skip_bad_rows)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_same_rows_split_val_rows_and_skipped_rows_as_in_memory(tmp_path, kind):
    rows = _rows()
    rows[4] = {"text": "  ", "label": "pos"}
    rows[17] = {"text": "the cat sat", "label": "maybe"}
    rows[40] = {"label": "neg"} if kind != "csv" else {"text": "", "label": "neg"}
    cfg = config(kind=kind, path=str(write(tmp_path, kind, rows)), labels=["neg", "pos"], skip_bad_rows=True)
    memory = in_memory(cfg)
    summary = survey_files(cfg, KEEP_VAL, summaries=local_summaries)

    assert summary["bad_rows"] == memory.bad_rows == 3 and summary["reasons"] == memory.reasons
    assert summary["n_train"] == len(memory.train) and summary["n_val"] == len(memory.val)
    assert 5 < summary["n_val"] < 30
    assert summary["labels"] == memory.labels == ["neg", "pos"]
    assert summary["val_rows"] == [[0, ex.line, ex.text, ex.text_pair, ex.label] for ex in memory.val[:KEEP_VAL]]
    train = streamed_train_rows(cfg, summary["labels"])
    assert [(r["line"], r["text"], r["label"]) for r in train] == [(ex.line, ex.text, ex.label) for ex in memory.train]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_first_bad_row_is_the_same_error_as_in_memory(tmp_path, kind):
    cases = [({"text": "ok", "label": "maybe"}, "field 'label': unknown label 'maybe' (labels: neg, pos)"),
             ({"text": " ", "label": "pos"}, "field 'text': empty text")]
    if kind != "csv":  # csv has no types and no missing keys in a full row
        cases += [({"label": "pos"}, "field 'text': missing")]
    if kind == "jsonl":
        cases += [({"text": 5, "label": "pos"}, "field 'text': expected a string, got int"), ("{not json", "not valid JSON")]
    for i, (bad, reason) in enumerate(cases):
        rows = _rows(30)
        rows[11], rows[20] = bad, {"text": "", "label": "neg"}  # the first bad row is the error
        cfg = config(kind=kind, path=str(write(tmp_path, kind, rows, f"case{i}")), labels=["neg", "pos"])
        with pytest.raises(DataFileError) as memory:
            in_memory(cfg)
        with pytest.raises(DataFileError) as streamed:
            survey_files(cfg, KEEP_VAL, summaries=local_summaries)
        line = 13 if kind == "csv" else 12  # csv: the header is line 1
        assert str(streamed.value) == str(memory.value)
        assert str(streamed.value).startswith(f"{cfg.path}:{line}: {reason}"), str(streamed.value)


def test_labels_collected_checked_and_capped(tmp_path, monkeypatch):
    rows = _rows(40)
    cfg = config(kind="jsonl", path=str(write(tmp_path, "jsonl", rows)))
    assert survey_files(cfg, KEEP_VAL, summaries=local_summaries)["labels"] == in_memory(cfg).labels == ["neg", "pos"]
    # a label only in val: the same error naming its first row
    val_line = next(ex.line for ex in in_memory(cfg).val)
    rows[val_line - 1]["label"] = "rare"
    cfg = config(kind="jsonl", path=str(write(tmp_path, "jsonl", rows, "rare")))
    with pytest.raises(DataFileError) as memory:
        in_memory(cfg)
    with pytest.raises(DataFileError) as streamed:
        survey_files(cfg, KEEP_VAL, summaries=local_summaries)
    assert str(streamed.value) == str(memory.value) and f":{val_line}: field 'label': label 'rare'" in str(memory.value)
    # too many distinct labels is refused, naming the file and the key that lifts the limit
    monkeypatch.setattr(stream, "MAX_LABELS", 3)
    many = config(kind="jsonl", path=str(write(tmp_path, "jsonl", [{"text": f"t {i}", "label": str(i)} for i in range(30)], "many")))
    with pytest.raises(DataFileError, match=r"many.jsonl: field 'label': more than 3 distinct labels .* data.labels"):
        survey_files(many, KEEP_VAL, summaries=local_summaries)


def test_train_and_val_files_as_in_memory(tmp_path):
    train = write(tmp_path, "jsonl", _rows(30), "train")
    val = write(tmp_path, "jsonl", [{"text": "the dog ran", "label": "pos"}, {"text": "the cat sat", "label": "odd"}], "val")
    cfg = config(kind="jsonl", train_path=str(train), val_path=str(val))
    with pytest.raises(DataFileError) as memory:
        in_memory(cfg)
    with pytest.raises(DataFileError) as streamed:
        survey_files(cfg, KEEP_VAL, summaries=local_summaries)
    assert str(streamed.value) == str(memory.value) and "val.jsonl:2: field 'label': unknown label 'odd'" in str(memory.value)
    cfg = cfg.model_copy(update={"skip_bad_rows": True})
    summary, memory = survey_files(cfg, KEEP_VAL, summaries=local_summaries), in_memory(cfg)
    assert (summary["n_train"], summary["n_val"], summary["bad_rows"]) == (30, 1, 1) == (len(memory.train), len(memory.val), memory.bad_rows)
    assert summary["val_rows"] == [[1, 1, "the dog ran", None, "pos"]]


def test_tokenized_shard_batches_equal_the_in_memory_batches(tmp_path, bert):
    cfg = config(kind="parquet", path=str(write(tmp_path, "parquet", _rows())), max_length=8)
    model = HFModelConfig(kind="hf", path=str(bert), task="sequence_classification")
    summary = survey_files(cfg, KEEP_VAL, summaries=local_summaries)
    tokenize_rows = stream.TokenizeRows(model.path, model.task, cfg.max_length, summary["labels"], has_pair=False)
    blocks = [tokenize_rows(block) for task in train_source(cfg, summary["labels"]).get_read_tasks(1) for block in task()]
    only_val = tokenize_rows(stream._block([(0, 1, True, "the cat", None, "pos", None), (0, 2, None, None, None, None, "bad")]))
    assert only_val.num_rows == 0 and len({b.schema for b in [*blocks, only_val]}) == 1  # same columns and types
    rows = [r for b in blocks for r in b.to_pylist()]
    memory = FileTextData(cfg, model)  # the in-memory path, tokenized as the workers tokenize it
    assert [r["input_ids"] for r in rows] == memory.train.input_ids
    assert [r["label_id"] for r in rows] == memory.train.labels
    # a collated batch of the shard is the in-memory path's padded batch of the same rows
    columns = {name: [r[name] for r in rows[:5]] for name in rows[0]}
    x, y, ids = stream._PadBatch(memory.pad_id, model.task)(columns)
    x_mem, y_mem = pad_batch(memory.train, range(5), memory.pad_id, model.task)
    assert torch.equal(x, x_mem) and torch.equal(y, y_mem)
    assert ids[:, 1].tolist() == [r["line"] for r in rows[:5]]
    # the worker's val batches are the in-memory val batches
    data = stream.StreamedTextData(cfg, model, summary, shard=None)
    for (xs, ys), (xm, ym) in zip(data.val_batches(2, 5), memory.val_batches(2, 5), strict=True):
        assert torch.equal(xs, xm) and torch.equal(ys, ym)


def test_stream_switches_on_above_the_size_threshold(tmp_path):
    path = str(write(tmp_path, "jsonl", _rows(20)))  # about 1 kB
    size_mb = os.path.getsize(path) / 1e6
    assert not should_stream(config(kind="jsonl", path=path, stream="auto"))  # default: 256 MB
    assert should_stream(config(kind="jsonl", path=path, stream="auto", stream_above_mb=size_mb / 2))
    assert not should_stream(config(kind="jsonl", path=path, stream=False, stream_above_mb=size_mb / 2))
    assert should_stream(config(kind="jsonl", path=path, stream=True))
    with pytest.raises(ValueError, match="stream_above_mb"):
        config(kind="jsonl", path=path, stream_above_mb=0)
