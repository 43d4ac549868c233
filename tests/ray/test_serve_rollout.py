"""Rollouts on the shared local Ray cluster, over real HTTP: a 90/10 traffic split between two
registry aliases, sticky routing, an alias moved in the registry and picked up without a
redeploy, an automatic rollback of a deliberately broken canary (recorded in the registry's
alias history), backpressure (503 + Retry-After from a bounded queue, and a retrying client
getting through), streamed generation, autoscaling settings reaching Serve, and the
`serve status|advise|shutdown` CLI.

Assertions are on counts and values; waiting loops poll a condition with a deadline (alias
polling and the watcher work on their own clock)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import httpx
import numpy as np
import pytest
import torch
import yaml

from app.artifacts import save_fp32
from app.compression import METHODS
from app.config.data import DataConfig
from app.config.model import GPTConfig, ViTConfig
from app.config.registry import RegistryConfig
from app.config.jobs import ServeApp, TrainJob
from app.config.serve import ServeConfig, ServedModel
from app.data import DigitsData
from app.inference import SamplingParams, generate_text, generate_tokens, load_predictor
from app.models import build_model
from serve.client import AsyncTemperClient, HandleClient, RetryPolicy, TemperClient
from serve.deploy import WATCHER_NAME, deploy
from serve.protocol import API_PREFIX, ROUTE_HEADER
from serve.routing import TrafficRouter
from conftest import GAUGE_EXPIRY_S, free_port, metric_total, wait_for

pytestmark = pytest.mark.ray

WEIGHTS = {"production": 90, "staging": 10}
DEPLOYED: dict[str, float] = {}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """digits: ViT fp32 (v1), its int8 variant (v2), a broken copy with NaN weights (v3); code: a GPT."""
    root = tmp_path_factory.mktemp("rollout-artifacts")
    vit = TrainJob(name="digits", model=ViTConfig(n_layer=1, d_model=32), data=DataConfig(name="digits"))
    gpt = TrainJob(name="code", model=GPTConfig(n_layer=2, d_model=32, n_head=2, block_size=32), data=DataConfig(name="lm-code"))
    torch.manual_seed(0)
    good = build_model(vit.model)
    paths = {"vit": str(save_fp32(root / "vit", good, vit)), "gpt": str(save_fp32(root / "gpt", build_model(gpt.model), gpt))}
    paths["vit_int8"] = str(METHODS["torch_int8"](paths["vit"], root / "vit_int8"))
    broken = build_model(vit.model)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(float("nan"))  # what a bad export or a diverged run could register
    paths["vit_broken"] = str(save_fp32(root / "vit_broken", broken, vit))
    return paths


@pytest.fixture(scope="module")
def registry(ray_cluster, artifacts, tmp_path_factory):
    from actors.registry.client import get_or_create_registry

    cfg = RegistryConfig(
        actor_name=f"rollout-test-{uuid.uuid4().hex[:8]}", namespace="temper-tests",
        db_url=f"sqlite:///{tmp_path_factory.mktemp('rollout-registry') / 'r.db'}",
    )
    handle = get_or_create_registry(cfg)
    ray = ray_cluster
    ray.get(handle.register_version.remote("digits", artifacts["vit"], "torch_fp32"))
    ray.get(handle.register_version.remote("digits", artifacts["vit_int8"], "torch_int8",
                                           parent={"model": "digits", "version": 1}, transformation="quantized"))
    ray.get(handle.register_version.remote("digits", artifacts["vit_broken"], "torch_fp32"))
    ray.get(handle.set_alias.remote("digits", "production", 1, "first release", "test"))
    ray.get(handle.set_alias.remote("digits", "staging", 2, "canary: int8", "test"))
    ray.get(handle.register_version.remote("code", artifacts["gpt"], "torch_fp32"))
    yield cfg, handle
    ray.kill(handle, no_restart=True)


@pytest.fixture(scope="module")
def app_cfg(registry) -> ServeApp:
    return ServeApp(registry=registry[0], serve=ServeConfig(
        app_name=f"rollout-{uuid.uuid4().hex[:6]}", port=free_port(), alias_poll_interval_s=0.5,
        models=[
            ServedModel(model="digits", traffic=WEIGHTS, max_batch_size=8, batch_wait_timeout_s=0.005, cpus_per_replica=0.25,
                        # latency is not judged here: on a shared 2-core machine p95 says more about neighbours than versions
                        auto_rollback={"canary": "staging", "baseline": "production", "min_requests": 8,
                                       "check_interval_s": 0.5, "window_s": 120, "latency_p95_factor": None}),
            # One request at a time and a queue of 2: overload is easy to reach.
            ServedModel(model="code", version="latest", max_batch_size=1, max_ongoing_requests=1, max_queued_requests=2,
                        max_new_tokens=64, cpus_per_replica=0.25,
                        autoscaling={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1}),
        ],
    ))


@pytest.fixture(scope="module")
def config_file(app_cfg, tmp_path_factory):
    path = tmp_path_factory.mktemp("rollout-cfg") / "serve.yaml"
    path.write_text(yaml.safe_dump(app_cfg.model_dump(mode="json")))
    return str(path)


@pytest.fixture(scope="module")
def base_url(app_cfg, config_file):
    from ray import serve

    from app.cli.main import main

    url = deploy(app_cfg)
    DEPLOYED["at"] = time.monotonic()
    yield url
    try:
        assert main(["serve", "shutdown", config_file]) == 0  # the CLI's shutdown, on the way out
        assert app_cfg.serve.app_name not in serve.status().applications
    finally:
        # HTTP host/port are fixed when Serve starts: stop it so a later module can pick its own.
        serve.shutdown()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return DigitsData(DataConfig(name="digits")).x_val[:8]


def _staging_key() -> str:
    router = TrafficRouter(WEIGHTS)
    return next(k for k in (f"user-{i}" for i in range(1000)) if router.pick(k) == "staging")


def _predict(url: str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}{API_PREFIX}/models/digits/predict", json={"inputs": [[0.5] * 64], "top_k": 1},
                      headers=headers or {}, timeout=30)


def test_traffic_split_over_1000_requests_and_version_in_every_answer(base_url, images):
    async def send():
        async with AsyncTemperClient(base_url, timeout=60.0) as c:
            sem = asyncio.Semaphore(16)

            async def one(i):
                async with sem:
                    return await c.predict("digits", images[i % len(images)][None], top_k=1)

            return await asyncio.gather(*(one(i) for i in range(1000)))

    results = asyncio.run(send())
    seen = Counter((r.route, r.version, r.backend) for r in results)
    assert set(seen) == {("production", 1, "torch_fp32"), ("staging", 2, "torch_int8")}, seen
    share = seen[("staging", 2, "torch_int8")] / len(results)
    assert abs(share - WEIGHTS["staging"] / 100) <= 0.05, seen


def test_sticky_header_pins_each_caller_to_one_route(base_url):
    router = TrafficRouter(WEIGHTS)
    for i in range(40):
        key = f"caller-{i}"
        answers = {(r.json()["route"], r.json()["version"]) for r in
                   (_predict(base_url, {"X-Temper-Route-Key": key}) for _ in range(2))}
        assert answers == {(router.pick(key), 1 if router.pick(key) == "production" else 2)}, key


def test_alias_move_in_registry_is_served_without_redeploy(base_url, app_cfg, registry):
    ray_handle = registry[1]
    import ray

    staging = HandleClient(app_cfg.serve.app_name, "digits", route="staging")
    before = staging.stats()
    key = {"X-Temper-Route-Key": _staging_key()}
    assert _predict(base_url, key).json()["version"] == 2
    ray.get(ray_handle.set_alias.remote("digits", "staging", 1, "canary back to fp32", "test"))
    wait_for(lambda: _predict(base_url, key).json()["version"] == 1, "staging to serve v1")
    after = staging.stats()
    assert after["replica"] == before["replica"] and after["swaps"] == before["swaps"] + 1  # hot swap, same replica
    ray.get(ray_handle.set_alias.remote("digits", "staging", 2, "canary: int8 again", "test"))
    wait_for(lambda: _predict(base_url, key).json()["version"] == 2, "staging to serve v2 again")


def test_auto_rollback_of_a_broken_canary_is_recorded_in_the_registry(base_url, app_cfg, registry):
    from ray import serve

    ray_handle = registry[1]
    import ray

    ray.get(ray_handle.set_alias.remote("digits", "staging", 3, "canary: v3", "test"))
    canary = {ROUTE_HEADER: "staging"}

    def canary_fails():
        resp = _predict(base_url, canary)
        return resp.status_code == 500 and "version 3 (staging) failed" in resp.json()["error_message"]

    wait_for(canary_fails, "staging to serve the broken v3")
    # Production keeps answering while the canary fails; both feed the watcher's window.
    statuses = Counter()
    for _ in range(12):
        statuses[("staging", _predict(base_url, canary).status_code)] += 1
        statuses[("production", _predict(base_url, {ROUTE_HEADER: "production"}).status_code)] += 1
    # The watcher may already act within these calls (8 failed canary calls in its window, the
    # polling above included): a canary answer after that comes from the rolled-back version, 200.
    assert statuses[("production", 200)] == 12 and statuses[("staging", 500)] >= 1, statuses
    assert set(statuses) <= {("staging", 500), ("staging", 200), ("production", 200)}, statuses

    def rolled_back():
        rows = ray.get(ray_handle.alias_history.remote("digits", "staging"))
        return rows[-1] if rows[-1]["action"] == "rollback" else None

    row = wait_for(rolled_back, "the watcher's rollback", poke=lambda: _predict(base_url))
    assert (row["from_version"], row["to_version"], row["actor"]) == (3, 2, "serve:auto-rollback")
    assert "error rate 1.000" in row["reason"] and "staging v3 vs production v1" in row["reason"]
    assert ray.get(ray_handle.aliases.remote("digits"))["staging"] == 2
    wait_for(lambda: _predict(base_url, canary).status_code == 200, "staging to serve v2 after the rollback")
    assert _predict(base_url, canary).json()["version"] == 2
    watcher = serve.get_deployment_handle(WATCHER_NAME, app_cfg.serve.app_name).status.remote().result(timeout_s=30)
    [event] = watcher["rollbacks"]
    assert (event["model"], event["alias"], event["from_version"], event["to_version"]) == ("digits", "staging", 3, 2)
    # ... and the metric went up once (ray.util.metrics, on the node's Prometheus endpoint)
    node = ray._private.worker.global_worker.node
    metrics_url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    wait_for(lambda: metric_total(httpx.get(metrics_url, timeout=10).text, "ray_temper_serve_rollbacks_total",
                                    model="digits", alias="staging") == 1, "temper_serve_rollbacks_total to reach 1")


def test_overload_answers_503_with_retry_after_from_a_bounded_queue(base_url):
    body = {"prompt": "def overload(", "max_new_tokens": 64}

    async def burst(n):
        async with httpx.AsyncClient(timeout=60.0) as c:
            return await asyncio.gather(*(c.post(f"{base_url}{API_PREFIX}/models/code/generate", json=body) for _ in range(n)))

    answers = asyncio.run(burst(12))
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) == {200, 503} and statuses[503] >= 1, statuses  # 1 running + 2 queued, the rest refused
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error_code"] == "500_0002" and "overloaded" in r.json()["error_message"]
            assert r.json()["request_id"] == r.headers["x-request-id"]

    async def patient(n):  # the same burst through clients that back off and retry
        async with AsyncTemperClient(base_url, timeout=60.0, retry=RetryPolicy(retries=30, backoff_s=0.05, max_backoff_s=0.5)) as c:
            results = await asyncio.gather(*(c.generate("code", body["prompt"], 64) for _ in range(n)))
            return results, c.attempts

    results, attempts = asyncio.run(patient(6))
    assert len(results) == 6 and all(len(r.tokens) == 64 for r in results)
    assert attempts > 6  # some were turned away and came back


def test_streamed_generation_equals_uncached_generation(base_url, app_cfg, artifacts):
    pred = load_predictor(artifacts["gpt"])
    prompt = "def stream(self):"
    row = np.frombuffer(prompt.encode(), dtype=np.uint8).astype(np.int64)
    want = generate_text(pred, row[None], 40)[0].tolist()  # no KV cache: recompute the context each step
    with TemperClient(base_url, timeout=60.0) as client:
        stream = client.generate_stream("code", prompt, max_new_tokens=40)
        chunks = list(stream)
        assert [c.token for c in chunks] == want == stream.result.tokens
        assert [c.index for c in chunks] == list(range(40)) and stream.result.version == 1
        assert client.generate("code", prompt, max_new_tokens=40).tokens == want
        sampled = [client.generate("code", prompt, 20, temperature=0.8, top_k=20, seed=11).tokens for _ in range(2)]
        assert sampled[0] == sampled[1] == generate_tokens(pred, [row], [SamplingParams(20, 0.8, 20, 11)])[0]
    assert list(HandleClient(app_cfg.serve.app_name, "code").generate_stream(prompt, 40)) == want


def test_autoscaling_settings_reach_serve(base_url, app_cfg):
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployment = details["applications"][app_cfg.serve.app_name]["deployments"]["model-code"]["deployment_config"]
    auto = deployment["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 1, 1)
    assert (deployment["max_ongoing_requests"], deployment["max_queued_requests"]) == (1, 2)


def test_cli_status_and_advise(base_url, app_cfg, config_file, capsys):
    from app.cli.main import main

    assert main(["serve", "status", config_file]) == 0
    out = capsys.readouterr().out
    assert "HEALTHY" in out or "RUNNING" in out
    assert "model-digits--staging" in out and "auto-rollback: digits staging v3 -> v2" in out
    code = main(["serve", "advise", config_file, "--slo-p99-ms", "30000", "--model", "digits", "--batch-sizes", "1,8",
                 "--waits-ms", "2", "--requests", "60", "--duration-s", "4", "--concurrency", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "best within p99 <= 30000 ms" in out and "max_batch_size:" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith(("    1", "    8"))] == [["1", "0.0"], ["8", "2.0"]]
    models = {m["model"]: m for m in TemperClient(base_url).models()}
    assert models["digits"]["max_batch_size"] == 8 and models["digits"]["batch_wait_timeout_s"] == 0.005  # restored


def test_served_version_gauges_stay_while_the_replicas_serve(base_url):
    """Each replica sets its served-version gauge when it loads a version (and at a hot swap): a
    value that stays the same for the replica's whole life is still scraped minutes later."""
    import ray

    time.sleep(max(0.0, DEPLOYED["at"] + GAUGE_EXPIRY_S - time.monotonic()))  # the module's tests usually took longer
    node = ray._private.worker.global_worker.node
    text = httpx.get(f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics", timeout=10).text
    served = {route: metric_total(text, "ray_temper_serve_served_version", model=model, route=route)
              for model, route in (("digits", "production"), ("digits", "staging"), ("code", "latest"))}
    # production: v1 since the start; staging: v2 again after the auto-rollback; code: its only version
    assert served == {"production": 1.0, "staging": 2.0, "latest": 1.0}, served
