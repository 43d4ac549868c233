"""The Serve app on the shared local Ray cluster, over real HTTP: tiny untrained models are
registered in a registry actor, deployed, and every answer is compared with the same
computation done in-process. Auth is switched on live on the same app for its own tests
(the README's role x operation table over HTTP, each 401 reason, the rate limit). Over 500 lines
in one module because every test shares the one deployed app (deploying costs ~30 s on 2 cores)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import uuid

import httpx
import numpy as np
import pytest
import torch
import yaml

from app.artifacts import save_fp32
from app.compression import METHODS
from app.config.auth import AuthConfig, JwtConfig, RateLimitConfig
from app.config.data import DataConfig
from app.config.model import GPTConfig, ViTConfig
from app.config.registry import RegistryConfig
from app.config.jobs import ServeApp, TrainJob
from app.config.serve import ServeConfig, ServedModel
from app.data import DigitsData
from app.inference import classify, generate_text, load_predictor, score_text
from app.models import build_model
from serve.client import AsyncTemperClient, HandleClient, TemperAPIError, TemperClient
from serve.deploy import build_app, deploy
from serve.protocol import API_PREFIX, ModelRequestError
from conftest import free_port, metric_total, readme_permissions, serving, wait_for

pytestmark = pytest.mark.ray

N_CONCURRENT = 32
KEY_SECRET = "serve-test-key-secret-0123456789abcdef"
JWT_SECRET = "serve-test-jwt-secret-0123456789abcdef"
JWT = JwtConfig(audience="temper-serve", issuer="https://idp.test")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """digits: ViT fp32 + its torch_int8 variant; code: a 2-layer byte GPT (all untrained)."""
    root = tmp_path_factory.mktemp("serve-artifacts")
    vit = TrainJob(name="digits", model=ViTConfig(n_layer=1, d_model=32), data=DataConfig(name="digits"))
    gpt = TrainJob(name="code", model=GPTConfig(n_layer=2, d_model=32, n_head=2, block_size=32), data=DataConfig(name="lm-code"))
    torch.manual_seed(0)
    paths = {
        "vit": str(save_fp32(root / "vit", build_model(vit.model), vit)),
        "gpt": str(save_fp32(root / "gpt", build_model(gpt.model), gpt)),
    }
    paths["vit_int8"] = str(METHODS["torch_int8"](paths["vit"], root / "vit_int8"))
    paths["vit_onnx_int8"] = str(METHODS["onnx_int8"](paths["vit"], root / "vit_onnx_int8"))
    paths["vit_raises"] = _artifact_that_raises(paths["vit_onnx_int8"], root / "vit_raises")
    return paths


def _artifact_that_raises(onnx_artifact: str, folder) -> str:
    """A copy of an ONNX digits artifact whose graph takes (N, 3) inputs: it loads, and every
    inference raises inside ONNX Runtime (rank 4 given, rank 2 expected): an error no code path
    of the replica anticipates."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from app.artifacts import WEIGHT_FILES

    shutil.copytree(onnx_artifact, folder)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])], "raises",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / WEIGHT_FILES["onnx_int8"]))
    return str(folder)


@pytest.fixture(scope="module")
def registry_cfg(ray_cluster, artifacts, tmp_path_factory):
    from actors.registry.client import get_or_create_registry

    cfg = RegistryConfig(
        actor_name=f"serve-test-{uuid.uuid4().hex[:8]}", namespace="temper-tests",
        db_url=f"sqlite:///{tmp_path_factory.mktemp('serve-registry') / 'r.db'}",
    )
    # Writes stay open (auth off, as the loopback app's default), but the actor can check the
    # API keys and JWTs of the auth tests below.
    handle = get_or_create_registry(cfg, auth={"enabled": False, "key_secret": KEY_SECRET, "jwt_key": JWT_SECRET,
                                               "jwt": JWT.model_dump(mode="json")})
    ray = ray_cluster
    ray.get(handle.register_version.remote("digits", artifacts["vit"], "torch_fp32"))
    ray.get(handle.register_version.remote(
        "digits", artifacts["vit_int8"], "torch_int8", parent={"model": "digits", "version": 1}, transformation="quantized"))
    ray.get(handle.register_version.remote(
        "digits", artifacts["vit_onnx_int8"], "onnx_int8", parent={"model": "digits", "version": 1}, transformation="quantized"))
    ray.get(handle.register_version.remote("digits", artifacts["vit_raises"], "onnx_int8"))  # version 4
    ray.get(handle.set_alias.remote("digits", "production", 1))
    ray.get(handle.register_version.remote("code", artifacts["gpt"], "torch_fp32"))
    yield cfg
    ray.kill(handle, no_restart=True)


