"""Every metric Temper exports, in one place.

Metrics go through `ray.util.metrics`, so they show on the Ray dashboard and on each node's
Prometheus endpoint (prefixed `ray_`). Objects are created lazily, once per process, and only
inside Ray workers/actors/replicas (creating them needs a connected Ray).
"""

from __future__ import annotations

from functools import lru_cache

# --- training (pipelines/train.py, reported by every rank, tagged by rank)
TRAIN_LOSS = "temper_train_loss"
TRAIN_SAMPLES_PER_S = "temper_train_samples_per_second"
TRAIN_STEP = "temper_train_step"
EVAL_METRIC = "temper_eval_metric"

# --- serving (serve/app.py)
SERVE_REQUESTS = "temper_serve_requests_total"
SERVE_ERRORS = "temper_serve_errors_total"
SERVE_LATENCY_MS = "temper_serve_request_latency_ms"
SERVE_BATCH_SIZE = "temper_serve_batch_size"

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]

_DESCRIPTIONS = {
    TRAIN_LOSS: "Training loss at the last logged step.",
    TRAIN_SAMPLES_PER_S: "Training samples per second on this rank.",
    TRAIN_STEP: "Optimizer step reached.",
    EVAL_METRIC: "Latest evaluation metric (tag `metric` names it).",
    SERVE_REQUESTS: "Requests answered by the Temper ingress.",
    SERVE_ERRORS: "Requests answered with an error status.",
    SERVE_LATENCY_MS: "End-to-end request latency at the ingress, in ms.",
    SERVE_BATCH_SIZE: "Size of each dynamic batch a model replica ran.",
}


@lru_cache(maxsize=None)
def gauge(name: str, tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Gauge

    return Gauge(name, description=_DESCRIPTIONS[name], tag_keys=tag_keys)


@lru_cache(maxsize=None)
def counter(name: str, tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Counter

    return Counter(name, description=_DESCRIPTIONS[name], tag_keys=tag_keys)


@lru_cache(maxsize=None)
def histogram(name: str, boundaries: tuple[float, ...], tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Histogram

    return Histogram(name, description=_DESCRIPTIONS[name], boundaries=list(boundaries), tag_keys=tag_keys)
