"""`model.build`: a causal LM made from an architecture config on first use, with a byte-level BPE
tokenizer trained on the standard library's code and the job's data file, pre-trained briefly by
Temper's own loop in this process, and saved as a transformers folder at `model.path`. Checked: the
folder loads with the Auto classes and gives the logits Temper's model gives; pre-training brought
the validation loss well under the uniform guess; the data file's words are tokens of their own;
a second job uses the folder as it is; mistakes are config errors naming the key."""

from __future__ import annotations

import json
import math

import pytest
import torch

from app.config.base import ConfigError
from app.config.jobs import TrainJob, parse_config
from app.config.model import BUILD_FILE
from app.models import build_model
from app.models.sources import folder_provenance
from pipelines.build_base import with_built_model

ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}


def _tree(tmp_path, **build) -> dict:
    data = tmp_path / "rows.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"Say zyxwvut {i}\n", "completion": "qwertyzz"}) + "\n" for i in range(40)))
    return {
        "name": "built", "storage_path": str(tmp_path / "runs"),
        "model": {"kind": "hf", "task": "causal_lm", "path": str(tmp_path / "models" / "tiny"),
                  "build": {"architecture": dict(ARCH), "tokenizer_vocab_size": 512,
                            "pretrain": {"max_bytes": 150_000, "steps": 80, "batch_size": 8, "max_length": 32, "lr": 1e-2},
                            **build}},
        "data": {"kind": "jsonl", "format": "instructions", "path": str(data), "max_length": 32},
        "train": {"num_workers": 1, "steps": 20, "finetune": "lora"},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    job = TrainJob.model_validate(_tree(tmp))
    return tmp, job, with_built_model(job)


def test_the_built_folder_loads_with_the_auto_classes_and_learned_from_the_code(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, _, job = built
    folder = tmp / "models" / "tiny"
    assert {"config.json", "model.safetensors", "tokenizer.json", BUILD_FILE} <= {p.name for p in folder.iterdir()}
    assert not any(p.name.startswith(".tiny.build") for p in folder.parent.iterdir())  # the staging folder is gone
    info = json.loads((folder / BUILD_FILE).read_text())
    assert info["tokenizer_vocab_size"] == 512 and info["build"]["pretrain"]["steps"] == 80
    assert info["pretrain_metrics"]["val_loss"] < 0.75 * math.log(512), info  # far below the uniform guess

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert len(tok(" zyxwvut", add_special_tokens=False)["input_ids"]) <= 2  # a word of the data file: merged
    ids = tok("def f(self):\n    return 1", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "def f(self):\n    return 1"  # byte-level: text comes back as it was

    auto = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
    assert auto.config.vocab_size == 512 and auto.config.num_hidden_layers == 1
    ours = build_model(job.model).eval()
    x = torch.stack([ids, torch.ones_like(ids)], dim=1)  # Temper's packed batch: ids, mask
    with torch.no_grad():
        torch.testing.assert_close(ours(x), auto(input_ids=ids).logits)


def test_a_second_job_uses_the_folder_as_it_is(built):
    tmp, job, resolved = built
    folder = tmp / "models" / "tiny"
    before = (folder / "model.safetensors").stat().st_mtime_ns
    again = with_built_model(TrainJob.model_validate(_tree(tmp)))
    assert again.model.path == resolved.model.path == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    tag = folder_provenance(folder)["source_build"]
    assert tag.startswith("llama (num_hidden_layers 1, hidden_size 32;") and "pre-trained 80 steps on lm-code, val_loss" in tag


@pytest.mark.parametrize("change, message", [
    (lambda t: t["model"].update(task="embedding"), "model.build makes causal LMs"),
    (lambda t: t["model"]["build"]["architecture"].pop("model_type"), "model.build.architecture: needs model_type"),
    (lambda t: t["model"]["build"]["architecture"].update(vocab_size=10), "model.build.architecture.vocab_size"),
    (lambda t: t["model"]["build"]["architecture"].update(auto_map={}), "trust_remote_code"),
    (lambda t: t["model"]["build"]["pretrain"].update(stpes=3), "stpes"),
])
def test_build_mistakes_are_config_errors_naming_the_key(tmp_path, change, message):
    tree = _tree(tmp_path)
    change(tree)
    with pytest.raises(ConfigError, match=message):
        parse_config("train", tree)


def test_an_existing_folder_not_made_by_build_is_not_overwritten(tmp_path):
    from hf_folders import tiny_llama

    tree = _tree(tmp_path)
    tiny_llama(tmp_path / "models" / "tiny")
    with pytest.raises(ConfigError, match="exists and was not made by model.build"):
        parse_config("train", tree)


def test_a_folder_built_from_another_build_section_is_refused(built):
    tmp, _, _ = built
    tree = _tree(tmp)
    tree["model"]["build"]["architecture"]["hidden_size"] = 64
    tree["model"]["build"]["pretrain"]["steps"] = 81
    with pytest.raises(ConfigError, match=r"built from another model.build \(model.build.architecture.hidden_size, "
                                          r"model.build.pretrain.steps differ\)"):
        parse_config("train", tree)


def test_an_unknown_model_type_is_named_when_building(tmp_path):
    tree = _tree(tmp_path)
    tree["model"]["build"]["architecture"]["model_type"] = "no-such-model"
    tree["model"]["build"]["pretrain"]["steps"] = 0
    with pytest.raises(ValueError, match="model.build.architecture"):
        with_built_model(TrainJob.model_validate(tree))
    assert not (tmp_path / "models" / "tiny").exists()
