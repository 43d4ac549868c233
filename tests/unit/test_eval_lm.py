"""Causal-LM evaluation without Ray (app/eval_lm.py, app/data/eval_pairs.py, app/config/evaluation.py):
EM / F1 against hand-computed SQuAD values, perplexity against transformers' own loss on the same
tokens, greedy answers against `model.generate`, the paired test against identical inputs and
the exact McNemar test, and bad pair files / eval files named by file, line, field or key."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
import yaml

from app.config.base import ConfigError
from app.config.evaluation import EvalConfig, load_eval_config
from app.data.eval_pairs import EvalPair, read_eval_pairs
from app.data.files import DataFileError
from app.eval_lm import (answer_tokens, evaluate_pairs, exact_match, greedy_answers, lm_eval_metrics, paired_p_value,
                         prompt_ids, reference_nll, text_perplexity, token_f1)
from app.inference import load_predictor
from hf_folders import tiny_llama_artifact

TEXTS = ["the cat sat on the mat", "a dog ran", "red house", "the big blue tree sat on a small mat fast"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    """A tiny random Llama's torch_fp32 artifact folder."""
    return tiny_llama_artifact(tmp_path_factory.mktemp("eval-lm"), lines=20, max_length=32)[0]


@pytest.fixture(scope="module")
def lm(artifact):
    """(TextPredictor of the artifact, its transformers model)."""
    pred = load_predictor(artifact)
    return pred, pred._torch_model


# ----------------------------------------------------------------------------- EM / F1


def test_normalisation_exact_match_and_f1_are_squads():
    assert answer_tokens("The Cat, sat!  on a mat.") == ["cat", "sat", "on", "mat"]
    assert answer_tokens("The Cat, sat!", normalize=False) == ["The", "Cat,", "sat!"]
    assert exact_match("The cat.", "cat") == 1.0 and exact_match("The cat.", "cat", normalize=False) == 0.0
    assert exact_match("cat sat", "sat cat") == 0.0
    # reference normalised to cat sat on red mat: 3 shared tokens, precision 3/3, recall 3/5 -> F1 = 0.75
    assert token_f1("cat sat mat", "the cat sat on the red mat") == pytest.approx(0.75)
    # as written the articles count: recall 3/7 -> F1 = 2 * (3/7) / (1 + 3/7) = 0.6
    assert token_f1("cat sat mat", "the cat sat on the red mat", normalize=False) == pytest.approx(0.6)
    assert token_f1("Cat", "cat", normalize=False) == 0.0
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)  # multiset overlap: one cat, one dog
    assert token_f1("blue", "red") == 0.0 and token_f1("", "") == 1.0 and token_f1("the", "cat") == 0.0
    assert token_f1("a", "the") == 1.0  # both empty after normalisation


# ----------------------------------------------------------------------------- perplexity


def test_text_perplexity_is_transformers_token_weighted_loss(lm):
    pred, model = lm
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for text in TEXTS:
            ids = torch.tensor([pred.tokenize(text)])
            loss = model(input_ids=ids, labels=ids).loss.item()  # mean over the T - 1 predicted tokens
            nll, tokens = nll + loss * (ids.shape[1] - 1), tokens + ids.shape[1] - 1
    expected = math.exp(nll / tokens)
    assert text_perplexity(pred, TEXTS, batch_size=3) == pytest.approx(expected, rel=1e-5)
    # a plain mean of per-text perplexities is a different number: the weighting is per token
    per_text = [text_perplexity(pred, [t]) for t in TEXTS]
    assert abs(np.mean(per_text) - expected) > 1e-3


def test_text_perplexity_of_the_val_split_is_trainings_val_perplexity(lm):
    """The number training registers (`val_perplexity`, app/evaluation.py over the job's val
    batches) and `text_perplexity` over the same val texts are one definition."""
    from app.data import build_data
    from app.data.text import read_splits
    from app.evaluation import eval_sums, metrics_from_sums

    pred, model = lm
    data = build_data(pred.job.data, pred.job.model)
    with torch.inference_mode():
        sums = eval_sums("lm", model, data.val_batches(100, 4))
    trained = metrics_from_sums("lm", sums)["val_perplexity"]
    val_texts = [ex.text for ex in read_splits(pred.job.data).val]
    assert len(val_texts) == data.n_val >= 3
    assert text_perplexity(pred, val_texts) == pytest.approx(trained, rel=1e-5)


