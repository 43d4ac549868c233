"""The `tune:` section: search-space validation naming the key, Ray Tune objects built from it,
best-trial selection and the results files (no Ray cluster needed)."""

from __future__ import annotations

import copy
import csv
import math

import pytest

from app.cli.main import main
from app.config.base import ConfigError
from app.config.jobs import parse_config
from tune.sweep import (TrialRow, build_scheduler, build_searcher, objective, pick_best, search_space, trial_rows,
                        write_results)

BASE = {
    "name": "sweep", "storage_path": "runs",
    "model": {"kind": "gpt", "n_layer": 1, "d_model": 32, "n_head": 2, "block_size": 32},
    "data": {"name": "lm-code"},
    "train": {"steps": 60, "eval_every": 10, "checkpoint_every": 10,
              "callbacks": [{"name": "magnitude_pruning", "final_sparsity": 0.5, "start_step": 5, "end_step": 40}]},
}


def _job(tune: dict, root=None):
    tree = copy.deepcopy(BASE)
    tree["tune"] = tune
    if root is not None:
        tree["storage_path"] = str(root)
    return parse_config("tune", tree)


def test_search_space_maps_to_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    job = _job({"search_space": {
        "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "train.weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},
        "model.n_layer": {"type": "int", "low": 1, "high": 3},
        "train.batch_size": {"type": "choice", "values": [8, 16]},
        "train.callbacks.0.final_sparsity": {"type": "grid", "values": [0.3, 0.5]},
    }})
    space = search_space(job.tune)
    assert isinstance(space["train.lr"], Float) and space["train.lr"].lower == 1e-4
    assert "LogUniform" in type(space["train.lr"].get_sampler()).__name__
    assert isinstance(space["model.n_layer"], Integer) and space["model.n_layer"].upper == 4  # inclusive high
    assert isinstance(space["train.batch_size"], Categorical)
    assert space["train.callbacks.0.final_sparsity"] == {"grid_search": [0.3, 0.5]}
    assert objective(job) == ("val_loss", "min")


def test_grid_searcher_turns_choices_into_grids():
    job = _job({"search_space": {"train.lr": {"type": "choice", "values": [1e-3, 3e-3]}}, "searcher": {"name": "grid"}})
    assert search_space(job.tune)["train.lr"] == {"grid_search": [1e-3, 3e-3]}


