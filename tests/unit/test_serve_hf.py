"""Serving `hf` text models without Ray: the replica's plain text-batch function on a real tiny
BERT (many requests in one batch answer as each would alone), its request checks, and the
REST routes `/embed` and `/classify` with their 4xx answers, over a fake server that runs the
same functions, and the Python client's `embed` / `classify`."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.artifacts import save_fp32
from app.config.jobs import parse_config
from app.config.serve import ServeConfig, ServedModel
from app.data.text import read_splits
from app.inference import load_predictor
from app.models import build_model
from hf_folders import sentiment_rows, tiny_bert
from serve.client import TemperClient
from serve.ingress import make_api
from serve.protocol import ModelRequestError
from serve.batches import TextRequest, encode_texts, run_text_batch

LONG = " ".join(["cat"] * 30)  # 32 tokens with [CLS] [SEP]; the limit (data.max_length) is 16


@pytest.fixture(scope="module")
def preds(tmp_path_factory):
    """task -> TextPredictor of a torch_fp32 artifact of the tiny BERT."""
    root = tmp_path_factory.mktemp("serve-hf")
    bert = tiny_bert(root / "bert")
    jsonl = root / "sent.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(40)))
    out = {}
    for task, extra_model, extra_data in (("embedding", {"pooling": "mean", "normalize": True}, {}),
                                          ("sequence_classification", {}, {"label_field": "label"})):
        job = parse_config("train", {
            "name": "m", "model": {"kind": "hf", "path": str(bert), "task": task, **extra_model},
            "data": {"kind": "jsonl", "path": str(jsonl), "max_length": 16, "val_fraction": 0.3, **extra_data}})
        torch.manual_seed(0)
        model = build_model(job.model, labels=read_splits(job.data).labels)
        out[task] = load_predictor(str(save_fp32(root / task, model, job)))
    return out


def test_text_batch_of_many_requests_answers_as_each_alone(preds):
    pred = preds["embedding"]
    groups = [["the cat sat"], ["a dog ran fast on the mat", "red", "the big house"], ["tree"] * 5]
    requests = [TextRequest("embed", encode_texts(pred, g, False)) for g in groups]
    results = run_text_batch(pred, requests)
    for g, r in zip(groups, results):
        np.testing.assert_allclose(np.asarray(r["embeddings"]), pred.embed(g), atol=1e-5)

    cls = preds["sequence_classification"]
    requests = [TextRequest("classify", encode_texts(cls, g, False), top_k=2) for g in groups]
    for g, r in zip(groups, run_text_batch(cls, requests)):
        want = cls.classify(g, top_k=2)
        assert r["outputs"] == [w["label"] for w in want]
        for got_row, want_row in zip(r["probabilities"], want):
            assert [p["label"] for p in got_row] == [p["label"] for p in want_row["top_k"]]
            np.testing.assert_allclose([p["probability"] for p in got_row],
                                       [p["probability"] for p in want_row["top_k"]], atol=1e-5)


@pytest.mark.parametrize("texts, field, fragment", [
    ([], "texts", "no texts"),
    (["the cat", ""], "texts.1", "empty"),
    (["  "], "texts.0", "empty"),
    (["the cat", 3], "texts.1", "must be a string"),
    (["the cat", LONG], "texts.1", "32 tokens; the limit is 16"),
])
def test_encode_texts_refuses_with_the_field(preds, texts, field, fragment):
    with pytest.raises(ModelRequestError) as err:
        encode_texts(preds["embedding"], texts, truncate=False)
    assert (err.value.status, err.value.field) == (422, field) and fragment in err.value.message


def test_truncate_cuts_to_the_limit(preds):
    ids = encode_texts(preds["embedding"], [LONG], truncate=True)
    assert len(ids["input_ids"][0]) == 16


# ----------------------------------------------------------------------------- REST over a fake server


class _Response:
    def __init__(self, coro):
        self._coro = coro

    def __await__(self):
        return self._coro.__await__()


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return _Response(self.fn(*args))


class TextServer:
    """Answers like BatchedModelServer's `embed` / `classify_texts`, with its plain functions."""

    def __init__(self, pred):
        self.pred = pred
        self.embed = _Method(self._embed)
        self.classify_texts = _Method(self._classify)

    async def _answer(self, op, texts, top_k, truncate):
        try:
            request = TextRequest(op, encode_texts(self.pred, texts, truncate), top_k)
        except ModelRequestError as err:
            return err.as_refusal()
        return {"version": 1, "backend": self.pred.backend, **run_text_batch(self.pred, [request])[0]}

    async def _embed(self, texts, truncate):
        return await self._answer("embed", texts, 1, truncate)

    async def _classify(self, texts, top_k, truncate):
        return await self._answer("classify", texts, top_k, truncate)


