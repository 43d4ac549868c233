"""Serve logic without Ray: the plain batch functions, the REST API over fake model handles, and
the client's error parsing."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.artifacts import save_fp32
from app.config.data import DataConfig
from app.config.model import GPTConfig, ViTConfig
from app.config.jobs import TrainJob
from app.config.serve import ServeConfig, ServedModel
from app.inference import classify, generate_text, load_predictor, score_text
from app.models import build_model
from serve.client import TemperAPIError, TemperClient
from serve.ingress import make_api
from serve.protocol import ModelRequestError, raise_if_refused
from serve.batches import (
    ClassifyRequest,
    LMRequest,
    group_lm_rows,
    images_from_inputs,
    run_classify_batch,
    run_lm_batch,
    tokens_from_text,
)
from serve.replica import BatchStats


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    job = TrainJob(name="digits", model=ViTConfig(n_layer=1, d_model=32), data=DataConfig(name="digits"))
    torch.manual_seed(0)
    return load_predictor(str(save_fp32(tmp_path_factory.mktemp("vit"), build_model(job.model), job)))


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    job = TrainJob(name="code", model=GPTConfig(n_layer=1, d_model=32, n_head=2, block_size=16), data=DataConfig(name="lm-code"))
    torch.manual_seed(0)
    return load_predictor(str(save_fp32(tmp_path_factory.mktemp("gpt"), build_model(job.model), job)))


# ----------------------------------------------------------------------------- batch functions


def test_classify_batch_splits_results_per_request_in_order(vit):
    rng = np.random.default_rng(0)
    reqs = [ClassifyRequest(rng.random((n, 1, 8, 8), dtype=np.float32), k) for n, k in [(3, 1), (1, 4), (2, 2)]]
    out = run_classify_batch(vit, reqs)
    assert len(out) == 3
    for req, res in zip(reqs, out):
        alone = classify(vit, req.images, req.top_k)  # same images, no batching
        assert res["outputs"] == [a["label"] for a in alone]
        assert [len(p) for p in res["probabilities"]] == [req.top_k] * len(req.images)
        assert [[q["label"] for q in p] for p in res["probabilities"]] == [[q["label"] for q in a["top_k"]] for a in alone]
        # the probabilities are the softmax of the model's own logits, most likely first: a
        # renormalised top-k, a wrong class order or a missing softmax fails here
        logits = vit.logits(req.images).astype(np.float64)  # (N, classes)
        softmax = np.exp(logits - logits.max(-1, keepdims=True))
        softmax /= softmax.sum(-1, keepdims=True)
        for row, top in zip(softmax, res["probabilities"]):
            probs = [q["probability"] for q in top]
            assert probs == sorted(probs, reverse=True)
            assert sum(probs) < 1.0  # top_k < 10 classes: the rest of the mass is elsewhere
            np.testing.assert_allclose(probs, row[[q["label"] for q in top]], rtol=1e-5, atol=1e-7)


def _rows(*texts: str) -> list[np.ndarray]:
    return [tokens_from_text(t) for t in texts]


def test_group_lm_rows_by_op_length_and_max_new_tokens():
    reqs = [
        LMRequest("score", _rows("abc", "de", "xyz")),
        LMRequest("generate", _rows("abc"), max_new_tokens=4),
        LMRequest("generate", _rows("abd"), max_new_tokens=4),
        LMRequest("generate", _rows("abc"), max_new_tokens=2),
        LMRequest("score", _rows("fg")),
    ]
    groups = group_lm_rows(reqs)
    assert groups == {
        ("score", 3, 0): [(0, 0), (0, 2)],
        ("score", 2, 0): [(0, 1), (4, 0)],
        ("generate", 3, 4): [(1, 0), (2, 0)],
        ("generate", 3, 2): [(3, 0)],
    }


def test_lm_batch_matches_unbatched_calls_and_keeps_order(gpt):
    reqs = [
        LMRequest("generate", _rows("def f(x):"), max_new_tokens=5),
        LMRequest("score", _rows("import os", "x = 1", "print()"), top_k=2),
        LMRequest("generate", _rows("return 1;"), max_new_tokens=5),  # same length as the first: one group
        LMRequest("generate", _rows("ab"), max_new_tokens=3),
        LMRequest("score", _rows("x = 2"), top_k=4),
    ]
    out = run_lm_batch(gpt, reqs)
    assert [len(o) for o in out] == [1, 3, 1, 1, 1]
    for req, res in zip(reqs, out):
        for row, got in zip(req.rows, res):
            if req.op == "generate":
                want = generate_text(gpt, row[None], req.max_new_tokens)[0].tolist()
                assert got == want and len(got) == req.max_new_tokens
            else:
                want = score_text(gpt, row[None], req.top_k)[0]
                assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)
                assert [n["byte"] for n in got["next"]] == [n["byte"] for n in want["next"]]
                assert len(got["next"]) == req.top_k


def test_images_from_inputs_shapes_and_errors():
    flat = list(np.linspace(0, 1, 64))
    rows = np.linspace(0, 1, 64).reshape(8, 8).tolist()
    x = images_from_inputs([flat, rows], (1, 8, 8))
    assert x.shape == (2, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], x[1])
    with pytest.raises(ModelRequestError) as err:
        images_from_inputs([flat, flat[:63]], (1, 8, 8))
    assert (err.value.status, err.value.field) == (422, "inputs.1")
    with pytest.raises(ModelRequestError) as err:
        images_from_inputs([[[0.0] * 4] * 16], (1, 8, 8))  # 64 values but 16x4
    assert err.value.field == "inputs.0"
    with pytest.raises(ModelRequestError, match="NaN"):
        images_from_inputs([[float("nan")] * 64], (1, 8, 8))


def test_batch_stats_counts_sizes():
    stats = BatchStats()
    for size, method in ((1, "predict"), (4, "predict"), (4, "generate"), (2, "predict")):
        stats.record(size, method, unqueued=size == 1)
    assert stats.snapshot() == {"batches": 4, "max_batch_size_seen": 4, "batch_size_counts": {1: 1, 2: 1, 4: 2},
                                "by_method": {"generate": {4: 1}, "predict": {1: 1, 2: 1, 4: 1}}, "unqueued": 1}


def test_refusal_round_trip():
    refusal = ModelRequestError(400, "model", "wrong task").as_refusal()
    with pytest.raises(ModelRequestError) as err:
        raise_if_refused(refusal)
    assert (err.value.status, err.value.field, err.value.message) == (400, "model", "wrong task")
    assert raise_if_refused({"version": 1}) == {"version": 1}


# ----------------------------------------------------------------------------- REST API over fakes


class _Response:
    """Stands in for a DeploymentResponse: awaitable, cancellable."""

    def __init__(self, coro):
        self._coro, self.cancelled = coro, False

    def __await__(self):
        return self._coro.__await__()

    def cancel(self):
        self.cancelled = True


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return _Response(self.fn(*args))


class FakeServer:
    """A classifier 'model server' answering like BatchedModelServer's entry points."""

    def __init__(self, name: str, task: str, delay_s: float = 0.0):
        self.name, self.task, self.delay_s = name, task, delay_s
        self.classify = _Method(self._classify)
        self.generate = _Method(self._generate)
        self.score = _Method(self._score)
        self.info = _Method(self._info)

    async def _classify(self, inputs, top_k):
        await asyncio.sleep(self.delay_s)
        if self.task != "classifier":
            return ModelRequestError(400, "model", f"model {self.name!r} is a 'lm' model").as_refusal()
        try:
            images_from_inputs(inputs, (1, 8, 8))
        except ModelRequestError as err:
            return err.as_refusal()
        return {"version": 3, "backend": "torch_int8", "outputs": [7] * len(inputs),
                "probabilities": [[{"label": 7, "probability": 1.0}]] * len(inputs)}

    async def _generate(self, prompt, max_new_tokens, temperature=0.0, top_k=0, seed=None):
        return {"version": 1, "backend": "torch_fp32", "tokens": [65] * max_new_tokens, "text": "A" * max_new_tokens,
                "finish_reason": "length"}

    async def _score(self, texts, top_k):
        return {"version": 1, "backend": "torch_fp32", "outputs": [{"nll": 1.0, "perplexity": 2.7, "next": []} for _ in texts]}

    async def _info(self):
        return {"model": self.name, "version": 3, "backend": "torch_int8", "task": self.task, "max_batch_size": 8}


