"""Batched generation without Ray: the KV-cache decode path against the recompute path, padding of
prompts of different lengths, the sliding window past block_size, sampling, broken versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.artifacts import save_fp32
from app.compression import METHODS
from app.config.data import DataConfig
from app.config.jobs import TrainJob
from app.config.model import GPTConfig
from app.inference import (
    KVCacheDecoder,
    NonFiniteOutputError,
    SamplingParams,
    generate_steps,
    generate_text,
    generate_tokens,
    load_predictor,
)
from app.models import build_model
from app.models.gpt import decode_mask

BLOCK = 32
PROMPTS = ["def add(a, b):", "x", "import numpy as np; import os, sys  # longer than the block", "for i in range("]


def _rows(*texts: str) -> list[np.ndarray]:
    return [np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int64) for t in texts]


@pytest.fixture(scope="module")
def gpt_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    job = TrainJob(name="code", model=GPTConfig(n_layer=2, d_model=32, n_head=2, block_size=BLOCK), data=DataConfig(name="lm-code"))
    torch.manual_seed(0)
    model = build_model(job.model)
    fp32 = str(save_fp32(root / "fp32", model, job))
    broken = build_model(job.model)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    return {
        "fp32": fp32,
        "int8": str(METHODS["torch_int8"](fp32, root / "int8")),
        "onnx": str(METHODS["onnx_fp32"](fp32, root / "onnx")),
        "broken": str(save_fp32(root / "broken", broken, job)),
    }


def test_decode_mask_attends_real_past_keys_and_itself():
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    m = decode_mask(valid, 4)[:, 0]  # (B, T, S)
    assert m.shape == (2, 4, 4)
    # row 0: padding queries see only themselves; real queries see real keys up to their position
    assert m[0].tolist() == [[True, False, False, False], [False, True, False, False],
                             [False, False, True, False], [False, False, True, True]]
    assert m[1].tolist() == torch.tril(torch.ones(4, 4, dtype=torch.bool)).tolist()
    step = decode_mask(torch.tensor([[False, True, True]]), 1)[0, 0]  # one new query at the end
    assert step.tolist() == [[False, True, True]]


def test_kv_cache_greedy_equals_recompute_for_mixed_lengths_and_past_block_size(gpt_paths):
    pred = load_predictor(gpt_paths["fp32"])
    assert pred.supports_kv_cache
    rows = _rows(*PROMPTS)
    params = [SamplingParams(n) for n in (24, 40, 5, 12)]  # "x" + 40 > block_size: the window slides
    cached = generate_tokens(pred, rows, params)  # one batch, left-padded, KV cache
    plain = generate_tokens(pred, rows, params, use_kv_cache=False)
    for row, p, got, again in zip(rows, params, cached, plain):
        want = generate_text(pred, row[None], p.max_new_tokens)[0].tolist()  # alone, no cache
        assert got == want and again == want and len(got) == p.max_new_tokens


def test_steps_stream_rows_until_each_is_done(gpt_paths):
    pred = load_predictor(gpt_paths["fp32"])
    steps = list(generate_steps(pred, _rows("ab", "abcdef", "q"), [SamplingParams(3), SamplingParams(1), SamplingParams(2)]))
    assert len(steps) == 3
    assert [[t is not None for t in s] for s in steps] == [[True, True, True], [True, False, True], [True, False, False]]


def test_onnx_backend_generates_with_the_recompute_path(gpt_paths):
    pred = load_predictor(gpt_paths["onnx"])
    assert not pred.supports_kv_cache
    rows = _rows(*PROMPTS)
    params = [SamplingParams(8)] * len(rows)
    got = generate_tokens(pred, rows, params)
    want = generate_tokens(load_predictor(gpt_paths["fp32"]), rows, params)
    assert got == want  # ORT fp32 matches torch fp32 here
    with pytest.raises(ValueError, match="no KV-cache"):
        generate_tokens(pred, rows, params, use_kv_cache=True)


def test_int8_cache_picks_the_recompute_token_at_almost_every_step(gpt_paths):
    # Dynamic int8 quantizes activations with one scale per tensor, so an int8 row depends on
    # what it is computed with (one cached token vs the full context): where the two best logits
    # are nearly tied the cached path may pick the other one, and a free-running greedy text
    # diverges from there on. So each step is checked teacher-forced: given the same context (the
    # recompute path's own continuation), the cached decoder must pick the same next byte. The
    # tiny untrained model agreed at 142 of 144 steps here (6 prompts x 24 bytes). Broken caches
    # measured on the same model: each step's key fed the wrong byte 7 of 144, the prompt's
    # context lost (only its last byte cached) 95 of 144; the 90% bar sits between.
    pred = load_predictor(gpt_paths["int8"])
    assert pred.supports_kv_cache
    prompts = PROMPTS + ["def f(x):", "import os"]
    n_new, agree = 24, 0
    for row in _rows(*prompts):
        want = generate_text(pred, row[None], n_new)[0].tolist()  # recompute path, greedy
        free_running = generate_tokens(pred, [row], [SamplingParams(n_new)])[0]  # cached path, greedy
        assert free_running[0] == want[0] and len(free_running) == n_new  # same prefill tensor: exact
        decoder = KVCacheDecoder(pred._torch_model, BLOCK)
        logits = decoder.start([row])
        for token in want:
            agree += int(np.argmax(logits[0])) == token
            logits = decoder.step(np.asarray([token]))
    assert agree >= 0.9 * n_new * len(prompts), f"cached int8 picked the recompute byte at {agree} of {n_new * len(prompts)} steps"
    assert all(0 <= t < 256 for out in generate_tokens(pred, _rows(*prompts), [SamplingParams(6)] * len(prompts)) for t in out)


def test_sampling_is_seeded_per_row_and_respects_top_k(gpt_paths):
    pred = load_predictor(gpt_paths["fp32"])
    p = SamplingParams(12, temperature=1.5, top_k=5, seed=7)
    alone = generate_tokens(pred, _rows("def f(x):"), [p])[0]
    batched = generate_tokens(pred, _rows("import os", "def f(x):", "q"), [SamplingParams(4, 1.0, 0, 1), p, SamplingParams(9)])[1]
    assert alone == batched  # the row's own sampler: batch company does not change its text
    assert generate_tokens(pred, _rows("def f(x):"), [SamplingParams(12, 1.5, 5, 8)])[0] != alone  # another seed
    greedy = generate_tokens(pred, _rows("def f(x):"), [SamplingParams(12)])[0]
    assert generate_tokens(pred, _rows("def f(x):"), [SamplingParams(12, 2.0, 1, 3)])[0] == greedy  # top_k=1 is greedy
    # every sampled byte is among the 5 most likely at its step
    decoder = KVCacheDecoder(pred._torch_model, BLOCK)
    logits = decoder.start(_rows("def f(x):"))
    for t in alone:
        assert t in np.argsort(-logits[0])[:5]
        logits = decoder.step(np.asarray([t]))


def test_broken_version_raises_instead_of_inventing_tokens(gpt_paths):
    pred = load_predictor(gpt_paths["broken"])
    with pytest.raises(NonFiniteOutputError):
        generate_tokens(pred, _rows("abc"), [SamplingParams(3)])


def test_forward_is_unchanged_by_the_cache_path(gpt_paths):
    """`GPT.forward(idx)` (training, ONNX export) and a full-length `forward_kv` prefill agree."""
    pred = load_predictor(gpt_paths["fp32"])
    model = pred._torch_model
    idx = torch.tensor(_rows("def add(a, b): return a + b")[0])[None]
    T = idx.shape[1]
    with torch.inference_mode():
        full = model(idx)
        kv, cache = model.forward_kv(idx, torch.arange(T)[None], decode_mask(torch.ones(1, T, dtype=torch.bool), T))
    torch.testing.assert_close(kv, full, rtol=1e-5, atol=1e-5)
    assert len(cache) == 2 and cache[0][0].shape == (1, 2, T, 16)


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_samples_from_the_tokens_transformers_keeps(top_p):
    from transformers import TopPLogitsWarper

    from app.inference import next_token

    logits = np.random.default_rng(1).normal(size=12).astype(np.float32) * 2
    kept = TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)[None])[0]
    want = set(np.flatnonzero(np.isfinite(kept.numpy())).tolist())
    rng = np.random.default_rng(0)
    drawn = {next_token(logits, SamplingParams(1, temperature=1.0, top_p=top_p), rng) for _ in range(3000)}
    assert drawn == want and len(want) < len(logits)


def test_a_row_ends_at_its_stop_string(gpt_paths):
    pred = load_predictor(gpt_paths["fp32"])
    row = _rows("def add(a, b):")[0]
    free = generate_tokens(pred, [row], [SamplingParams(12)])[0]
    text = pred.token_text(free)
    stop = text[3:5]  # two characters the free continuation reaches after a few bytes
    stopped = generate_tokens(pred, [row, row], [SamplingParams(12, stop=(stop,)), SamplingParams(12)])
    assert stopped[1] == free  # the other row of the batch runs on
    mine = stopped[0]  # the same bytes, up to the one completing the stop string
    assert mine == free[:len(mine)] and len(mine) < len(free)
    assert stop in pred.token_text(mine) and stop not in pred.token_text(mine[:-1])
