"""The `lm-code` run end to end through the real CLI (a byte-level GPT trained on the Python
standard library's own source, quantized, served), made small by overrides, then `generate` and
`score` through the Python client against the version the run put in production."""

from __future__ import annotations

import math

import pytest

from .conftest import summary_of

pytestmark = pytest.mark.e2e


def test_lm_code_run_then_generate_through_the_client(workspace):
    from serve.client import TemperClient

    ws = workspace
    proc = ws.cli(
        # small: bf16 autocast gives no speedup on CPU at this size, and 40 steps of 8 sequences suffice
        "run", "configs/lm-code.yaml", "data.max_bytes=400000", "model.block_size=64", "train.precision=fp32",
        "train.steps=40", "train.batch_size=8", "train.eval_every=20", "train.checkpoint_every=40", "train.log_every=20",
        "train.eval_batches=2", "compress.methods=[onnx_int8]", "compress.eval_batches=2",
        "compress.latency_iters=3", "serve.app_name=lm-code", "serve.route_prefix=/lm",
        "--keep-serving", "--json",
    )
    summary = summary_of(proc)
    served = next(v for v in summary["versions"] if v["version"] == summary["served_version"])
    assert summary["client_answer"]["endpoint"] == "generate" and summary["client_answer"]["completion"]
    base = f"{ws.url}/lm"
    try:
        with TemperClient(base, timeout=60.0) as client:
            first = client.generate("lm-code", "import ", max_new_tokens=16)
            again = client.generate("lm-code", "import ", max_new_tokens=16)
            assert (first.model, first.version, first.backend) == ("lm-code", served["version"], served["format"])
            assert len(first.tokens) == 16 and first.text == bytes(first.tokens).decode("utf-8", errors="replace")
            assert first.tokens == again.tokens  # greedy (temperature 0) is deterministic
            # An untrained byte model scores perplexity ~256 (uniform over bytes); 40 steps already
            # learn far more than that about Python source it has never seen in that order.
            scored = client.score("lm-code", ["def add(a, b):\n    return a + b\n"], top_k=3)
            ppl = scored.outputs[0]["perplexity"]
            assert math.isfinite(ppl) and ppl < 128, scored
    finally:
        ws.cli("serve", "shutdown", "configs/lm-code.yaml", "serve.app_name=lm-code", "serve.route_prefix=/lm")