@pytest.mark.parametrize("tune, named", [
    ({"search_space": {"train.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}}, "tune.search_space.train.lrr"),
    ({"search_space": {"model.n_head": {"type": "choice", "values": [2, 3]}}}, "model.n_head (3) must divide"),
    ({"search_space": {"train.callbacks.3.final_sparsity": {"type": "uniform", "low": 0.1, "high": 0.2}}}, "'3' is not a key"),
    ({"search_space": {"compress.methods": {"type": "choice", "values": [["onnx_int8"]]}}}, "tune.search_space.compress.methods"),
    ({"search_space": {"train.lr": {"type": "grid", "values": [0.1]}}, "searcher": {"name": "optuna"}}, "cannot take `grid`"),
    ({"search_space": {"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "searcher": {"name": "grid"}}, "searcher 'grid' needs"),
    ({"search_space": {"model.n_layer": {"type": "int", "low": 1, "high": 2}}, "scheduler": {"name": "pbt"}}, "scheduler 'pbt'"),
    ({"search_space": {"train.num_workers": {"type": "int", "low": 1, "high": 2}}, "scheduler": {"name": "pbt"}}, "scheduler 'pbt'"),
    ({"search_space": {"train.lr": {"type": "loguniform", "low": 0.0, "high": 0.2}}}, "low > 0"),
    ({"search_space": {"train.lr": {"type": "uniform", "low": 0.3, "high": 0.2}}}, "tune.search_space.train.lr"),
    ({"search_space": {"model.n_layer": {"type": "int", "low": 1.5, "high": 3}}}, "whole-number"),
    ({"search_space": {"train.lr": {"type": "choice"}}}, "non-empty `values`"),
    ({"search_space": {"train.lr": {"type": "uniform", "low": 1e-3, "high": 2e-3}}, "metric": "val_accuracy"}, "tune.mode"),
    ({"search_space": {"train.lr": {"type": "uniform", "low": 1e-3, "high": 2e-3}},
      "searcher": {"name": "optuna", "points_to_evaluate": [{"train.momentum": 0.9}]}}, "points_to_evaluate.0"),
    ({"search_space": {"train.lr": {"type": "uniform", "low": 1e-3, "high": 2e-3}}, "num_sample": 4}, "tune.num_sample"),
    ({"search_space": {}}, "tune.search_space"),
])
def test_bad_tune_sections_name_the_key(tune, named):
    with pytest.raises(ConfigError) as err:
        _job(tune)
    assert named in str(err.value), str(err.value)


def test_schedulers_measure_progress_in_steps():
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    asha = build_scheduler(_job({"search_space": {"train.lr": {"type": "uniform", "low": 1e-3, "high": 2e-3}},
                                 "scheduler": {"name": "asha", "grace_period": 10, "reduction_factor": 2}}))
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "step" and asha._max_t == 60
    pbt = build_scheduler(_job({"search_space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
                                "scheduler": {"name": "pbt", "perturbation_interval": 20}}))
    assert isinstance(pbt, PopulationBasedTraining) and set(pbt._hyperparam_mutations) == {"train.lr"}
    searcher = build_searcher(_job({"search_space": {"train.lr": {"type": "uniform", "low": 1e-3, "high": 2e-3}},
                                    "searcher": {"name": "optuna", "seed": 1, "n_startup_trials": 3}}), 2)
    assert type(searcher).__name__ == "OptunaSearch"   # Tune wraps it in a ConcurrencyLimiter
    grid = build_searcher(_job({"search_space": {"train.lr": {"type": "grid", "values": [1e-3, 2e-3]}}}), 2)
    assert grid.max_concurrent == 2  # Tune would not limit a BasicVariantGenerator it was handed


def _row(tid, metric, steps, *, error=None, full=60):
    return TrialRow(trial_id=tid, status="ERROR" if error else "TERMINATED", values={"train.lr": 0.001 * steps},
                    steps=steps, reports=steps // 10, metric_last=metric, metric_best=metric, stopped_early=error is None and steps < full,
                    error=error, curve=[(s, metric + (60 - s) / 100) for s in range(10, steps + 1, 10)])


def test_best_trial_is_a_full_length_one_without_errors():
    rows = [_row("a", 1.0, 60), _row("b", 0.5, 20), _row("c", 0.9, 60), _row("d", 0.1, 30, error="boom"),
            _row("e", math.nan, 60)]
    assert pick_best(rows, "min").trial_id == "c"           # b is better but was stopped at a rung
    assert pick_best(rows, "max").trial_id == "a"
    assert pick_best([_row("x", 0.5, 20)], "min").trial_id == "x"  # only early-stopped ones: best of those
    assert pick_best([_row("d", 0.1, 30, error="boom")], "min") is None


def test_a_trials_last_report_is_on_its_curve_when_the_results_file_lacks_it():
    """Tune reads a trial's curve back from a results file its driver writes after the fact; a trial
    stopped at a rung right after reporting can end before that row is there."""
    from types import SimpleNamespace

    import pandas as pd

    job = _job({"search_space": {"train.lr": {"type": "uniform", "low": 1e-3, "high": 2e-3}}, "scheduler": {"name": "asha"}})
    last = {"step": 20, "val_loss": 1.5, "trial_id": "b"}
    lost_row = pd.DataFrame({"step": [10], "val_loss": [2.0]})
    results = [SimpleNamespace(metrics=last, metrics_dataframe=df, config={"train.lr": 0.001}, error=None, path="/x/b")
               for df in (lost_row, None, pd.DataFrame({"step": [10, 20], "val_loss": [2.0, 1.5]}))]
    rows = trial_rows(results, job, "val_loss")
    assert [r.curve for r in rows] == [[(10, 2.0), (20, 1.5)], [(20, 1.5)], [(10, 2.0), (20, 1.5)]]
    assert all(r.steps == 20 and r.metric_best == 1.5 and r.stopped_early for r in rows)


def test_steps_missing_from_the_results_file_come_from_the_trials_own_records(tmp_path):
    """A trial paused at a rung and resumed in another trial's process (Tune's actor reuse) was seen
    without the rung's row in Tune's results file: every report the trial's runs made is also in
    their own folders (`reports.jsonl`, after a PBT exploit also the continued run's `-x` folder)."""
    import json
    from types import SimpleNamespace

    import pandas as pd

    from tune.sweep import SweepPaths

    job = _job({"search_space": {"train.lr": {"type": "uniform", "low": 1e-3, "high": 2e-3}}, "scheduler": {"name": "asha"}}, tmp_path)
    trials = SweepPaths.of(job.name, job.storage_path).trials
    records = {"trial-b": [(1, 0.9), (2, 0.7)], "trial-b-x1a2b3c": [(3, 0.5)], "trial-bb": [(4, 0.1)]}
    for folder, points in records.items():
        (trials / folder).mkdir(parents=True)
        (trials / folder / "reports.jsonl").write_text(
            "".join(json.dumps({"step": s, "val_loss": v, "lr": 1e-3}) + "\n" for s, v in points) + '{"step": 5, "val_lo')
    result = SimpleNamespace(metrics={"step": 3, "val_loss": 0.5, "trial_id": "b"}, config={"train.lr": 0.001}, error=None,
                             path="/x/b", metrics_dataframe=pd.DataFrame({"step": [2, 3], "val_loss": [0.7, 0.5]}))
    (row,) = trial_rows([result], job, "val_loss")
    assert row.curve == [(1, 0.9), (2, 0.7), (3, 0.5)]  # not trial-bb's point, nor the line cut short
    assert row.reports == 3 and row.metric_best == 0.5 and row.steps == 3


def test_results_table_and_curves_are_written(tmp_path):
    job = _job({"search_space": {"train.lr": {"type": "uniform", "low": 1e-3, "high": 2e-3}}, "scheduler": {"name": "asha"}}, tmp_path)
    rows = [_row("a", 1.0, 60), _row("b", 1.5, 20), _row("c", 0.9, 60)]
    md = write_results(job, rows, pick_best(rows, "min"), "val_loss", "min")
    text = md.read_text()
    assert "| c | TERMINATED |" in text and "**best**" in text and "stopped early" in text
    assert "140 training steps in all (a full grid of these trials would be 180)" in text
    with open(md.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == ["a", "b", "c"] and [r["best"] for r in table] == ["False", "False", "True"]
    assert md.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_cli_tune_needs_a_config_or_a_name(tmp_path, capsys):
    assert main(["tune"]) == 2
    assert "--resume NAME" in capsys.readouterr().err
    assert main(["tune", "--resume", "nothing-here", "--storage", str(tmp_path)]) == 2
    assert "no sweep named 'nothing-here'" in capsys.readouterr().err


def test_run_config_with_a_tune_section_hands_it_to_the_sweep():
    tree = copy.deepcopy(BASE)
    tree["tune"] = {"search_space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}, "num_samples": 3}
    tree["compress"] = {"methods": ["onnx_int8"]}
    job = parse_config("run", tree)
    sweep = job.tune_job()
    assert sweep.tune == job.tune and sweep.train == job.train and sweep.compress.methods == ["onnx_int8"]
    assert parse_config("run", copy.deepcopy(BASE)).tune is None  # no section: one training run
    tree["tune"]["search_space"] = {"train.nope": {"type": "uniform", "low": 0.1, "high": 0.2}}
    with pytest.raises(ConfigError, match="tune.search_space.train.nope"):
        parse_config("run", tree)
