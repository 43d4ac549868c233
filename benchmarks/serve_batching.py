"""Dynamic batching on Ray Serve, on (max_batch_size 32) vs off (max_batch_size 1), side by side.

    .venv/bin/python benchmarks/serve_batching.py [--duration-s 10] [--max-new-tokens 64] [--skip-digits] [--quick]

`--quick` (a smoke run): the lm model only, concurrency 1 and 32, 2 s per load point, 8 new
tokens per request, 10 calls per latency median.

What it measures, on this machine, with an embedded local Ray:
- the built-in models with the architectures of `configs/lm-code.yaml` (byte GPT, 4 layers,
  d=128, 0.9M parameters; `generate`, greedy, `--max-new-tokens` new bytes per request, KV cache)
  and `configs/quickstart.yaml` (digits ViT; `predict`, one image per request). Weights are
  freshly initialised with a fixed seed: speed does not depend on what the weights learned, and
  nothing is trained or downloaded;
- one replica per model (1 logical CPU, torch at 1 thread), the real HTTP path (Serve proxy ->
  ingress -> handle -> replica);
- a bounded closed-loop load from a separate process (`serve.loadgen`) at concurrency 1, 8, 32:
  throughput and client-side p50/p95/p99, batching off then on (switched live by `reconfigure`);
- the overhead of that path at batch 1: p50 over HTTP at concurrency 1 minus the p50 of the same
  call in-process (`generate_tokens` / `classify` on the same predictor, one thread), and how much
  of it is Serve's own floor for a path of that shape (deployments that return at once: proxy ->
  FastAPI ingress -> handle -> replica) rather than Temper's code.

It prints the tables, the ratios and the machine's load average before and after (other jobs on
a shared machine disturb the numbers), and writes `benchmarks/results/serve_batching.json`.
Goals (issue 7): >= 4x throughput at concurrency 32 with batching, <= 3 ms p50 overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONCURRENCY = (1, 8, 32)


def _config_model(path: str):
    import yaml

    from app.config.jobs import OptimizeJob

    job = OptimizeJob.model_validate(yaml.safe_load((ROOT / path).read_text()))
    return job



def _median_call_ms(call, iters: int) -> float:
    """Median wall time of `call(i)` over `iters` calls, after 5 warm-up calls."""
    import numpy as np

    for i in range(5):
        call(i)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))

def in_process_p50_ms(pred, endpoint: str, max_new_tokens: int, iters: int = 40) -> float:
    """Median of the same single call the HTTP path makes, done in this process."""
    import numpy as np

    from app.inference import SamplingParams, classify, generate_tokens
    from serve.loadgen import PROMPTS, payloads

    if endpoint == "generate":
        rows = [np.frombuffer(p.encode(), dtype=np.uint8).astype(np.int64) for p in PROMPTS]

        def call(i):
            generate_tokens(pred, [rows[i % len(rows)]], [SamplingParams(max_new_tokens)])
    else:
        images = [np.asarray(b["inputs"], dtype=np.float32).reshape(1, 1, 8, 8) for b in payloads("predict", 0)]

        def call(i):
            classify(pred, images[i % len(images)], 1)

    return _median_call_ms(call, iters)


def handle_p50_ms(model: str, endpoint: str, max_new_tokens: int, iters: int = 40) -> float:
    """Median of one call through the model's DeploymentHandle (in-cluster callers: no HTTP, no ingress)."""
    from serve.client import HandleClient
    from serve.loadgen import PROMPTS, payloads

    client = HandleClient("bench", model, timeout_s=60.0)
    bodies = payloads(endpoint, max_new_tokens)

    def call(i):
        if endpoint == "generate":
            client.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens)
        else:
            client.predict(bodies[i % len(bodies)]["inputs"], 1)

    return _median_call_ms(call, iters)


