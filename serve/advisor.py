"""The batching advisor behind `python -m app serve advise CONFIG --slo-p99-ms X`.

For one served model it sweeps `max_batch_size` x `batch_wait_timeout_s`, applying each point
live (a redeploy that only changes `user_config`, so the replicas are reconfigured, not
restarted), drives a bounded load from a separate process (`serve.loadgen`) at a fixed
concurrency, and reports the point with the highest throughput whose p99 latency meets the
SLO (and that answered every request). The original settings are restored at the end.

Batch size 1 is swept once (its wait is irrelevant), and sizes above the model's
`max_ongoing_requests` are skipped: Serve would cap them silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from app.config.jobs import ServeApp
from app.config.serve import ServedModel

DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32)
DEFAULT_WAITS_MS = (1.0, 5.0, 10.0, 25.0)


@dataclass
class SweepPoint:
    max_batch_size: int
    batch_wait_timeout_s: float
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    ok: int
    failed: int
    tokens_per_s: float | None = None
    meets_slo: bool = False


@dataclass
class Advice:
    model: str
    endpoint: str
    slo_p99_ms: float
    concurrency: int
    points: list[SweepPoint] = field(default_factory=list)
    best: SweepPoint | None = None

    def table(self) -> str:
        head = f"{'batch':>5} {'wait_ms':>7} {'req/s':>8} {'tok/s':>8} {'p50_ms':>8} {'p95_ms':>8} {'p99_ms':>8} {'failed':>6}  slo"
        rows = [head, "-" * len(head)]
        for p in self.points:
            mark = "ok" if p.meets_slo else "-"
            if p is self.best:
                mark += "  <- best"
            tok = f"{p.tokens_per_s:8.0f}" if p.tokens_per_s is not None else f"{'-':>8}"
            rows.append(f"{p.max_batch_size:>5} {p.batch_wait_timeout_s * 1000:>7.1f} {p.throughput_rps:>8.1f} {tok} "
                        f"{p.p50_ms:>8.1f} {p.p95_ms:>8.1f} {p.p99_ms:>8.1f} {p.failed:>6}  {mark}")
        return "\n".join(rows)

    def summary(self) -> str:
        if self.best is None:
            fastest = min(self.points, key=lambda p: p.p99_ms) if self.points else None
            return (f"no configuration met p99 <= {self.slo_p99_ms:g} ms at concurrency {self.concurrency}"
                    + (f"; the lowest p99 was {fastest.p99_ms:.1f} ms (max_batch_size {fastest.max_batch_size}, "
                       f"batch_wait_timeout_s {fastest.batch_wait_timeout_s:g}): add replicas or relax the SLO"
                       if fastest else ""))
        b = self.best
        return (f"best within p99 <= {self.slo_p99_ms:g} ms at concurrency {self.concurrency}: "
                f"{b.throughput_rps:.1f} req/s with p99 {b.p99_ms:.1f} ms\n"
                f"serve.models[{self.model}]:\n  max_batch_size: {b.max_batch_size}\n"
                f"  batch_wait_timeout_s: {b.batch_wait_timeout_s:g}")

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k not in ("points", "best")},
                "points": [asdict(p) for p in self.points], "best": asdict(self.best) if self.best else None}


def sweep_points(served: ServedModel, batch_sizes: tuple[int, ...], waits_ms: tuple[float, ...]) -> list[tuple[int, float]]:
    """(max_batch_size, batch_wait_timeout_s) to try: size 1 once, sizes over max_ongoing_requests skipped."""
    points = []
    for size in sorted(set(batch_sizes)):
        if size > served.max_ongoing_requests:
            continue
        for wait in ([0.0] if size == 1 else sorted(set(waits_ms))):
            points.append((size, round(wait / 1000, 6)))
    return points


def pick_best(points: list[SweepPoint], slo_p99_ms: float) -> SweepPoint | None:
    """Highest throughput among the points that met the SLO and failed nothing (ties: lower p99)."""
    for p in points:
        p.meets_slo = p.failed == 0 and p.ok > 0 and p.p99_ms <= slo_p99_ms
    ok = [p for p in points if p.meets_slo]
    return max(ok, key=lambda p: (p.throughput_rps, -p.p99_ms)) if ok else None


def advise(app_cfg: ServeApp, model: str, slo_p99_ms: float, *, concurrency: int = 32, requests: int = 400,
           duration_s: float = 5.0, max_new_tokens: int = 16, batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
           waits_ms: tuple[float, ...] = DEFAULT_WAITS_MS, progress=print) -> Advice:
    """Sweep and advise (needs Ray connected). Deploys the app when it is not running (and
    deletes it again at the end); a running app gets its original settings back."""
    import ray
    from ray import serve

    from serve.deploy import base_url, build_app, deploy, shutdown
    from serve.loadgen import run_subprocess

    if not ray.is_initialized():
        raise RuntimeError("advise needs Ray: call ray.init() first")
    served = {m.model: m for m in app_cfg.serve.models}
    if model not in served:
        raise ValueError(f"serve advise: model {model!r} is not in serve.models ({sorted(served)})")
    cfg = app_cfg.serve
    was_running = cfg.app_name in serve.status().applications
    url = deploy(app_cfg) if not was_running else base_url(cfg)
    from actors.registry.client import caller_credentials
    from serve.client import TemperClient

    with TemperClient(url, timeout=60.0, api_key=caller_credentials()) as client:
        info = next(m for m in client.models() if m["model"] == model)
    endpoint = "predict" if info["task"] == "classifier" else "generate"
    advice = Advice(model, endpoint, slo_p99_ms, concurrency)
    index = [m.model for m in cfg.models].index(model)
    try:
        for size, wait in sweep_points(served[model], batch_sizes, waits_ms):
            variant = app_cfg.model_copy(deep=True)
            variant.serve.models[index].max_batch_size = size
            variant.serve.models[index].batch_wait_timeout_s = wait
            serve.run(build_app(variant), name=cfg.app_name, route_prefix=cfg.route_prefix)  # reconfigure, no restart
            r = run_subprocess(url, model, endpoint, concurrency, requests, duration_s, max_new_tokens,
                               warmup=min(concurrency, 16))
            failed = r["sent"] - r["ok"]
            lat = r["latency_ms"]
            point = SweepPoint(size, wait, r["throughput_rps"], lat["p50"], lat["p95"], lat["p99"], r["ok"], failed,
                               r["tokens_per_s"])
            advice.points.append(point)
            progress(f"[advise] batch {size:>3} wait {wait * 1000:5.1f} ms: {point.throughput_rps:7.1f} req/s, "
                     f"p99 {point.p99_ms:7.1f} ms" + (f", {failed} failed" if failed else ""))
    finally:
        if was_running:
            serve.run(build_app(app_cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
        else:
            shutdown(cfg.app_name)
    advice.best = pick_best(advice.points, slo_p99_ms)
    return advice
