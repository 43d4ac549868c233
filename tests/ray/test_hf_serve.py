"""Serving `hf` text models on the shared local Ray cluster, over real HTTP: a tiny BERT
embedder (fp32 and its ORT int8 variant), a tiny BERT classifier and a tiny Llama causal LM are
registered, deployed, and `/embed` / `/classify` / `/generate` / `/score` answers are compared
with the in-process model; concurrent requests must meet in batches larger than one."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from app.artifacts import save_fp32
from app.compression import METHODS
from app.config.jobs import ServeApp, parse_config
from app.config.registry import RegistryConfig
from app.config.serve import ServeConfig, ServedModel
from app.data.text import read_splits
from app.inference import SamplingParams, generate_tokens, load_predictor
from app.models import build_model
from conftest import free_port, serving
from hf_folders import WORDS, sentiment_rows, tiny_bert, tiny_llama
from serve.client import AsyncTemperClient, HandleClient, TemperAPIError, TemperClient

pytestmark = pytest.mark.ray

N_CONCURRENT = 32


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))) for _ in range(n)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-serve")
    bert = tiny_bert(root / "bert")
    jsonl = root / "sent.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(60)))
    out = {}
    for task, model_extra, data_extra in (("embedding", {"pooling": "mean", "normalize": True}, {}),
                                          ("sequence_classification", {}, {"label_field": "label"})):
        job = parse_config("train", {
            "name": "m", "model": {"kind": "hf", "path": str(bert), "task": task, **model_extra},
            "data": {"kind": "jsonl", "path": str(jsonl), "max_length": 16, "val_fraction": 0.3, **data_extra}})
        torch.manual_seed(0)
        out[task] = str(save_fp32(root / task, build_model(job.model, labels=read_splits(job.data).labels), job))
    out["embedding_int8"] = str(METHODS["onnx_int8"](out["embedding"], root / "embedding-onnx-int8"))
    lines = root / "lines.txt"
    lines.write_text("".join(r["text"] + "\n" for r in sentiment_rows(40)))
    job = parse_config("train", {
        "name": "lm", "model": {"kind": "hf", "path": str(tiny_llama(root / "llama", initializer_range=0.5)),
                                "task": "causal_lm"},
        "data": {"kind": "text", "path": str(lines), "max_length": 16, "val_fraction": 0.3}})
    torch.manual_seed(0)
    out["causal_lm"] = str(save_fp32(root / "causal_lm", build_model(job.model), job))
    return out


@pytest.fixture(scope="module")
def app_cfg(ray_cluster, artifacts, tmp_path_factory):
    from actors.registry.client import get_or_create_registry

    reg = RegistryConfig(actor_name=f"hf-serve-{uuid.uuid4().hex[:8]}", namespace="temper-tests",
                         db_url=f"sqlite:///{tmp_path_factory.mktemp('hf-serve-registry') / 'r.db'}")
    handle = get_or_create_registry(reg)
    ray = ray_cluster
    ray.get(handle.register_version.remote("emb", artifacts["embedding"], "torch_fp32"))
    ray.get(handle.register_version.remote("emb", artifacts["embedding_int8"], "onnx_int8",
                                           parent={"model": "emb", "version": 1}, transformation="quantized"))
    ray.get(handle.register_version.remote("sent", artifacts["sequence_classification"], "torch_fp32"))
    ray.get(handle.register_version.remote("lm", artifacts["causal_lm"], "torch_fp32"))
    yield ServeApp(registry=reg, serve=ServeConfig(
        app_name=f"temper-hf-{uuid.uuid4().hex[:6]}", port=free_port(), route_prefix="/temper",
        models=[
            # a long batch wait so that concurrent requests reliably meet in one batch
            ServedModel(model="emb", version="latest", max_batch_size=16, batch_wait_timeout_s=0.1, cpus_per_replica=0.5),
            ServedModel(model="sent", version="1", max_batch_size=16, batch_wait_timeout_s=0.1, cpus_per_replica=0.5),
            ServedModel(model="lm", version="1", max_batch_size=16, batch_wait_timeout_s=0.1, cpus_per_replica=0.5,
                        max_new_tokens=24),
        ],
    ))
    ray.kill(handle, no_restart=True)


@pytest.fixture(scope="module")
def base_url(app_cfg):
    yield from serving(app_cfg)


def test_concurrent_embeds_are_batched_and_equal_the_in_process_int8_model(base_url, app_cfg, artifacts):
    requests = [texts(1 + i % 3, seed=i) for i in range(N_CONCURRENT)]
    stats = HandleClient(app_cfg.serve.app_name, "emb")
    before = stats.stats()["by_method"].get("text", {})

    async def many():
        async with AsyncTemperClient(base_url, timeout=60.0) as c:
            return await asyncio.gather(*(c.embed("emb", r) for r in requests))

    results = asyncio.run(many())
    after = stats.stats()["by_method"]["text"]
    added = {int(s): n - before.get(s, 0) for s, n in after.items() if n - before.get(s, 0)}
    assert sum(s * n for s, n in added.items()) == N_CONCURRENT  # every request ran in one batch
    assert max(added) > 1, f"no batching: batch sizes {added}"
    local = load_predictor(artifacts["embedding_int8"])
    fp32 = load_predictor(artifacts["embedding"])
    for r, sent in zip(results, requests):
        assert (r.version, r.backend) == (2, "onnx_int8")
        got = np.asarray(r.embeddings)
        # Dynamic int8 quantizes activations with one scale per tensor, i.e. per batch: the same
        # texts batched with other requests get a slightly different scale than alone.
        np.testing.assert_allclose(got, local.embed(sent), atol=3e-3)
        assert (got * local.embed(sent)).sum(axis=1).min() > 0.999
        assert (got * fp32.embed(sent)).sum(axis=1).min() > 0.95  # int8 stays near fp32


def test_classify_over_http_equals_the_in_process_model(base_url, artifacts):
    sent = texts(5, seed=99)
    with TemperClient(base_url, timeout=30.0) as c:
        res = c.classify("sent", sent, top_k=2)
    want = load_predictor(artifacts["sequence_classification"]).classify(sent, top_k=2)
    assert res.labels == [w["label"] for w in want] and set(res.labels) <= {"neg", "pos"}
    for got_row, want_row in zip(res.probabilities, want):
        np.testing.assert_allclose([p["probability"] for p in got_row],
                                   [p["probability"] for p in want_row["top_k"]], atol=1e-5)


def test_text_limits_and_wrong_task_are_4xx_over_http(base_url):
    long = " ".join(["cat"] * 30)
    with TemperClient(base_url, timeout=30.0) as c:
        with pytest.raises(TemperAPIError) as err:
            c.embed("emb", ["the cat", long])
        assert (err.value.status, err.value.field) == (422, "texts.1") and "the limit is 16" in str(err.value)
        assert len(c.embed("emb", [long], truncate=True).embeddings) == 1
        with pytest.raises(TemperAPIError) as err:
            c.classify("emb", ["the cat"])
        assert err.value.status == 400 and "use embed" in str(err.value)


def test_concurrent_generates_are_batched_and_equal_in_process_greedy_decoding(base_url, app_cfg, artifacts):
    prompts = [" ".join(t.split()[:8]) for t in texts(12, seed=7)]
    max_new = [8 + i % 9 for i in range(len(prompts))]
    stats = HandleClient(app_cfg.serve.app_name, "lm")
    before = stats.stats()["by_method"].get("generate", {})

    async def many():
        async with AsyncTemperClient(base_url, timeout=120.0) as c:
            return await asyncio.gather(*(c.generate("lm", p, n) for p, n in zip(prompts, max_new)))

    results = asyncio.run(many())
    after = stats.stats()["by_method"]["generate"]
    added = {int(s): n - before.get(s, 0) for s, n in after.items() if n - before.get(s, 0)}
    assert sum(s * n for s, n in added.items()) == len(prompts)
    assert max(added) > 1, f"no batching: batch sizes {added}"
    local = load_predictor(artifacts["causal_lm"])
    want = [generate_tokens(local, [np.asarray(local.tokenize(p))], [SamplingParams(n)])[0] for p, n in zip(prompts, max_new)]
    assert [r.tokens for r in results] == want
    assert [r.text for r in results] == [local.token_text(w) for w in want]
    eos = next(iter(local.stop_ids))
    assert [r.finish_reason for r in results] == ["stop" if w[-1] == eos else "length" for w in want]
    assert {r.finish_reason for r in results} == {"stop", "length"}  # some rows ended early, at eos

    with TemperClient(base_url, timeout=60.0) as c:  # streamed: the same tokens, one event each
        stream = c.generate_stream("lm", prompts[0], max_new[0])
        chunks = list(stream)
    assert [ch.token for ch in chunks] == want[0] == stream.result.tokens
    assert "".join(ch.text for ch in chunks) == stream.result.text == results[0].text


def test_score_over_http_equals_the_in_process_forward_pass(base_url, artifacts):
    sent = ["the cat sat on the mat", "red", "a big dog ran fast"]
    with TemperClient(base_url, timeout=30.0) as c:
        res = c.score("lm", sent, top_k=3)
    local = load_predictor(artifacts["causal_lm"])
    for text, out in zip(sent, res.outputs):
        ids = np.asarray([local.tokenize(text)])
        logits = torch.from_numpy(local.logits(ids)).double()
        logp = torch.log_softmax(logits[0], -1)
        want = logp[torch.arange(ids.shape[1] - 1), torch.from_numpy(ids[0, 1:])].numpy()
        np.testing.assert_allclose(out["logprobs"], want, atol=1e-5)
        assert [n["token"] for n in out["next"]] == torch.topk(logp[-1], 3).indices.tolist()


def test_causal_lm_limits_are_4xx_over_http(base_url):
    long = " ".join(["cat"] * 30)  # 32 tokens with [CLS] [SEP]; the limit (data.max_length) is 16
    with TemperClient(base_url, timeout=30.0) as c:
        with pytest.raises(TemperAPIError) as err:
            c.generate("lm", long, 4)
        assert (err.value.status, err.value.field) == (422, "prompt") and "the limit is 16" in str(err.value)
        with pytest.raises(TemperAPIError) as err:
            c.score("lm", ["the cat", long])
        assert (err.value.status, err.value.field) == (422, "texts.1") and "the limit is 16" in str(err.value)
        with pytest.raises(TemperAPIError) as err:
            c.generate("lm", "the cat", 25)
        assert (err.value.status, err.value.field) == (422, "max_new_tokens") and "at most 24" in str(err.value)
        with pytest.raises(TemperAPIError) as err:
            c.generate("emb", "the cat", 4)
        assert err.value.status == 400 and "use embed" in str(err.value)
