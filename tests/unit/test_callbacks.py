"""Callback protocol pieces that need no Ray: registration by name, ordering, early stopping."""

from __future__ import annotations

import pytest

from app.config.jobs import TrainJob
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


def test_every_strategy_implements_the_whole_protocol():
    """The pruning callback reaches weights only through `Strategy.weight_views` / `apply_masks`:
    the protocol declares them and every strategy class defines every protocol method."""
    import inspect

    from pipelines.strategies import DeepSpeedStrategy, Strategy, TorchStrategy

    methods = {n for n, v in vars(Strategy).items() if inspect.isfunction(v) and not n.startswith("_")}
    assert {"weight_views", "apply_masks", "forward", "backward", "step", "save", "load"} <= methods
    for cls in (TorchStrategy, DeepSpeedStrategy):
        missing = sorted(n for n in methods if not inspect.isfunction(getattr(cls, n, None)))
        assert not missing, f"{cls.__name__} lacks {missing}"
        for n in methods:  # same parameter names as the protocol
            assert list(inspect.signature(getattr(cls, n)).parameters) == list(inspect.signature(getattr(Strategy, n)).parameters), (cls.__name__, n)


def test_pruning_goes_through_the_protocol():
    """A strategy stand-in with only the protocol's pruning methods is enough for MagnitudePruning."""
    import torch

    from app.compression.pruning import RowView, no_reduce

    job = _job([{"name": "magnitude_pruning", "final_sparsity": 0.5, "start_step": 0, "end_step": 1, "update_every": 1}])
    model = build_model(job.model)
    applied = []

    class Stub:
        module = model

        def weight_views(self, names):
            params = dict(model.named_parameters())
            return {n: RowView(params[n].data, 0, tuple(params[n].shape)) for n in names}, no_reduce

        def apply_masks(self, masks):
            applied.append(set(masks))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in masks:
                        p.mul_(masks[n])

    cb = build_callbacks(job, model)[0]
    state = TrainState(job, strategy=Stub(), rank=0, world=1)
    cb.on_setup(state)
    for step in (1, 2):
        state.step = step
        cb.on_step_end(state)
    assert applied and applied[-1] == set(cb.targets)
    weights = [p for n, p in model.named_parameters() if n in cb.targets]
    zero = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zero == pytest.approx(0.5, abs=0.01)
