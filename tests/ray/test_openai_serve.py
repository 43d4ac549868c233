"""The OpenAI-compatible routes over real HTTP, called with the official `openai` client: one Serve
app (auth on, an API key as the client's api_key) hosts a tiny Llama causal LM with three LoRA
adapters (at most two loaded; two given as peft folders, the third as a registered `lora_adapter`
version, `version:2`), a tiny BERT embedder and a tiny built-in GPT. Answers are compared with transformers'
own greedy decoding of the base model and of each adapter merged into it (peft's merge_and_unload)."""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx
import numpy as np
import pytest
import torch

from app.artifacts import save_fp32
from app.config.auth import AuthConfig
from app.config.data import DataConfig
from app.config.jobs import ServeApp, TrainJob, parse_config
from app.config.model import GPTConfig
from app.config.registry import RegistryConfig
from app.config.serve import ServeConfig, ServedModel
from app.data.chat_template import render_chat
from app.inference import generate_text, load_predictor
from app.models import build_model
from conftest import free_port, serving
from hf_folders import greedy_ids, lora_adapter, merged_lora_model, sentiment_rows, tiny_bert, tiny_llama
from serve.protocol import API_PREFIX

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.ray

KEY_SECRET = "openai-test-key-secret-0123456789abcdef"
MAX_TOKENS = 6
PROMPT = "the cat sat on"
CHAT = [{"role": "system", "content": "a big dog"}, {"role": "user", "content": "the red house"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-serve")
    llama = tiny_llama(root / "llama", initializer_range=0.5)
    lines = root / "lines.txt"
    lines.write_text("".join(r["text"] + "\n" for r in sentiment_rows(20)))
    lm_job = parse_config("train", {"name": "lm", "model": {"kind": "hf", "path": str(llama), "task": "causal_lm"},
                                    "data": {"kind": "text", "path": str(lines), "max_length": 32, "val_fraction": 0.3}})
    bert = tiny_bert(root / "bert")
    emb_job = parse_config("train", {"name": "emb", "model": {"kind": "hf", "path": str(bert), "task": "embedding",
                                                              "pooling": "mean", "normalize": True},
                                     "data": {"kind": "text", "path": str(lines), "max_length": 16, "val_fraction": 0.3}})
    gpt_job = TrainJob(name="code", model=GPTConfig(n_layer=2, d_model=32, n_head=2, block_size=32),
                       data=DataConfig(name="lm-code"))
    torch.manual_seed(0)
    return {
        "gpt": str(save_fp32(root / "gpt", build_model(gpt_job.model), gpt_job)),
        "llama": llama,
        "lm": str(save_fp32(root / "lm", build_model(lm_job.model), lm_job)),
        "emb": str(save_fp32(root / "emb", build_model(emb_job.model), emb_job)),
        "adapters": {f"a{i}": str(lora_adapter(llama, root / f"a{i}", seed=i)) for i in (1, 2, 3)},
    }


@pytest.fixture(scope="module")
def api_key(ray_cluster, models, tmp_path_factory):
    """(app config, a developer API key): the registry (auth on) holds the two models."""
    from actors.registry.client import get_or_create_registry, open_store, registry_auth

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEMPER_KEY_SECRET", KEY_SECRET)
        reg = RegistryConfig(actor_name=f"openai-{uuid.uuid4().hex[:8]}", namespace="temper-tests",
                             db_url=f"sqlite:///{tmp_path_factory.mktemp('openai-registry') / 'r.db'}")
        auth = AuthConfig(enabled=True)
        store = open_store(reg, key_secret=KEY_SECRET.encode())
        admin, developer = (store.create_key(role, role)[1] for role in ("admin", "developer"))
        store.close()
        handle = get_or_create_registry(reg, auth=registry_auth(auth, True))
        ray_cluster.get(handle.register_version.remote("lm", models["lm"], "torch_fp32", credentials=admin))
        # adapter a3 is served from the registry: a lora_adapter version (v2) of the same model
        ray_cluster.get(handle.register_version.remote("lm", models["adapters"]["a3"], "lora_adapter", transformation="lora",
                                                       parent={"model": "lm", "version": 1}, credentials=admin))
        ray_cluster.get(handle.register_version.remote("emb", models["emb"], "torch_fp32", credentials=admin))
        ray_cluster.get(handle.register_version.remote("code", models["gpt"], "torch_fp32", credentials=admin))
        app_cfg = ServeApp(registry=reg, auth=auth, serve=ServeConfig(
            app_name=f"temper-openai-{uuid.uuid4().hex[:6]}", port=free_port(), route_prefix="/temper",
            models=[ServedModel(model="lm", version="1", max_new_tokens=12, cpus_per_replica=0.5,
                                adapters={**models["adapters"], "a3": "version:2"}, max_adapters=2),
                    ServedModel(model="emb", version="1", cpus_per_replica=0.5),
                    ServedModel(model="code", version="1", max_new_tokens=12, cpus_per_replica=0.5)]))
        for url in serving(app_cfg):
            yield app_cfg, url, developer
        ray_cluster.kill(handle, no_restart=True)


@pytest.fixture(scope="module")
def client(api_key):
    _, url, key = api_key
    with openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=60.0, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def reference(models):
    """Greedy continuations by transformers itself: {adapter or None: model}, and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["llama"], local_files_only=True)
    nets = {None: AutoModelForCausalLM.from_pretrained(models["llama"], local_files_only=True).eval()}
    for name, folder in models["adapters"].items():
        nets[name] = merged_lora_model(models["llama"], folder)

    def answer(prompt: str, adapter: str | None = None, max_tokens: int = MAX_TOKENS, chat: bool = False) -> dict:
        # a rendered chat carries its special tokens (bos) in the text: tokenized as it is
        ids = tok(prompt, add_special_tokens=not chat)["input_ids"]
        new = greedy_ids(nets[adapter], ids, max_tokens)
        eos = nets[None].generation_config.eos_token_id
        return {"text": tok.decode(new, skip_special_tokens=True), "prompt_tokens": len(ids),
                "completion_tokens": len(new), "finish_reason": "stop" if new and new[-1] == eos else "length"}

    answer.tokenizer = tok
    return answer


def test_models_list_names_every_model_and_adapter(client):
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"lm", "emb", "code", "lm:a1", "lm:a2", "lm:a3"}
    assert ids["lm:a1"].parent == "lm" and ids["lm"].object == "model"


def test_completion_equals_transformers_greedy_with_exact_usage(client, reference):
    res = client.completions.create(model="lm", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    want = reference(PROMPT)
    assert res.choices[0].text == want["text"] and want["text"]
    assert res.choices[0].finish_reason == want["finish_reason"]
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens) == (
        want["prompt_tokens"], want["completion_tokens"], want["prompt_tokens"] + want["completion_tokens"])


def test_chat_streamed_and_whole_equal_transformers_greedy_on_the_rendered_chat(client, reference):
    want = reference(render_chat(reference.tokenizer, CHAT), chat=True)
    whole = client.chat.completions.create(model="lm", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert whole.choices[0].message.content == want["text"] and whole.choices[0].message.role == "assistant"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (want["prompt_tokens"], want["completion_tokens"])
    chunks = list(client.chat.completions.create(model="lm", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want["text"]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [want["finish_reason"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want["completion_tokens"]


def test_stop_string_ends_the_text_before_it(client, reference, api_key):
    full = reference(PROMPT, max_tokens=12)["text"]
    assert len(full.split()) >= 3, full
    stop = full.split()[2]  # a word the greedy text reaches after a few tokens
    want = full[:full.find(stop)]
    res = client.completions.create(model="lm", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert (res.choices[0].text, res.choices[0].finish_reason) == (want, "stop")
    streamed = list(client.completions.create(model="lm", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"
    # the raw stream is OpenAI's: `data: {...}` events ending with `data: [DONE]`
    _, url, key = api_key
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": "lm", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_embeddings_equal_the_in_process_model(client, models):
    texts = ["the cat sat", "a big red dog ran fast"]
    res = client.embeddings.create(model="emb", input=texts)  # the client asks for base64 floats
    local = load_predictor(models["emb"])
    np.testing.assert_allclose(np.asarray([d.embedding for d in res.data]), local.embed(texts), atol=1e-5)
    assert res.usage.prompt_tokens == sum(len(local.tokenize(t)) for t in texts) == res.usage.total_tokens
    floats = client.embeddings.create(model="emb", input="the cat", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, local.embed(["the cat"])[0], atol=1e-5)


def test_bad_requests_get_openai_errors(client, api_key):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="lm", prompt=PROMPT, max_tokens=2, n=2)
    assert err.value.status_code == 400 and err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="lm", prompt=PROMPT, max_tokens=13)
    assert err.value.body["param"] == "max_tokens" and "at most 12" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert err.value.status_code == 404 and (err.value.body["param"], err.value.body["code"]) == ("model", "model_not_found")
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="lm", input="the cat")  # a causal LM embeds nothing
    assert err.value.body["param"] == "model"
    _, url, key = api_key
    bad = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30,
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    wrong_role = httpx.post(f"{url}/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                            json={"model": "lm", "messages": [{"role": "robot", "content": "hi"}]})
    assert wrong_role.status_code == 400 and wrong_role.json()["error"]["param"] == "messages.0.role"
    # auth applies as on /api/v1: no key is a 401 in OpenAI's shape
    with openai.OpenAI(base_url=f"{url}/v1", api_key="not-a-key", max_retries=0) as anonymous:
        with pytest.raises(openai.AuthenticationError) as err:
            anonymous.models.list()
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    ours = httpx.get(f"{url}{API_PREFIX}/models", timeout=30)
    assert ours.status_code == 401 and "error_code" in ours.json()  # our own shape stays on /api/v1


def test_adapters_answer_as_their_merged_models_and_are_evicted_past_the_limit(client, reference, api_key):
    def adapter_state() -> dict:
        _, url, key = api_key
        listed = httpx.get(f"{url}{API_PREFIX}/models", headers={"X-API-Key": key}, timeout=30).json()["models"]
        return next(m for m in listed if m["model"] == "lm")["adapters"]

    assert adapter_state()["loaded"] == []
    answers = {}
    for name in (None, "a1", "a2"):
        res = client.completions.create(model="lm" if name is None else f"lm:{name}", prompt=PROMPT,
                                        max_tokens=MAX_TOKENS, temperature=0)
        answers[name] = res.choices[0].text
        assert answers[name] == reference(PROMPT, name)["text"], name
    assert len(set(answers.values())) == 3  # each adapter answers differently from the other and the base
    state = adapter_state()
    assert (state["loaded"], state["loads"], state["evictions"]) == (["a1", "a2"], 2, 0)
    streamed = client.chat.completions.create(model="lm:a3", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                              stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == reference(render_chat(reference.tokenizer, CHAT), "a3", chat=True)["text"]
    state = adapter_state()
    assert (state["loaded"], state["loads"], state["evictions"]) == (["a2", "a3"], 3, 1)  # a1 was least recently used
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="lm:zzz", prompt=PROMPT, max_tokens=2)
    assert "'zzz'" in err.value.body["message"] and err.value.body["param"] == "model"


def test_the_built_in_gpt_completes_bytes_as_in_process(client, models):
    pred = load_predictor(models["gpt"])
    prompt = "def add(a, b):"
    new = generate_text(pred, np.frombuffer(prompt.encode(), dtype=np.uint8).astype(np.int64)[None], 8)[0].tolist()
    want = bytes(new).decode("utf-8", errors="replace")
    res = client.completions.create(model="code", prompt=prompt, max_tokens=8, temperature=0)
    assert res.choices[0].text == want
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(prompt.encode()), 8)
    streamed = client.completions.create(model="code", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
