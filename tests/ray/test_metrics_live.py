"""Every family of Temper's metrics reaches the cluster's Prometheus endpoint with its labels, read
with `prometheus_client`'s exposition parser: the training gauges while a run started with `python
-m app train` from another driver is going (a gauge leaves with the Train worker that set it, so a
finished run has none), then the tune, registry and serve families after a short training run
(registered), a sweep of 2 trials and 50 served requests. Counts are exact where this test alone
produced the series (its own run, sweep and model names); values are plausible elsewhere."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import ray
import yaml

from actors.registry.client import get_or_create_registry
from app import telemetry
from app.config.jobs import ServeApp, TrainJob, parse_config
from app.config.serve import ServeConfig, ServedModel
from app.data import DigitsData
from conftest import GAUGE_EXPIRY_S, free_port, serving, wait_for
from local_ranks import LocalRanks
from serve.protocol import API_PREFIX
from tune.sweep import run_sweep

pytestmark = pytest.mark.ray
REQUESTS = 50


def _tree(tmp_path, name: str, steps: int) -> dict:
    return {
        "name": name, "storage_path": str(tmp_path),
        "registry": {"actor_name": f"metrics-{uuid.uuid4().hex[:6]}", "db_url": f"sqlite:///{tmp_path}/registry.db"},
        "model": {"kind": "vit", "d_model": 16, "n_layer": 1, "n_head": 2},
        "data": {"name": "digits"},
        "train": {"num_workers": 1, "cpus_per_worker": 0.5, "steps": steps, "batch_size": 32, "warmup_steps": 2,
                  "eval_every": 5, "checkpoint_every": steps, "log_every": 5, "eval_batches": 2},
    }


def _samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of every sample called `name` whose labels include `labels` (all series summed by the caller)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def _endpoint() -> str:
    node = ray._private.worker.global_worker.node
    return f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"


def test_training_gauges_are_scraped_while_a_run_goes(ray_cluster, tmp_path):
    """A long run (far more steps than it gets to do) from a second driver on this cluster, as a
    user's `python -m app train` would be; stopped with SIGINT once every gauge was seen. With
    TEMPER_LOG_FORMAT=json its progress lines and evaluation reports reach that driver's console
    as one JSON object each."""
    run = f"live-{uuid.uuid4().hex[:6]}"
    tree = _tree(tmp_path, run, steps=100_000)
    tree["train"].update(checkpoint_every=40, eval_every=20)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TEMPER_LOG_FORMAT": "json"}
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "app", "train", str(config)], cwd=Path(__file__).parents[2],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    seen: dict = {}

    def live():
        assert proc.poll() is None, f"the run ended early ({proc.returncode}): {(tmp_path / 'train.log').read_text()[-3000:]}"
        seen["text"] = text = httpx.get(_endpoint(), timeout=10).text
        return all(_samples(text, f"ray_{name}", run=run) for name in (
            telemetry.TRAIN_STEP, telemetry.TRAIN_LOSS, telemetry.TRAIN_SAMPLES_PER_S, telemetry.TRAIN_CHECKPOINT_S,
            telemetry.EVAL_METRIC))

    try:
        wait_for(live, lambda: f"every training gauge of run {run} on {_endpoint()}", 240, interval_s=1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        try:  # the run's registry actor is detached: it outlives its driver
            ray.kill(ray.get_actor(tree["registry"]["actor_name"], namespace="temper"))
        except ValueError:
            pass  # the driver stopped before it started one
    text = seen["text"]
    [step] = _samples(text, f"ray_{telemetry.TRAIN_STEP}", run=run, rank="0")
    assert 0 < step < 100_000 and step % 5 == 0  # set at each progress line (train.log_every: 5)
    [loss] = _samples(text, f"ray_{telemetry.TRAIN_LOSS}", run=run, rank="0")
    assert 0 < loss < math.log(10) * 2  # cross-entropy over 10 classes, from ln 10 down
    [rate] = _samples(text, f"ray_{telemetry.TRAIN_SAMPLES_PER_S}", run=run, rank="0")
    assert rate > 0
    [ckpt_s] = _samples(text, f"ray_{telemetry.TRAIN_CHECKPOINT_S}", run=run, rank="0")
    assert 0 < ckpt_s < 120
    [accuracy] = _samples(text, f"ray_{telemetry.EVAL_METRIC}", run=run, metric="val_accuracy")
    assert 0 <= accuracy <= 1
    events = [json.loads(line[line.index("{"):]) for line in (tmp_path / "train.log").read_text(errors="replace").splitlines()
              if f'"run":"{run}"' in line]
    reports = [e for e in events if e["event"] == "train_report"]
    steps = [e for e in events if e["event"] == "train_step"]
    assert reports and [r["step"] for r in reports] == list(range(20, 20 * len(reports) + 1, 20))  # train.eval_every
    assert all(0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0 for r in reports)
    assert steps and all(set(e) >= {"loss", "lr", "samples_per_s", "eta_s", "steps"} for e in steps)


def test_tune_registry_and_serve_metrics_reach_prometheus(ray_cluster, tmp_path):
    run, sweep, served = (f"{kind}-{uuid.uuid4().hex[:6]}" for kind in ("mtrain", "msweep", "mserve"))
    job = TrainJob.model_validate(_tree(tmp_path / "train", run, steps=10))
    registry = get_or_create_registry(job.registry)
    tune_job = parse_config("tune", {**_tree(tmp_path / "tune", sweep, steps=5), "registry": job.registry.model_dump(),
                                     "tune": {"search_space": {"train.lr": {"type": "choice", "values": [0.01, 0.03]}},
                                              "num_samples": 1, "max_concurrent_trials": 2, "searcher": {"name": "grid"}}})
    try:
        # The run trains in a process of its own (the loop a Ray Train worker runs, without Ray Train's
        # start-up: what is served is not what this test is about) and is registered as a trained run is.
        with LocalRanks(1) as one:
            record = one.fit_and_register(job, registry)
        ray.get(registry.register_version.remote(served, record["artifact_uri"], "torch_fp32"))
        result = run_sweep(tune_job, registry)
        swept = time.monotonic()
        assert len(result.trials) == 2
        app_cfg = ServeApp(registry=job.registry, serve=ServeConfig(
            app_name=f"metrics-{uuid.uuid4().hex[:6]}", port=free_port(),
            models=[ServedModel(model=served, version="1", cpus_per_replica=0.5)]))
        images = [DigitsData(job.data).x_val[0][0].tolist()]  # one 8x8 image
        for url in serving(app_cfg):
            with httpx.Client(timeout=30) as http:
                codes = [http.post(f"{url}{API_PREFIX}/models/{served}/predict", json={"inputs": images}).status_code
                         for _ in range(REQUESTS)]
            assert codes == [200] * REQUESTS
            endpoint = _endpoint()
            seen: dict = {}

            def scraped():
                seen["text"] = text = httpx.get(endpoint, timeout=10).text
                return sum(_samples(text, f"ray_{telemetry.SERVE_REQUESTS}", model=served, endpoint="predict",
                                    status="200")) == REQUESTS and _samples(text, f"ray_{telemetry.TUNE_TRIALS}", sweep=sweep) \
                    and _samples(text, f"ray_{telemetry.TUNE_BEST_METRIC}", sweep=sweep)
            wait_for(scraped, lambda: f"{REQUESTS} predict requests of {served} and the sweep's trial and best-metric "
                                      f"gauges on {endpoint}", 90)
            # Ray drops a gauge series not set for ~30 s (default export interval) although its process
            # lives; the sweep's gauges, last set when its final trial ended, must outlive that, and so
            # must the replica's served version, set once when it loaded.
            time.sleep(max(0.0, swept + GAUGE_EXPIRY_S - time.monotonic()))
            late = httpx.get(endpoint, timeout=10).text
    finally:
        ray.kill(registry)

    text = seen["text"]
    # tune: both trials ended (states: running, stopped, errored), the best objective is a validation accuracy
    assert sum(_samples(text, f"ray_{telemetry.TUNE_TRIALS}", sweep=sweep, state="stopped")) == 2
    [best] = _samples(text, f"ray_{telemetry.TUNE_BEST_METRIC}", sweep=sweep)
    assert 0 <= best <= 1
    assert sum(_samples(late, f"ray_{telemetry.TUNE_TRIALS}", sweep=sweep, state="stopped")) == 2
    assert _samples(late, f"ray_{telemetry.TUNE_BEST_METRIC}", sweep=sweep) == [best]
    assert _samples(late, f"ray_{telemetry.SERVE_SERVED_VERSION}", model=served, route="1") == [1.0]
    # registry: this test's register calls at least (other tests' actors count too)
    assert sum(_samples(text, f"ray_{telemetry.REGISTRY_OPERATIONS}", operation="register_version")) >= 3
    assert sum(_samples(text, f"ray_{telemetry.REGISTRY_LATENCY_MS}_count", operation="register_version")) >= 3
    # serve: exactly the requests sent, each timed and batched
    assert sum(_samples(text, f"ray_{telemetry.SERVE_LATENCY_MS}_count", model=served, endpoint="predict")) == REQUESTS
    assert sum(_samples(text, f"ray_{telemetry.SERVE_BATCH_SIZE}_count", model=served, method="predict")) >= 1
    assert sum(_samples(text, f"ray_{telemetry.SERVE_ROUTE_REQUESTS}", model=served, version="1", outcome="ok")) == REQUESTS