@pytest.fixture(scope="module")
def app_cfg(registry_cfg) -> ServeApp:
    return ServeApp(registry=registry_cfg, serve=ServeConfig(
        app_name=f"temper-test-{uuid.uuid4().hex[:6]}", port=free_port(), route_prefix="/temper", max_body_bytes=64_000,
        alias_poll_interval_s=0.5,
        models=[
            # A long batch wait so that concurrent requests reliably meet in one batch.
            ServedModel(model="digits", version="production", max_batch_size=16, batch_wait_timeout_s=0.1, cpus_per_replica=0.5),
            ServedModel(model="code", version="latest", backend="torch_fp32", max_batch_size=8,
                        batch_wait_timeout_s=0.1, max_new_tokens=24, cpus_per_replica=0.5),
        ],
    ))


@pytest.fixture(scope="module")
def base_url(app_cfg):
    yield from serving(app_cfg)


@pytest.fixture(scope="module")
def client(base_url):
    with TemperClient(base_url, timeout=30.0) as c:
        yield c


@pytest.fixture(scope="module")
def digits_images() -> np.ndarray:
    return DigitsData(DataConfig(name="digits")).x_val[:8]  # (8, 1, 8, 8) float32 in [0, 1]


def _diff(after: dict, before: dict) -> dict[int, int]:
    """Batch-size counts added between two stats() snapshots."""
    sizes = set(after["batch_size_counts"]) | set(before["batch_size_counts"])
    out = {s: after["batch_size_counts"].get(s, 0) - before["batch_size_counts"].get(s, 0) for s in sizes}
    return {s: n for s, n in sorted(out.items()) if n}


async def _concurrent_predicts(base_url: str, images: np.ndarray, n: int):
    async with AsyncTemperClient(base_url, timeout=60.0) as c:
        return await asyncio.gather(*(c.predict("digits", images[i % len(images)][None], top_k=2) for i in range(n)))


def test_health_and_models(client, base_url, app_cfg):
    assert base_url.endswith(":%d/temper" % app_cfg.serve.port)  # endpoints live under the route prefix
    health = client.health()
    assert health["status"] == "ok" and health["models"] == ["code", "digits"]
    models = {m["model"]: m for m in client.models()}
    assert set(models) == {"digits", "code"}
    digits, code = models["digits"], models["code"]
    assert (digits["version"], digits["backend"], digits["task"], digits["ref"]) == (1, "torch_fp32", "classifier", "production")
    assert (digits["max_batch_size"], digits["batch_wait_timeout_s"], digits["max_ongoing_requests"]) == (16, 0.1, 32)
    assert digits["effective_max_batch_size"] == 16
    assert (code["version"], code["task"], code["block_size"], code["max_new_tokens"]) == (1, "lm", 32, 24)


def test_predict_matches_in_process_classify(client, base_url, artifacts, digits_images):
    result = client.predict("digits", digits_images, top_k=3)
    want = classify(load_predictor(artifacts["vit"]), digits_images, 3)
    assert result.labels == [w["label"] for w in want]
    assert (result.version, result.backend) == (1, "torch_fp32")
    for got, exp in zip(result.probabilities, want):
        assert [g["label"] for g in got] == [e["label"] for e in exp["top_k"]]
        np.testing.assert_allclose([g["probability"] for g in got], [e["probability"] for e in exp["top_k"]], rtol=1e-4)
    assert result.latency_ms > 0
    # 8x8 rows are accepted too, and give the same answer
    rows = {"inputs": [img[0].tolist() for img in digits_images], "top_k": 1}
    resp = httpx.post(f"{base_url}{API_PREFIX}/models/digits/predict", json=rows, timeout=30)
    assert resp.status_code == 200 and resp.json()["outputs"] == result.labels


def test_concurrent_requests_are_batched(base_url, app_cfg, artifacts, digits_images):
    stats = HandleClient(app_cfg.serve.app_name, "digits")
    before = stats.stats()
    results = asyncio.run(_concurrent_predicts(base_url, digits_images, N_CONCURRENT))
    after = stats.stats()
    added = _diff(after, before)
    assert sum(size * n for size, n in added.items()) == N_CONCURRENT  # every request ran in exactly one batch
    assert max(added) > 1, f"no batching: batch sizes {added}"
    assert max(added) <= 16  # max_batch_size
    want = [w["label"] for w in classify(load_predictor(artifacts["vit"]), digits_images, 1)]
    assert [r.labels[0] for r in results] == [want[i % len(want)] for i in range(N_CONCURRENT)]
    assert {(r.version, r.backend) for r in results} == {(1, "torch_fp32")}


