"""Several LoRA adapters on one loaded causal LM, without Ray: rows of one batch generated with
different adapters (and the base) equal each adapter's merged model decoded by transformers;
adapters load on first use and the least recently used unpinned one is evicted; pickled adapter
weights are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.artifacts import save_fp32
from app.config.jobs import parse_config
from app.inference import SamplingParams, generate_tokens, load_predictor
from app.models import build_model
from app.models.adapters import AdapterError, AdapterSet, check_adapter_folder
from hf_folders import greedy_ids, lora_adapter, merged_lora_model, sentiment_rows, tiny_llama

PROMPTS = ["the cat sat on", "a big dog", "red house", "the small tree ran fast"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    folder = tiny_llama(root / "llama", initializer_range=0.5)
    lines = root / "lines.txt"
    lines.write_text("".join(r["text"] + "\n" for r in sentiment_rows(20)))
    job = parse_config("train", {"name": "lm", "model": {"kind": "hf", "path": str(folder), "task": "causal_lm"},
                                 "data": {"kind": "text", "path": str(lines), "max_length": 32, "val_fraction": 0.3}})
    torch.manual_seed(0)
    artifact = str(save_fp32(root / "artifact", build_model(job.model), job))
    adapters = {f"a{i}": str(lora_adapter(folder, root / f"a{i}", seed=i)) for i in (1, 2, 3)}
    return {"folder": folder, "artifact": artifact, "adapters": adapters}


def test_mixed_adapter_batch_equals_each_merged_model(lm):
    pred = load_predictor(lm["artifact"])
    adapters = AdapterSet(pred._torch_model, lm["adapters"], max_loaded=4)
    names = [None, "a1", "a2", "a1"]
    for n in {"a1", "a2"}:
        adapters.acquire(n)
    rows = [np.asarray(pred.tokenize(p)) for p in PROMPTS]
    got = generate_tokens(pred, rows, [SamplingParams(MAX_NEW)] * len(rows), adapters=names)
    base_alone = generate_tokens(pred, rows, [SamplingParams(MAX_NEW)] * len(rows))  # no adapter rows: the base exactly

    from transformers import AutoModelForCausalLM

    reference = {None: AutoModelForCausalLM.from_pretrained(lm["folder"], local_files_only=True).eval(),
                 "a1": merged_lora_model(lm["folder"], lm["adapters"]["a1"]),
                 "a2": merged_lora_model(lm["folder"], lm["adapters"]["a2"])}
    want = [greedy_ids(reference[n], [int(t) for t in r], MAX_NEW) for n, r in zip(names, rows)]
    assert got == want
    assert base_alone == [greedy_ids(reference[None], [int(t) for t in r], MAX_NEW) for r in rows]
    # the adapters change the answers: each differs from the base and from the other
    same_prompt = [greedy_ids(reference[n], [int(t) for t in rows[1]], MAX_NEW) for n in (None, "a1", "a2")]
    assert len({tuple(x) for x in same_prompt}) == 3


def test_adapters_load_on_first_use_and_the_least_recently_used_is_evicted(lm):
    pred = load_predictor(lm["artifact"])
    adapters = AdapterSet(pred._torch_model, lm["adapters"], max_loaded=2)
    assert adapters.snapshot()["loaded"] == []
    for name in ("a1", "a2"):
        adapters.acquire(name)
        adapters.release(name)
    adapters.acquire("a1")  # a1 is now the most recently used (and pinned)
    adapters.acquire("a3")
    adapters.release("a3")
    snap = adapters.snapshot()
    assert (snap["loaded"], snap["loads"], snap["evictions"]) == (["a1", "a3"], 3, 1)
    adapters.acquire("a2")  # a1 pinned: a3 goes
    assert adapters.snapshot()["loaded"] == ["a1", "a2"] and adapters.stats.evictions == 2
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        adapters.acquire("nope")


def test_pickled_adapter_weights_are_refused(lm, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="adapter 'x'.*pickled weights are refused"):
        check_adapter_folder(folder, "x")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        check_adapter_folder(tmp_path, "y")


def test_adapter_rows_joining_a_running_batch_equal_each_merged_model_and_are_unpinned_after(lm):
    """Continuous batching with LoRA: a base row decodes, rows of two adapters join it at later
    steps (serve's decode loop); each row still makes its own merged model's greedy tokens, and
    once they are done no adapter stays pinned."""
    import asyncio

    from app.decode_batch import DecodeSequence
    from serve.decode_loop import DecodeLoop

    pred = load_predictor(lm["artifact"])
    adapters = AdapterSet(pred._torch_model, lm["adapters"], max_loaded=4)
    rows = [np.asarray(pred.tokenize(p)) for p in PROMPTS[:3]]
    names = [None, "a1", "a2"]
    seqs = [DecodeSequence(r, SamplingParams(MAX_NEW), n) for r, n in zip(rows, names)]
    loop = DecodeLoop(pred, adapters, lambda: 8)

    async def scenario():
        outs = [[], [], []]

        async def collect(i, delay_tokens):
            if delay_tokens:  # join once the base row has made this many tokens
                while len(seqs[0].tokens) < delay_tokens:
                    await asyncio.sleep(0.001)
            async for batch in loop.token_batches(seqs[i], "generate", 0.0):
                outs[i].extend(batch)

        await asyncio.gather(collect(0, 0), collect(1, 1), collect(2, 2))
        return outs

    outs = asyncio.run(scenario())
    from transformers import AutoModelForCausalLM

    reference = {None: AutoModelForCausalLM.from_pretrained(lm["folder"], local_files_only=True).eval(),
                 "a1": merged_lora_model(lm["folder"], lm["adapters"]["a1"]),
                 "a2": merged_lora_model(lm["folder"], lm["adapters"]["a2"])}
    assert outs == [greedy_ids(reference[n], [int(t) for t in r], MAX_NEW) for n, r in zip(names, rows)]
    assert [s.joined_step for s in seqs][0] == 0 and 0 < seqs[1].joined_step <= seqs[2].joined_step < MAX_NEW
    assert adapters.pins == {} and set(adapters.loaded) == {"a1", "a2"}
    assert loop._task is None and len(loop._batch) == 0
