"""Serve rollout logic without Ray: traffic split and sticky keys, the auto-rollback decision, the
serve config schema, what `build_app` hands Serve, the `serve deploy` file, the API's routing /
backpressure / streaming over fake handles, and the client's retries. Over 500 lines in one
module because these are one subject, the rollout, tested through the same fake handles."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.config.jobs import ServeApp, load_config
from app.config.serve import AutoRollbackConfig, ServeConfig, ServedModel
from serve.advisor import SweepPoint, pick_best, sweep_points
from serve.client import RetryPolicy, TemperAPIError, TemperClient
from serve.deploy import build_app, serve_config_file
from serve.ingress import RouteTable, make_api
from serve.loadgen import is_loopback
from serve.protocol import ROUTE_HEADER, ModelRequestError, ModelServerError
from serve.rollout import OutcomeWindow, WindowStats, judge
from serve.routing import BUCKETS, TrafficRouter, key_bucket

ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- traffic split


def test_weighted_round_robin_is_exact_and_spread():
    router = TrafficRouter({"production": 90, "staging": 10})
    picks = [router.pick() for _ in range(1000)]
    assert Counter(picks) == {"production": 900, "staging": 100}
    staging_at = [i for i, p in enumerate(picks) if p == "staging"]
    assert all(b - a == 10 for a, b in zip(staging_at, staging_at[1:]))  # spread out, not bunched
    three = TrafficRouter({"a": 50, "b": 30, "c": 20})
    assert Counter(three.pick() for _ in range(100)) == {"a": 50, "b": 30, "c": 20}
    assert set(TrafficRouter({"a": 100, "b": 0}).pick() for _ in range(50)) == {"a"}


def test_sticky_keys_are_stable_and_split_by_weight():
    router = TrafficRouter({"production": 90, "staging": 10})
    keys = [f"user-{i}" for i in range(2000)]
    first = [router.pick(k) for k in keys]
    assert [router.pick(k) for k in keys] == first  # same key, same route
    assert [TrafficRouter({"production": 90, "staging": 10}).pick(k) for k in keys] == first  # in any process
    share = Counter(first)["staging"] / len(keys)
    assert abs(share - 0.10) <= 0.05
    assert all(0 <= key_bucket(k) < BUCKETS for k in keys)
    # 90/10 -> 80/20 moves only keys from production to staging, never the other way
    moved = [router.pick(k) for k in keys if router.pick(k) == "staging"]
    router.set_weights({"production": 80, "staging": 20})
    after = [router.pick(k) for k in keys]
    assert all(a == "staging" for a, b in zip(after, first) if b == "staging") and len(moved) < after.count("staging")


def test_route_table_explicit_route_and_live_update():
    from serve.protocol import APIError

    table = RouteTable({"digits": {"production": 90, "staging": 10}})
    assert table.pick("digits", None, "staging") == (1, "staging")
    with pytest.raises(APIError) as err:
        table.pick("digits", None, "canary")
    assert (err.value.status, err.value.field) == (404, ROUTE_HEADER)
    table.update({"digits": {"production": 0, "staging": 100}})
    assert {table.pick("digits", None, None) for _ in range(10)} == {(1, "staging")}
    with pytest.raises(ValueError, match="keep its 2 routes"):
        table.update({"digits": {"production": 100}})


# ----------------------------------------------------------------------------- auto-rollback decision


ROLLBACK = AutoRollbackConfig(canary="staging", baseline="production", min_requests=20, error_rate_factor=1.1,
                              min_error_rate=0.02, latency_p95_factor=2.0)


@pytest.mark.parametrize("canary, baseline, rollback", [
    (WindowStats(requests=50, errors=10, p95_ms=5, successes=40), WindowStats(100, 2, 5, 98), True),    # 20% vs 2%
    (WindowStats(requests=50, errors=1, p95_ms=5, successes=49), WindowStats(100, 0, 5, 100), False),   # 2% = floor
    (WindowStats(requests=50, errors=2, p95_ms=5, successes=48), WindowStats(100, 0, 5, 100), True),    # 4% > floor
    (WindowStats(requests=50, errors=11, p95_ms=5, successes=39), WindowStats(100, 20, 5, 80), False),  # 22% < 20% x 1.1
    (WindowStats(requests=10, errors=10, p95_ms=None, successes=0), WindowStats(100, 0, 5, 100), False),  # too few
    (WindowStats(requests=50, errors=0, p95_ms=30, successes=50), WindowStats(100, 0, 10, 100), True),  # slow
    (WindowStats(requests=50, errors=0, p95_ms=19, successes=50), WindowStats(100, 0, 10, 100), False),
])
def test_judge(canary, baseline, rollback):
    reasons = judge(canary, baseline, ROLLBACK)
    assert bool(reasons) == rollback, reasons


def test_judge_without_latency_check_and_reason_text():
    no_latency = ROLLBACK.model_copy(update={"latency_p95_factor": None})
    slow = WindowStats(requests=50, errors=0, p95_ms=300, successes=50)
    assert judge(slow, WindowStats(100, 0, 10, 100), no_latency) == []
    [reason] = judge(WindowStats(40, 40, None, 0), WindowStats(), ROLLBACK)
    assert reason.startswith("error rate 1.000 (40/40) > 0.020")


def test_outcome_window_prunes_and_attributes_unknown_versions():
    w = OutcomeWindow(window_s=10)
    for t in range(5):
        w.add("m", "staging", 3, "server_error", 1.0, now=t)
    w.add("m", "staging", None, "server_error", 1.0, now=5)  # e.g. a timeout: version unknown
    w.add("m", "staging", 3, "ok", 4.0, now=6)
    w.add("m", "staging", 3, "client_error", 1.0, now=6)  # a bad request says nothing about the version
    w.add("m", "staging", 3, "rejected", 1.0, now=6)      # nor does an overloaded queue
    s = w.stats("m", "staging", 3, now=7)
    assert (s.requests, s.errors, s.successes, s.p95_ms) == (6, 5, 1, 4.0)
    assert w.stats("m", "staging", 3, now=7, include_unknown=True).errors == 6
    assert w.stats("m", "staging", 3, now=14.5).requests == 1  # events before t=4.5 left the window


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("fields, match", [
    ({"traffic": {"production": 90, "staging": 5}}, "sum to 95"),
    ({"traffic": {"production": 100}, "version": "3"}, "either `version`"),
    ({"traffic": {"prod uction": 100}}, "not a version number"),
    ({"traffic": {"a": 110, "b": -10}}, "weight -10"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
    ({"autoscaling": {}, "num_replicas": 2}, "either `num_replicas`"),
    ({"autoscaling": {"target_ongoing_requests": 64}}, "target_ongoing_requests"),
    ({"auto_rollback": {"canary": "staging", "baseline": "production"}}, "auto_rollback.canary"),
    ({"traffic": {"production": 90, "staging": 10}, "auto_rollback": {"canary": "staging", "baseline": "staging"}}, "must differ"),
    ({"max_queued_requests": 0}, "max_queued_requests"),
    ({"max_batch_size": 64}, "max_ongoing_requests"),
])
def test_served_model_cross_field_checks_name_the_field(fields, match):
    with pytest.raises(ValidationError, match=match):
        ServedModel(model="m", **fields)


def test_served_model_routes_and_redump():
    m = ServedModel(model="m", traffic={"production": 90, "staging": 10}, autoscaling={"max_replicas": 3},
                    auto_rollback={"canary": "staging", "baseline": "production"})
    again = ServedModel.model_validate(m.model_dump(mode="json"))  # workers / config files re-validate dumps
    assert again.routes() == {"production": 90, "staging": 10} and again.max_replicas() == 3
    assert ServedModel(model="m", version="4").routes() == {"4": 100}
    with pytest.raises(ValidationError, match="sticky_header"):
        ServeConfig(sticky_header="x user")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "serve").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_serve_configs_validate_and_name_their_command(path):
    assert path.read_text().splitlines()[0].startswith("# Run: python -m app serve deploy configs/serve/" + path.name)
    load_config("serve", path)


# ----------------------------------------------------------------------------- build_app / serve config


def _canary_app() -> ServeApp:
    return ServeApp(serve=ServeConfig(retry_after_s=2, models=[
        ServedModel(model="digits", traffic={"production": 90, "staging": 10}, max_queued_requests=7,
                    autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 12},
                    auto_rollback={"canary": "staging", "baseline": "production"}),
        ServedModel(model="code", version="latest", max_batch_size=8, batch_wait_timeout_s=0.002, num_replicas=2),
    ]))


def test_build_app_hands_serve_routes_queues_autoscaling_and_live_settings():
    app = build_app(_canary_app())
    ingress = app._bound_deployment
    assert ingress.name == "TemperIngress"
    assert ingress.user_config == {"traffic": {"digits": {"production": 90, "staging": 10}, "code": {"latest": 100}},
                                   "auth": {"enabled": False, "rate_limit": None}, "models": {}}  # auth: off on loopback
    assert ingress.max_ongoing_requests >= (32 + 7) * 3 * 2 + (32 + 64) * 2
    serve_cfg, servers, watcher, registry, local = ingress.init_args
    assert local == {}  # the routes are deployments of their own
    assert registry == _canary_app().registry.model_dump(mode="json")  # whom the ingress asks about credentials
    assert watcher._bound_deployment.name == "RolloutWatcher"
    digits = [a._bound_deployment for a in servers["digits"]]
    assert [d.name for d in digits] == ["model-digits", "model-digits--staging"]
    for d, ref in zip(digits, ["production", "staging"]):
        assert d.user_config == {"max_batch_size": 16, "batch_wait_timeout_s": 0.01, "stream_interval_s": 0.25, "version": ref}
        assert d.max_queued_requests == 7 and d.backpressure_config.retry_after_s == 2
        auto = d._deployment_config.autoscaling_config
        assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 12)
    [code] = [a._bound_deployment for a in servers["code"]]
    assert (code.name, code.num_replicas, code.user_config["max_batch_size"]) == ("model-code", 2, 8)
    assert code._deployment_config.autoscaling_config is None


def test_single_hop_builds_the_routes_into_the_ingress():
    app_cfg = _canary_app()
    app_cfg.serve.models[0].autoscaling, app_cfg.serve.models[0].num_replicas = None, 2
    app_cfg.serve.single_hop = True
    app_cfg = ServeApp.model_validate(app_cfg.model_dump())
    ingress = build_app(app_cfg)._bound_deployment
    serve_cfg, servers, watcher, registry, local = ingress.init_args
    assert servers == {} and [spec["args"][0] for spec in local["digits"]] == ["digits", "digits"]
    assert [(s["max_ongoing_requests"], s["max_queued_requests"]) for s in local["digits"]] == [(32, 7), (32, 7)]
    assert ingress.num_replicas == 2 and ingress.ray_actor_options["num_cpus"] == pytest.approx(0.1 + 0.5 * 3)
    # the routes' live settings are the ingress's user_config, in route order
    assert [r["version"] for r in ingress.user_config["models"]["digits"]] == ["production", "staging"]
    assert ingress.user_config["models"]["code"] == [{"max_batch_size": 8, "batch_wait_timeout_s": 0.002,
                                                      "stream_interval_s": 0.25, "version": "latest"}]
    # a route's capacity is counted once per ingress replica (its routes are in the replica itself)
    assert ingress.max_ongoing_requests == (32 + 7) * 2 + (32 + 64) + 16
    [entry] = serve_config_file(app_cfg)["applications"][0]["deployments"]
    assert (entry["name"], entry["num_replicas"], entry["user_config"]) == ("TemperIngress", 2, ingress.user_config)


def test_build_app_versions_keep_replicas_on_live_changes_only():
    base = _canary_app()
    live = base.model_copy(deep=True)
    live.serve.models[0].traffic = {"production": 50, "staging": 50}
    live.serve.models[1].max_batch_size, live.serve.models[1].version = 4, "2"
    fixed = base.model_copy(deep=True)
    fixed.serve.models[1].max_new_tokens = 8

    def versions(cfg):
        app = build_app(cfg)
        ingress = app._bound_deployment
        return [ingress.version] + [a._bound_deployment.version for apps in ingress.init_args[1].values() for a in apps]

    assert versions(live) == versions(base)  # weights, batch size, version ref: reconfigure in place
    assert versions(base) == versions(_canary_app())  # the same config deployed again: replicas kept
    fresh = build_app(base, fresh=True)  # over a failed app: every deployment starts anew
    assert not set(versions(base)) & {fresh._bound_deployment.version}
    assert versions(fixed)[0] != versions(base)[0] and versions(fixed)[-1] != versions(base)[-1]


def test_serve_config_file_is_a_valid_serve_deploy_schema(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    cfg = _canary_app()
    doc = serve_config_file(cfg)
    ServeDeploySchema.model_validate(yaml.safe_load(yaml.safe_dump(doc)))
    [application] = doc["applications"]
    assert application["import_path"] == "serve.deploy:app_builder"
    assert ServeApp.model_validate(application["args"]).serve.models[0].routes() == {"production": 90, "staging": 10}
    assert application["args"]["registry"]["db_url"].startswith("sqlite:////")  # made absolute
    names = [d["name"] for d in application["deployments"]]
    assert names == ["model-digits", "model-digits--staging", "model-code"]
    assert application["deployments"][2]["user_config"]["batch_wait_timeout_s"] == 0.002
    # and through the CLI
    src = tmp_path / "serve.yaml"
    src.write_text(yaml.safe_dump({"serve": cfg.serve.model_dump(mode="json")}))
    from app.cli.main import main

    assert main(["serve", "config", str(src), "-o", str(tmp_path / "out.yaml"), "serve.port=8123"]) == 0
    written = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert written["http_options"]["port"] == 8123
    # `--config FILE` is accepted as well, with or without an action (none: deploy)
    assert main(["serve", "config", "--config", str(src), "-o", str(tmp_path / "out2.yaml"), "serve.port=8124"]) == 0
    assert yaml.safe_load((tmp_path / "out2.yaml").read_text())["http_options"]["port"] == 8124
    from app.cli.main import _serve_config_option

    assert _serve_config_option(["serve", "--config", "c.yaml", "serve.port=1"]) == ["serve", "deploy", "c.yaml", "serve.port=1"]
    assert _serve_config_option(["serve", "status", "--config=c.yaml", "--json"]) == ["serve", "status", "c.yaml", "--json"]


# ----------------------------------------------------------------------------- advisor


def test_advisor_sweep_points_and_best_choice():
    served = ServedModel(model="m", max_ongoing_requests=16, max_batch_size=8)
    points = sweep_points(served, (1, 8, 16, 32), (1.0, 5.0))
    assert points == [(1, 0.0), (8, 0.001), (8, 0.005), (16, 0.001), (16, 0.005)]  # 32 > max_ongoing_requests
    sweep = [SweepPoint(1, 0.0, 100, 5, 8, 9, 500, 0), SweepPoint(8, 0.001, 300, 10, 30, 45, 500, 0),
             SweepPoint(16, 0.005, 400, 20, 60, 80, 500, 0), SweepPoint(16, 0.001, 500, 9, 20, 30, 480, 20)]
    assert pick_best(sweep, slo_p99_ms=50) is sweep[1]  # the fastest within the SLO; failures disqualify
    assert pick_best(sweep, slo_p99_ms=100) is sweep[2]
    assert pick_best(sweep, slo_p99_ms=5) is None
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://localhost:1") and not is_loopback("http://10.0.0.2")


# ----------------------------------------------------------------------------- API over fakes


class _Response:
    def __init__(self, coro):
        self._coro, self.cancelled = coro, False

    def __await__(self):
        return self._coro.__await__()

    def cancel(self):
        self.cancelled = True


class _Stream:
    """Stands in for a streaming DeploymentResponseGenerator."""

    def __init__(self, agen):
        self._agen = agen

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._agen.__anext__()

    def cancel(self):
        pass


class _Method:
    def __init__(self, fn, stream=False):
        self.fn, self.stream = fn, stream

    def remote(self, *args):
        return _Stream(self.fn(*args)) if self.stream else _Response(self.fn(*args))


class FakeRoute:
    """One route deployment of a classifier + lm model, serving `version`."""

    def __init__(self, version: int, route: str, fail: bool = False, overloaded: bool = False):
        self.version, self.route, self.fail, self.overloaded = version, route, fail, overloaded
        self.calls = 0
        self.classify = _Method(self._classify)
        self.generate = _Method(self._generate)
        self.info = _Method(self._info)

    def options(self, stream: bool = False):
        fake = FakeRoute(self.version, self.route, self.fail, self.overloaded)
        fake.generate_stream = _Method(self._generate_stream, stream=True)
        return fake

    def _head(self):
        return {"version": self.version, "backend": "torch_fp32", "route": self.route}

    async def _classify(self, inputs, top_k):
        from ray.serve.exceptions import BackPressureError

        self.calls += 1
        if self.overloaded:
            raise BackPressureError(num_queued_requests=5, max_queued_requests=5)
        if self.fail:
            return ModelServerError(500, "non-finite outputs", self.version, "torch_fp32").as_failure()
        return {**self._head(), "outputs": [1] * len(inputs), "probabilities": [[]] * len(inputs)}

    async def _info(self):
        return {**self._head(), "model": "m", "task": "classifier", "ref": self.route}

    async def _generate(self, prompt, max_new_tokens, temperature, top_k, seed):
        return {**self._head(), "tokens": [104, 105], "text": "hi", "finish_reason": "length"}

    async def _generate_stream(self, prompt, max_new_tokens, temperature, top_k, seed):
        if prompt == "refuse":
            yield ModelRequestError(400, "model", "wrong task").as_refusal()
            return
        yield self._head()
        data = list("h\u00e9!".encode())  # a 2-byte character in the middle
        yield data[:2]  # new tokens come in lists; this one splits the character between two of them
        yield data[2:]
        if prompt == "break":
            yield ModelServerError(500, "non-finite outputs", self.version).as_failure()


class FakeMetrics:
    def __init__(self):
        self.outcomes = []

    def observe(self, model, endpoint, status, latency_ms):
        pass

    def route(self, model, route, version, outcome):
        self.outcomes.append((model, route, version, outcome))


@pytest.fixture
def split_env():
    cfg = ServeConfig(retry_after_s=3, max_items_per_request=4, models=[
        ServedModel(model="digits", traffic={"production": 90, "staging": 10}),
        ServedModel(model="busy", version="1"),
        ServedModel(model="code", version="latest", max_new_tokens=8),
    ])
    servers = {"digits": [FakeRoute(1, "production"), FakeRoute(2, "staging")], "busy": FakeRoute(1, "1", overloaded=True),
               "code": FakeRoute(5, "latest")}
    metrics = FakeMetrics()
    with TestClient(make_api(cfg, servers, metrics)) as client:
        yield client, servers, metrics


def test_api_split_over_1000_requests_names_route_and_version(split_env):
    client, servers, metrics = split_env
    seen = Counter()
    for _ in range(1000):
        body = client.post("/api/v1/models/digits/predict", json={"inputs": [[0.5] * 64]}).json()
        seen[(body["route"], body["version"])] += 1
    assert seen == {("production", 1): 900, ("staging", 2): 100}
    assert (servers["digits"][0].calls, servers["digits"][1].calls) == (900, 100)
    assert Counter(o[3] for o in metrics.outcomes) == {"ok": 1000}


def test_api_sticky_header_and_explicit_route(split_env):
    client, _, _ = split_env
    router = TrafficRouter({"production": 90, "staging": 10})
    for i in range(60):
        key = f"user-{i}"
        routes = {client.post("/api/v1/models/digits/predict", json={"inputs": [[0.5] * 64]},
                              headers={"X-Temper-Route-Key": key}).json()["route"] for _ in range(3)}
        assert routes == {router.pick(key)}
    body = client.post("/api/v1/models/digits/predict", json={"inputs": [[0.5] * 64]}, headers={ROUTE_HEADER: "staging"}).json()
    assert (body["route"], body["version"]) == ("staging", 2)
    resp = client.post("/api/v1/models/digits/predict", json={"inputs": [[0.5] * 64]}, headers={ROUTE_HEADER: "blue"})
    assert resp.status_code == 404 and resp.json()["error_details"]["field"] == ROUTE_HEADER


def test_api_overload_is_503_with_retry_after_and_failure_is_500_with_version(split_env):
    client, servers, metrics = split_env
    resp = client.post("/api/v1/models/busy/predict", json={"inputs": [[0.5] * 64]})
    assert resp.status_code == 503 and resp.headers["retry-after"] == "3"
    assert resp.json()["error_code"] == "500_0002" and "overloaded" in resp.json()["error_message"]
    servers["digits"][1].fail = True
    resp = client.post("/api/v1/models/digits/predict", json={"inputs": [[0.5] * 64]}, headers={ROUTE_HEADER: "staging"})
    assert resp.status_code == 500 and resp.json()["error_code"] == "500_0001"
    assert "version 2 (staging)" in resp.json()["error_message"]
    assert metrics.outcomes[-2:] == [("busy", "1", None, "rejected"), ("digits", "staging", 2, "server_error")]


@pytest.mark.parametrize("body, status, field", [
    ({"inputs": [[0.5] * 64] * 5}, 413, "inputs"),                                   # over max_items_per_request
    ({"prompt": "x", "temperature": -1}, 422, "temperature"),
    ({"prompt": "x", "top_k": "3"}, 422, "top_k"),
    ({"prompt": "x", "seed": -4}, 422, "seed"),
    ({"prompt": "x", "stream": "yes"}, 422, "stream"),
    ({"prompt": 42}, 422, "prompt"),
    ({"max_new_tokens": 3}, 422, "prompt"),
    ({"prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 9}, 422, "max_new_tokens"),                  # over the model's cap (8)
    ({"prompt": "x", "temperature": 0.5, "extra": 1}, 422, "extra"),
])
def test_api_generate_and_limits_refusals(split_env, body, status, field):
    client, _, _ = split_env
    path = "digits/predict" if "inputs" in body else "code/generate"
    resp = client.post(f"/api/v1/models/{path}", json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error_details"]["field"] == field


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_api_stream_sends_start_tokens_done_and_errors(split_env):
    client, _, _ = split_env
    resp = client.post("/api/v1/models/code/generate", json={"prompt": "hi", "max_new_tokens": 4, "stream": True},
                       headers={"X-Request-ID": "s-1"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = _events(resp.text)
    assert events[0] == ("start", {"model": "code", "route": "latest", "version": 5, "backend": "torch_fp32", "request_id": "s-1"})
    tokens = [e[1] for e in events if e[0] == "token"]
    assert [t["token"] for t in tokens] == list("h\u00e9!".encode())
    assert "".join(t["text"] for t in tokens) == "h\u00e9!"  # the split character comes whole, once
    assert events[-1][0] == "done" and events[-1][1]["text"] == "h\u00e9!" and events[-1][1]["tokens"] == list("h\u00e9!".encode())
    refused = client.post("/api/v1/models/code/generate", json={"prompt": "refuse", "max_new_tokens": 4, "stream": True})
    assert refused.status_code == 400 and refused.json()["error_details"]["field"] == "model"  # before the stream: a status
    broken = _events(client.post("/api/v1/models/code/generate", json={"prompt": "break", "max_new_tokens": 4, "stream": True}).text)
    assert broken[-1][0] == "error" and broken[-1][1]["error_code"] == "500_0001"  # after it started: in-band


def test_api_models_lists_routes(split_env):
    client, _, _ = split_env
    digits = {m["model"]: m for m in client.get("/api/v1/models").json()["models"]}["digits"]
    assert digits["traffic"] == {"production": 90, "staging": 10}
    assert [(r["route"], r["deployment"], r["version"]) for r in digits["routes"]] == [
        ("production", "model-digits", 1), ("staging", "model-digits--staging", 2)]


# ----------------------------------------------------------------------------- client retries


def _client(handler, retries=3) -> TemperClient:
    return TemperClient("http://temper.test", transport=httpx.MockTransport(handler),
                        retry=RetryPolicy(retries=retries, backoff_s=0.001, max_backoff_s=0.01))


def _ok(request):
    return httpx.Response(200, json={"model": "digits", "route": "production", "version": 1, "backend": "onnx_int8",
                                     "outputs": [3], "probabilities": [[]], "latency_ms": 1.0})


def test_client_retries_503_then_succeeds_and_honours_retry_after():
    answers = [httpx.Response(503, json={"error_code": "500_0002", "error_message": "busy"}, headers={"Retry-After": "0"})] * 2
    seen = []

    def handler(request):
        seen.append(request.headers.get("x-temper-route-key"))
        return answers.pop(0) if answers else _ok(request)

    client = _client(handler)
    client.route_key = "user-7"
    result = client.predict("digits", np.zeros((1, 8, 8)))
    assert (result.version, result.route, client.attempts) == (1, "production", 3)
    assert seen == ["user-7"] * 3  # the sticky key goes with every attempt


@pytest.mark.parametrize("status", [400, 404, 413, 422, 500, 504])
def test_client_never_retries_other_errors(status):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, json={"error_code": f"{status}_0001", "error_message": "no",
                                            "error_details": {"field": "inputs", "message": "no"}})

    client = _client(handler)
    with pytest.raises(TemperAPIError) as err:
        client.predict("digits", np.zeros((1, 8, 8)))
    assert err.value.status == status and len(calls) == 1


def test_client_retries_connection_errors_then_gives_up():
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(httpx.ConnectError):
        _client(handler, retries=2).health()
    assert len(calls) == 3
    stubborn = [httpx.Response(503, text="busy")] * 5
    client = _client(lambda r: stubborn.pop(0), retries=2)
    with pytest.raises(TemperAPIError) as err:
        client.health()
    assert err.value.status == 503 and client.attempts == 3


def test_retry_policy_backoff_grows_and_is_capped():
    policy = RetryPolicy(retries=5, backoff_s=0.1, max_backoff_s=0.5)
    delays = [policy.delay(a, None) for a in range(5)]
    assert 0.075 <= delays[0] <= 0.125 and 0.15 <= delays[1] <= 0.25 and all(d <= 0.5 * 1.25 for d in delays)
    assert policy.delay(0, 30.0) == 0.5 and policy.delay(3, 0.0) == 0.0


def test_client_stream_parses_events_and_raises_on_error_event():
    def sse(*events):
        return "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events)

    body = sse(("start", {"model": "code", "route": "latest", "version": 2, "backend": "torch_fp32", "request_id": "r"}),
               ("token", {"index": 0, "token": 104, "text": "h"}), ("token", {"index": 1, "token": 105, "text": "i"}),
               ("done", {"tokens": [104, 105], "text": "hi", "latency_ms": 3.0, "finish_reason": "length"}))
    client = _client(lambda r: httpx.Response(200, text=body, headers={"content-type": "text/event-stream"}))
    stream = client.generate_stream("code", "x", 2)
    assert [c.text for c in stream] == ["h", "i"]
    assert (stream.result.tokens, stream.result.version, stream.result.route) == ([104, 105], 2, "latest")
    broken = sse(("start", {"version": 2}), ("error", {"error_code": "500_0003", "error_message": "too slow",
                                                       "error_details": {"field": None}, "request_id": "r"}))
    client = _client(lambda r: httpx.Response(200, text=broken))
    with pytest.raises(TemperAPIError) as err:
        list(client.generate_stream("code", "x", 2))
    assert err.value.status == 504


def test_async_client_retries_503():
    from serve.client import AsyncTemperClient

    answers = [httpx.Response(503, text="busy")]

    async def run():
        async def handler(request):
            return answers.pop(0) if answers else _ok(request)

        async with AsyncTemperClient("http://t", transport=httpx.MockTransport(handler),
                                     retry=RetryPolicy(retries=1, backoff_s=0.001)) as c:
            return await c.predict("digits", np.zeros((1, 8, 8))), c.attempts

    result, attempts = asyncio.run(run())
    assert result.labels == [3] and attempts == 2