def test_reconfigure_changes_batching_and_version_live(base_url, app_cfg, artifacts, digits_images):
    from ray import serve

    stats = HandleClient(app_cfg.serve.app_name, "digits")
    before = stats.stats()
    new_cfg = app_cfg.model_copy(deep=True)
    new_cfg.serve.models[0].max_batch_size = 1
    new_cfg.serve.models[0].version = "2"  # hot swap to the int8 variant

    # Requests keep flowing while the app is redeployed: none may fail.
    statuses, stop = [], threading.Event()

    def traffic():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                resp = c.post(f"{base_url}{API_PREFIX}/models/digits/predict", json={"inputs": [[0.5] * 64]})
                statuses.append((resp.status_code, resp.json().get("version")))

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        serve.run(build_app(new_cfg), name=app_cfg.serve.app_name, route_prefix=app_cfg.serve.route_prefix)
    finally:
        stop.set()
        sender.join()
    assert statuses and {s for s, _ in statuses} == {200}, statuses
    try:
        mid = stats.stats()
        assert mid["replica"] == before["replica"], "replica was restarted instead of reconfigured"
        assert (mid["version"], mid["backend"]) == (2, "torch_int8")
        results = asyncio.run(_concurrent_predicts(base_url, digits_images, N_CONCURRENT))
        added = _diff(stats.stats(), mid)
        assert added == {1: N_CONCURRENT}, f"batches not capped at 1: {added}"
        assert {(r.version, r.backend) for r in results} == {(2, "torch_int8")}
        want = [w["label"] for w in classify(load_predictor(artifacts["vit_int8"]), digits_images, 1)]
        assert [r.labels[0] for r in results] == [want[i % len(want)] for i in range(N_CONCURRENT)]
    finally:
        serve.run(build_app(app_cfg), name=app_cfg.serve.app_name, route_prefix=app_cfg.serve.route_prefix)
    restored = stats.stats()
    assert (restored["replica"], restored["version"]) == (before["replica"], 1)


def test_alias_poll_in_flight_does_not_undo_a_reconfigure(registry_cfg):
    """The interleaving behind a CI failure, made deterministic on the replica class itself (real
    registry actor, no Serve): an alias poll that read `production` waits for the swap lock
    while a reconfigure to version 2 holds it; once the lock is free the poll must not swap
    production's version 1 back in."""
    from serve.replica import BatchedModelServer

    async def scenario():
        server = BatchedModelServer.func_or_class("digits", None, 8, registry_cfg.model_dump(mode="json"), 3600.0)
        settings = {"max_batch_size": 4, "batch_wait_timeout_s": 0.0}
        await server.reconfigure({**settings, "version": "production"})
        assert server._current().version == 1
        await server._swap.acquire()  # a swap in progress: both calls below queue behind it, in order
        reconfigure = asyncio.create_task(server.reconfigure({**settings, "version": "2"}))
        await asyncio.sleep(0)
        stale_poll = asyncio.create_task(server._load("production"))
        await asyncio.sleep(0)
        server._swap.release()
        await reconfigure
        swapped = await stale_poll
        server._poller.cancel()
        return swapped, server._current().version, server._target_ref

    assert asyncio.run(scenario()) == (False, 2, "2")


@pytest.mark.parametrize("path, body, status, code, field", [
    ("digits/predict", b"{oops", 422, "422_0001", "body"),                                  # not JSON
    ("digits/predict", [[0.1] * 64], 422, "422_0001", "body"),                              # not an object
    ("digits/predict", {"top_k": 2}, 422, "422_0001", "inputs"),                          # missing field
    ("digits/predict", {"inputs": []}, 422, "422_0001", "inputs"),                          # empty list
    ("digits/predict", {"inputs": [[[0.1] * 8] * 7 + [[0.1] * 7]]}, 422, "422_0001", "inputs.0"),  # ragged rows
    ("digits/predict", {"inputs": [[0.1] * 64], "top_k": 0}, 422, "422_0001", "top_k"),    # out of range
    ("digits/predict", {"inputs": [[0.1] * 64, [0.1] * 63]}, 422, "422_0001", "inputs.1"),  # wrong shape
    ("digits/predict", {"inputs": [[0.1] * 64], "temperature": 1}, 422, "422_0001", "temperature"),  # unknown key
    ("digits/predict", {"inputs": [[0.1] * 64], "top_k": "2"}, 422, "422_0001", "top_k"),  # wrong type
    ("digits/predict", {"inputs": [["a"] * 64]}, 422, "422_0001", "inputs.0"),             # wrong item type
    ("digits/predict", {"inputs": [[0.1] * 64] * 300}, 413, "413_0001", "body"),           # over max_body_bytes
    ("nope/predict", {"inputs": [[0.1] * 64]}, 404, "404_0001", "model"),                   # unknown model
    ("code/predict", {"inputs": [[0.1] * 64]}, 400, "400_0001", "model"),                   # wrong task
    ("digits/generate", {"prompt": "x"}, 400, "400_0001", "model"),                         # wrong task
    ("code/generate", {"prompt": "x", "max_new_tokens": 25}, 422, "422_0001", "max_new_tokens"),  # over the cap
    ("code/score", {"texts": ["x" * 33]}, 422, "422_0001", "texts.0"),                      # over block_size
    ("code/score", {"texts": ["x"] * 300}, 413, "413_0001", "texts"),                       # over max_items_per_request
    ("code/generate", {"prompt": ""}, 422, "422_0001", "prompt"),                           # empty prompt
    ("code/generate", {"prompt": "x", "temperature": -1}, 422, "422_0001", "temperature"),  # negative temperature
    ("code/generate", {"prompt": "x", "seed": -1}, 422, "422_0001", "seed"),                # negative seed
    ("code/generate", {"prompt": "x", "stream": "yes"}, 422, "422_0001", "stream"),         # not a boolean
])
def test_malformed_requests_get_json_errors(base_url, path, body, status, code, field):
    url = f"{base_url}{API_PREFIX}/models/{path}"
    if isinstance(body, bytes):
        resp = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        resp = httpx.post(url, json=body, timeout=30)
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert set(err) == {"error_code", "error_message", "error_details", "request_id", "timestamp"}
    assert err["error_code"] == code
    assert err["error_details"]["field"] == field
    assert err["error_details"]["message"] and err["timestamp"]
    assert err["request_id"] == resp.headers["x-request-id"]
    if field == "model":
        assert path.split("/")[0] in err["error_message"]


