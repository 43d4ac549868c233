"""The end-to-end recipe behind `python -m app run`: [tune ->] train (or import) -> register -> compress -> serve -> call.

The only module of `pipelines/` that imports `tune/` and `serve/`, and only the CLI imports it:
training, compression and registration live in their own modules and know nothing of the stages
that follow them.

One readable function per stage; each prints one progress line when it starts and its
result when it ends. Re-running the same config is safe: training resumes from its last
checkpoint (and does nothing if it had finished), and artifacts already registered are found
by their location instead of being registered twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from app.config.jobs import OptimizeJob, ServeApp
from app.config.serve import ServedModel
from app.evaluation import metric_kind, primary_metric, training_metric
from pipelines.register import train_and_register


@dataclass
class RunSummary:
    """What `run` produced, printed at the end and returned to callers (tests, notebooks)."""

    model: str
    versions: list[dict] = field(default_factory=list)
    served_version: int | None = None
    served_models: list[str] | None = None
    """What `serve.models` put up when the config names its own (`model vN (+ adapters a, b)`); else the chosen variant is served."""
    url: str | None = None
    client_answer: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def stage_tune(job: OptimizeJob, registry) -> dict:
    """A Ray Tune sweep instead of one training run; the best trial's `tuned` version goes on."""
    from tune.sweep import run_sweep

    result = run_sweep(job.tune_job(), registry)
    if result.version is None:
        raise RuntimeError(f"sweep {job.name!r}: no trial finished without error; see {result.report_path}")
    print(f"[tune] results table and curves: {result.report_path} (+ .csv, .json, .png)", flush=True)
    return result.version


def stage_compress(job: OptimizeJob, registry, trained: dict) -> list[dict]:
    from pipelines.compress import compress

    _, reports = compress(job.compress_job(str(trained["version"])), registry)
    return [ray.get(registry.get_version.remote(job.name, r.version)) for r in reports]


def pick_for_serving(job: OptimizeJob, trained: dict, variants: list[dict]) -> dict:
    """The fastest (batch-1 latency) variant within the quality budget; the fp32 model otherwise."""
    ok = [v for v in variants if v["tags"].get("rejected") != "true"]
    if not ok:
        return trained
    return min(ok, key=lambda v: v["metrics"]["latency_b1_ms"])


def stage_serve(job: OptimizeJob, registry, chosen: dict) -> tuple[str, ServeApp]:
    from actors.registry.client import caller_credentials
    from serve.deploy import deploy

    ray.get(registry.set_alias.remote(
        job.name, "production", chosen["version"],
        reason=f"run {job.name}: fastest {chosen['format']} variant within quality budget", actor="app run",
        credentials=caller_credentials(),
    ))
    models = job.serve.models or [ServedModel(model=job.name, version="production")]
    app_cfg = ServeApp(registry=job.registry, serve=job.serve.model_copy(update={"models": models}), auth=job.auth)
    return deploy(app_cfg), app_cfg


def client_call(job: OptimizeJob, url: str) -> dict:
    """One real HTTP call through the Python client, on a held-out sample."""
    from app.data import build_data
    from actors.registry.client import caller_credentials
    from serve.client import TemperClient

    if job.model.kind == "hf" and job.model.task in ("embedding", "sequence_classification"):
        from app.data.text import read_splits

        text = read_splits(job.data).val[0].text
        with TemperClient(url, timeout=30.0, api_key=caller_credentials()) as client:
            if job.model.task == "embedding":
                res = client.embed(job.name, [text], truncate=True)
                answer = {"endpoint": "embed", "text": text[:60], "dim": len(res.embeddings[0]),
                          "first_values": [round(v, 4) for v in res.embeddings[0][:4]]}
            else:
                res = client.classify(job.name, [text], top_k=2, truncate=True)
                answer = {"endpoint": "classify", "text": text[:60], "predicted": res.labels[0], "top_k": res.probabilities[0]}
        return {**answer, "version": res.version, "backend": res.backend, "latency_ms": res.latency_ms}
    data = build_data(job.data, job.model)
    with TemperClient(url, timeout=30.0, api_key=caller_credentials()) as client:
        if job.model.kind == "vit":
            x, y = next(data.val_batches(1, 1))
            res = client.predict(job.name, x.numpy().tolist(), top_k=3)
            return {"endpoint": "predict", "true_label": int(y[0]), "predicted": res.labels[0],
                    "top_k": res.probabilities[0], "version": res.version, "backend": res.backend,
                    "latency_ms": res.latency_ms}
        prompt = "def __init__(self"
        res = client.generate(job.name, prompt, max_new_tokens=24)
        return {"endpoint": "generate", "prompt": prompt, "completion": res.text, "version": res.version,
                "backend": res.backend, "latency_ms": res.latency_ms}


