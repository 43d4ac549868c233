"""The command line without Ray: `schema`, `validate` exit codes, `--verbose`, `--json` keeping
stdout for JSON alone, and user mistakes reported as one line (no traceback).

The `registry` reads here run `python -m app` in a subprocess against a database the test
writes through the store: with no cluster running they must not start Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from actors.registry.errors import RegistryNotFound
from app.cli import main as cli_main
from app.cli.console import results_stream
from app.runtime import VERBOSE_ENV

ROOT = Path(__file__).resolve().parents[2]


def _app(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", VERBOSE_ENV)}
    return subprocess.run([sys.executable, "-m", "app", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**clean, **(env or {})})


def test_schema_prints_the_reference_tables():
    proc = _app("schema")
    assert proc.returncode == 0, proc.stderr
    assert "#### OptimizeJob (`python -m app run`)" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) > 50 and any(row.startswith("| `lr`") for row in rows)
    assert "Traceback" not in proc.stderr


def test_validate_exit_codes(tmp_path):
    ok = _app("validate", "train", "configs/quickstart.yaml")
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok: configs/quickstart.yaml is a valid TrainJob")

    bad = _app("validate", "train", "configs/quickstart.yaml", "train.no_such_key=1")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines()[0].startswith("config error:") and "train.no_such_key" in bad.stderr
    assert "Traceback" not in bad.stderr

    missing = _app("validate", "run", str(tmp_path / "nothing.yaml"))
    assert missing.returncode == 2 and "nothing.yaml" in missing.stderr and "Traceback" not in missing.stderr


def test_verbose_is_accepted_before_and_after_the_verb(monkeypatch, capsys):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert cli_main.main(["validate", "train", "configs/quickstart.yaml"]) == 0
    assert VERBOSE_ENV not in os.environ
    assert cli_main.main(["--verbose", "validate", "train", "configs/quickstart.yaml"]) == 0
    assert os.environ[VERBOSE_ENV] == "1"  # where Ray is started, this turns Ray's own log lines back on
    monkeypatch.delenv(VERBOSE_ENV)
    assert cli_main.main(["validate", "train", "configs/quickstart.yaml", "-v"]) == 0
    assert os.environ[VERBOSE_ENV] == "1"
    proc = _app("registry", "list", "--verbose", "--help")
    assert proc.returncode == 0 and "--verbose" in proc.stdout


def test_json_mode_sends_everything_but_the_result_to_stderr(capsys):
    with results_stream(json_only=True) as out:
        print("[train] step 1/2 loss 0.5")  # a progress line, e.g. forwarded from a worker
        print('{"ok": true}', file=out)
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"ok": True} and captured.err == "[train] step 1/2 loss 0.5\n"
    with results_stream(json_only=False) as out:
        print("table", file=out)
        print("progress")
    assert capsys.readouterr().out == "table\nprogress\n"


def test_a_user_error_is_one_line_and_an_unexpected_one_a_traceback(monkeypatch, capsys):
    def missing_model(args):  # e.g. `run` reaching a serve entry that names no registered model
        raise RegistryNotFound("no model named 'lm-code' in the registry (models: mine)")

    monkeypatch.setattr(cli_main, "cmd_validate", missing_model)
    assert cli_main.main(["validate", "train", "configs/quickstart.yaml"]) == 1
    assert capsys.readouterr().err == "error: no model named 'lm-code' in the registry (models: mine)\n"

    def bug(args):
        raise KeyError("not a user mistake")

    monkeypatch.setattr(cli_main, "cmd_validate", bug)
    with pytest.raises(KeyError):
        cli_main.main(["validate", "train", "configs/quickstart.yaml"])


# ----------------------------------------------------------------------------- registry reads without Ray


@pytest.fixture
def registry_config(tmp_path):
    """A config file whose registry database holds model `digits` v1 (production) and v2 (int8)."""
    from actors.registry.client import open_store
    from app.config.registry import RegistryConfig

    db_url = f"sqlite:///{tmp_path / 'registry.db'}"
    store = open_store(RegistryConfig(db_url=db_url))
    try:
        store.register_version("digits", "/runs/digits/v1", "torch_fp32", metrics={"val_accuracy": 0.96})
        store.register_version("digits", "/runs/digits/v2", "onnx_int8", parent={"model": "digits", "version": 1},
                               transformation="quantized", metrics={"val_accuracy": 0.95})
        store.set_alias("digits", "production", 1, reason="baseline", actor="test")
    finally:
        store.close()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"registry": {"db_url": db_url, "actor_name": "cli-unit-never-started"}}))
    return str(path)


def test_registry_list_json_is_only_json_and_needs_no_ray(registry_config):
    proc = _app("registry", "list", "--json", "--config", registry_config)
    assert proc.returncode == 0, proc.stderr
    [model] = json.loads(proc.stdout)
    assert (model["name"], model["versions"], model["latest"], model["aliases"]) == ("digits", 2, 2, {"production": 1})
    assert "[ray]" not in proc.stderr  # no Ray instance was started for a read

    proc = _app("registry", "list", "--model", "digits", "--where", "val_accuracy>=0.955", "--json", "--config", registry_config)
    assert proc.returncode == 0 and [v["version"] for v in json.loads(proc.stdout)] == [1]
    proc = _app("registry", "show", "--model", "digits", "--version", "production", "--config", registry_config)
    assert proc.returncode == 0 and "lineage" in proc.stdout and "[ray]" not in proc.stderr


def test_a_missing_model_is_one_line_without_traceback(registry_config):
    proc = _app("registry", "show", "--model", "bert", "--config", registry_config)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["registry: no model named 'bert' in the registry (models: digits)"]
    proc = _app("registry", "show", "--model", "digits", "--version", "7", "--config", registry_config)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "7" in proc.stderr


def test_ray_is_quiet_unless_verbose(monkeypatch):
    import logging

    from app.runtime import ray_log_options

    for name in (VERBOSE_ENV, "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING"):
        monkeypatch.delenv(name, raising=False)
    quiet = ray_log_options()
    assert quiet["logging_level"] == logging.WARNING and quiet["logging_config"].log_level == "WARNING"
    # Ray Train's own console loggers (one `TrainingReport(...)` line per report per rank) hand over to the job's level
    assert os.environ["RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING"] == "0"
    assert os.environ["RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING"] == "0"
    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert ray_log_options() == {}


def test_direct_ingress_env_turns_the_mode_on_and_keeps_what_the_user_set(monkeypatch, tmp_path, capsys):
    from app.runtime import direct_ingress_env

    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "7")
    # the mode itself, and the user's draining period instead of ours (1 s: no balancer in front)
    assert direct_ingress_env() == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "7"}
    # `serve config` reminds whoever starts the cluster, only when the key is set
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"serve": {"models": [{"model": "m", "version": "1"}], "direct_ingress": True}}))
    assert cli_main.main(["serve", "config", str(cfg)]) == 0
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in capsys.readouterr().out
    cfg.write_text(yaml.safe_dump({"serve": {"models": [{"model": "m", "version": "1"}]}}))
    assert cli_main.main(["serve", "config", str(cfg)]) == 0
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in capsys.readouterr().out


def test_an_embedded_ray_starts_with_a_light_log_monitor_and_serve_loop_and_keeps_what_the_user_set(monkeypatch):
    """`connect` starts the local Ray with the log monitor's and Serve controller's settings in the
    environment its processes inherit, and only around `ray.init`: the settings are Ray's own
    variables, read by those processes when they start. `ray.init` is replaced by a recorder that
    stops before anything starts (nothing else of Ray is involved)."""
    import ray

    from app import runtime

    monkeypatch.setenv("RAY_LOG_MONITOR_MAX_OPEN_FILES", "300")
    for name in ("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "LOG_NAME_UPDATE_INTERVAL_S", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S",
                 "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    expected = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "1",
                "RAY_LOG_MONITOR_MAX_OPEN_FILES": "300", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
    assert runtime.light_node_env() == expected
    seen = {}

    class Stop(Exception):
        pass

    def recording_init(**kwargs):
        seen.update({name: os.environ.get(name) for name in runtime.light_node_env()}, address=kwargs.get("address"))
        raise Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", recording_init)
    before = dict(os.environ)
    try:
        with pytest.raises(Stop):
            runtime.connect(num_cpus=2)
    finally:  # connect also sets Ray Train's defaults in this process: not for the tests after this one
        after = dict(os.environ)
        os.environ.clear()
        os.environ.update(before)
    assert seen == {**expected, "address": "local"}
    # the process's own environment is as it was
    assert "LOG_NAME_UPDATE_INTERVAL_S" not in after and "RAY_SERVE_CONTROL_LOOP_INTERVAL_S" not in after