def test_request_id_is_echoed_and_client_error_is_typed(base_url, client):
    resp = httpx.post(f"{base_url}{API_PREFIX}/models/digits/predict", json={}, headers={"X-Request-ID": "trace-42"}, timeout=30)
    assert resp.status_code == 422
    assert resp.headers["x-request-id"] == "trace-42" and resp.json()["request_id"] == "trace-42"
    with pytest.raises(TemperAPIError) as err:
        client.predict("digits", np.zeros((1, 7, 7), dtype=np.float32))
    assert (err.value.status, err.value.error_code, err.value.field) == (422, "422_0001", "inputs.0")
    assert err.value.request_id


def test_lm_generate_and_score_match_in_process(client, base_url, app_cfg, artifacts):
    pred = load_predictor(artifacts["gpt"])
    prompts = ["def add(a, b):", "import numpy as", "class Temper:\n  ", "for i in range("]  # lengths 14, 15, 16, 15
    lm_stats = HandleClient(app_cfg.serve.app_name, "code")
    before = lm_stats.stats()

    async def many():
        async with AsyncTemperClient(base_url, timeout=60.0) as c:
            return await asyncio.gather(*(c.generate("code", p, max_new_tokens=12) for p in prompts * 2))

    results = asyncio.run(many())
    added = _diff(lm_stats.stats(), before)
    assert sum(size * n for size, n in added.items()) == len(prompts) * 2
    for prompt, res in zip(prompts * 2, results):
        want = generate_text(pred, np.frombuffer(prompt.encode(), dtype=np.uint8).astype(np.int64)[None], 12)[0]
        assert res.tokens == want.tolist() and len(res.tokens) == 12
        assert (res.version, res.backend) == (1, "torch_fp32")

    texts = ["import os", "x = 1\n", "print('hello')"]
    scored = client.score("code", texts, top_k=3)
    for text, out in zip(texts, scored.outputs):
        want = score_text(pred, np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)[None], 3)[0]
        assert out["nll"] == pytest.approx(want["nll"], rel=1e-4)
        assert [n["byte"] for n in out["next"]] == [n["byte"] for n in want["next"]]
    assert scored.version == 1


def test_handle_client(app_cfg, artifacts, digits_images):
    digits = HandleClient(app_cfg.serve.app_name, "digits", timeout_s=30.0)
    result = digits.predict(digits_images[:3], top_k=2)
    assert result.labels == [w["label"] for w in classify(load_predictor(artifacts["vit"]), digits_images[:3], 2)]
    assert result.version == 1
    with pytest.raises(ModelRequestError) as err:
        HandleClient(app_cfg.serve.app_name, "code").predict(digits_images[:1])
    assert (err.value.status, err.value.field) == (400, "model")


def test_deploy_refuses_unknown_version_or_wrong_backend(app_cfg):
    from serve.deploy import check_versions

    records = check_versions(app_cfg)
    assert [(r["model"], r["version"]) for r in records] == [("digits", 1), ("code", 1)]
    bad = app_cfg.model_copy(deep=True)
    bad.serve.models[0].version = "staging"
    with pytest.raises(ValueError, match="staging"):
        check_versions(bad)
    bad = app_cfg.model_copy(deep=True)
    bad.serve.models[0].backend = "onnx_int8"
    with pytest.raises(ValueError, match="onnx_int8"):
        check_versions(bad)


def test_a_failed_deploy_is_tried_again_with_the_same_config(base_url, app_cfg, registry_cfg, artifacts, tmp_path):
    """Deployment versions are stable, so deploying the same config again keeps its replicas; over
    an app whose deployment failed to start, the same config must start it afresh (here: the
    version's artifact folder was missing at the first try, then put back)."""
    import ray
    from ray import serve

    from actors.registry.client import get_or_create_registry

    folder = tmp_path / "vit"
    shutil.copytree(artifacts["vit"], folder)
    ray.get(get_or_create_registry(registry_cfg).register_version.remote("again", str(folder), "torch_fp32"))
    again = app_cfg.model_copy(deep=True)  # the same Serve instance (host, port), another app
    again.serve.app_name, again.serve.route_prefix = f"again-{uuid.uuid4().hex[:6]}", "/again"
    again.serve.models = [ServedModel(model="again", version="1", cpus_per_replica=0.25)]
    away = folder.rename(tmp_path / "away")
    try:
        with pytest.raises(RuntimeError, match="model-again"):
            deploy(again)
        away.rename(folder)
        url = deploy(again)
        resp = httpx.post(f"{url}{API_PREFIX}/models/again/predict", json={"inputs": [[0.5] * 64]}, timeout=30)
        assert resp.status_code == 200 and resp.json()["version"] == 1
    finally:
        serve.delete(again.serve.app_name)


