"""Continuous batching without Ray: sequences that join a running batch mid-decode (`RunningBatch`,
and the replica's asyncio `DecodeLoop`) start at the next step, never wait for the running ones
to finish, and make exactly the tokens they would alone: `model.generate` of a tiny random Llama,
the built-in GPT's no-cache recompute path."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import asyncio

import numpy as np
import pytest
import torch

from app.artifacts import save_fp32
from app.config.data import DataConfig
from app.config.jobs import TrainJob
from app.config.model import GPTConfig
from app.decode_batch import DecodeSequence, RunningBatch
from app.inference import SamplingParams, generate_text, generate_tokens, load_predictor
from app.models import build_model
from hf_folders import tiny_llama_artifact
from serve.decode_loop import DecodeLoop

# greedy alone, this Llama makes 24+, 6, 16, 8, 7 and 2 tokens for these (the others end at eos)
LLAMA_PROMPTS = ["tree", "a dog ran", "red", "blue mat", "blue", "the cat"]
GPT_BLOCK = 32


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(TextPredictor of a tiny random Llama's torch_fp32 artifact, the transformers model)."""
    folder, model = tiny_llama_artifact(tmp_path_factory.mktemp("cb-llama"))
    return load_predictor(folder), model


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    job = TrainJob(name="code", model=GPTConfig(n_layer=2, d_model=32, n_head=2, block_size=GPT_BLOCK),
                   data=DataConfig(name="lm-code"))
    torch.manual_seed(0)
    return load_predictor(str(save_fp32(tmp_path_factory.mktemp("cb-gpt") / "fp32", build_model(job.model), job)))