def serve_floor_p50_ms(port: int, iters: int = 60) -> dict:
    """Ray Serve's own cost on this machine, with deployments that return at once: over HTTP with
    one hop (proxy -> replica), over HTTP with two hops (proxy -> FastAPI ingress -> DeploymentHandle
    -> replica: the shape of Temper's path, without any of its code), and through a DeploymentHandle."""
    import httpx
    import numpy as np
    from fastapi import FastAPI
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Echo:
        async def __call__(self, request) -> str:
            return "ok"

        async def ping(self, body: dict | None = None) -> dict:
            return {"ok": 1}

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(api)
    class Front:
        def __init__(self, echo):
            self.echo = echo

        @api.post("/")
        async def forward(self, body: dict) -> dict:
            return await self.echo.ping.remote(body)

    handle = serve.run(Echo.bind(), name="bench-echo", route_prefix="/bench-echo")
    serve.run(Front.bind(Echo.bind()), name="bench-front", route_prefix="/bench-front")
    body = {"inputs": [[0.5] * 64], "top_k": 1}

    def median(call) -> float:
        for _ in range(5):
            call()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1000)
        return round(float(np.median(times)), 3)

    with httpx.Client() as http:
        out = {"http_p50_ms": median(lambda: http.get(f"http://127.0.0.1:{port}/bench-echo")),
               "http_two_hops_p50_ms": median(lambda: http.post(f"http://127.0.0.1:{port}/bench-front/", json=body)),
               "handle_p50_ms": median(lambda: handle.ping.remote().result())}
    serve.delete("bench-front")
    serve.delete("bench-echo")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=10.0, help="seconds per load point at most")
    ap.add_argument("--requests", type=int, default=3000, help="answers per load point at most")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="new bytes per generate request")
    ap.add_argument("--skip-digits", action="store_true", help="only the lm model")
    ap.add_argument("--quick", action="store_true", help="lm only, concurrency 1 and 32, short load points")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    concurrency, iters = CONCURRENCY, 40
    if args.quick:
        args.skip_digits, args.duration_s, args.requests, args.max_new_tokens = True, 2.0, 200, 8
        concurrency, iters = (1, 32), 10

    import ray
    import torch
    from ray import serve

    from actors.registry.client import get_or_create_registry
    from app.artifacts import save_fp32
    from app.config.registry import RegistryConfig
    from app.config.jobs import ServeApp, TrainJob
    from app.config.serve import ServeConfig, ServedModel
    from app.inference import load_predictor
    from app.models import build_model
    from serve.deploy import build_app, deploy, shutdown
    from serve.client import HandleClient
    from serve.loadgen import run_subprocess

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="temper-bench-serve-"))
    models = {"lm": ("configs/lm-code.yaml", "generate")}
    if not args.skip_digits:
        models["digits"] = ("configs/quickstart.yaml", "predict")

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    reg_cfg = RegistryConfig(actor_name=f"bench-{uuid.uuid4().hex[:6]}", namespace="temper-bench",
                             db_url=f"sqlite:///{tmp / 'registry.db'}")
    registry = get_or_create_registry(reg_cfg)
    preds, params = {}, {}
    for name, (config, _) in models.items():
        job = _config_model(config)
        torch.manual_seed(0)
        model = build_model(job.model)
        params[name] = sum(p.numel() for p in model.parameters())
        path = str(save_fp32(tmp / name, model, TrainJob.model_validate(job.train_job().model_dump())))
        ray.get(registry.register_version.remote(name, path, "torch_fp32"))
        preds[name] = load_predictor(path)

    def served(name: str, batch: int) -> ServedModel:
        return ServedModel(model=name, version="latest", max_batch_size=batch, batch_wait_timeout_s=0.005,
                           max_ongoing_requests=64, max_queued_requests=256, cpus_per_replica=1,
                           max_new_tokens=max(args.max_new_tokens, 64))

    def app(batch: int) -> ServeApp:
        return ServeApp(registry=reg_cfg, serve=ServeConfig(app_name="bench", port=8000 + os.getpid() % 1000,
                                                            models=[served(n, batch) for n in models]))

    results: dict = {"machine": {"cpus": os.cpu_count(), "load_avg_before": load_before}, "models": {}}
    url = deploy(app(1))
    try:
        results["serve_floor"] = serve_floor_p50_ms(app(1).serve.port, iters=iters + 20)
        for name, (_, endpoint) in models.items():
            out = results["models"][name] = {"endpoint": endpoint, "params": params[name], "runs": {}}
            out["in_process_p50_ms"] = round(in_process_p50_ms(preds[name], endpoint, args.max_new_tokens, iters), 3)
            out["handle_p50_ms"] = round(handle_p50_ms(name, endpoint, args.max_new_tokens, iters), 3)
            for mode, batch in (("off", 1), ("on", 32)):
                serve.run(build_app(app(batch)), name="bench", route_prefix="/")  # live reconfigure, no restart
                replica = HandleClient("bench", name)
                for c in concurrency:
                    before = replica.stats()["batch_size_counts"]
                    r = run_subprocess(url, name, endpoint, c, args.requests, args.duration_s, args.max_new_tokens,
                                       warmup=min(2 * c, 32))
                    after = replica.stats()["batch_size_counts"]
                    added = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                    r["mean_batch_size"] = round(sum(k * n for k, n in added.items()) / max(1, sum(added.values())), 2)
                    out["runs"][f"{mode}_c{c}"] = r
                    lat = r["latency_ms"]
                    print(f"[bench] {name:6s} batching {mode:3s} c={c:<3d} {r['throughput_rps']:8.1f} req/s  "
                          f"p50 {lat['p50']:7.1f}  p95 {lat['p95']:7.1f}  p99 {lat['p99']:7.1f} ms  "
                          f"mean batch {r['mean_batch_size']:5.1f}  ({r['ok']}/{r['sent']} ok)  load {os.getloadavg()[0]:.1f}",
                          flush=True)
    finally:
        shutdown("bench")
        serve.shutdown()
        ray.shutdown()
    results["machine"]["load_avg_after"] = os.getloadavg()

    print()
    for name, out in results["models"].items():
        runs = out["runs"]
        print(f"{name} ({out['endpoint']}, {out['params'] / 1e6:.2f}M params"
              + (f", {args.max_new_tokens} new tokens/request" if out["endpoint"] == "generate" else ", 1 image/request") + ")")
        print("| concurrency | batching off req/s | on req/s | on/off | off p50/p95/p99 ms | on p50/p95/p99 ms | on: mean batch |")
        print("|---|---|---|---|---|---|---|")
        for c in concurrency:
            off, on = runs[f"off_c{c}"], runs[f"on_c{c}"]
            ratio = on["throughput_rps"] / off["throughput_rps"] if off["throughput_rps"] else float("nan")
            out[f"speedup_c{c}"] = round(ratio, 2)
            fmt = lambda r: "/".join(f"{r['latency_ms'][k]:.1f}" for k in ("p50", "p95", "p99"))  # noqa: E731
            print(f"| {c} | {off['throughput_rps']:.1f} | {on['throughput_rps']:.1f} | {ratio:.2f}x | {fmt(off)} | {fmt(on)} "
                  f"| {on['mean_batch_size']:.1f} |")
        floor = results["serve_floor"]
        overhead = runs["on_c1"]["latency_ms"]["p50"] - out["in_process_p50_ms"]
        out["overhead_p50_ms"] = round(overhead, 2)
        out["handle_overhead_p50_ms"] = round(out["handle_p50_ms"] - out["in_process_p50_ms"], 2)
        # What is left once Serve's own cost for the same shape of path is taken off: Temper's code,
        # plus the model computing in a replica process instead of this one (scheduling on a busy machine).
        out["ours_beyond_serve_floor_http_ms"] = round(overhead - floor["http_two_hops_p50_ms"], 2)
        out["ours_beyond_serve_floor_handle_ms"] = round(out["handle_overhead_p50_ms"] - floor["handle_p50_ms"], 2)
        print(f"overhead at batch 1: HTTP p50 {runs['on_c1']['latency_ms']['p50']:.2f} ms - in-process p50 "
              f"{out['in_process_p50_ms']:.2f} ms = {overhead:.2f} ms; through a DeploymentHandle (no HTTP): "
              f"{out['handle_p50_ms']:.2f} ms, +{out['handle_overhead_p50_ms']:.2f} ms")
        print(f"  beyond Serve's own floor for the same path (Temper's code + the replica process): HTTP "
              f"{out['ours_beyond_serve_floor_http_ms']:+.2f} ms, handle {out['ours_beyond_serve_floor_handle_ms']:+.2f} ms\n")
    floor = results["serve_floor"]
    print(f"Ray Serve's floor here (deployments that return at once): HTTP p50 {floor['http_p50_ms']:.2f} ms "
          f"(one hop), {floor['http_two_hops_p50_ms']:.2f} ms (two hops: FastAPI ingress -> handle -> replica), "
          f"DeploymentHandle p50 {floor['handle_p50_ms']:.2f} ms")
    lm = results["models"]["lm"]
    print(f"goals: lm throughput at c=32 with batching {lm['speedup_c32']:.2f}x (goal >= 4x): "
          f"{'met' if lm['speedup_c32'] >= 4 else 'NOT met'}; p50 overhead {lm['overhead_p50_ms']:.2f} ms "
          f"(goal <= 3 ms): {'met' if lm['overhead_p50_ms'] <= 3 else 'NOT met'}")
    print(f"machine: {os.cpu_count()} CPUs, load average before {load_before[0]:.2f}, after "
          f"{results['machine']['load_avg_after'][0]:.2f} (1 min)")
    results.update(benchmark="serve_batching", quick=args.quick, goals=[
        {"goal": "lm generate: throughput at concurrency 32 with batching >= 4x without", "figure": f"{lm['speedup_c32']:.2f}x",
         "met": lm["speedup_c32"] >= 4},
        {"goal": "lm generate: HTTP p50 overhead over an in-process call <= 3 ms", "figure": f"{lm['overhead_p50_ms']:.2f} ms",
         "met": lm["overhead_p50_ms"] <= 3},
    ])
    out_path = args.results_dir / "serve_batching.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