def test_a_lone_request_skips_the_batch_wait(base_url, app_cfg, client):
    """ray #36510: a request that arrives at an idle replica must not wait batch_wait_timeout_s."""
    from ray import serve

    stats = HandleClient(app_cfg.serve.app_name, "digits")
    patient = app_cfg.model_copy(deep=True)
    patient.serve.models[0].batch_wait_timeout_s = 8.0  # a lone request in the queue would wait this long
    serve.run(build_app(patient), name=app_cfg.serve.app_name, route_prefix=app_cfg.serve.route_prefix)
    try:
        assert {m["model"]: m for m in client.models()}["digits"]["batch_wait_timeout_s"] == 8.0
        before = stats.stats()
        with httpx.Client(timeout=30) as c:
            for _ in range(5):
                resp = c.post(f"{base_url}{API_PREFIX}/models/digits/predict", json={"inputs": [[0.5] * 64]})
                assert resp.status_code == 200
        after = stats.stats()
        # The replica counts requests that found it idle and ran at once, outside the batch queue
        # (and its 8 s wait): all five, each a batch of its own.
        assert after["unqueued"] - before["unqueued"] == 5
        assert _diff(after, before) == {1: 5}
    finally:
        serve.run(build_app(app_cfg), name=app_cfg.serve.app_name, route_prefix=app_cfg.serve.route_prefix)


def test_batch_size_and_queue_wait_histograms_reach_prometheus(base_url, app_cfg, digits_images):
    """`temper_serve_batch_size` / `temper_serve_queue_wait_ms` (ray.util.metrics) on the node's
    metrics endpoint agree with the batches the replica counted: every cumulative bucket of the
    batch-size histogram, and one queue-wait observation per request. (Not `_sum`: Ray's exporter
    rebuilds it from the buckets, so it is approximate.)"""
    import ray

    from app.telemetry import BATCH_BOUNDARIES

    asyncio.run(_concurrent_predicts(base_url, digits_images, N_CONCURRENT))
    predict = HandleClient(app_cfg.serve.app_name, "digits").stats()["by_method"]["predict"]
    assert max(predict) > 1
    requests = sum(size * n for size, n in predict.items())
    want = {f"{float(b)}": sum(n for size, n in predict.items() if size <= b) for b in BATCH_BOUNDARIES}
    want["+Inf"] = sum(predict.values())
    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    # Only this module's application: a test or module before it may have served "digits" from
    # another application, whose series stay on the endpoint for a while after it is deleted.
    tags = {"model": "digits", "app": app_cfg.serve.app_name, "method": "predict"}
    seen: dict = {}

    def exported():
        text = httpx.get(url, timeout=10).text
        seen["buckets"] = {le: metric_total(text, "ray_temper_serve_batch_size_bucket", le=le, **tags) for le in want}
        seen["waits"] = metric_total(text, "ray_temper_serve_queue_wait_ms_count", **tags)
        return seen["buckets"] == want and seen["waits"] == requests

    wait_for(exported, lambda: f"batch-size buckets {want} and {requests} queue waits (seen: {seen})")


def test_alias_moved_to_an_onnx_int8_version_is_served(base_url, registry_cfg, artifacts, client, digits_images):
    """ONNX Runtime int8 backend, loaded from its .onnx file when the served alias moves to it."""
    import ray

    from actors.registry.client import get_or_create_registry

    registry = get_or_create_registry(registry_cfg)
    ray.get(registry.set_alias.remote("digits", "production", 3))
    try:
        wait_for(lambda: client.predict("digits", digits_images[:1]).version == 3, "production to serve v3")
        result = client.predict("digits", digits_images, top_k=3)
        assert (result.version, result.backend) == (3, "onnx_int8")
        want = classify(load_predictor(artifacts["vit_onnx_int8"]), digits_images, 3)
        assert result.labels == [w["label"] for w in want]
        for got, exp in zip(result.probabilities, want):
            np.testing.assert_allclose([g["probability"] for g in got], [e["probability"] for e in exp["top_k"]], rtol=1e-4)
    finally:
        ray.get(registry.set_alias.remote("digits", "production", 1))
        wait_for(lambda: client.predict("digits", digits_images[:1]).version == 1, "production to serve v1 again")


