"""File datasets (jsonl / csv / parquet / text): bad rows name file, line and field; skipping
counts them; deterministic splits; tokenization; `data stats` numbers on known files."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from app.data.files import DataFileError, Example, Fields, load_splits, read_examples, split_examples, tokenize
from app.data.stats import data_stats, format_stats

LABELED = Fields(text_field="text", label_field="label", labels=("neg", "pos"))


@pytest.fixture(scope="module")
def tokenizer():
    """Whitespace words -> ids, [CLS] text [SEP]: a length is the word count + 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_jsonl_bad_rows_name_file_line_and_field(tmp_path):
    good = {"text": "fine", "label": "pos"}
    cases = [
        ({"label": "pos"}, "field 'text': missing"),
        ({"text": 5, "label": "pos"}, "field 'text': expected a string, got int"),
        ({"text": "   ", "label": "pos"}, "field 'text': empty text"),
        ({"text": "ok", "label": "maybe"}, "field 'label': unknown label 'maybe' (labels: neg, pos)"),
        ({"text": "ok", "label": True}, "field 'label': expected a string or integer label, got bool"),
        ("{not json", "not valid JSON"),
    ]
    for i, (bad, reason) in enumerate(cases):
        path = write_jsonl(tmp_path / f"case{i}.jsonl", [good, good, bad, good])
        with pytest.raises(DataFileError) as err:
            read_examples(path, "jsonl", LABELED)
        assert str(err.value).startswith(f"{path}:3: {reason}"), str(err.value)
    # a blank line is not a row, but still counts for the line numbers
    path = write_jsonl(tmp_path / "blank.jsonl", [good, "", {"text": "x"}])
    with pytest.raises(DataFileError, match=r"blank.jsonl:3: field 'label': missing"):
        read_examples(path, "jsonl", LABELED)


def test_csv_bad_row_names_its_line_after_a_multiline_value(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",pos\nfine,neg\n,pos\nok,neg\n')
    with pytest.raises(DataFileError, match=r"d.csv:5: field 'text': empty text"):
        read_examples(path, "csv", LABELED)
    path.write_text("text,label\nfine,neg\nshort\n")
    with pytest.raises(DataFileError, match=r"d.csv:3: field 'label': missing"):
        read_examples(path, "csv", LABELED)
    path.write_text("body,label\nfine,neg\n")
    with pytest.raises(DataFileError, match=r"d.csv:1: field 'text': no such column \(columns: body, label\)"):
        read_examples(path, "csv", LABELED)
    path.write_text('text,label\n"two\nlines",pos\n\nfine,neg\n')
    rows = read_examples(path, "csv", LABELED).examples
    assert [(ex.text, ex.label, ex.line) for ex in rows] == [("two\nlines", "pos", 2), ("fine", "neg", 5)]


def test_parquet_bad_row_names_its_row(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"text": ["a", "b", None, "d"], "label": [0, 1, 1, 0]})
    with pytest.raises(DataFileError, match=r"d.parquet:3: field 'text': missing"):
        read_examples(path, "parquet", Fields(label_field="label"))
    path = write_parquet(tmp_path / "e.parquet", {"text": ["a", "b", "c"], "label": [0, 7, 1]})
    with pytest.raises(DataFileError, match=r"e.parquet:2: field 'label': unknown label '7' \(labels: 0, 1\)"):
        read_examples(path, "parquet", Fields(label_field="label", labels=("0", "1")))
    path = write_parquet(tmp_path / "f.parquet", {"text": [1.5, 2.5]})
    with pytest.raises(DataFileError, match=r"f.parquet:1: field 'text': expected a string, got float"):
        read_examples(path, "parquet", Fields())
    with pytest.raises(DataFileError, match=r"f.parquet: field 'label': no such column"):
        read_examples(path, "parquet", Fields(label_field="label"))