@pytest.fixture
def api(preds):
    cfg = ServeConfig(models=[ServedModel(model="emb"), ServedModel(model="sent")], max_items_per_request=4)
    servers = {"emb": TextServer(preds["embedding"]), "sent": TextServer(preds["sequence_classification"])}
    with TestClient(make_api(cfg, servers)) as client:
        yield client


def _error(resp, status, field):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error_details"]["field"] == field, body
    return body


def test_embed_and_classify_routes_answer_as_the_model(api, preds):
    texts = ["the cat sat", "a big red dog"]
    resp = api.post("/api/v1/models/emb/embed", json={"texts": texts})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "emb" and body["backend"] == "torch_fp32"
    np.testing.assert_allclose(np.asarray(body["embeddings"]), preds["embedding"].embed(texts), atol=1e-5)
    resp = api.post("/api/v1/models/sent/classify", json={"texts": texts, "top_k": 2})
    assert resp.status_code == 200, resp.text
    want = preds["sequence_classification"].classify(texts, top_k=2)
    assert resp.json()["outputs"] == [w["label"] for w in want]
    assert all(len(p) == 2 for p in resp.json()["probabilities"])


def test_text_routes_answer_clear_4xx(api):
    url = "/api/v1/models/emb/embed"
    body = _error(api.post(url, json={"texts": ["a"] * 5}), 413, "texts")
    assert "at most 4" in body["error_message"]
    _error(api.post(url, json={"texts": []}), 422, "texts")
    _error(api.post(url, json={"texts": ["the cat", ""]}), 422, "texts.1")
    _error(api.post(url, json={"texts": ["the cat", "   "]}), 422, "texts.1")
    _error(api.post(url, json={"texts": ["the cat", 7]}), 422, "texts.1")
    body = _error(api.post(url, json={"texts": ["the cat", LONG]}), 422, "texts.1")
    assert "the limit is 16" in body["error_message"] and "truncate" in body["error_message"]
    assert api.post(url, json={"texts": [LONG], "truncate": True}).status_code == 200
    _error(api.post("/api/v1/models/emb/classify", json={"texts": ["a"], "top_k": 0}), 422, "top_k")


def test_client_embed_and_classify_parse_the_answers():
    def handler(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        if request.url.path.endswith("/embed"):
            assert sent == {"texts": ["a", "b"], "truncate": True}
            return httpx.Response(200, json={"model": "emb", "route": "primary", "version": 2, "backend": "onnx_int8",
                                             "embeddings": [[1.0, 0.0], [0.0, 1.0]], "latency_ms": 1.5})
        assert sent == {"texts": ["a"], "top_k": 2, "truncate": False}
        return httpx.Response(200, json={"model": "sent", "route": "primary", "version": 3, "backend": "torch_fp32",
                                         "outputs": ["pos"], "latency_ms": 2.0,
                                         "probabilities": [[{"label": "pos", "probability": 0.9},
                                                            {"label": "neg", "probability": 0.1}]]})

    client = TemperClient("http://temper.test", transport=httpx.MockTransport(handler))
    emb = client.embed("emb", ["a", "b"], truncate=True)
    assert (emb.version, emb.backend, emb.embeddings) == (2, "onnx_int8", [[1.0, 0.0], [0.0, 1.0]])
    cls = client.classify("sent", ["a"], top_k=2)
    assert cls.labels == ["pos"] and cls.probabilities[0][1]["label"] == "neg"