def test_generated_serve_config_file_deploys_with_serve(base_url, app_cfg, tmp_path):
    """`python -m app serve config` writes a file that Serve's controller deploys as `serve deploy
    FILE` does (schema check, then `apply_config`), with an edited `user_config` taking effect."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from app.cli.main import main

    variant = app_cfg.model_copy(deep=True)
    variant.serve.app_name = app_cfg.serve.app_name + "-file"
    variant.serve.route_prefix = "/from-file"
    variant.serve.models = variant.serve.models[:1]  # digits
    src = tmp_path / "serve.yaml"
    src.write_text(yaml.safe_dump(variant.model_dump(mode="json")))
    out = tmp_path / "serve_config.yaml"
    assert main(["serve", "config", "--config", str(src), "-o", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    [deployment] = doc["applications"][0]["deployments"]
    assert deployment["name"] == "model-digits" and deployment["user_config"]["max_batch_size"] == 16
    deployment["user_config"]["max_batch_size"] = 3  # tuned the Ray way, in the file...
    deployment["max_ongoing_requests"] = 2  # ...and set below it, which our config would refuse
    serve_client = _get_global_client()
    serve_client.deploy_apps(ServeDeploySchema.model_validate(doc), _blocking=True)
    try:
        url = f"http://127.0.0.1:{app_cfg.serve.port}/from-file{API_PREFIX}"
        wait_for(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 200, "the app from the file")
        [digits] = httpx.get(f"{url}/models", timeout=30).json()["models"]
        assert (digits["model"], digits["version"], digits["max_batch_size"]) == ("digits", 1, 3)
        # the cap Serve applies is reported, not hidden (ray #43288)
        assert (digits["max_ongoing_requests"], digits["effective_max_batch_size"]) == (2, 2)
        resp = httpx.post(f"{url}/models/digits/predict", json={"inputs": [[0.5] * 64]}, timeout=30)
        assert resp.status_code == 200 and resp.json()["version"] == 1
    finally:
        serve_client.delete_apps([variant.serve.app_name], blocking=True)


def test_single_hop_runs_the_models_in_the_ingress(app_cfg, artifacts, digits_images):
    """`serve.single_hop`: the app is one deployment, the ingress, and answers as the two-hop app
    does: concurrent predictions batched and equal to in-process, greedy generation (plain and
    streamed) equal to in-process; a redeploy with a new batch size and version ref reconfigures
    the same ingress replica live; `serve status` and the Serve config file name the ingress."""
    from ray import serve

    from serve.deploy import app_status, serve_config_file, shutdown

    hop = app_cfg.model_copy(deep=True)
    hop.serve.app_name, hop.serve.route_prefix, hop.serve.single_hop = app_cfg.serve.app_name + "-hop", "/hop", True
    url = deploy(hop)
    ingress = serve.get_deployment_handle("TemperIngress", hop.serve.app_name)

    def digits_stats() -> dict:
        return ingress.route_call.remote("digits", 0, "stats").result(timeout_s=30)

    try:
        assert set(serve.status().applications[hop.serve.app_name].deployments) == {"TemperIngress"}
        before = digits_stats()
        results = asyncio.run(_concurrent_predicts(url, digits_images, N_CONCURRENT))
        added = _diff(digits_stats(), before)
        assert sum(size * n for size, n in added.items()) == N_CONCURRENT and 1 < max(added) <= 16, added
        want = [w["label"] for w in classify(load_predictor(artifacts["vit"]), digits_images, 1)]
        assert [r.labels[0] for r in results] == [want[i % len(want)] for i in range(N_CONCURRENT)]
        assert {(r.version, r.backend) for r in results} == {(1, "torch_fp32")}

        prompt = "def add(a, b):"
        tokens = generate_text(load_predictor(artifacts["gpt"]),
                               np.frombuffer(prompt.encode(), dtype=np.uint8).astype(np.int64)[None], 12)[0].tolist()
        with TemperClient(url, timeout=30.0) as c:
            assert c.generate("code", prompt, max_new_tokens=12).tokens == tokens
            assert [chunk.token for chunk in c.generate_stream("code", prompt, max_new_tokens=12)] == tokens

        status = app_status(hop)
        routes = {m["model"]: m["routes"][0] for m in status["models"]}
        assert {(r["deployment"], r["serving_version"]) for r in routes.values()} == {("TemperIngress", 1)}
        [entry] = serve_config_file(hop)["applications"][0]["deployments"]
        assert entry["name"] == "TemperIngress" and entry["user_config"]["models"]["digits"][0]["max_batch_size"] == 16

        live = hop.model_copy(deep=True)
        live.serve.models[0].max_batch_size, live.serve.models[0].version = 1, "2"  # batches of one, the int8 variant
        deploy(live)
        after = digits_stats()
        assert after["replica"] == before["replica"], "the ingress replica was restarted instead of reconfigured"
        results = asyncio.run(_concurrent_predicts(url, digits_images, 8))
        assert _diff(digits_stats(), after) == {1: 8}
        assert {(r.version, r.backend) for r in results} == {(2, "torch_int8")}
    finally:
        shutdown(hop.serve.app_name)


# ----------------------------------------------------------------------------- errors over real HTTP
# The same answers as the unit tests over fake handles, through Serve's proxy, the ingress replica
# and the model replicas of this module's app (redeployed in place: no new app is started).


def _error(resp: httpx.Response, status: int, code: str, field: str | None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert set(err) == {"error_code", "error_message", "error_details", "request_id", "timestamp"}
    assert (err["error_code"], err["error_details"]["field"]) == (code, field), err
    assert err["request_id"] == resp.headers["x-request-id"]
    return err


def test_streamed_body_past_the_limit_without_content_length_is_413(base_url):
    def chunks():  # no Content-Length: httpx sends it chunked; 300 images of 64 floats > 64000 bytes
        yield b'{"inputs": ['
        for _ in range(300):
            yield b"[" + b",".join([b"0.5"] * 64) + b"],"
        yield b"[0.5]]}"

    resp = httpx.post(f"{base_url}{API_PREFIX}/models/digits/predict", content=chunks(),
                      headers={"content-type": "application/json"}, timeout=30)
    assert "content-length" not in resp.request.headers and resp.request.headers["transfer-encoding"] == "chunked"
    err = _error(resp, 413, "413_0001", "body")
    assert "64000 bytes" in err["error_message"]


def test_an_unexpected_model_error_is_a_500_error_body(base_url, app_cfg, client, digits_images):
    """Version 4's inference raises inside ONNX Runtime: the replica's exception crosses Serve to
    the ingress, which answers our 500 body (not Serve's plain-text 500) with the request id."""
    from ray import serve

    raising = app_cfg.model_copy(deep=True)
    raising.serve.models[0].version = "4"  # a live field: the digits replica reconfigures, nothing restarts
    serve.run(build_app(raising), name=app_cfg.serve.app_name, route_prefix=app_cfg.serve.route_prefix)
    try:
        resp = httpx.post(f"{base_url}{API_PREFIX}/models/digits/predict", json={"inputs": [[0.5] * 64]},
                          headers={"X-Request-ID": "boom-1"}, timeout=30)
        err = _error(resp, 500, "500_0001", None)
        assert err["request_id"] == "boom-1"
        assert err["error_message"].startswith("internal error (")  # the middleware's answer, not a model failure's
    finally:
        serve.run(build_app(app_cfg), name=app_cfg.serve.app_name, route_prefix=app_cfg.serve.route_prefix)
    assert client.predict("digits", digits_images[:1]).version == 1


def test_a_model_call_past_request_timeout_s_is_504(base_url, app_cfg, client, digits_images):
    """An ingress whose request_timeout_s (1 us) is below any model call's round trip (an actor call
    to another process): every model call times out, deterministically, and is answered 504."""
    from ray import serve

    impatient = app_cfg.model_copy(deep=True)
    impatient.serve.request_timeout_s = 1e-6
    # A fixed ingress field: Serve replaces the ingress replica (model replicas stay); requests
    # may reach the old one until the proxy has seen the new one, hence the polls.
    serve.run(build_app(impatient), name=app_cfg.serve.app_name, route_prefix=app_cfg.serve.route_prefix)
    url = f"{base_url}{API_PREFIX}/models/digits/predict"
    try:
        resp = wait_for(lambda: (r := httpx.post(url, json={"inputs": [[0.5] * 64]}, timeout=30)).status_code == 504 and r,
                        "the impatient ingress to answer")
        err = _error(resp, 504, "500_0003", None)
        assert "request_timeout_s" in err["error_message"]
    finally:
        serve.run(build_app(app_cfg), name=app_cfg.serve.app_name, route_prefix=app_cfg.serve.route_prefix)
        wait_for(lambda: httpx.post(url, json={"inputs": [[0.5] * 64]}, timeout=30).status_code == 200,
                 "the restored ingress to answer")
    assert client.predict("digits", digits_images[:1]).version == 1


# ----------------------------------------------------------------------------- auth over HTTP

HTTP_CALLS = {  # operation (README table) -> requests that perform it: (method, path, body)
    "read": [("GET", "/models", None)],
    "predict": [("POST", "/models/digits/predict", {"inputs": [[0.5] * 64]}),
                ("POST", "/models/code/generate", {"prompt": "de", "max_new_tokens": 2})],
}
"""The model routes' operations; the control plane's (training jobs, version reads and writes) are
checked over HTTP in tests/ray/test_control_plane.py, and the whole table on the registry actor
in tests/ray/test_auth_registry_actor.py."""


def _token(role: str, **claims) -> str:
    import time

    import jwt

    return jwt.encode({"sub": f"{role}-sub", "role": role, "aud": JWT.audience, "iss": JWT.issuer,
                       "exp": int(time.time()) + 600, **claims}, JWT_SECRET, "HS256")


@pytest.fixture(scope="module")
def auth_keys(registry_cfg):
    """{name: API key} made on the registry database: one per role, and one to revoke."""
    from actors.registry.client import open_store
    from app.auth.identity import ROLES

    store = open_store(registry_cfg, key_secret=KEY_SECRET.encode())
    try:
        yield {name: store.create_key(name, role)[1] for name, role in [(r, r) for r in ROLES] + [("to-revoke", "viewer")]}
    finally:
        store.close()


@contextlib.contextmanager
def _auth_on(app_cfg, base_url, **auth):
    """The module's app with auth enabled live (the ingress is reconfigured, not restarted), then off again."""
    from ray import serve

    authed = app_cfg.model_copy(deep=True)
    authed.auth = AuthConfig(enabled=True, jwt=JWT, **auth)
    serve.run(build_app(authed), name=app_cfg.serve.app_name, route_prefix=app_cfg.serve.route_prefix)
    try:
        yield authed
    finally:
        serve.run(build_app(app_cfg), name=app_cfg.serve.app_name, route_prefix=app_cfg.serve.route_prefix)
        wait_for(lambda: httpx.get(f"{base_url}{API_PREFIX}/models", timeout=30).status_code == 200,
                 "the ingress to answer without credentials again")


def test_every_cell_of_the_permissions_table_over_http(base_url, app_cfg, auth_keys):
    table = readme_permissions()
    with _auth_on(app_cfg, base_url), httpx.Client(base_url=f"{base_url}{API_PREFIX}", timeout=60) as http:
        health = http.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})  # open, names nothing
        for operation, calls in HTTP_CALLS.items():
            for method, path, body in calls:
                err = _error(http.request(method, path, json=body), 401, "401_0001", "authorization")
                assert err["error_message"].startswith("missing credentials"), err
                for role, allowed in table[operation].items():
                    for headers in ({"X-API-Key": auth_keys[role]}, {"Authorization": f"Bearer {auth_keys[role]}"},
                                    {"Authorization": f"Bearer {_token(role)}"}):
                        resp = http.request(method, path, json=body, headers=headers)
                        if allowed:
                            assert resp.status_code == 200, (operation, role, headers, resp.text)
                        else:
                            _error(resp, 403, "403_0001", "authorization")


