"""`data: {kind: docstrings}`: the standard library's docstrings as an `hf` model's text, a fixed
sample and split, read by training, compression and `data stats` like a file dataset (no Ray)."""

from __future__ import annotations

import json

import pytest
import yaml

from app.cli.main import main
from app.config.base import ConfigError
from app.config.data import DocstringsDataConfig
from app.config.jobs import parse_config
from app.data import build_data
from app.data.docstrings import MIN_CHARS, docstring_examples, stdlib_docstrings
from app.data.text import read_splits
from hf_folders import tiny_bert


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("docstrings") / "bert")


def test_the_sample_is_fixed_distinct_and_grows_by_appending():
    small = docstring_examples(50)
    assert len(small) == 50 and len({ex.text for ex in small}) == 50
    assert all(len(ex.text) >= MIN_CHARS and " ".join(ex.text.split()) == ex.text for ex in small)
    assert all(ex.label is None and ex.text_pair is None and ex.file.endswith(".py") for ex in small)
    docstring_examples.cache_clear()
    assert docstring_examples(50) == small  # read again from the files: the same texts in the same order
    assert docstring_examples(120)[:50] == small
    assert [ex.text for ex in small] == [ex.text for ex, _ in zip(stdlib_docstrings(), range(50))]


def test_the_split_is_a_hash_of_each_text_salted_by_seed():
    cfg = DocstringsDataConfig(kind="docstrings", max_texts=200, val_fraction=0.2)
    splits = read_splits(cfg)
    assert splits.labels is None and len(splits.train) + len(splits.val) == 200
    assert 20 <= len(splits.val) <= 60 and not {ex.text for ex in splits.train} & {ex.text for ex in splits.val}
    assert read_splits(cfg).val == splits.val
    assert read_splits(cfg.model_copy(update={"seed": 1})).val != splits.val


def test_docstrings_fit_hf_models_without_labels(bert):
    base = {"name": "d", "model": {"kind": "hf", "path": str(bert), "task": "causal_lm"},
            "data": {"kind": "docstrings", "max_texts": 100}}
    job = parse_config("train", base)
    assert isinstance(job.data, DocstringsDataConfig) and job.data.max_length == 128
    data = build_data(job.data, job.model)  # tokenized with the folder's tokenizer, as training reads it
    assert data.describe()["dataset"] == "standard-library docstrings"
    x, y = data.train_batch(0, 0, 0, 4)
    assert x.shape[0] == 4 and y.shape == x[:, 0].shape
    for tree, message in [
        ({**base, "model": {"kind": "gpt"}}, "data.kind 'docstrings' .standard-library docstrings. needs model.kind 'hf'"),
        ({**base, "model": {**base["model"], "task": "sequence_classification"}}, "has no labels"),
        ({**base, "data": {"kind": "docstrings", "path": "x.txt"}}, "data.path: unknown key"),
        ({**base, "data": {"kind": "docstrings", "max_texts": 5}}, "data.max_texts"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config("train", tree)


def test_data_stats_reads_docstrings(bert, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"name": "d", "model": {"kind": "hf", "path": str(bert), "task": "embedding"},
                                      "data": {"kind": "docstrings", "max_texts": 100, "max_length": 32, "val_fraction": 0.2}}))
    assert main(["data", "stats", str(config), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["train"]["rows"] + stats["val"]["rows"] == 100
    assert stats["overlap"]["val_rows"] == 0 and stats["train"]["duplicate_rows"] == 0
    assert stats["train"]["tokens"]["max"] > 0 and stats["max_length"] == 32
    assert main(["data", "stats", str(config)]) == 0
    assert "docstrings data of 'd'" in capsys.readouterr().out
