"""The Prometheus alert rules and the Grafana dashboard in cluster/ query only metrics that exist:
Temper's own (app/telemetry.py, which Ray exports with a `ray_` prefix) or Ray built-ins named
below, each checked against the installed Ray's source. With promtool (Debian package
`prometheus`) the rules pass `promtool check rules`, their unit tests (cluster/prometheus-alerts.test.yaml)
pass `promtool test rules`, and every dashboard query parses as PromQL.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app import telemetry

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
RULES = CLUSTER / "prometheus-alerts.yaml"
RULE_TESTS = CLUSTER / "prometheus-alerts.test.yaml"
DASHBOARD = CLUSTER / "grafana-dashboard.json"

RAY_BUILTINS = {
    # exported name: (file of the installed `ray` package that defines it, the name given there)
    "ray_serve_deployment_replica_starts_total": ("serve/_private/replica.py", "serve_deployment_replica_starts"),
    "ray_serve_deployment_replica_healthy": ("serve/_private/deployment_state.py", "serve_deployment_replica_healthy"),
}
"""Ray Serve's own metrics the rules and the dashboard use. A Counter is exported with `_total`."""

OURS = {f"ray_{v}" for k, v in vars(telemetry).items() if k.isupper() and isinstance(v, str) and v.startswith("temper_")}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`; .ci/run installs it)")

_PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                 "offset", "Inf", "NaN", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, label matchers,
    ranges and grouping lists are removed, that are neither a function call nor a keyword."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if not call and word not in _PROMQL_WORDS:
            names.add(word)
    return names


def unknown_metrics(expr: str) -> list[str]:
    unknown = []
    for name in sorted(metric_names(expr)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in OURS and base not in OURS and name not in RAY_BUILTINS:
            unknown.append(name)
    return unknown


def test_metric_names_parses_promql():
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(ray_temper_serve_request_latency_ms_bucket'
            '{status=~"5..", model="a b"}[5m]))) / on (model) group_left max(ray_x) > 4 and abs(y) == Inf')
    assert metric_names(expr) == {"ray_temper_serve_request_latency_ms_bucket", "ray_x", "y"}
    assert unknown_metrics(expr) == ["ray_x", "y"]


def test_ray_builtins_exist_in_the_installed_ray():
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    for exported, (path, name) in RAY_BUILTINS.items():
        assert f'"{name}"' in (ray_dir / path).read_text(), f"{exported}: Ray no longer defines {name!r} in {path}"


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_alert_rules_read_only_known_metrics():
    rules = _rules()
    assert {r["alert"] for r in rules} >= {"TemperHighErrorRatio", "TemperSlowInference", "TemperAutoRollback",
                                           "TemperReplicaRestartLoop", "TemperTrainingStalled",
                                           "TemperTrainingLossNaN", "TemperTrainingLossExploding"}
    for rule in rules:
        assert metric_names(rule["expr"]), f"{rule['alert']}: no metric in its expr"
        assert not unknown_metrics(rule["expr"]), \
            f"{rule['alert']} reads {unknown_metrics(rule['expr'])}: neither in app/telemetry.py nor in RAY_BUILTINS"


def test_every_alert_fires_in_the_rule_tests():
    fired = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    missing = sorted({r["alert"] for r in _rules()} - fired)
    assert not missing, f"no case in {RULE_TESTS.name} expects these alerts to fire: {missing}"


@needs_promtool
def test_promtool_check_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_test_rules():
    out = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def _panels() -> list[dict]:
    top = json.loads(DASHBOARD.read_text())["panels"]
    return [p for panel in top for p in [panel, *panel.get("panels", [])]]


def test_dashboard_is_a_grafana_dashboard_on_a_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": f"${{{var['name']}}}"}
    panels = _panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == ref and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ref and t["expr"].strip() and t["refId"], p["title"]


def test_dashboard_queries_read_only_known_metrics():
    used = set()
    for p in _panels():
        for t in p.get("targets", []):
            assert not unknown_metrics(t["expr"]), \
                f"panel {p['title']!r} reads {unknown_metrics(t['expr'])}: neither in app/telemetry.py nor in RAY_BUILTINS"
            used |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in metric_names(t["expr"])}
    assert not OURS - used, f"metrics Temper exports that no dashboard panel shows: {sorted(OURS - used)}"


@needs_promtool
def test_dashboard_queries_parse_as_promql(tmp_path):
    """Each query as a recording rule, so `promtool check rules` parses it."""
    rules = [{"record": f"dashboard:panel{p['id']}_{t['refId']}", "expr": t["expr"]}
             for p in _panels() for t in p.get("targets", [])]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
