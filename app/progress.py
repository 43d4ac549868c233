"""A training run's latest progress in one small file: `<storage_path>/<name>/progress.json`.

Rank 0 of the training loop rewrites it at every `train.log_every` step (step, total steps,
loss, learning rate, samples/s, ETA) and after every evaluation (the run's eval metric), and the
HTTP control plane reads it (`GET /api/v1/training/jobs/{id}/progress`).

Why a file and not the job's log or Ray Train's reports: the log is a mixed stream (Ray's
lines, every worker's output, text or JSON per TEMPER_LOG_FORMAT) that would have to be read
whole and parsed on every poll, and Ray Train persists metrics only with checkpoints
(`checkpoint_every`), which is too coarse for progress. The file is written atomically
(temporary file + rename), so a reader sees the previous state or the new one, never half;
it lives with the run's other files, so it outlives the job (a stopped or finished run still
shows where it got to) and is readable wherever the storage path is.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.json"


def progress_path(storage_path: str | Path, name: str) -> Path:
    """Where run `name` under `storage_path` keeps its progress (relative paths: against this process's cwd)."""
    return Path(storage_path).resolve() / name / PROGRESS_FILE


def write_progress(path: Path, update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into the file at `path` (its previous content kept for the keys not given) and
    stamp `updated_at` (unix seconds); returns what was written."""
    current = read_progress(path) or {}
    record = {**current, **update, "updated_at": round(time.time(), 3)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True, default=float))
    os.replace(tmp, path)
    return record


def read_progress(path: Path) -> dict[str, Any] | None:
    """The last progress written at `path`, or None when the run has written none yet."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
