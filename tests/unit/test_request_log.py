"""serve.request_log: the ingress writes one line per request, JSON by default (request id,
method, path, endpoint, model, route, version, backend, batch size, status, latency), `request
k=v ...` as text, nothing when off; credentials, query strings and bodies never appear."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from app.config.serve import ServeConfig, ServedModel
from app.logs import format_event
from serve.ingress import make_api
from test_serve_traffic import FakeRoute


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def lines():
    handler = Lines()
    logger = logging.getLogger("temper.requests")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


class BatchedRoute(FakeRoute):
    async def _classify(self, inputs, top_k):
        return {**await super()._classify(inputs, top_k), "batch_size": 3}


def _client(fmt: str) -> TestClient:
    cfg = ServeConfig(request_log=fmt, models=[ServedModel(model="digits", version="production")])
    return TestClient(make_api(cfg, {"digits": BatchedRoute(4, "production")}))


def test_one_json_line_per_request_with_the_model_call(lines):
    with _client("json") as client:
        ok = client.post("/api/v1/models/digits/predict?api_key=secret-in-query", json={"inputs": [[0.5] * 64]},
                         headers={"X-Request-ID": "req-1", "Authorization": "Bearer secret-in-header"})
        missing = client.post("/api/v1/models/nope/predict", json={"inputs": [[0.5] * 64]}, headers={"X-Request-ID": "req-2"})
        bad = client.post("/api/v1/models/digits/predict", content=b"{not json", headers={"X-Request-ID": "req-3"})
    assert (ok.status_code, missing.status_code, bad.status_code) == (200, 404, 422)
    events = [json.loads(line) for line in lines]
    assert [e["request_id"] for e in events] == ["req-1", "req-2", "req-3"]
    first = events[0]
    assert {k: first[k] for k in ("event", "method", "path", "endpoint", "model", "route", "version", "backend",
                                  "batch_size", "status")} == {
        "event": "request", "method": "POST", "path": "/api/v1/models/digits/predict", "endpoint": "predict",
        "model": "digits", "route": "production", "version": 4, "backend": "torch_fp32", "batch_size": 3, "status": 200}
    assert first["latency_ms"] > 0
    assert (events[1]["status"], events[1]["model"], events[1]["version"]) == (404, "nope", None)  # no model call
    assert events[2]["status"] == 422
    assert not any("secret" in line for line in lines)


def test_text_lines_for_humans_and_none_when_off(lines):
    with _client("text") as client:
        client.post("/api/v1/models/digits/predict", json={"inputs": [[0.5] * 64]}, headers={"X-Request-ID": "req-t"})
    assert len(lines) == 1 and lines[0].startswith("request request_id=req-t method=POST path=/api/v1/models/digits/predict")
    assert "version=4" in lines[0] and "batch_size=3" in lines[0] and "status=200" in lines[0]
    lines.clear()
    with _client("off") as client:
        client.post("/api/v1/models/digits/predict", json={"inputs": [[0.5] * 64]})
    assert lines == []


def test_format_event_leaves_out_empty_text_fields_and_keeps_json_whole():
    assert format_event("x", {"a": 1, "b": None}, "text") == "x a=1"
    assert json.loads(format_event("x", {"a": 1, "b": None})) == {"event": "x", "a": 1, "b": None}