def served_model_line(m: ServedModel, default_model: str) -> str:
    """`model v1`, `model production 90%, staging 10%`, `model v1 (+ adapters a, b)`."""
    routes = ", ".join(("v" + ref if ref.isdigit() else ref) + (f" {pct}%" if m.traffic else "") for ref, pct in m.routes().items())
    adapters = f" (+ adapters {', '.join(m.adapters)})" if m.adapters else ""
    return f"{m.model or default_model} {routes}{adapters}"


def run(job: OptimizeJob, keep_serving: bool = False) -> RunSummary:
    from actors.registry.client import get_or_create_registry, registry_auth

    summary = RunSummary(model=job.name)
    # Auth as the app it serves will have: on when serving beyond loopback unless `auth.enabled: false`.
    registry = get_or_create_registry(job.registry, auth=registry_auth(job.auth, job.auth.enabled_for(job.serve.host)))

    t0 = time.perf_counter()
    metric, _ = primary_metric(metric_kind(job.model))
    if job.tune is not None:
        print(f"[1/4 tune] {job.name}: {job.tune.num_samples} trials of {job.train.num_workers} workers x {job.train.steps} steps", flush=True)
        trained = stage_tune(job, registry)
        summary.seconds["tune"] = time.perf_counter() - t0
    elif job.train.steps == 0:
        print(f"[1/4 import] {job.name}: {job.model.path} as it is (train.steps 0)", flush=True)
        trained = train_and_register(job.train_job(), registry)
        summary.seconds["import"] = time.perf_counter() - t0
    else:
        print(f"[1/4 train] {job.name}: {job.train.num_workers} workers x {job.train.steps} steps", flush=True)
        trained = train_and_register(job.train_job(), registry)
        summary.seconds["train"] = time.perf_counter() - t0
    # an imported model has no val metrics of its own yet: compression measures its source first
    # an embedding model's training reports its training metric; compression measures mean_cosine
    shown = next((m for m in (metric, training_metric(metric_kind(job.model))[0]) if m in trained["metrics"]), None)
    score = f"{shown} {trained['metrics'][shown]:.4f}" if shown else "not measured yet"
    print(f"[2/4 register] v{trained['version']} {trained['transformation']}: {score}", flush=True)

    t0 = time.perf_counter()
    print(f"[3/4 compress] {', '.join(job.compress.methods)}", flush=True)
    variants = stage_compress(job, registry, trained)
    summary.seconds["compress"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    chosen = pick_for_serving(job, trained, variants)
    print(f"[4/4 serve] alias production -> v{chosen['version']} ({chosen['format']})", flush=True)
    url, _ = stage_serve(job, registry, chosen)
    summary.url, summary.served_version = url, chosen["version"]
    if any(served_model_line(m, job.name) != f"{job.name} production" for m in job.serve.models):
        summary.served_models = [served_model_line(m, job.name) for m in job.serve.models]
    summary.client_answer = client_call(job, url)
    summary.seconds["serve"] = time.perf_counter() - t0
    summary.versions = ray.get(registry.list_versions.remote(job.name))
    return summary


def format_summary(s: RunSummary, model_kind: str) -> str:
    metric, _ = primary_metric(model_kind)
    lines = [f"== Temper run summary: model {s.model!r} ==", "versions:"]
    lines.append(f"  {'ver':>4} {'format':<11} {'parent':<7} {metric:>13} {'size MB':>8} {'b1 ms':>7} {'b32 ms':>7}  aliases")
    for v in s.versions:
        m = v["metrics"]
        parent = f"v{v['parent']['version']}" if v.get("parent") else "-"
        fmt = lambda key, scale=1.0, p=3: f"{m[key] * scale:.{p}f}" if key in m else "-"  # noqa: E731
        lines.append(
            f"  v{v['version']:<3} {v['format']:<11} {parent:<7} {fmt(metric, p=4):>13} {fmt('size_bytes', 1e-6):>8} "
            f"{fmt('latency_b1_ms'):>7} {fmt('latency_b32_ms'):>7}  {','.join(v.get('aliases') or []) or '-'}"
        )
    if s.served_models:  # the config's own serve.models; the chosen variant only holds the alias
        lines.append(f"served: {'; '.join(s.served_models)} at {s.url.rstrip('/')}/api/v1/ and /v1/  "
                     f"(alias production -> v{s.served_version})")
    else:
        lines.append(f"served: v{s.served_version} at {s.url.rstrip('/')}/api/v1/  (alias production)")
    if s.client_answer:
        lines.append("client call: " + ", ".join(f"{k}={v}" for k, v in s.client_answer.items() if k != "top_k"))
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s.seconds.items()))
    return "\n".join(lines)