def llama_alone(model, pred, prompt: str, max_new: int) -> list[int]:
    """`model.generate` greedy on the prompt alone: its new tokens (an end-of-sequence id included)."""
    ids = torch.tensor([pred.tokenize(prompt)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def byte_row(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)


def run_schedule(pred, arrivals: dict[int, list[DecodeSequence]]) -> tuple[RunningBatch, list[int], list[int]]:
    """Step a RunningBatch, adding `arrivals[k]` at tick k, until nothing runs or is due; the
    batch, the number of sequences each tick's step ran, and the batch's step count at each tick
    (an idle batch runs no step)."""
    batch, sizes, counts, k = RunningBatch(pred), [], [], 0
    while batch.live or any(step >= k for step in arrivals):
        counts.append(batch.steps)
        sizes.append(len(batch.step(arrivals.get(k, []))))
        k += 1
    return batch, sizes, counts


def test_llama_sequences_joining_mid_decode_start_at_once_and_equal_model_generate(llama):
    pred, model = llama
    eos = next(iter(pred.stop_ids))
    plan = [(0, 24), (2, 6), (3, 12), (3, 9), (7, 14), (30, 5)]  # (arrival step, max_new_tokens) per prompt
    seqs = [DecodeSequence(np.asarray(pred.tokenize(p)), SamplingParams(n)) for p, (_, n) in zip(LLAMA_PROMPTS, plan)]
    arrivals: dict[int, list[DecodeSequence]] = {}
    for s, (step, _) in zip(seqs, plan):
        arrivals.setdefault(step, []).append(s)
    batch, sizes, counts = run_schedule(pred, arrivals)

    want = [llama_alone(model, pred, p, n) for p, (_, n) in zip(LLAMA_PROMPTS, plan)]
    assert [s.tokens for s in seqs] == want
    assert any(w[-1] == eos and len(w) < n for w, (_, n) in zip(want, plan))  # some ended early, at eos
    assert [s.joined_step for s in seqs] == [counts[step] for step, _ in plan]  # nobody waited for a step
    assert counts[30] < 30  # the batch idled before the last one came, and started again for it
    assert max(sizes) >= 4  # several sequences really decoded together
    # the second sequence (6 tokens from step 2) was done long before the first (24 from step 0)
    assert seqs[1].joined_step + len(seqs[1].tokens) < len(seqs[0].tokens)
    assert batch.live == 0 and batch.retire() and len(batch) == 0


def test_llama_cache_width_shrinks_when_the_longest_row_leaves(llama):
    """Rows keep joining a running batch: the left padding that only a departed row needed goes,
    so the cache is as wide as its longest live context, not the batch's whole history."""
    pred, _ = llama
    long = DecodeSequence(np.asarray(pred.tokenize("the big house sat on a small tree")), SamplingParams(3))
    short = DecodeSequence(np.asarray(pred.tokenize("red")), SamplingParams(12))
    batch = RunningBatch(pred)
    batch.step([long, short])
    while not long.done:
        batch.step()
    batch.step()  # the long row leaves here
    width = batch._decoder.mask.shape[1]
    assert width == len(short.row) + len(short.tokens) - 1 < len(long.row)  # keys of the fed tokens only
    assert batch._decoder.cache.get_seq_length() == width


def test_sampled_sequence_joining_a_batch_equals_it_alone(gpt):
    params = SamplingParams(10, temperature=0.8, top_k=20, seed=3)
    alone = generate_tokens(gpt, [byte_row("def f(x):")], [params])[0]
    joining = DecodeSequence(byte_row("def f(x):"), params)
    run_schedule(gpt, {0: [DecodeSequence(byte_row("import os"), SamplingParams(16))], 4: [joining]})
    assert len(alone) == 10 and joining.tokens == alone and joining.joined_step == 4
    assert alone != generate_tokens(gpt, [byte_row("def f(x):")], [SamplingParams(10)])[0]  # really sampled


def test_gpt_sequences_joining_mid_decode_equal_the_recompute_path_past_block_size(gpt):
    prompts = ["def add(a, b):", "x", "import numpy as np; import os, sys  # past the block", "for i in range("]
    plan = [(0, 40), (1, 5), (3, 10), (5, 30)]  # the first and last slide past block_size (32)
    seqs = [DecodeSequence(byte_row(p), SamplingParams(n)) for p, (_, n) in zip(prompts, plan)]
    arrivals: dict[int, list[DecodeSequence]] = {}
    for s, (step, _) in zip(seqs, plan):
        arrivals.setdefault(step, []).append(s)
    _, sizes, counts = run_schedule(gpt, arrivals)
    for s, p, (_, n) in zip(seqs, prompts, plan):
        assert s.tokens == generate_text(gpt, byte_row(p)[None], n)[0].tolist()  # alone, no cache
    assert [s.joined_step for s in seqs] == [counts[step] for step, _ in plan] == [step for step, _ in plan]
    assert max(sizes) == 4  # at step 5 all four decode together


async def _collect(loop: DecodeLoop, seq: DecodeSequence, out: list, started: asyncio.Event | None = None, after: int = 0):
    async for batch in loop.token_batches(seq, "generate", 0.0):
        out.extend(batch)
        if started is not None and len(out) >= after:
            started.set()


def test_decode_loop_admits_requests_arriving_mid_decode_at_the_next_step(llama):
    pred, model = llama
    loop = DecodeLoop(pred, None, lambda: 8)
    first = DecodeSequence(np.asarray(pred.tokenize(LLAMA_PROMPTS[0])), SamplingParams(24))
    late = [DecodeSequence(np.asarray(pred.tokenize(p)), SamplingParams(n)) for p, n in ((LLAMA_PROMPTS[2], 6), (LLAMA_PROMPTS[3], 8))]
    outs: list[list[int]] = [[], [], []]
    steps_at: dict[str, int] = {}

    async def scenario():
        started = asyncio.Event()
        running = asyncio.create_task(_collect(loop, first, outs[0], started, after=3))
        await started.wait()  # the first request is decoding: 3 tokens out
        steps_at["submit"] = loop._batch.steps
        await asyncio.gather(*(_collect(loop, s, o) for s, o in zip(late, outs[1:])))
        steps_at["late_done"] = loop._batch.steps
        assert not first.done  # the late ones finished while the first still decoded
        await running

    asyncio.run(scenario())
    assert outs[0] == first.tokens == llama_alone(model, pred, LLAMA_PROMPTS[0], 24)
    for s, o, (p, n) in zip(late, outs[1:], ((LLAMA_PROMPTS[2], 6), (LLAMA_PROMPTS[3], 8))):
        assert o == s.tokens == llama_alone(model, pred, p, n)
        # joined at the step after the one running when they arrived, not after the first finished
        assert steps_at["submit"] <= s.joined_step <= steps_at["submit"] + 1
    assert steps_at["late_done"] < first.joined_step + len(first.tokens)
    assert loop.stats.joined_running == 2 and loop.stats.snapshot()["max_step_size"] == 3
    assert loop._task is None and loop.running == 0  # the loop ended with its last sequence


def test_decode_loop_caps_the_batch_and_admits_a_waiting_request_when_a_row_leaves(llama):
    pred, model = llama
    loop = DecodeLoop(pred, None, lambda: 2)
    plan = [(LLAMA_PROMPTS[0], 20), (LLAMA_PROMPTS[1], 4), (LLAMA_PROMPTS[3], 6)]
    seqs = [DecodeSequence(np.asarray(pred.tokenize(p)), SamplingParams(n)) for p, n in plan]
    outs: list[list[int]] = [[], [], []]

    async def scenario():
        await asyncio.gather(*(_collect(loop, s, o) for s, o in zip(seqs, outs)))

    asyncio.run(scenario())
    assert max(loop.stats.steps) == 2  # never more than max_batch_size sequences in a step
    assert [s.joined_step for s in seqs[:2]] == [0, 0]
    assert seqs[2].joined_step == len(seqs[1].tokens)  # the step right after the short one's last
    for s, o, (p, n) in zip(seqs, outs, plan):
        assert o == s.tokens == llama_alone(model, pred, p, n)


def test_a_closed_stream_leaves_the_batch_at_the_next_step(gpt):
    loop = DecodeLoop(gpt, None, lambda: 8)
    stay = DecodeSequence(byte_row("def f(x):"), SamplingParams(30))
    leave = DecodeSequence(byte_row("import os"), SamplingParams(30))

    async def scenario():
        keep: list[int] = []
        task = asyncio.create_task(_collect(loop, stay, keep))
        gen = loop.token_batches(leave, "generate_stream", 0.0)  # interval 0: one token per list here
        got = [t for _ in range(3) for t in await gen.__anext__()]
        await gen.aclose()  # the client went away
        left_at = loop._batch.steps
        await task
        return got, left_at

    got, left_at = asyncio.run(scenario())
    assert leave.cancelled and not leave.done and got == leave.tokens[:3]
    assert len(leave.tokens) <= left_at + 1 < 30  # it stopped decoding right away
    assert stay.tokens == generate_text(gpt, byte_row("def f(x):")[None], 30)[0].tolist()
    assert loop._task is None and len(loop._batch) == 0 and not loop._requests  # ended with nothing held

    again = DecodeSequence(byte_row("x = 1"), SamplingParams(5))  # the same loop starts again for a new request
    out: list[int] = []
    asyncio.run(_collect(loop, again, out))
    assert out == generate_text(gpt, byte_row("x = 1")[None], 5)[0].tolist()


def test_streamed_tokens_come_in_lists_the_first_alone_and_the_end_is_not_held_by_the_interval(gpt):
    """`token_batches`: the first token in a list of its own; with a 600 s interval every later
    token waits for the next list, which the sequence's end sends at once (a reader that slept
    out the interval would hit the 120 s guard); with interval 0 each list holds one token."""
    loop = DecodeLoop(gpt, None, lambda: 8)

    async def lists(seq, interval_s):
        return [b async for b in loop.token_batches(seq, "generate_stream", 0.0, interval_s)]

    slow = DecodeSequence(byte_row("def f(x):"), SamplingParams(20))
    batches = asyncio.run(asyncio.wait_for(lists(slow, 600.0), 120))
    assert len(slow.tokens) == 20 and batches == [slow.tokens[:1], slow.tokens[1:]]
    assert slow.tokens == generate_text(gpt, byte_row("def f(x):")[None], 20)[0].tolist()

    each = DecodeSequence(byte_row("def f(x):"), SamplingParams(20))
    assert asyncio.run(lists(each, 0.0)) == [[t] for t in slow.tokens]
