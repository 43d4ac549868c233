"""The `hf` model kind and file datasets: config shapes and their errors, batches, the packed
model, losses, and consolidated weights that reload into the Auto class (no Ray)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.config.base import ConfigError
from app.config.data import DataConfig, FileDataConfig
from app.config.jobs import TrainJob, parse_config
from app.config.model import HFModelConfig
from app.data import build_data
from app.evaluation import eval_sums, metric_kind, metrics_from_sums, task_loss
from app.models import build_model
from hf_folders import sentiment_rows, tiny_bert, tiny_llama


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-config")
    bert, llama = tiny_bert(root / "bert"), tiny_llama(root / "llama")
    jsonl = root / "sent.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(64)))
    text = root / "lines.txt"
    text.write_text("".join(r["text"] + "\n" for r in sentiment_rows(64)))
    return {"bert": str(bert), "llama": str(llama), "jsonl": str(jsonl), "text": str(text), "root": root}


def cls_tree(files, **data):
    return {"name": "sent", "model": {"kind": "hf", "path": files["bert"], "task": "sequence_classification"},
            "data": {"kind": "jsonl", "path": files["jsonl"], "label_field": "label", "max_length": 16, "val_fraction": 0.3, **data}}


def lm_tree(files):
    return {"name": "lm", "model": {"kind": "hf", "path": files["llama"], "task": "causal_lm"},
            "data": {"kind": "text", "path": files["text"], "max_length": 16, "val_fraction": 0.3}}


def test_hf_and_file_data_validate_and_builtins_still_do(files):
    job = parse_config("train", cls_tree(files))
    assert isinstance(job.model, HFModelConfig) and isinstance(job.data, FileDataConfig)
    assert parse_config("train", lm_tree(files)).data.kind == "text"
    builtin = parse_config("train", {"name": "d", "model": {"kind": "vit"}, "data": {"name": "digits"}})
    assert isinstance(builtin.data, DataConfig)
    # a validated job survives the trip to a worker (a dict) unchanged
    assert TrainJob.model_validate(job.model_dump(mode="json")) == job


BAD = [
    (lambda f: {**cls_tree(f), "data": {"name": "digits"}}, "model.kind 'hf' does not fit data.name 'digits'"),
    (lambda f: {**cls_tree(f), "model": {"kind": "vit"}}, "data.kind 'jsonl' (a file dataset) needs model.kind 'hf'"),
    (lambda f: cls_tree(f, label_field=None), "needs data.label_field"),
    (lambda f: {**lm_tree(f), "data": {"kind": "jsonl", "path": f["jsonl"], "label_field": "label"}},
     "data.label_field is for model.task 'sequence_classification'"),
    (lambda f: {**cls_tree(f), "model": {"kind": "hf", "path": "/nonexistent", "task": "causal_lm"}},
     "model.path: no such folder"),
    (lambda f: {**cls_tree(f), "model": {"kind": "hf", "path": str(f["root"]), "task": "causal_lm"}},
     "has no config.json"),
    (lambda f: {**cls_tree(f), "model": {"kind": "hf", "path": f["bert"], "task": "causal_lm", "pooling": "cls"}},
     "model.pooling / model.normalize apply to model.task 'embedding'"),
    (lambda f: cls_tree(f, train_path=f["jsonl"]), "either data.path, or data.train_path and data.val_path"),
    (lambda f: cls_tree(f, path=None, train_path=f["jsonl"]), "data.train_path and data.val_path go together"),
    (lambda f: cls_tree(f, path="/nope.jsonl"), "data.path: no such file"),
    (lambda f: {**lm_tree(f), "data": {"kind": "text", "path": f["text"], "text_pair_field": "b"}},
     "data.kind 'text' has one text per line"),
    (lambda f: cls_tree(f, labels=["pos"]), "data.labels must be at least two distinct names"),
    (lambda f: cls_tree(f, kind="xml"), "data.kind"),
    (lambda f: cls_tree(f, text_fields="t"), "data.text_fields: unknown key"),
    (lambda f: {**cls_tree(f), "train": {"steps": 20, "callbacks": [{"name": "magnitude_pruning", "kind": "heads"}]}},
     "train.callbacks.0.kind 'heads' works on the built-in gpt / vit attention"),
]


@pytest.mark.parametrize("make,fragment", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_shapes_name_the_key(files, make, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config("train", make(files))
    assert fragment in str(err.value), str(err.value)


def test_weights_that_are_only_pickled_are_refused_at_validation(files, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    tree = {**lm_tree(files), "model": {"kind": "hf", "path": str(tmp_path), "task": "causal_lm"}}
    with pytest.raises(ConfigError, match="no \\*.safetensors weights .*save_pretrained"):
        parse_config("train", tree)


def test_classification_batches_pad_to_their_longest_and_map_labels(files):
    job = parse_config("train", cls_tree(files))
    data = build_data(job.data, job.model)
    assert data.labels == ["neg", "pos"] and metric_kind(job.model) == "classifier"
    x, y = data.train_batch(seed=0, step=3, rank=1, batch_size=8)
    again, _ = data.train_batch(seed=0, step=3, rank=1, batch_size=8)
    assert torch.equal(x, again)  # a pure function of (seed, step, rank)
    assert x.shape[:2] == (8, 3) and y.shape == (8,) and set(y.tolist()) <= {0, 1}
    mask = x[:, 1]
    assert mask.sum(1).max() == x.shape[2]  # padded to the longest member, not to max_length
    assert (x[:, 0][mask == 0] == 0).all()  # [PAD] id
    val = list(data.val_batches(100, 4))
    assert sum(len(b[1]) for b in val) == data.n_val


def test_causal_lm_targets_are_the_next_token_and_ignore_padding(files):
    job = parse_config("train", lm_tree(files))
    data = build_data(job.data, job.model)
    x, y = data.train_batch(0, 0, 0, 6)
    ids, mask = x[:, 0], x[:, 1]
    assert x.shape[1] == 3  # this word-level tokenizer makes token types; the Llama forward drops them
    for row in range(6):
        n = int(mask[row].sum())
        assert y[row, : n - 1].tolist() == ids[row, 1:n].tolist()
        assert (y[row, n - 1:] == -100).all()


def test_packed_model_trains_and_its_state_dict_reloads_into_the_auto_class(files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for tree, auto in ((cls_tree(files), AutoModelForSequenceClassification), (lm_tree(files), AutoModelForCausalLM)):
        job = parse_config("train", tree)
        data = build_data(job.data, job.model)
        torch.manual_seed(0)
        model = build_model(job.model, labels=data.labels)
        kind = metric_kind(job.model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(25):
            x, y = data.train_batch(0, step, 0, 16)
            loss = task_loss(kind, model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert sum(losses[-5:]) < sum(losses[:5]), losses
        metrics = metrics_from_sums(kind, eval_sums(kind, lambda x: model(x).detach(), data.val_batches(4, 8)))
        assert ("val_accuracy" if kind == "classifier" else "val_perplexity") in metrics

        # what the checkpoint writes: safetensors refuses two names for one (tied) tensor
        path = tmp_path / f"{kind}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
        extra = {"num_labels": 2} if kind == "classifier" else {}
        reloaded = auto.from_pretrained(job.model.path, local_files_only=True, **extra).eval()
        reloaded.load_state_dict(load_file(str(path)), strict=kind == "classifier")
        if kind == "lm":
            assert reloaded.config.tie_word_embeddings
            assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
        model.eval()
        x, _ = next(data.val_batches(1, 4))
        with torch.no_grad():
            want = model(x)
            got = reloaded(input_ids=x[:, 0], attention_mask=x[:, 1],
                           **({"token_type_ids": x[:, 2]} if x.shape[1] == 3 else {})).logits
        torch.testing.assert_close(got, want)
        # and back into a fresh packed model (resume), tied key filled from its source
        fresh = build_model(job.model, labels=data.labels)
        fresh.load_state_dict(load_file(str(path)))
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval()(x), want)


def test_eval_sums_skip_ignored_targets():
    logits = torch.zeros(1, 3, 4)
    logits[0, :, 2] = 5.0
    sums = eval_sums("lm", lambda x: logits, [(None, torch.tensor([[2, 1, -100]]))])
    assert sums[1:].tolist() == [1.0, 2.0]


def test_data_stats_cli_counts_a_known_file(files, tmp_path, capsys):
    import yaml

    from app.cli.main import main

    train = [("the cat sat", "pos"), ("the cat sat", "pos"), ("a dog ran fast on the mat", "neg"),
             ("big red house", "pos"), ("small tree", "neg")]
    val = [("big red house", "pos"), ("the blue mat", "neg")]
    for name, rows in (("train", train), ("val", val)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"t": t, "y": y}) + "\n" for t, y in rows))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "name": "stats", "model": {"kind": "hf", "path": files["bert"], "task": "sequence_classification"},
        "data": {"kind": "jsonl", "train_path": str(tmp_path / "train.jsonl"), "val_path": str(tmp_path / "val.jsonl"),
                 "text_field": "t", "label_field": "y", "max_length": 5},
    }))
    assert main(["data", "stats", str(config), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    t, v = stats["train"], stats["val"]
    assert (t["rows"], v["rows"]) == (5, 2)
    assert t["labels"] == {"neg": 2, "pos": 3} and v["labels"] == {"neg": 1, "pos": 1}
    assert t["tokens"]["max"] == 9 and t["tokens"]["p50"] == 5  # words + [CLS] + [SEP]
    assert t["over_max_length"] == 1 and v["over_max_length"] == 0
    assert (t["duplicate_rows"], t["duplicated_texts"]) == (1, 1)
    assert stats["overlap"] == {"val_rows": 1, "distinct_texts": 1}
    assert main(["data", "stats", str(config), "data.text_field=nope"]) == 1  # one line naming file, line, field
    assert "field 'nope'" in capsys.readouterr().err


def test_packed_model_still_answers_keyword_calls_and_keeps_its_signature(files):
    import inspect

    job = parse_config("train", cls_tree(files))
    data = build_data(job.data, job.model)
    model = build_model(job.model, labels=data.labels).eval()
    x, _ = next(data.val_batches(1, 4))
    assert "token_type_ids" in inspect.signature(model.forward).parameters
    with torch.no_grad():
        out = model(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2])
        torch.testing.assert_close(out.logits, model(x))
        assert model(x[:, 0]).logits.shape == (4, 2)  # a plain positional call is transformers' own


def test_layers_and_default_pruning_targets_are_found_from_the_model(files):
    """FSDP shards each layer the model lists in `_no_split_modules`; pruning's default targets are
    the Linear weights inside those layers, never embeddings, pooler or head."""
    from app.config.model import GPTConfig
    from app.models import block_linear_weights, transformer_blocks

    bert = build_model(HFModelConfig(kind="hf", path=files["bert"], task="sequence_classification"), labels=["neg", "pos"])
    assert [n for n, _ in transformer_blocks(bert)] == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"]
    targets = block_linear_weights(bert)
    assert len(targets) == 12 and all(n.startswith("bert.encoder.layer.") for n in targets)
    llama = build_model(HFModelConfig(kind="hf", path=files["llama"], task="causal_lm"))
    assert {n.split(".")[-2] for n in block_linear_weights(llama)} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # the built-in GPT: the same set its earlier regex default named
    gpt = build_model(GPTConfig(kind="gpt", n_layer=2, d_model=64, n_head=4, block_size=32))
    assert block_linear_weights(gpt) == [f"blocks.{i}.{m}.weight" for i in range(2)
                                         for m in ("attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.down")]
