"""The OpenAI-compatible routes without Ray: stop strings (cut and streamed hold-back), stream
chunk and error shapes as the official `openai` client parses them, usage counts, the chat
template, and the /v1 routes on `make_api` with a fake model server (what reaches the model,
error bodies, our own shape kept on /api/v1)."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config.serve import ServeConfig, ServedModel
from app.data.chat_template import ChatFormatError, render_chat
from app.stop_strings import find_stop, visible_text
from serve.ingress import make_api
from serve.openai_api import (
    StreamText,
    completion_body,
    embedding_item,
    is_openai_path,
    openai_error_body,
    sse,
    stream_chunk,
    usage,
)


def test_find_stop_is_the_earliest_stop_string():
    assert find_stop("the cat sat. on", [".", "cat"]) == 4
    assert find_stop("the cat", ["dog", ""]) is None


@pytest.mark.parametrize("pieces, stops, shown, stopped", [
    (["the ", "ca", "t sat"], ["cat"], ["the ", "", ""], True),            # held "ca", then cut before "cat"
    (["the ", "ca", "r"], ["cat"], ["the ", "", "car"], False),             # "ca" released once it cannot be "cat"
    (["ab", "c"], ["bcd", "x"], ["a", ""], False),                          # "bc" may still become "bcd"
    (["hello"], [], ["hello"], False),
])
def test_streamed_text_never_shows_a_stop_string(pieces, stops, shown, stopped):
    s = StreamText(stops)
    assert [s.add(p) for p in pieces] == shown
    rest = s.add("", final=True)
    assert s.stopped is stopped
    text = "".join(shown) + rest
    assert text == visible_text("".join(pieces), stops, final=True)[0]
    assert not any(stop in text for stop in stops)


def test_chunks_and_bodies_parse_as_the_openai_client_types():
    from openai.types import Completion, CreateEmbeddingResponse
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    use = usage(7, 3)
    assert use == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    chat = ChatCompletion.model_validate(completion_body("chat.completion", "chatcmpl-1", 5, "lm", "hi", "stop", use))
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason, chat.usage.total_tokens) == ("hi", "stop", 10)
    text = Completion.model_validate(completion_body("text_completion", "cmpl-1", 5, "lm:a1", "hi", "length", use))
    assert (text.choices[0].text, text.model) == ("hi", "lm:a1")
    first = ChatCompletionChunk.model_validate(stream_chunk("chat.completion.chunk", "c", 5, "lm", text="", role=True))
    assert (first.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "")
    last = ChatCompletionChunk.model_validate(stream_chunk("chat.completion.chunk", "c", 5, "lm", finish="length"))
    assert last.choices[0].finish_reason == "length" and last.choices[0].delta.content is None
    tail = ChatCompletionChunk.model_validate(stream_chunk("chat.completion.chunk", "c", 5, "lm", use=use))
    assert tail.choices == [] and tail.usage.completion_tokens == 3
    # OpenAI streams completions pieces with finish_reason null (its Completion type, which the client
    # builds chunks with unvalidated, declares it non-null)
    assert stream_chunk("text_completion", "c", 5, "lm", text="ab") == {
        "id": "c", "object": "text_completion", "created": 5, "model": "lm",
        "choices": [{"index": 0, "text": "ab", "finish_reason": None, "logprobs": None}]}
    assert sse({"a": 1}) == b'data: {"a":1}\n\n' and sse("[DONE]") == b"data: [DONE]\n\n"
    vec = [0.5, -1.25, 3.0]
    packed = embedding_item(0, vec, "base64")["embedding"]
    assert np.frombuffer(base64.b64decode(packed), dtype="<f4").tolist() == vec
    emb = CreateEmbeddingResponse.model_validate({"object": "list", "model": "emb", "usage": usage(4),
                                                  "data": [embedding_item(0, vec, "float")]})
    assert emb.data[0].embedding == vec and emb.usage.total_tokens == 4


def test_error_body_is_openais_shape():
    assert openai_error_body(404, "no such model", "model") == {
        "error": {"message": "no such model", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    assert openai_error_body(401, "missing credentials", "authorization")["error"]["type"] == "authentication_error"
    assert openai_error_body(503, "busy")["error"]["type"] == "server_error"
    assert is_openai_path({"path": "/temper/v1/models", "root_path": "/temper"})
    assert is_openai_path({"path": "/v1/chat/completions"})
    assert not is_openai_path({"path": "/temper/api/v1/models", "root_path": "/temper"})


def test_plain_chat_template_and_a_tokenizers_own():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert render_chat(None, messages) == "### System:\nbe brief\n\n### User:\nhi\n\n### Assistant:\n"
    assert render_chat(None, messages, add_generation_prompt=False) == "### System:\nbe brief\n\n### User:\nhi\n\n"

    class Templated:
        chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")

    assert render_chat(Templated(), messages) == "<system>be brief<user>hi<assistant>"
    with pytest.raises(ChatFormatError) as err:
        render_chat(None, [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    assert err.value.field == "messages.1.role"


class _Response:
    def __init__(self, coro):
        self.coro = coro

    def __await__(self):
        return self.coro.__await__()


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return _Response(self.fn(*args))


class FakeLM:
    """A causal-LM model server answering like BatchedModelServer.generate / embed (records its calls)."""

    def __init__(self, task: str):
        self.task, self.calls = task, []
        self.generate, self.embed = _Method(self._generate), _Method(self._embed)

    async def _generate(self, *args):
        self.calls.append(args)
        prompt, max_new, *_rest, adapter, messages = args
        if self.task != "causal_lm":
            return {"refused": {"status": 400, "field": "model", "message": "use embed"}}
        if messages is not None and messages[0]["role"] == "assistant":
            return {"refused": {"status": 422, "field": "max_new_tokens", "message": "too many"}}
        return {"version": 1, "backend": "torch_fp32", "tokens": [5] * max_new, "text": "x" * max_new,
                "finish_reason": "length", "prompt_tokens": 4, "adapter": adapter}

    async def _embed(self, texts, truncate):
        await asyncio.sleep(0)
        if self.task != "embedding":
            return {"refused": {"status": 400, "field": "model", "message": "use score or generate"}}
        return {"version": 1, "backend": "torch_fp32", "embeddings": [[1.0, 0.0]] * len(texts),
                "token_counts": [3] * len(texts)}


@pytest.fixture
def api():
    cfg = ServeConfig(models=[ServedModel(model="lm", max_new_tokens=8, adapters={"a1": "/adapters/a1"}),
                              ServedModel(model="emb")])
    servers = {"lm": FakeLM("causal_lm"), "emb": FakeLM("embedding")}
    with TestClient(make_api(cfg, servers)) as client:
        yield client, servers


def _openai_error(resp, status, param):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param, body
    return body["error"]


def test_v1_routes_pass_parameters_and_count_usage(api):
    client, servers = api
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["lm", "lm:a1", "emb"] and models["object"] == "list"
    res = client.post("/v1/completions", json={"model": "lm:a1", "prompt": "hi", "max_tokens": 3, "temperature": 0,
                                               "top_p": 0.5, "top_k": 4, "seed": 9, "stop": "."}).json()
    assert servers["lm"].calls[-1] == ("hi", 3, 0.0, 4, 9, 0.5, ["."], "a1", None)
    assert res["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert res["object"] == "text_completion" and res["model"] == "lm:a1" and res["choices"][0]["text"] == "xxx"
    chat = client.post("/v1/chat/completions", json={"model": "lm", "messages": [{"role": "user", "content": "hi"}]}).json()
    assert servers["lm"].calls[-1][1] == 8  # chat's default: the model's max_new_tokens
    assert servers["lm"].calls[-1][-1] == [{"role": "user", "content": "hi"}]
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "x" * 8}
    emb = client.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"]}).json()
    assert emb["usage"] == {"prompt_tokens": 6, "total_tokens": 6} and len(emb["data"]) == 2


def test_v1_errors_are_openais_and_name_the_field(api):
    client, _ = api
    _openai_error(client.post("/v1/completions", json={"model": "lm", "prompt": "hi", "n": 2}), 400, "n")
    _openai_error(client.post("/v1/completions", json={"model": "lm", "prompt": "hi", "max_tokens": 9}), 400, "max_tokens")
    _openai_error(client.post("/v1/completions", json={"model": "lm", "prompt": "hi", "temperature": 3}), 400, "temperature")
    _openai_error(client.post("/v1/completions", json={"model": "lm", "prompt": "hi", "logit_bias": {}}), 400, "logit_bias")
    err = _openai_error(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"}), 404, "model")
    assert err["code"] == "model_not_found" and "'gpt-4'" in err["message"]
    err = _openai_error(client.post("/v1/completions", json={"model": "lm:zz", "prompt": "hi"}), 404, "model")
    assert "no adapter 'zz'" in err["message"]
    # the model's refusal (our 422 naming max_new_tokens) is a 400 naming max_tokens
    err = _openai_error(client.post("/v1/chat/completions", json={
        "model": "lm", "messages": [{"role": "assistant", "content": "x"}]}), 400, "max_tokens")
    _openai_error(client.post("/v1/embeddings", json={"model": "lm", "input": "a"}), 400, "model")
    bad = client.post("/v1/embeddings", content=b"{oops", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and json.loads(bad.text)["error"]["type"] == "invalid_request_error"
    _openai_error(client.get("/v1/nothing"), 404, None)
    ours = client.post("/api/v1/models/nope/generate", json={"prompt": "hi"})
    assert ours.status_code == 404 and "error_code" in ours.json()  # /api/v1 keeps our shape


@pytest.mark.parametrize("template", ["own", "plain"])
def test_a_served_chat_prompt_is_the_text_fine_tuning_trained_before_the_answer(tmp_path, template):
    """A model tuned on chat rows sees at serving time exactly the text that preceded the answers
    it was trained on: the generation prompt of the conversation up to its last assistant turn
    is the start of the training text, up to where the trained span begins."""
    from transformers import AutoTokenizer

    from app.data.instructions import InstructionExample, render
    from hf_folders import save_chat_tokenizer

    save_chat_tokenizer(tmp_path, ["be", "brief", "hi", "hello", "again", "bye"],
                        **({} if template == "own" else {"chat_template": None}))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    turns = (("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "again"), ("assistant", "bye"))
    text, spans = render(InstructionExample(messages=turns, prompt=None, completion=None, file="f", line=1), tok)
    served = render_chat(tok, [{"role": r, "content": c} for r, c in turns[:-1]])
    assert text[:spans[-1][0]] == served
    assert text[spans[-1][0]:].lstrip().startswith("bye")

