"""A bounded closed-loop load generator for a Temper Serve app, meant to run in its own process.

    python -m serve.loadgen --url http://127.0.0.1:8000 --model lm-code --endpoint generate \
        --concurrency 32 --requests 800 --duration-s 20 --max-new-tokens 16

`concurrency` workers each send one request, wait for its answer, and send the next, until
`requests` answers are in or `duration_s` has passed, whichever comes first (then in-flight
requests finish and it stops). It prints one JSON line: counts by status, throughput, latency
percentiles (client-side, so they include HTTP and the client's own overhead), tokens/s for
generation. Only loopback addresses are accepted unless `--allow-remote` is given: a load
generator should not surprise anyone else's server.

Imports stay light (no torch, no ray): the process measures, it does not compete for CPU more
than sending requests needs.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from collections import Counter
from urllib.parse import urlparse

import httpx
import numpy as np

API_PREFIX = "/api/v1"
PROMPTS = [
    "def __init__(self, name):\n        self.",
    "import os\nimport sys\n\ndef main(",
    "for i in range(len(items)):\n    ",
    "class Config:\n    def get(self, key",
    "    return sorted(",
    "if __name__ == '__main__':\n    ",
    "with open(path) as f:\n        data = ",
    "try:\n    import numpy as np\nexcept ",
]
"""Fixed prompts of different lengths (generation batches mix them: left padding at work)."""
SENTENCES = [
    "How do I reset my password?",
    "The quarterly report shows revenue grew by twelve percent while costs stayed flat.",
    "Best hiking trails near the lake with a view of the mountains",
    "A sentence embedding maps a text to a vector so that similar meanings land close together.",
    "Where is the nearest train station?",
    "Customers who bought this item also looked at the waterproof version, which ships in two days "
    "and comes with a one-year warranty.",
    "error: connection refused when the client retries after a timeout",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
]
"""Fixed search-style texts of different lengths for `embed` (one text per request)."""


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def payloads(endpoint: str, max_new_tokens: int, n: int = 64) -> list[dict]:
    """Request bodies cycled through by the workers."""
    if endpoint == "predict":
        from sklearn.datasets import load_digits

        images = load_digits().images[:n] / 16.0  # (n, 8, 8) in [0, 1], as the digits model was trained
        return [{"inputs": [img.reshape(-1).tolist()], "top_k": 1} for img in images]
    if endpoint == "generate":
        return [{"prompt": p, "max_new_tokens": max_new_tokens} for p in PROMPTS]
    if endpoint == "embed":
        return [{"texts": [t]} for t in SENTENCES]
    if endpoint == "score":
        return [{"texts": [p], "top_k": 1} for p in PROMPTS]
    raise ValueError(f"unknown endpoint {endpoint!r}")


async def run_load(url: str, model: str, endpoint: str, concurrency: int, requests: int, duration_s: float,
                   max_new_tokens: int = 16, warmup: int = 0, timeout_s: float = 60.0) -> dict:
    bodies = payloads(endpoint, max_new_tokens)
    path = f"{url.rstrip('/')}{API_PREFIX}/models/{model}/{endpoint}"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        # Warmup (not recorded): connections opened, replicas' first calls done.
        await asyncio.gather(*(http.post(path, json=bodies[i % len(bodies)]) for i in range(warmup)))
        statuses: Counter[int] = Counter()
        latencies: list[float] = []
        tokens = 0
        started = 0
        t0 = time.perf_counter()
        stop_at = t0 + duration_s

        async def worker(w: int) -> None:
            nonlocal started, tokens
            while started < requests and time.perf_counter() < stop_at:
                body = bodies[(started + w) % len(bodies)]
                started += 1
                t = time.perf_counter()
                try:
                    resp = await http.post(path, json=body)
                    status = resp.status_code
                except httpx.HTTPError:
                    status = 0  # no answer (connection refused / reset / timeout)
                statuses[status] += 1
                if status == 200:
                    latencies.append((time.perf_counter() - t) * 1000)
                    if endpoint == "generate":
                        tokens += len(resp.json()["tokens"])

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    ok = statuses.get(200, 0)
    return {
        "model": model, "endpoint": endpoint, "concurrency": concurrency, "sent": sum(statuses.values()), "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())}, "duration_s": round(elapsed, 3),
        "throughput_rps": round(ok / elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1) if endpoint == "generate" else None,
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2), "p95": round(float(np.percentile(lat, 95)), 2),
                       "p99": round(float(np.percentile(lat, 99)), 2), "mean": round(float(lat.mean()), 2)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="base URL of the app (endpoints under <url>/api/v1/)")
    p.add_argument("--model", required=True)
    p.add_argument("--endpoint", choices=["predict", "generate", "score", "embed"], required=True)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=500, help="stop after this many answers")
    p.add_argument("--duration-s", type=float, default=10.0, help="... or after this many seconds")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--warmup", type=int, default=0, help="requests sent (and not measured) first")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback URL")
    args = p.parse_args(argv)
    if not args.allow_remote and not is_loopback(args.url):
        print(f"loadgen: {args.url} is not a loopback address (pass --allow-remote to load another host)", file=sys.stderr)
        return 2
    if not 1 <= args.concurrency <= 1024 or args.requests < 1 or args.duration_s <= 0:
        print("loadgen: need 1 <= concurrency <= 1024, requests >= 1, duration-s > 0", file=sys.stderr)
        return 2
    result = asyncio.run(run_load(args.url, args.model, args.endpoint, args.concurrency, args.requests,
                                  args.duration_s, args.max_new_tokens, args.warmup))
    print(json.dumps(result))
    return 0


def run_subprocess(url: str, model: str, endpoint: str, concurrency: int, requests: int, duration_s: float,
                   max_new_tokens: int = 16, warmup: int = 0) -> dict:
    """Run the load generator in its own process (so it does not share the caller's GIL) and
    return its result."""
    import subprocess

    cmd = [sys.executable, "-m", "serve.loadgen", "--url", url, "--model", model, "--endpoint", endpoint,
           "--concurrency", str(concurrency), "--requests", str(requests), "--duration-s", str(duration_s),
           "--max-new-tokens", str(max_new_tokens), "--warmup", str(warmup)]
    from pathlib import Path

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 120,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
