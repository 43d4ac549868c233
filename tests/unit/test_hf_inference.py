"""Inference and compression of `hf` artifacts without Ray: `load_predictor` on a torch_fp32
artifact answers as the in-process model, every compression method's variant loads and stays
close to its source, and the compress step's quality measures (cosine / recall@10, accuracy /
macro-F1, perplexity) come out right. Tiny BERT / Llama models from configs, random weights."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from app.artifacts import class_labels, read_meta, save_fp32
from app.compression import METHODS
from app.config.jobs import CompressJob, parse_config
from app.data.text import read_splits
from app.inference import TextPredictor, TokenLimitError, load_predictor
from app.models import build_model
from app.models.hf import embed_texts, load_tokenizer
from hf_folders import sentiment_rows, tiny_bert, tiny_llama
from pipelines.compress import measure_text, text_eval

TEXTS = ["the big red dog sat on the small blue mat", "cat", "a tree house", "the slow cat ran fast"]
# variant -> how close its output stays to fp32 (max abs difference, on vectors / logits of
# a random tiny model: int8 is coarse there, the real model's numbers are in the compress report)
TOLERANCE = {"onnx_fp32": 1e-4, "torch_int8": 0.15, "onnx_int8": 0.15, "onnx_int8_static": 0.3}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-inference")
    jsonl = root / "sent.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(80)))
    text = root / "lines.txt"
    text.write_text("".join(r["text"] + "\n" for r in sentiment_rows(80)))
    return {"bert": str(tiny_bert(root / "bert")), "llama": str(tiny_llama(root / "llama")),
            "jsonl": str(jsonl), "text": str(text), "root": root}


def job_for(files, task: str):
    data = {"kind": "jsonl", "path": files["jsonl"], "max_length": 16, "val_fraction": 0.3}
    if task == "sequence_classification":
        data["label_field"] = "label"
    if task == "causal_lm":
        data = {"kind": "text", "path": files["text"], "max_length": 16, "val_fraction": 0.3}
    model = {"kind": "hf", "path": files["llama" if task == "causal_lm" else "bert"], "task": task}
    if task == "embedding":
        model.update(pooling="mean", normalize=True)
    return parse_config("train", {"name": task.replace("_", "-"), "model": model, "data": data})


@pytest.fixture(scope="module")
def artifacts(files):
    """task -> (fp32 artifact folder, the in-process model it was saved from)."""
    out = {}
    for task in ("embedding", "sequence_classification", "causal_lm"):
        job = job_for(files, task)
        torch.manual_seed(0)
        labels = read_splits(job.data).labels
        model = build_model(job.model, labels=labels).eval()
        out[task] = (save_fp32(files["root"] / f"{task}-fp32", model, job), model)
    return out


def in_process(model, tok, texts: list[str]) -> np.ndarray:
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return (out if isinstance(out, torch.Tensor) else out.logits).numpy()


def test_fp32_embedding_artifact_answers_as_the_in_process_model(files, artifacts):
    folder, model = artifacts["embedding"]
    pred = load_predictor(str(folder))
    assert isinstance(pred, TextPredictor) and pred.backend == "torch_fp32" and pred.task == "embedding"
    want = embed_texts(model, load_tokenizer(files["bert"]), TEXTS, max_length=16).numpy()
    got = pred.embed(TEXTS)
    assert got.shape == (4, 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalize: true
    # batches of any size and order give the same vectors (length-sorted, padded per batch)
    np.testing.assert_allclose(pred.forward(TEXTS, batch_size=1), want, atol=1e-5)


def test_classifier_labels_come_from_the_data_and_probabilities_sum_to_one(files, artifacts):
    folder, model = artifacts["sequence_classification"]
    job, meta = read_meta(folder)
    assert class_labels(job, meta) == ["neg", "pos"]  # not in the meta: the training files give them
    pred = load_predictor(str(folder))
    assert pred.labels == ["neg", "pos"]
    answers = pred.classify(TEXTS, top_k=2)
    logits = in_process(model, load_tokenizer(files["bert"]), TEXTS)
    want = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for row, a in zip(want, answers):
        assert a["label"] == ["neg", "pos"][int(row.argmax())]
        assert [t["label"] for t in a["top_k"]] == [["neg", "pos"][i] for i in np.argsort(-row)]
        assert sum(t["probability"] for t in a["top_k"]) == pytest.approx(1.0, abs=1e-5)
        assert a["top_k"][0]["probability"] == pytest.approx(float(row.max()), abs=1e-5)
    with pytest.raises(ValueError, match="embed needs model.task 'embedding'"):
        pred.embed(TEXTS)


def test_a_text_over_the_token_limit_is_refused_unless_truncated(artifacts):
    pred = load_predictor(str(artifacts["embedding"][0]))
    long = " ".join(["cat"] * 30)  # 32 tokens with [CLS] [SEP]; the limit is data.max_length 16
    with pytest.raises(TokenLimitError, match="text 1 has 32 tokens; the limit is 16"):
        pred.embed(["the cat", long])
    assert pred.embed(["the cat", long], truncate=True).shape == (2, 32)


@pytest.mark.parametrize("method", ["onnx_fp32", "onnx_int8", "onnx_int8_static", "torch_int8"])
@pytest.mark.parametrize("task", ["embedding", "sequence_classification", "causal_lm"])
def test_every_variant_loads_and_stays_close_to_fp32(files, artifacts, task, method):
    if task == "causal_lm" and method == "onnx_int8_static":
        pytest.skip("static int8 is calibrated for encoders here (jsonl texts); the Llama reads a text file")
    src, _ = artifacts[task]
    dst = METHODS[method](src, files["root"] / f"{task}-{method}")
    pred, ref = load_predictor(str(dst)), load_predictor(str(src))
    assert pred.backend == method and pred.task == task
    if task == "sequence_classification":
        assert read_meta(dst)[1]["labels"] == ["neg", "pos"] and pred.labels == ["neg", "pos"]
    enc = ref.encode(TEXTS)
    batch = ref.pad(enc, range(len(TEXTS)))
    got, want = pred.run(batch), ref.run(batch)
    assert got.shape == want.shape
    mask = batch["attention_mask"].astype(bool)
    if task == "causal_lm":  # padded positions' logits are not defined to agree
        got, want = got[mask], want[mask]
    assert np.abs(got - want).max() < TOLERANCE[method], f"{method} {task}: {np.abs(got - want).max()}"


def test_bert_onnx_variants_are_fused(files, artifacts):
    dst = METHODS["onnx_fp32"](artifacts["embedding"][0], files["root"] / "fused-check")
    fusions = read_meta(dst)[1]["fusions"]
    assert fusions.get("Attention", 0) + fusions.get("MultiHeadAttention", 0) >= 2, fusions  # one per layer


def test_compress_quality_measures_per_task(files, artifacts):
    job = CompressJob(name="q", compress={"eval_batches": 2, "eval_batch_size": 16, "latency_iters": 2})
    # embedding: the source against itself is exact; an int8 variant is close but not exact
    src = load_predictor(str(artifacts["embedding"][0]))
    ev = text_eval(src.job, job.compress)
    assert ev.texts == [ex.text for ex in read_splits(src.job.data).val][:32] and len(ev.texts) > 10
    base = measure_text(src, job, ev)
    assert base["mean_cosine"] == pytest.approx(1.0) and base["recall_at_10"] == 1.0
    ev.reference = src.forward(ev.texts, truncate=True)
    int8 = measure_text(load_predictor(str(METHODS["onnx_int8"](artifacts["embedding"][0], files["root"] / "q-int8"))), job, ev)
    assert 0.9 < int8["mean_cosine"] <= 1.0 and int8["min_cosine"] <= int8["mean_cosine"]
    assert 0.0 <= int8["recall_at_10"] <= 1.0 and int8["latency_b1_ms"] > 0 and int8["latency_b32_ms"] > 0
    # classification: accuracy / macro-F1 against the val labels, as computed by hand
    cls = load_predictor(str(artifacts["sequence_classification"][0]))
    ev = text_eval(cls.job, job.compress)
    m = measure_text(cls, job, ev)
    predicted = cls.forward(ev.texts).argmax(-1)
    assert m["val_accuracy"] == pytest.approx(float((predicted == np.asarray(ev.labels)).mean()))
    assert 0.0 <= m["val_macro_f1"] <= 1.0
    # causal LM: perplexity = exp(val_loss); a random 21-token model is near uniform
    lm = load_predictor(str(artifacts["causal_lm"][0]))
    m = measure_text(lm, job, text_eval(lm.job, job.compress))
    assert m["val_perplexity"] == pytest.approx(np.exp(m["val_loss"]))
    assert 5 < m["val_perplexity"] < 100


def test_compress_report_shows_the_hf_quality_columns(tmp_path):
    from pipelines.compress import VariantReport, write_report

    job = CompressJob(name="emb", storage_path=str(tmp_path))
    src = {"mean_cosine": 1.0, "min_cosine": 1.0, "recall_at_10": 1.0, "latency_b1_ms": 2.0, "latency_b32_ms": 9.0,
           "size_bytes": 4e6}
    var = {**src, "mean_cosine": 0.993, "min_cosine": 0.95, "recall_at_10": 0.91, "latency_b1_ms": 1.0,
           "size_bytes": 1e6, "quality_drop": 0.007}
    report = write_report(job, {"version": 1}, src, [VariantReport("onnx_int8", 2, "x", var, False)], "embedding")
    text = report.read_text()
    assert "| mean_cosine | quality drop |" in text and "recall_at_10 |" in text
    assert "| onnx_int8 | v2 | 0.9930 |" in text and "| 0.9500 | 0.9100 |" in text
    assert report.with_suffix(".png").is_file()
