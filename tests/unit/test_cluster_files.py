"""cluster/ manifests parse, and alert rules only use metric names Temper exports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from app import telemetry

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_parses(path):
    assert yaml.safe_load(path.read_text())


def test_alert_rules_reference_exported_metrics():
    exported = {v for k, v in vars(telemetry).items() if k.isupper() and isinstance(v, str) and v.startswith("temper_")}
    text = (CLUSTER / "prometheus-alerts.yaml").read_text()
    used = set(re.findall(r"ray_(temper_[a-z_]+)", text))
    assert used, "no Temper metric in the alert rules"
    for name in used:
        assert re.sub(r"_(bucket|sum|count)$", "", name) in exported, f"{name} is not exported by app/telemetry.py"


def test_rayjob_runs_the_quickstart():
    job = yaml.safe_load((CLUSTER / "rayjob-quickstart.yaml").read_text())
    assert job["kind"] == "RayJob"
    assert "python -m app run configs/quickstart.yaml" in job["spec"]["entrypoint"]
