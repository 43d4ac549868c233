"""Generation and scoring of an `hf` causal LM as the replica runs them, without Ray: a tiny
random Llama (torch fp32 artifact, initialised wide enough that greedy tokens vary), several prompts of different lengths decoded in one batch
through the model's own KV cache must give, per prompt, exactly the greedy tokens of
`model.generate`; `score` must give the log-probabilities of a direct forward pass."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from app.inference import SamplingParams, generate_steps, generate_tokens, load_predictor
from hf_folders import tiny_llama_artifact
from serve.batches import LMRequest, run_lm_batch

PROMPTS = ["the cat", "a dog ran fast on the mat", "red", "the big house sat on a small tree", "blue mat"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """(torch_fp32 artifact folder, the transformers model it was saved from)."""
    return tiny_llama_artifact(tmp_path_factory.mktemp("hf-generate"))


@pytest.fixture(scope="module")
def lm(artifact):
    """(TextPredictor of the torch_fp32 artifact, the transformers model it was saved from)."""
    return load_predictor(artifact[0]), artifact[1]


def reference(model, pred, prompt: str, max_new: int) -> list[int]:
    """`model.generate` greedy on the prompt alone: its new tokens (the stop token included)."""
    ids = torch.tensor([pred.tokenize(prompt)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_batched_greedy_generation_equals_model_generate_per_prompt(lm):
    pred, model = lm
    assert pred.supports_kv_cache and pred.stop_ids == frozenset([model.generation_config.eos_token_id])
    rows = [np.asarray(pred.tokenize(p)) for p in PROMPTS]
    max_new = [24, 10, 12, 17, 12]
    got = generate_tokens(pred, rows, [SamplingParams(n) for n in max_new])
    for prompt, n, tokens in zip(PROMPTS, max_new, got):
        assert tokens == reference(model, pred, prompt, n)
    # rows leave the batch at different steps: some at the end-of-sequence token, one at its cap
    eos = model.generation_config.eos_token_id
    assert len({len(t) for t in got}) > 2 and any(len(t) == n and eos not in t for t, n in zip(got, max_new))
    assert all(t.index(eos) == len(t) - 1 for t in got if eos in t)
    assert len({tuple(t) for t in got}) == len(got)
    # the recompute path (what an ONNX graph runs) decodes the same tokens
    assert generate_tokens(pred, rows, [SamplingParams(n) for n in max_new], use_kv_cache=False) == got


def test_streamed_steps_end_each_row_at_its_stop_token(lm):
    pred, _ = lm
    rows = [np.asarray(pred.tokenize(p)) for p in PROMPTS[:3]]
    steps = list(generate_steps(pred, rows, [SamplingParams(8)] * 3))
    full = generate_tokens(pred, rows, [SamplingParams(8)] * 3)
    for i, tokens in enumerate(full):
        column = [s[i] for s in steps]
        assert column[:len(tokens)] == tokens and all(t is None for t in column[len(tokens):])


def test_sampling_is_seeded_per_row_whatever_the_batch(lm):
    pred, _ = lm
    rows = [np.asarray(pred.tokenize(p)) for p in PROMPTS]
    params = [SamplingParams(8, temperature=1.5, top_k=5, seed=i) for i in range(len(rows))]
    batched = generate_tokens(pred, rows, params)
    alone = [generate_tokens(pred, [r], [p])[0] for r, p in zip(rows, params)]
    assert batched == alone and len(set(map(tuple, batched))) > 1


def test_score_log_probs_equal_a_direct_forward_pass(lm):
    pred, model = lm
    texts = ["the cat sat on the mat", "red", "a big dog ran"]
    rows = [np.asarray(pred.tokenize(t)) for t in texts]
    out = run_lm_batch(pred, [LMRequest("score", rows[:2], top_k=3), LMRequest("score", rows[2:], top_k=2)])
    results = out[0] + out[1]
    for row, res, k in zip(rows, results, (3, 3, 2)):
        ids = torch.as_tensor(row)[None]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (T, V)
        want = logp[torch.arange(len(row) - 1), ids[0, 1:]].numpy()
        np.testing.assert_allclose(res["logprobs"], want, atol=1e-5)
        assert res["nll"] == pytest.approx(-want.mean(), abs=1e-5)
        top = torch.topk(logp[-1], k).indices.tolist()
        assert [n["token"] for n in res["next"]] == top


def test_onnx_artifact_generates_the_torch_tokens_by_recomputing(artifact, lm, tmp_path):
    from app.compression import METHODS

    pred, _ = lm
    onnx = load_predictor(str(METHODS["onnx_fp32"](artifact[0], tmp_path / "onnx-fp32")))
    assert onnx.backend == "onnx_fp32" and not onnx.supports_kv_cache and onnx.stop_ids == pred.stop_ids
    rows = [np.asarray(pred.tokenize(p)) for p in PROMPTS]
    params = [SamplingParams(10) for _ in rows]
    assert generate_tokens(onnx, rows, params) == generate_tokens(pred, rows, params)


def test_replica_rows_refuse_a_text_over_the_token_limit_and_stream_pieces_add_up(lm):
    from serve.protocol import ModelRequestError
    from serve.batches import TokenPieces, finish_reason, lm_row

    pred, _ = lm
    with pytest.raises(ModelRequestError) as err:
        lm_row(pred, " ".join(["cat"] * 30), "prompt")
    assert err.value.field == "prompt" and "32 tokens; the limit is 16" in err.value.message
    rows = [lm_row(pred, p, "prompt") for p in PROMPTS]
    for tokens in generate_tokens(pred, rows, [SamplingParams(12) for _ in rows]):
        pieces = TokenPieces(pred)
        events = [pieces.add(t) for t in tokens]
        assert "".join(e["text"] for e in events) == pred.token_text(tokens)
        assert [e["stop"] for e in events] == [t in pred.stop_ids for t in tokens]
        assert finish_reason(pred, tokens) == ("stop" if events[-1]["stop"] else "length")
