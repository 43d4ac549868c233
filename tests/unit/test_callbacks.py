"""Callback protocol pieces that need no Ray: registration by name, ordering, early stopping."""

from __future__ import annotations

import pytest

from app.config import TrainJob
from app.models import build_model
from pipelines.callbacks import EarlyStopping, MagnitudePruning, TrainState, build_callbacks


def _job(callbacks) -> TrainJob:
    return TrainJob.model_validate({"name": "t", "model": {"kind": "vit"}, "data": {"name": "digits"},
                                    "train": {"steps": 100, "callbacks": callbacks}})


def test_callbacks_are_built_by_name_mutators_first():
    job = _job([{"name": "early_stopping"}, {"name": "magnitude_pruning", "final_sparsity": 0.3}])
    cbs = build_callbacks(job, build_model(job.model))
    assert [type(c) for c in cbs] == [MagnitudePruning, EarlyStopping]
    assert cbs[0].mutates_model and not cbs[1].mutates_model


def test_early_stopping_waits_for_patience_and_survives_a_restart():
    job = _job([{"name": "early_stopping", "patience": 2, "min_delta": 0.01}])
    cb = build_callbacks(job, build_model(job.model))[0]
    assert cb.metric == "val_accuracy" and cb.mode == "max"
    state = TrainState(job, strategy=None, rank=0, world=1)
    for acc in (0.5, 0.7, 0.705, 0.8, 0.79):  # 0.705 is within min_delta: not an improvement
        cb.on_eval_end(state, {"val_accuracy": acc})
        assert not state.should_stop
    cb.on_eval_end(state, {"val_accuracy": 0.80})
    assert state.should_stop  # two evaluations without beating 0.8 + 0.01

    restored = build_callbacks(job, build_model(job.model))[0]
    restored.load_state_dict(cb.state_dict())
    fresh = TrainState(job, strategy=None, rank=0, world=1)
    restored.on_setup(fresh)
    assert fresh.should_stop  # a re-run of a stopped job does not train on


def test_early_stopping_names_a_missing_metric():
    job = _job([{"name": "early_stopping", "metric": "val_f1"}])
    cb = build_callbacks(job, build_model(job.model))[0]
    with pytest.raises(ValueError, match="val_f1"):
        cb.on_eval_end(TrainState(job, None, 0, 1), {"val_accuracy": 0.5})


def test_pruning_targets_must_match_weights():
    job = _job([{"name": "magnitude_pruning", "targets": r"nothing\.here"}])
    with pytest.raises(ValueError, match="matches no 2-D weight"):
        build_callbacks(job, build_model(job.model))
