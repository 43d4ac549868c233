"""Metric emission outside the hot loops, without Ray: the sweep's trial tally and its Tune
callback, the registry actor's per-operation metrics (its class run without Ray), and that a
failing metric never reaches the caller. Metric objects are replaced by recorders."""

from __future__ import annotations

import asyncio
import logging
import pickle
from types import SimpleNamespace

import pytest

from app import telemetry


class Recorder:
    """Stands in for a ray.util.metrics object: remembers every set / inc / observe."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def set(self, value, tags=None):
        self.calls.append((self.name, "set", value, dict(tags or {})))

    def inc(self, value=1.0, tags=None):
        self.calls.append((self.name, "inc", value, dict(tags or {})))

    def observe(self, value, tags=None):
        self.calls.append((self.name, "observe", value, dict(tags or {})))


@pytest.fixture
def recorded(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(telemetry, "gauge", lambda name, tag_keys=(): Recorder(name, calls))
    monkeypatch.setattr(telemetry, "counter", lambda name, tag_keys=(): Recorder(name, calls))
    monkeypatch.setattr(telemetry, "histogram", lambda name, boundaries, tag_keys=(): Recorder(name, calls))
    return calls


def test_every_name_has_a_description():
    names = [v for k, v in vars(telemetry).items() if k.isupper() and isinstance(v, str) and v.startswith("temper_")]
    assert len(names) == len(set(names)), "two constants name the same metric"
    assert set(names) == set(telemetry._DESCRIPTIONS)


def test_a_failing_metric_is_logged_once_and_never_raised(monkeypatch, caplog):
    monkeypatch.setattr(telemetry, "_FAILED", set())

    def broken():
        raise RuntimeError("no metrics agent")

    with caplog.at_level(logging.WARNING, logger="app.telemetry"):
        telemetry.record(telemetry.TRAIN_LOSS, broken)
        telemetry.record(telemetry.TRAIN_LOSS, broken)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "temper_train_loss" in warnings[0] and "no metrics agent" in warnings[0]


def test_trial_tally_counts_states_and_keeps_the_best():
    from tune.sweep import TrialTally

    tally = TrialTally("min")
    for t in ("a", "b", "c"):
        tally.started(t)
    tally.ended("a", error=False)
    tally.ended("b", error=True)
    assert tally.counts() == {"running": 1, "stopped": 1, "errored": 1}
    tally.started("b")  # an errored trial resumed
    assert tally.counts() == {"running": 2, "stopped": 1, "errored": 0}
    assert [tally.offer(v) for v in (0.9, float("nan"), 1.2, "x", True, 0.5)] == [True, False, False, False, False, True]
    assert tally.best == 0.5
    high = TrialTally("max")
    assert [high.offer(v) for v in (0.2, 0.1, 0.7)] == [True, False, True] and high.best == 0.7


def test_sweep_callback_exports_trial_states_and_best_metric(recorded):
    from ray import cloudpickle
    from tune.sweep import _metrics_callback

    cb = _metrics_callback("digits-sweep", "val_loss", "min")
    cb = cloudpickle.loads(cloudpickle.dumps(cb))  # Tune pickles the RunConfig with the experiment
    a, b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    cb.on_trial_start(0, [a, b], a)
    cb.on_trial_start(0, [a, b], b)
    cb.on_trial_result(1, [a, b], a, {"val_loss": 0.8, "step": 10})
    cb.on_trial_result(2, [a, b], b, {"val_loss": 0.9, "step": 10})  # not better: not a new value
    cb.on_trial_result(3, [a, b], b, {"step": 10})  # no objective in this report
    cb.on_trial_complete(4, [a, b], a)
    cb.on_trial_error(5, [a, b], b)
    trials = [(c[3]["state"], c[2]) for c in recorded if c[0] == telemetry.TUNE_TRIALS]
    assert trials[-3:] == [("running", 0), ("stopped", 1), ("errored", 1)]
    assert trials[:3] == [("running", 1), ("stopped", 0), ("errored", 0)]
    best = [c for c in recorded if c[0] == telemetry.TUNE_BEST_METRIC]
    # first set at the improving result, then set again at each later trial event (complete, error)
    assert best == [(telemetry.TUNE_BEST_METRIC, "set", 0.8, {"sweep": "digits-sweep", "metric": "val_loss"})] * 3


def test_registry_actor_counts_times_and_fails_per_operation(recorded, tmp_path):
    from actors.registry.actor import ModelRegistry
    from actors.registry.errors import RegistryNotFound

    registry = ModelRegistry.__ray_actor_class__(f"sqlite:///{tmp_path / 'registry.db'}")  # the class, run without Ray

    async def calls():
        await registry.register_version("m", str(tmp_path / "w"), "safetensors")
        await registry.list_models()
        with pytest.raises(RegistryNotFound):
            await registry.get_version("m", 7)

    asyncio.run(calls())
    ops = [c[3]["operation"] for c in recorded if c[0] == telemetry.REGISTRY_OPERATIONS]
    assert ops == ["register_version", "list_models", "get_version"]
    latencies = [c for c in recorded if c[0] == telemetry.REGISTRY_LATENCY_MS]
    assert [c[3]["operation"] for c in latencies] == ops and all(c[2] >= 0 for c in latencies)
    errors = [c[3] for c in recorded if c[0] == telemetry.REGISTRY_ERRORS]
    assert errors == [{"operation": "get_version", "error": "RegistryNotFound"}]
