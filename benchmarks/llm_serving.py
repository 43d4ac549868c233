"""LLM serving through the OpenAI route: concurrency 1 vs 32, and a plain `transformers` generate loop as the anchor.

A Llama-architecture causal LM (random weights, fixed seed; default 4 layers, 256 wide, the word
tokenizer of configs/examples/tiny-chat-llama) is registered as it is and served by one replica
(1 logical CPU, torch at 1 thread), through Serve's proxy (the default) and again with
`serve.direct_ingress` + `serve.single_hop` (`--modes`), each on an embedded Ray of its own.
Streaming `POST /v1/completions` requests, `max_tokens` new tokens each, temperature 0, sent by
closed-loop clients at concurrency 1 and then 32:
- output tokens/s (completion tokens from `usage`, over the wall time of the load point);
- time to first token (first streamed text chunk), p50 and p99.
Anchor, same prompts, same model weights, one thread: `model.generate` one prompt at a time,
greedy, `max_new_tokens` the same (what a user would write without a server).
Goals: tokens/s at 32 >= 8x tokens/s at 1; Temper at 32 >= 5x the generate loop.

    .venv/bin/python benchmarks/llm_serving.py [--requests 96] [--max-tokens 32] [--stream-interval S] [--modes proxy,direct-single-hop] [--quick]

`--stream-interval` sets the served model's `stream_interval_s` (how long a stream's tokens are
gathered into one message after its first): the JSON records the value used.

`--quick` (a smoke run): a 2-layer 64-wide model, 8 tokens, 8 requests per load point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "configs" / "examples" / "tiny-chat-llama"
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish"]


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER, local_files_only=True)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                      num_attention_heads=max(hidden // 64, 2), num_key_value_heads=max(hidden // 64, 2),
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    # no end-of-sequence in the generation config: every request generates exactly max_tokens
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def prompts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=6)) for _ in range(n)]


async def load_point(url: str, model: str, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Closed loop: `concurrency` clients send the texts in turn, streaming; tokens/s and TTFT."""
    import httpx

    queue = list(texts)
    ttft, tokens, codes = [], 0, []

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            text = queue.pop()
            t0 = time.perf_counter()
            first = None
            body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                codes.append(resp.status_code)
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            if first is not None:
                ttft.append(first * 1000)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(texts), "status_codes": sorted(set(codes)), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": float(np.percentile(ttft, 50)) if ttft else None,
            "ttft_p99_ms": float(np.percentile(ttft, 99)) if ttft else None}