def test_skip_bad_rows_counts_and_reports_them(tmp_path):
    rows = [{"text": f"row {i}", "label": "pos"} for i in range(10)]
    rows[2] = {"text": ""}
    rows[5] = {"text": "x", "label": "other"}
    rows[8] = {"label": "neg"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = read_examples(path, "jsonl", LABELED, skip_bad_rows=True)
    assert len(result.examples) == 7 and result.bad_rows == 3
    assert result.reasons == [
        f"{path}:3: field 'text': empty text",
        f"{path}:6: field 'label': unknown label 'other' (labels: neg, pos)",
        f"{path}:9: field 'text': missing",
    ]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\na,pos\n,neg\nb,neu\nc,neg\n")
    splits = load_splits("csv", LABELED, train_path=csv_path, val_path=csv_path, skip_bad_rows=True)
    assert splits.bad_rows == 4 and len(splits.train) == 2 and splits.labels == ["neg", "pos"]


def test_text_files_one_example_per_nonblank_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first line\n\n  \nsecond line\n")
    rows = read_examples(path, "text", Fields()).examples
    assert [(ex.text, ex.line) for ex in rows] == [("first line", 1), ("second line", 4)]
    with pytest.raises(DataFileError, match="no text_pair_field or label_field"):
        read_examples(path, "text", Fields(label_field="label"))


def test_split_is_deterministic_and_keeps_duplicates_together(tmp_path):
    rows = [{"text": f"text number {i % 150}", "label": "pos" if i % 2 else "neg"} for i in range(300)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = load_splits("jsonl", LABELED, path=path, val_fraction=0.2, seed=1)
    b = load_splits("jsonl", LABELED, path=path, val_fraction=0.2, seed=1)
    c = load_splits("jsonl", LABELED, path=path, val_fraction=0.2, seed=2)
    assert [ex.line for ex in a.val] == [ex.line for ex in b.val]
    assert [ex.line for ex in a.val] != [ex.line for ex in c.val]
    assert 30 < len(a.val) < 90 and len(a.train) + len(a.val) == 300
    assert not {ex.key for ex in a.train} & {ex.key for ex in a.val}  # every text is there twice
    assert a.labels == ["neg", "pos"]
    with pytest.raises(DataFileError, match="left the val split empty"):
        split_examples(a.val[:2], 0.01, seed=0)


def test_explicit_val_file_labels_must_be_seen_in_train(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "c", "label": "y"}, {"text": "d", "label": "z"}])
    fields = Fields(label_field="label")
    with pytest.raises(DataFileError, match=r"val.jsonl:2: field 'label': unknown label 'z' \(labels: x, y\)"):
        load_splits("jsonl", fields, train_path=train, val_path=val)
    with pytest.raises(DataFileError, match="either path, or train_path and val_path"):
        load_splits("jsonl", fields, path=train, train_path=train, val_path=val)


def test_tokenize_truncates_and_maps_labels(tokenizer):
    examples = [
        Example("w " * 10, None, "pos", "f", 1),
        Example("w w", None, "neg", "f", 2),
    ]
    tok = tokenize(examples, tokenizer, max_length=6, labels=["neg", "pos"])
    assert [len(ids) for ids in tok.input_ids] == [6, 4]
    assert tok.labels == [1, 0]
    pairs = tokenize([Example("a b c", "d e", None, "f", 1)], tokenizer, max_length=32)
    assert len(pairs.input_ids[0]) == 3 + 2 + 3  # [CLS] a b c [SEP] d e [SEP]
    assert pairs.token_type_ids == [[0, 0, 0, 0, 0, 1, 1, 1]]


def test_data_stats_on_a_file_with_known_counts(tmp_path, tokenizer):
    # token length = words + 2; train lengths 3..12 (one text each) and two repeats of "w";
    # val holds one text from train and two of its own (one of them twice)
    def words(n):
        return " ".join(["w"] * n)

    train_rows = [{"text": words(n), "label": "pos" if n % 3 else "neg"} for n in range(1, 11)]
    train_rows += [{"text": words(1), "label": "neg"}, {"text": words(1), "label": "neg"}]
    val_rows = [{"text": words(4), "label": "pos"}, {"text": "v v v v v v v v v v v v", "label": "neg"},
                {"text": "u", "label": "pos"}, {"text": "u", "label": "pos"}]
    fields = Fields(label_field="label")
    splits = load_splits(
        "jsonl", fields,
        train_path=write_jsonl(tmp_path / "train.jsonl", train_rows),
        val_path=write_jsonl(tmp_path / "val.jsonl", val_rows),
    )
    stats = data_stats(splits.train, splits.val, tokenizer, max_length=10)
    train = stats["train"]
    assert train["rows"] == 12
    # lengths sorted: 3 3 3 4 5 6 7 8 9 10 11 12 -> nearest-rank p50 = 6th = 6, p90 = 11th = 11
    assert train["tokens"] == {"p50": 6, "p90": 11, "p99": 12, "max": 12}
    assert train["over_max_length"] == 2
    assert train["labels"] == {"neg": 5, "pos": 7}
    assert train["duplicate_rows"] == 2 and train["duplicated_texts"] == 1
    val = stats["val"]
    assert val["rows"] == 4 and val["tokens"]["max"] == 14 and val["over_max_length"] == 1
    assert val["duplicate_rows"] == 1 and val["labels"] == {"neg": 1, "pos": 3}
    assert stats["overlap"] == {"val_rows": 1, "distinct_texts": 1}
    table = format_stats(stats)
    assert "over max_length (10)" in table and "val rows also in train" in table
    assert table.splitlines()[1].split() == ["rows", "12", "4"]
