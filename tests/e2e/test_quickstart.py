"""The real CLI, end to end: `python -m app run configs/quickstart.yaml` in a subprocess with its
own embedded Ray (this file runs before tests/ray starts the shared cluster), shortened by
overrides. Asserts on what it prints, on the registry's SQLite file, and that a re-run is
idempotent (resumes, registers nothing twice)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _run(tmp_path: Path, port: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "app", "run", "configs/quickstart.yaml",
        f"storage_path={tmp_path / 'runs'}", f"registry.db_url=sqlite:///{tmp_path / 'registry.db'}",
        "registry.actor_name=e2e-registry", f"serve.port={port}",
        "train.steps=100", "train.eval_every=50", "train.checkpoint_every=100", "train.lr=0.004",
        "compress.latency_iters=10", "--json",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _summary(proc) -> dict:
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{") and '"versions"' in ln][-1]
    return json.loads(line)


def test_quickstart_run_trains_registers_quantizes_serves_and_reruns_idempotently(tmp_path):
    port = free_port()
    proc = _run(tmp_path, port)
    out = proc.stdout
    for marker in ("[1/4 train]", "[2/4 register]", "[3/4 compress]", "[4/4 serve]", "== Temper run summary", "samples/s eta"):
        assert marker in out, f"missing {marker!r} in output"

    summary = _summary(proc)
    versions = {v["version"]: v for v in summary["versions"]}
    assert len(versions) == 4  # trained + torch_int8 + onnx_fp32 + onnx_int8
    trained = versions[1]
    assert trained["format"] == "torch_fp32" and trained["parent"] is None and trained["transformation"] == "trained"
    assert trained["metrics"]["val_accuracy"] > 0.6
    int8 = [v for v in versions.values() if v["format"] == "torch_int8"][0]
    assert int8["parent"] == {"model": "quickstart-digits", "version": 1} and int8["transformation"] == "quantized"
    assert int8["metrics"]["size_bytes"] < 0.5 * trained["metrics"]["size_bytes"]
    assert abs(int8["metrics"]["val_accuracy"] - trained["metrics"]["val_accuracy"]) <= 0.03
    for v in versions.values():
        assert v["metrics"]["latency_b1_ms"] > 0

    served = versions[summary["served_version"]]
    assert "production" in served["aliases"]
    answer = summary["client_answer"]
    assert answer["version"] == summary["served_version"] and answer["backend"] == served["format"]
    assert 0 <= answer["predicted"] <= 9 and summary["url"].rstrip("/") == f"http://127.0.0.1:{port}"

    # The compression report: a Markdown table with every variant and its Pareto plot.
    report = tmp_path / "runs" / "quickstart-digits" / "reports" / "compress-v1.md"
    text = report.read_text()
    for fmt in ("torch_int8", "onnx_fp32", "onnx_int8"):
        assert f"| {fmt} |" in text
    png = report.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # The registry's state is in the SQLite file, not in the (now gone) actor.
    with sqlite3.connect(tmp_path / "registry.db") as db:
        rows = db.execute("SELECT version, format, parent_version_id FROM versions ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert rows[0][2] is None and all(r[2] is not None for r in rows[1:])

    # Same command again: training finds its finished checkpoint, nothing is registered twice.
    again = _run(tmp_path, free_port())
    assert "resumed from checkpoint at step 100" in again.stdout
    assert "already registered" in again.stdout
    assert sorted(v["version"] for v in _summary(again)["versions"]) == [1, 2, 3, 4]