def test_reference_nll_scores_only_the_reference_tokens_given_the_prompt(lm):
    pred, model = lm
    pairs = [EvalPair("the cat", "sat on the mat", 1), EvalPair("a big dog ran", "fast", 2), EvalPair("red", "blue tree", 3)]
    got = reference_nll(pred, pairs, batch_size=2)
    with torch.inference_mode():
        for (nll, n), pair in zip(got, pairs):
            head = pred.tokenize(pair.prompt)
            tail = pred.tokenizer(pair.reference, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([head + tail])
            labels = ids.clone()
            labels[0, :len(head)] = -100
            assert n == len(tail)
            assert nll / n == pytest.approx(model(input_ids=ids, labels=labels).loss.item(), rel=1e-5)


# ----------------------------------------------------------------------------- generation


def test_greedy_answers_are_model_generate_without_the_stop_token(lm):
    pred, model = lm
    pairs = [EvalPair(p, "cat", i) for i, p in enumerate(["the cat", "a dog ran fast on the mat", "red", "blue mat"])]
    answers = greedy_answers(pred, pairs, max_new_tokens=5, batch_size=3)
    for pair, answer in zip(pairs, answers):
        ids = torch.tensor([pred.tokenize(pair.prompt)])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
        new = [t for t in out[0, ids.shape[1]:].tolist()]
        if new and new[-1] in pred.stop_ids:
            new = new[:-1]
        assert answer == pred.tokenizer.decode(new, skip_special_tokens=True)
    assert any(a for a in answers)  # the wide random model says something


def test_a_chat_prompt_goes_through_the_chat_template_or_the_plain_one(lm):
    import copy
    import dataclasses

    from app.data.chat_template import render_chat

    pred, model = lm
    turns = ({"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}, {"role": "user", "content": "a dog"})
    # no template in the folder: the plain one serving and fine-tuning use, tokenized as rendered
    plain = render_chat(pred.tokenizer, list(turns))
    assert plain.endswith("### User:\na dog\n\n### Assistant:\n")
    assert prompt_ids(pred, turns) == pred.tokenizer(plain, add_special_tokens=False)["input_ids"]
    chat = dataclasses.replace(pred, tokenizer=copy.deepcopy(pred.tokenizer))
    chat.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                                    "{% if add_generation_prompt %}assistant{% endif %}")
    # the word tokenizer knows none of the role names: they are [UNK] (id 1) here
    expected = pred.tokenizer("user the cat assistant sat user a dog assistant", add_special_tokens=False)["input_ids"]
    assert prompt_ids(chat, turns) == expected and expected.count(1) == 4
    [answer] = greedy_answers(chat, [EvalPair(turns, "ran", 1)], max_new_tokens=3)
    ids = torch.tensor([expected])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    assert answer == pred.tokenizer.decode(new[:-1] if new[-1] in pred.stop_ids else new, skip_special_tokens=True)


def test_evaluate_pairs_scores_each_prompt_and_registry_metrics_carry_them(lm):
    pred, _ = lm
    pairs = [EvalPair("the cat", "sat", 1), EvalPair("a dog", "ran fast", 2), EvalPair("red", "tree", 3)]
    answers = greedy_answers(pred, pairs, max_new_tokens=2)
    # references made from the model's own answers for two prompts: those two are exact matches
    pairs = [EvalPair(p.prompt, answers[i], p.line) if i < 2 else p for i, p in enumerate(pairs)]
    cfg = EvalConfig(data="unused.jsonl", max_new_tokens=2)
    result = evaluate_pairs(pred, pairs, cfg)
    assert result["per_prompt"]["exact_match"][:2] == [1.0, 1.0]
    assert result["metrics"]["exact_match"] == pytest.approx(np.mean(result["per_prompt"]["exact_match"]))
    sums = reference_nll(pred, pairs)
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(sum(s for s, _ in sums) / sum(n for _, n in sums)))
    assert result["per_prompt"]["perplexity"] == pytest.approx([s / n for s, n in sums])
    metrics = lm_eval_metrics(pred, pairs, cfg)
    assert set(metrics) == {"eval_exact_match", "eval_token_f1", "eval_perplexity", "eval_prompts"}
    assert metrics["eval_prompts"] == 3.0 and metrics["eval_perplexity"] == pytest.approx(result["metrics"]["perplexity"])


def test_an_onnx_version_scores_what_its_torch_source_scores(artifact, lm, tmp_path):
    from app.compression import METHODS

    pred, _ = lm
    onnx = load_predictor(str(METHODS["onnx_fp32"](artifact, tmp_path / "onnx-fp32")))
    pairs = [EvalPair("the cat", "sat on the mat", 1), EvalPair("a big dog ran", "fast", 2), EvalPair("red", "blue tree", 3)]
    cfg = EvalConfig(data="unused.jsonl", max_new_tokens=4, batch_size=2)
    torch_result, onnx_result = evaluate_pairs(pred, pairs, cfg), evaluate_pairs(onnx, pairs, cfg)
    assert onnx.backend == "onnx_fp32" and onnx_result["answers"] == torch_result["answers"]
    assert onnx_result["per_prompt"]["perplexity"] == pytest.approx(torch_result["per_prompt"]["perplexity"], rel=1e-4)


# ----------------------------------------------------------------------------- paired test


def test_paired_p_value_is_one_for_identical_scores_and_exact_mcnemar_on_zero_one_scores():
    from scipy.stats import binomtest

    assert paired_p_value([1.0] * 40, [1.0] * 40) == 1.0
    assert paired_p_value([0, 1, 0.5, 1] * 10, [0, 1, 0.5, 1] * 10) == 1.0
    assert paired_p_value([0.3], [0.9]) == 1.0
    # 0/1 scores: A right where B is wrong on 6 prompts, the reverse on 1, 5 ties -> McNemar's exact test
    a = [1] * 6 + [0] + [1, 1, 0, 0, 1]
    b = [0] * 6 + [1] + [1, 1, 0, 0, 1]
    assert paired_p_value(a, b) == pytest.approx(binomtest(6, 7).pvalue)
    assert paired_p_value(a, b) == paired_p_value(b, a)
    assert paired_p_value([1] * 30, [0] * 30) < 0.001
    with pytest.raises(ValueError, match="one length"):
        paired_p_value([1, 0], [1])


# ----------------------------------------------------------------------------- files


def _write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_read_eval_pairs_takes_both_shapes(tmp_path):
    path = _write_lines(tmp_path / "pairs.jsonl", [
        {"prompt": "the cat", "completion": "sat"},
        "",
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a dog?"},
                      {"role": "assistant", "content": "ran"}]},
    ])
    first, second = read_eval_pairs(path)
    assert (first.prompt, first.reference, first.line) == ("the cat", "sat", 1)
    assert second.prompt == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "a dog?"})
    assert (second.reference, second.line) == ("ran", 3)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "x"}, ":2: field 'completion': missing"),
    ({"prompt": "x", "completion": 3}, ":2: field 'completion': expected a string, got int"),
    ({"prompt": " ", "completion": "y"}, ":2: field 'prompt': empty text"),
    ({"prompt": "x", "completion": "y", "answer": "z"}, ":2: field 'answer': unknown key"),
    ({"text": "x"}, ":2: field 'prompt': missing"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]},
     ":2: field 'messages[1].role': the last turn is the reference answer and must be 'assistant'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     ":2: field 'messages[1].role': expected one of system, user, assistant, got 'bot'"),
    ({"messages": [{"role": "assistant", "content": "yo"}]}, ":2: field 'messages': needs at least one turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "prompt": "x"},
     ":2: field 'messages': give either messages or prompt + completion"),
    ("[1, 2]", ":2: expected a JSON object, got list"),
    ("{not json", ":2: not valid JSON"),
])
def test_a_bad_pair_row_names_file_line_and_field(tmp_path, row, message):
    path = _write_lines(tmp_path / "pairs.jsonl", [{"prompt": "a", "completion": "b"}, row])
    with pytest.raises(DataFileError) as err:
        read_eval_pairs(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_eval_file_errors_name_their_keys(tmp_path):
    data = _write_lines(tmp_path / "pairs.jsonl", [{"prompt": "a", "completion": "b"}])
    good = tmp_path / "eval.yaml"
    good.write_text(yaml.safe_dump({"data": str(data), "max_new_tokens": 4, "metrics": ["exact_match"]}))
    assert load_eval_config(good).metrics == ["exact_match"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": str(data), "max_new_tokens": 0, "metrics": ["bleu", "token_f1", "token_f1"],
                                   "temperature": 1.0}))
    with pytest.raises(ConfigError) as err:
        load_eval_config(bad)
    text = str(err.value)
    assert "max_new_tokens: Input should be greater than or equal to 1" in text
    assert "metrics.0: Input should be 'exact_match', 'token_f1' or 'perplexity'" in text
    assert "temperature: unknown key" in text
    bad.write_text(yaml.safe_dump({"data": str(tmp_path / "missing.jsonl")}))
    with pytest.raises(ConfigError, match=r"data: no such file .*missing\.jsonl"):
        load_eval_config(bad)
    bad.write_text(yaml.safe_dump({"data": str(data), "metrics": ["token_f1", "token_f1"]}))
    with pytest.raises(ConfigError, match="metrics: token_f1 named more than once"):
        load_eval_config(bad)