class FakeMetrics:
    def __init__(self):
        self.seen = []

    def observe(self, model, endpoint, status, latency_ms):
        self.seen.append((model, endpoint, status))

    def route(self, model, route, version, outcome):
        pass


@pytest.fixture
def api_env():
    cfg = ServeConfig(
        models=[ServedModel(model="digits"), ServedModel(model="code", max_new_tokens=8), ServedModel(model="slow")],
        max_body_bytes=4096, request_timeout_s=0.2,
    )
    servers = {"digits": FakeServer("digits", "classifier"), "code": FakeServer("code", "lm"),
               "slow": FakeServer("slow", "classifier", delay_s=2.0)}
    metrics = FakeMetrics()
    with TestClient(make_api(cfg, servers, metrics)) as client:
        yield client, servers, metrics


def _assert_error(resp, status, code, field):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error_code", "error_message", "error_details", "request_id", "timestamp"}
    assert body["error_code"] == code
    assert body["error_details"]["field"] == field, body
    assert body["request_id"] == resp.headers["x-request-id"]
    return body


def test_api_predict_ok_and_request_id(api_env):
    client, _, metrics = api_env
    resp = client.post("/api/v1/models/digits/predict", json={"inputs": [[0.5] * 64], "top_k": 1},
                       headers={"X-Request-ID": "abc-123"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["outputs"] == [7] and body["version"] == 3 and body["backend"] == "torch_int8"
    assert body["latency_ms"] >= 0
    assert resp.headers["x-request-id"] == "abc-123"
    assert metrics.seen[-1] == ("digits", "predict", 200)


@pytest.mark.parametrize("body, field", [
    ({}, "inputs"),                                   # missing field
    ({"inputs": [[0.5] * 64], "topk": 2}, "topk"),    # unknown key
    ({"inputs": "nope"}, "inputs"),                   # wrong type
    ({"inputs": [[0.5] * 64], "top_k": "3"}, "top_k"),  # strict: no numeric strings
    ({"inputs": [[0.5] * 64, ["a"] * 64]}, "inputs.1"),
    ({"inputs": [[0.5] * 64, [0.5] * 63]}, "inputs.1"),  # wrong shape (refused by the model server)
    ({"inputs": []}, "inputs"),
    ({"inputs": [[0.5] * 64], "top_k": 0}, "top_k"),
])
def test_api_validation_errors_name_the_field(api_env, body, field):
    client, _, _ = api_env
    err = _assert_error(client.post("/api/v1/models/digits/predict", json=body), 422, "422_0001", field)
    assert field in err["error_message"] and err["error_details"]["message"]


def test_api_invalid_json_unknown_model_wrong_task(api_env):
    client, _, metrics = api_env
    _assert_error(client.post("/api/v1/models/digits/predict", content=b"{oops",
                              headers={"content-type": "application/json"}), 422, "422_0001", "body")
    err = _assert_error(client.post("/api/v1/models/nope/predict", json={"inputs": [[0.5] * 64]}), 404, "404_0001", "model")
    assert "nope" in err["error_message"]
    assert metrics.seen[-1] == ("unknown", "predict", 404)
    err = _assert_error(client.post("/api/v1/models/code/predict", json={"inputs": [[0.5] * 64]}), 400, "400_0001", "model")
    assert "code" in err["error_message"]
    _assert_error(client.get("/api/v1/nothing-here"), 404, "404_0001", None)


def test_api_body_limit_with_and_without_content_length(api_env):
    client, _, _ = api_env
    big = {"inputs": [[0.5] * 64] * 100}  # > 4096 bytes
    _assert_error(client.post("/api/v1/models/digits/predict", json=big), 413, "413_0001", "body")

    def chunks():  # no Content-Length: streamed
        yield b'{"inputs": ['
        for _ in range(100):
            yield b"[" + b",".join([b"0.5"] * 64) + b"],"
        yield b"[0.5]]}"

    _assert_error(client.post("/api/v1/models/digits/predict", content=chunks(),
                              headers={"content-type": "application/json"}), 413, "413_0001", "body")


def test_api_generate_cap_score_and_models(api_env):
    client, _, _ = api_env
    _assert_error(client.post("/api/v1/models/code/generate", json={"prompt": "x", "max_new_tokens": 9}),
                  422, "422_0001", "max_new_tokens")
    _assert_error(client.post("/api/v1/models/code/generate", json={"prompt": ""}), 422, "422_0001", "prompt")
    ok = client.post("/api/v1/models/code/generate", json={"prompt": "x", "max_new_tokens": 8}).json()
    assert ok["tokens"] == [65] * 8 and ok["version"] == 1
    scored = client.post("/api/v1/models/code/score", json={"texts": ["a", "b"]}).json()
    assert len(scored["outputs"]) == 2
    _assert_error(client.post("/api/v1/models/code/score", json={"texts": ["a", 3]}), 422, "422_0001", "texts.1")
    listed = client.get("/api/v1/models").json()["models"]
    assert {m["model"] for m in listed} == {"digits", "code", "slow"}
    assert all("max_ongoing_requests" in m and "num_replicas" in m for m in listed)
    assert client.get("/api/v1/health").json()["status"] == "ok"


def test_api_timeout_is_504_with_timeout_code(api_env):
    client, _, _ = api_env
    err = _assert_error(client.post("/api/v1/models/slow/predict", json={"inputs": [[0.5] * 64]}), 504, "500_0003", None)
    assert "request_timeout_s" in err["error_message"]


def test_api_unexpected_error_is_500_body(api_env):
    client, servers, _ = api_env

    async def boom(inputs, top_k):
        raise RuntimeError("kaput")

    servers["digits"].classify = _Method(boom)
    _assert_error(client.post("/api/v1/models/digits/predict", json={"inputs": [[0.5] * 64]}), 500, "500_0001", None)


# ----------------------------------------------------------------------------- client error parsing


def _client_for(handler) -> TemperClient:
    return TemperClient("http://temper.test", transport=httpx.MockTransport(handler))


def test_client_raises_typed_error_from_error_body():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={
            "error_code": "422_0001", "error_message": "invalid request: inputs.0: bad",
            "error_details": {"field": "inputs.0", "message": "bad"}, "request_id": "rid-1",
            "timestamp": "2026-01-01T00:00:00Z",
        })

    with pytest.raises(TemperAPIError) as err:
        _client_for(handler).predict("digits", np.zeros((1, 8, 8)))
    e = err.value
    assert (e.status, e.error_code, e.field, e.request_id) == (422, "422_0001", "inputs.0", "rid-1")
    assert "inputs.0" in str(e)


def test_client_error_without_json_body():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="bad gateway", headers={"x-request-id": "rid-2"})

    with pytest.raises(TemperAPIError) as err:
        _client_for(handler).health()
    assert (err.value.status, err.value.error_code, err.value.request_id) == (502, None, "rid-2")
    assert "bad gateway" in err.value.message


def test_client_parses_results_and_sends_flat_images():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        import json

        seen["body"] = json.loads(request.content)
        seen["path"] = request.url.path
        return httpx.Response(200, json={"model": "digits", "version": 2, "backend": "onnx_int8", "outputs": [3],
                                         "probabilities": [[{"label": 3, "probability": 0.9}]], "latency_ms": 1.5})

    result = _client_for(handler).predict("digits", np.ones((1, 1, 8, 8), dtype=np.float32), top_k=1)
    assert seen["path"] == "/api/v1/models/digits/predict"
    assert len(seen["body"]["inputs"][0]) == 64 and seen["body"]["top_k"] == 1
    assert (result.labels, result.version, result.backend, result.latency_ms) == ([3], 2, "onnx_int8", 1.5)