def test_each_refused_credential_has_its_own_401(base_url, app_cfg, auth_keys, registry_cfg):
    import time

    from actors.registry.client import open_store
    from serve.access import CREDENTIALS_CACHE_S

    url = f"{base_url}{API_PREFIX}/models"
    refused = {
        "unknown API key": {"X-API-Key": auth_keys["admin"][:-4] + "AAAA"},
        "token expired": {"Authorization": f"Bearer {_token('admin', exp=int(time.time()) - 3600)}"},
        "token is not meant for this service": {"Authorization": f"Bearer {_token('admin', aud='another-service')}"},
        "token signature does not verify": {"Authorization": "Bearer " + _token("admin")[:-6] + "AAAAAA"},
    }
    with _auth_on(app_cfg, base_url):
        for words, headers in refused.items():
            err = _error(httpx.get(url, headers=headers, timeout=30), 401, "401_0001", "authorization")
            assert words in err["error_message"], err
        assert httpx.get(url, headers={"X-API-Key": auth_keys["to-revoke"]}, timeout=30).status_code == 200
        store = open_store(registry_cfg, key_secret=KEY_SECRET.encode())
        try:
            store.revoke_key("to-revoke")
        finally:
            store.close()
        t0 = time.monotonic()
        resp = wait_for(lambda: (r := httpx.get(url, headers={"X-API-Key": auth_keys["to-revoke"]}, timeout=30)).status_code == 401 and r,
                        "the revoked key to be refused", deadline_s=CREDENTIALS_CACHE_S + 5)
        assert time.monotonic() - t0 <= CREDENTIALS_CACHE_S + 1.0
        assert "API key 'to-revoke' was revoked" in _error(resp, 401, "401_0001", "authorization")["error_message"]


