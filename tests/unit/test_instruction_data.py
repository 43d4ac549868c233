"""Instruction / chat rows (`data.format: instructions`): bad rows name file, line and field;
rendering with a chat template and with the plain template; labels only on assistant /
completion tokens; packing keeps each example to itself (block-diagonal mask, positions
restarting) and gives the logits the examples get alone; `data stats` reports the rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.config.jobs import TrainJob
from app.data import build_data
from app.data.files import DataFileError
from app.data.instructions import IGNORE_INDEX, encode, instruction_splits, read_instructions
from app.models import build_model
from hf_folders import tiny_chat_llama

WORDS = "red blue green gold".split()


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _chat(user: str, answer: str, system: str | None = None) -> dict:
    turns = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": turns}


@pytest.mark.parametrize("row, field, reason", [
    ({"messages": [{"role": "robot", "content": "red"}]}, "messages[0].role", "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "red"}]}, "messages[0].content", "empty text"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "red"}]}, "messages[0].content", "missing"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "red"}]}, "messages[0].content", "expected a string, got int"),
    ({"messages": "red"}, "messages", "expected a non-empty list"),
    ({"messages": [{"role": "user", "content": "red"}]}, "messages", "no assistant turn"),
    ({"prompt": "red"}, "completion", "missing"),
    ({"prompt": ["red"], "completion": "blue"}, "prompt", "expected a string, got list"),
    ({"text": "red"}, "messages", "missing"),
    ({"prompt": "red", "completion": "blue", "messages": []}, "messages", "a row holds either messages or prompt + completion, not both"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, field, reason):
    path = _write(tmp_path / "chat.jsonl", [_chat("red", "blue"), row])
    with pytest.raises(DataFileError) as err:
        read_instructions(path)
    assert f"{path}:2: field {field!r}: {reason}" in str(err.value)
    skipped = read_instructions(path, skip_bad_rows=True)
    assert len(skipped.examples) == 1 and skipped.bad_rows == 1 and f"{path}:2:" in skipped.reasons[0]


def test_config_refuses_instructions_with_other_kinds_and_tasks(tmp_path):
    folder = tiny_chat_llama(tmp_path / "m", WORDS)
    path = _write(tmp_path / "chat.jsonl", [_chat("red", "blue")] * 4)
    base = {"name": "x", "model": {"kind": "hf", "path": str(folder), "task": "causal_lm"},
            "data": {"kind": "jsonl", "path": str(path), "format": "instructions"}}
    TrainJob.model_validate(base)
    with pytest.raises(ValueError, match="data.format 'instructions' reads jsonl rows .* not data.kind 'csv'"):
        TrainJob.model_validate({**base, "data": {**base["data"], "kind": "csv"}})
    with pytest.raises(ValueError, match="data.format 'instructions' trains a causal LM .* not model.task 'embedding'"):
        TrainJob.model_validate({**base, "model": {**base["model"], "task": "embedding"}})
    with pytest.raises(ValueError, match="data.packing packs instruction examples: it needs data.format 'instructions'"):
        TrainJob.model_validate({**base, "data": {"kind": "jsonl", "path": str(path), "packing": True}})


def _labelled(tokenizer, ids: list[int], labels: list[int]) -> tuple[str, str]:
    """(the whole example, the trained tokens) as text."""
    return (" ".join(tokenizer.convert_ids_to_tokens(ids)),
            " ".join(tokenizer.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX])))


def test_chat_template_renders_and_only_assistant_turns_are_labelled(tmp_path):
    from app.models.hf import load_tokenizer

    tok = load_tokenizer(tiny_chat_llama(tmp_path / "m", WORDS))
    path = _write(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "gold"}, {"role": "user", "content": "red blue"},
        {"role": "assistant", "content": "blue red"}, {"role": "user", "content": "green"},
        {"role": "assistant", "content": "gold gold"}]}])
    [ex] = read_instructions(path).examples
    ids, labels = encode(ex, tok, 64)
    assert ids == tok(tok.apply_chat_template([{"role": r, "content": c} for r, c in ex.messages], tokenize=False),
                      add_special_tokens=False)["input_ids"]
    assert _labelled(tok, ids, labels) == (
        "< system > gold < user > red blue < assistant > blue red </s> < user > green < assistant > gold gold </s>",
        "blue red </s> gold gold </s>")
    cut_ids, cut_labels = encode(ex, tok, 12)  # cut at the end
    assert cut_ids == ids[:12] and cut_labels == labels[:12]


def test_plain_template_and_prompt_completion_rows(tmp_path):
    from app.models.hf import load_tokenizer

    tok = load_tokenizer(tiny_chat_llama(tmp_path / "m", WORDS, chat_template=None))
    assert not tok.chat_template
    path = _write(tmp_path / "chat.jsonl", [_chat("red blue", "blue red", system="gold"),
                                            {"prompt": "red green :", "completion": "green red"}])
    chat, pair = read_instructions(path).examples
    assert _labelled(tok, *encode(chat, tok, 64)) == (
        "<s> ### System : gold ### User : red blue ### Assistant : blue red </s>", "blue red </s>")
    assert _labelled(tok, *encode(pair, tok, 64)) == ("<s> red green : green red </s>", "green red </s>")


def _swap_job(tmp_path: Path, packing: bool) -> TrainJob:
    folder = tiny_chat_llama(tmp_path / "m", WORDS, initializer_range=0.2)
    rows = [_chat(f"{a} {b}", f"{b} {a}") for a in WORDS for b in WORDS if a != b]
    path = _write(tmp_path / "swap.jsonl", rows)
    return TrainJob.model_validate({"name": "x", "model": {"kind": "hf", "path": str(folder), "task": "causal_lm"},
                                    "data": {"kind": "jsonl", "path": str(path), "format": "instructions", "max_length": 40,
                                             "packing": packing, "val_fraction": 0.25}})


def test_packed_rows_give_each_example_its_own_logits(tmp_path):
    job = _swap_job(tmp_path, packing=True)
    data = build_data(job.data, job.model)
    assert data.describe()["packed_rows"] < data.n_train  # several examples per row
    from app.data.instructions import batch

    assert data.train_batch(0, 0, 0, 4)[0].shape[-1] <= job.data.max_length
    row = max(data.rows, key=len)
    x, y = batch(data.train, [row], data.pad_id)
    assert int(x[0, 1].max()) == len(row) >= 2  # segment numbers in the mask row
    torch.manual_seed(0)
    model = build_model(job.model).eval()
    with torch.no_grad():
        packed = model(x)[0]  # (T, V)
        t = 0
        for i in row:
            alone_x, alone_y = batch(data.train, [[i]], data.pad_id)
            n = alone_x.shape[-1]
            torch.testing.assert_close(packed[t:t + n], model(alone_x)[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(y[0, t:t + n], alone_y[0])  # the last token of each example has no target
            t += n


def test_data_stats_reports_instruction_rows(tmp_path, capsys):
    import yaml

    from app.cli.main import main

    job = _swap_job(tmp_path, packing=False)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json", include={"name", "model", "data"})))
    assert main(["data", "stats", str(config), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    splits = instruction_splits(job.data)
    assert stats["train"]["rows"] == len(splits.train) and stats["val"]["rows"] == len(splits.val)
    # "<user> a b <assistant> b a </s>" = 11 tokens, 3 of them trained
    assert stats["train"]["tokens"]["max"] == 11
    assert stats["train"]["completion_token_share"] == pytest.approx(3 / 11, abs=1e-4)
    assert main(["data", "stats", str(config)]) == 0
    assert "completion token share" in capsys.readouterr().out


def test_instruction_rows_are_never_streamed():
    from app.config.jobs import TrainJob
    from app.data.stream import should_stream

    tree = {"name": "x", "model": {"kind": "hf", "path": "configs/examples/tiny-chat-llama", "task": "causal_lm"},
            "data": {"kind": "jsonl", "format": "instructions", "path": "configs/examples/swap-words.jsonl"},
            "train": {"finetune": "lora", "steps": 10, "warmup_steps": 1}}
    with pytest.raises(ValueError, match="data.stream: instruction rows are read into memory"):
        TrainJob.model_validate({**tree, "data": {**tree["data"], "stream": True}})
    tiny_threshold = TrainJob.model_validate({**tree, "data": {**tree["data"], "stream_above_mb": 1e-6}})
    assert not should_stream(tiny_threshold.data)  # auto, far above the threshold: still in memory
