"""A run's progress file: each write merges into the last one, atomically, and a run that wrote
none reads as None."""

from __future__ import annotations

import json

from app.progress import progress_path, read_progress, write_progress


def test_progress_merges_updates_and_reads_back(tmp_path):
    path = progress_path(tmp_path, "run-a")
    assert path == tmp_path.resolve() / "run-a" / "progress.json"
    assert read_progress(path) is None
    write_progress(path, {"run": "run-a", "step": 0, "steps": 100, "metric": "val_accuracy"})
    write_progress(path, {"step": 10, "loss": 1.5, "samples_per_s": 320.0})
    record = write_progress(path, {"metric_value": 0.75, "eval_step": 10})
    assert record == read_progress(path) == json.loads(path.read_text())
    assert {k: record[k] for k in ("run", "step", "steps", "loss", "metric", "metric_value", "eval_step")} == {
        "run": "run-a", "step": 10, "steps": 100, "loss": 1.5, "metric": "val_accuracy", "metric_value": 0.75, "eval_step": 10}
    assert record["updated_at"] > 0
    assert [p.name for p in path.parent.iterdir()] == ["progress.json"]  # no temporary file left behind