def generate_loop(folder: Path, texts: list[str], max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
    tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", return_token_type_ids=False)
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - t0
    return {"requests": len(texts), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


MODES = {"proxy": (False, False, ""),
         "direct-single-hop": (True, True, ", serve.direct_ingress + serve.single_hop")}
"""Served modes measured, side by side, as (direct_ingress, single_hop, goal label): Serve's proxy
(the default), and the ingress replica's own port with the model inside the ingress replica."""


def served_points(folder: Path, tmp: Path, texts: list[str], args, mode: str) -> dict:
    """The model registered as it is and served by Temper on an embedded local Ray (one replica,
    1 CPU) in `mode` (a key of MODES), then the two load points; Ray is shut down after."""
    import ray

    from actors.registry.client import get_or_create_registry
    from app.config.jobs import ServeApp, TrainJob
    from app.config.registry import RegistryConfig
    from app.config.serve import ServeConfig, ServedModel
    from app.runtime import direct_ingress_env, environment
    from pipelines.register import train_and_register
    from serve.deploy import deploy, shutdown

    direct_ingress, single_hop, _ = MODES[mode]
    with environment(direct_ingress_env() if direct_ingress else {}):
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    reg_cfg = RegistryConfig(actor_name=f"bench-{uuid.uuid4().hex[:6]}", namespace="temper-bench",
                             db_url=f"sqlite:///{tmp / f'registry-{mode}.db'}")
    registry = get_or_create_registry(reg_cfg)
    job = TrainJob.model_validate({
        "name": "bench-llama", "storage_path": str(tmp / f"runs-{mode}"), "registry": reg_cfg.model_dump(),
        "model": {"kind": "hf", "path": str(folder), "task": "causal_lm"},
        "data": {"kind": "text", "path": str(ROOT / "configs" / "examples" / "swap-words.jsonl"), "max_length": 64},
        "train": {"steps": 0}})
    train_and_register(job, registry)
    port = 8000 + os.getpid() % 1000
    app = ServeApp(registry=reg_cfg, serve=ServeConfig(
        app_name="bench-llm", port=port, direct_ingress=direct_ingress, single_hop=single_hop, models=[ServedModel(
            model="bench-llama", version="latest", max_batch_size=32, batch_wait_timeout_s=0.005,
            max_ongoing_requests=64, max_queued_requests=256, cpus_per_replica=1, max_new_tokens=max(args.max_tokens, 64),
            **({} if args.stream_interval is None else {"stream_interval_s": args.stream_interval}))]))
    points = {}
    try:
        url = deploy(app).rstrip("/")
        if direct_ingress and url.endswith(f":{port}"):
            raise RuntimeError(f"direct ingress asked for, but deploy answered with the proxy's URL {url}")
        asyncio.run(load_point(url, "bench-llama", texts[:4], 2, args.max_tokens))  # warm-up
        for c in (1, 32):
            points[c] = p = asyncio.run(load_point(url, "bench-llama", texts, c, args.max_tokens))
            print(f"[{mode}] concurrency {c}: {p['tokens_per_s']:.1f} tokens/s, TTFT p50 {p['ttft_p50_ms']:.1f} ms "
                  f"p99 {p['ttft_p99_ms']:.1f} ms, status {p['status_codes']}", flush=True)
    finally:
        shutdown("bench-llm")
        ray.shutdown()  # the embedded Ray and Serve with it: the next mode starts a Ray of its own
    return {"direct_ingress": direct_ingress, "single_hop": single_hop,
            "stream_interval_s": app.serve.models[0].stream_interval_s, "points": {str(k): v for k, v in points.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=96, help="requests per load point")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--stream-interval", type=float, default=None, metavar="S",
                    help="serve.models[].stream_interval_s (default: the config's default)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"served modes to measure, of {', '.join(MODES)}")
    ap.add_argument("--quick", action="store_true", help="a tiny model, few tokens and requests")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.hidden, args.layers = 8, 8, 64, 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        ap.error(f"--modes: {args.modes!r}: each one of {', '.join(MODES)}")

    tmp = Path(tempfile.mkdtemp(prefix="temper-bench-llm-"))
    folder = make_model(tmp / "llama", args.hidden, args.layers)
    texts = prompts(args.requests)
    load_before = os.getloadavg()
    anchor = generate_loop(folder, texts, args.max_tokens)
    print(f"anchor: transformers generate loop, one prompt at a time: {anchor['tokens_per_s']:.1f} tokens/s", flush=True)
    served = {mode: served_points(folder, tmp, texts, args, mode) for mode in modes}

    goals = []
    for mode, out in served.items():
        points = out["points"]
        label = MODES[mode][2]
        batch_gain = points["32"]["tokens_per_s"] / points["1"]["tokens_per_s"]
        vs_anchor = points["32"]["tokens_per_s"] / anchor["tokens_per_s"]
        out.update(batch_gain=batch_gain, vs_anchor=vs_anchor)
        goals += [
            {"goal": f"output tokens/s at concurrency 32 >= 8x at 1 (OpenAI route, streaming{label})",
             "figure": f"{batch_gain:.2f}x", "met": batch_gain >= 8},
            {"goal": f"tokens/s at concurrency 32 >= 5x a transformers generate loop{label}",
             "figure": f"{vs_anchor:.2f}x ({points['32']['tokens_per_s']:.0f} vs {anchor['tokens_per_s']:.0f} tokens/s)",
             "met": vs_anchor >= 5},
        ]
    for g in goals:
        print(f"goal: {g['goal']}: {g['figure']} -> {'met' if g['met'] else 'NOT met'}")
    first = served[modes[0]]
    path = args.results_dir / "llm_serving.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "benchmark": "llm_serving", "quick": args.quick,
        "model": {"kind": "llama", "hidden": args.hidden, "layers": args.layers, "max_tokens": args.max_tokens},
        "stream_interval_s": first["stream_interval_s"], "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "anchor": anchor, "points": first["points"], "served": served, "goals": goals,
    }, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