def test_rate_limit_answers_429_with_retry_after(base_url, app_cfg, auth_keys):
    limit = RateLimitConfig(requests_per_s=0.2, burst=2)
    with _auth_on(app_cfg, base_url, rate_limit=limit), httpx.Client(timeout=30) as http:
        url, viewer = f"{base_url}{API_PREFIX}/models", {"X-API-Key": auth_keys["viewer"]}
        statuses = [http.get(url, headers=viewer).status_code for _ in range(3)]
        assert statuses == [200, 200, 429], statuses
        resp = http.get(url, headers=viewer)
        _error(resp, 429, "429_0001", None)
        assert 1 <= int(resp.headers["retry-after"]) <= 5
        assert http.get(url, headers={"X-API-Key": auth_keys["developer"]}).status_code == 200  # a bucket each


def test_each_request_leaves_one_json_line_in_the_ingress_log(base_url, digits_images):
    import json
    from pathlib import Path

    import ray

    rid = f"log-{uuid.uuid4().hex[:8]}"
    resp = httpx.post(f"{base_url}{API_PREFIX}/models/digits/predict", json={"inputs": [img[0].tolist() for img in digits_images[:2]]},
                      headers={"X-Request-ID": rid}, timeout=30)
    assert resp.status_code == 200
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # this session's log folder

    def line():
        for path in logs.rglob("*.err"):  # the ingress replica's stderr, where the request lines go
            for text in path.read_text(errors="replace").splitlines():
                if f'"request_id":"{rid}"' in text:
                    return text
        return None

    found = wait_for(line, "the request's line in the ingress replica's log", 30)
    event = json.loads(found[found.index("{"):])
    assert (event["event"], event["model"], event["version"], event["backend"], event["status"]) == (
        "request", "digits", resp.json()["version"], resp.json()["backend"], 200)
    assert event["batch_size"] >= 1 and event["endpoint"] == "predict" and event["latency_ms"] > 0
