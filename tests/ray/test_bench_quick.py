"""`make bench BENCH_ARGS=--quick` in miniature: every script in benchmarks/ runs in `--quick` mode
(its own embedded Ray where it needs one, in a subprocess), writes its JSON with the goals it
checks, and `benchmarks/report.py` turns those files into RESULTS.md with every goal beside its
figure. Nothing here asserts on a measured figure: quick runs are smoke runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.bench]  # `make test-bench`; not in `make test`

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.name != "report.py")
RESULT_KEYS = {  # what each script's JSON holds besides its goals
    "embeddings": {"threads", "texts", "columns", "d", "d_direct_ingress", "d_single_hop", "d_direct_single_hop"},
    "llm_serving": {"model", "anchor", "points"},
    "pruning": {"steps", "results"},
    "quantization": {"threads", "results"},
    "serve_batching": {"machine", "models", "serve_floor"},
    "serving_vs_fastapi": {"machine", "models"},
    "strategy_memory": {"args", "results"},
    "train_overhead": {"model", "results"},
    "tune_asha": {"grid", "asha", "step_ratio", "best_gap"},
}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-results")


def test_every_script_is_covered():
    assert set(SCRIPTS) == set(RESULT_KEYS), "a benchmark script was added or removed: update RESULT_KEYS"


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_writes_its_goals(script, results_dir):
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--results-dir", str(results_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    data = json.loads((results_dir / f"{script}.json").read_text())
    assert data["benchmark"] == script and data["quick"] is True
    assert RESULT_KEYS[script] <= set(data), f"{script}.json lacks {RESULT_KEYS[script] - set(data)}"
    assert data["goals"], f"{script}.json names no goal"
    for g in data["goals"]:
        assert set(g) == {"goal", "figure", "met"} and isinstance(g["met"], bool) and g["figure"], g


def test_report_writes_results_md(results_dir, tmp_path):
    ran = [s for s in SCRIPTS if (results_dir / f"{s}.json").is_file()]
    assert ran, "no benchmark wrote its JSON"
    out = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, str(BENCH / "report.py"), "--results-dir", str(results_dir), "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=60)
    text = out.read_text()
    goals = 0
    for script in SCRIPTS:
        assert f"## {script}" in text
        if script in ran:
            for g in json.loads((results_dir / f"{script}.json").read_text())["goals"]:
                assert f"| {g['goal']} | {g['figure']} | {'yes' if g['met'] else '**no**'} |" in text
                goals += 1
        else:
            assert f"_not run: no `{script}.json`_" in text
    assert "Goals met: " in text and f" of {goals}." in text
