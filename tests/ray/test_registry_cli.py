"""`python -m app registry list|show|compare|alias|rollback|history|delete`, run in-process through
`app.cli.main.main` on the shared Ray cluster (the CLI reuses an initialized Ray), against a
registry actor of its own chosen with `registry.*` overrides."""

from __future__ import annotations

import getpass
import json
import re
import uuid

import pytest

from actors.registry.client import get_or_create_registry
from app.cli.main import main
from app.config.registry import RegistryConfig

pytestmark = pytest.mark.ray


@pytest.fixture
def cli(ray_cluster, tmp_path, capsys):
    """(run, handle): run(*argv) -> (exit code, stdout, stderr) with this test's registry overrides."""
    ray = ray_cluster
    cfg = RegistryConfig(actor_name=f"cli-test-{uuid.uuid4().hex[:8]}", namespace="temper-tests",
                         db_url=f"sqlite:///{tmp_path / 'registry.db'}")
    overrides = [f"registry.actor_name={cfg.actor_name}", f"registry.namespace={cfg.namespace}", f"registry.db_url={cfg.db_url}"]
    handle = get_or_create_registry(cfg)
    cfg_a = {"model": {"kind": "vit", "d_model": 64}, "train": {"lr": 0.003, "steps": 200}}
    cfg_b = {"model": {"kind": "vit", "d_model": 64}, "train": {"lr": 0.003, "steps": 400}}
    ray.get(handle.register_version.remote("digits", "/runs/digits/v1", "torch_fp32", config=cfg_a,
                                           metrics={"accuracy": 0.95, "latency_b1_ms": 0.24}, label="1.0.0"))
    ray.get(handle.register_version.remote("digits", "/runs/digits/v2", "onnx_int8", config=cfg_a,
                                           parent={"model": "digits", "version": 1}, transformation="quantized",
                                           metrics={"accuracy": 0.94, "latency_b1_ms": 0.06}))
    ray.get(handle.register_version.remote("digits", "/runs/digits/v3", "torch_fp32", config=cfg_b,
                                           parent={"model": "digits", "version": 1}, transformation="tuned",
                                           metrics={"accuracy": 0.97, "latency_b1_ms": 0.25}))
    ray.get(handle.set_alias.remote("digits", "production", 1, reason="baseline", actor="test"))

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["registry", *argv, *overrides])
        out, err = capsys.readouterr()
        return code, out, err

    yield run, handle
    ray.kill(handle, no_restart=True)


def test_list_models_and_versions_with_filters_and_sorting(cli):
    run, _ = cli
    code, out, _ = run("list")
    assert code == 0
    header, rule, row = out.strip().splitlines()
    assert header.split() == ["model", "versions", "latest", "aliases", "deleted"]
    assert row.split() == ["digits", "3", "3", "production=1", "0"]

    code, out, _ = run("list", "--model", "digits", "--sort", "latency_b1_ms", "--where", "accuracy>=0.95")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split()[:7] == ["version", "label", "format", "transformation", "parent", "aliases", "latency_b1_ms"]
    assert [line.split()[0] for line in lines[2:]] == ["1", "3"]  # v2 filtered out; sorted by latency

    code, out, _ = run("list", "--model", "digits", "--transformation", "quantized", "--json")
    assert code == 0 and [v["version"] for v in json.loads(out)] == [2]


def test_show_and_compare(cli):
    run, _ = cli
    code, out, _ = run("show", "--model", "digits", "--version", "2")
    assert code == 0
    assert re.search(r"^lineage +digits v1 \(trained\) -> digits v2 \(quantized\)$", out, re.M), out
    assert "accuracy" in out and "0.94" in out
    code, out, _ = run("show", "--model", "digits", "--version", "production", "--json")
    record = json.loads(out)
    assert (record["version"], record["label"], record["aliases"]) == (1, "1.0.0", ["production"])
    assert [n["version"] for n in record["lineage"]["children"]] == [2, 3]

    code, out, _ = run("compare", "--model", "digits", "2", "3")
    assert code == 0
    assert "lineage: siblings: both descend from the common ancestor: digits v2 (quantized) -- digits v1 (trained) -- digits v3 (tuned)" in out
    metric_rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("accuracy", "latency_b1_ms"))}
    assert metric_rows["accuracy"] == ["0.94", "0.97", "0.03", "+3.2%"]
    assert any(line.split() == ["train.steps", "200", "400"] for line in out.splitlines())
    code, out, _ = run("compare", "--model", "digits", "1", "2", "--json")
    assert json.loads(out)["config"] == [] and json.loads(out)["lineage"]["relation"] == "b descends from a"


def test_alias_rollback_history_as_of_and_delete(cli):
    run, handle = cli
    code, out, _ = run("alias", "--model", "digits", "--alias", "production", "--version", "2", "--reason", "int8 is as good", "--by", "alice")
    assert (code, out.strip()) == (0, "digits: alias 'production' -> v2 (was v1)")
    code, out, _ = run("rollback", "--model", "digits", "--alias", "production", "--reason", "p99 regression")
    assert (code, out.strip()) == (0, "digits: alias 'production' rolled back v2 -> v1")

    code, out, _ = run("history", "--model", "digits", "--alias", "production")
    rows = out.strip().splitlines()[2:]
    assert code == 0 and len(rows) == 3
    assert [r.split()[2:6] for r in rows] == [
        ["set", "-", "1", "test"], ["set", "1", "2", "alice"], ["rollback", "2", "1", f"cli:{getpass.getuser()}"]]
    assert rows[1].endswith("int8 is as good") and rows[2].endswith("p99 regression")
    history = json.loads(run("history", "--model", "digits", "--json")[1])
    code, out, _ = run("history", "--model", "digits", "--alias", "production", "--as-of", history[1]["created_at"])
    assert code == 0 and ": v2 (since " in out and "set by alice: int8 is as good" in out

    code, out, err = run("delete", "--model", "digits", "--version", "1")
    assert code == 1 and out == ""
    assert "registry: version 1 of model 'digits' is what alias(es) production point at" in err and "--force" in err
    code, out, _ = run("delete", "--model", "digits", "--version", "1", "--force", "--reason", "retired")
    assert (code, out.strip()) == (0, "digits: deleted v1 (forced; aliases removed: production)")
    last = json.loads(run("history", "--model", "digits", "--alias", "production", "--json")[1])[-1]
    assert (last["action"], last["to_version"], last["reason"]) == ("delete", None, "version 1 deleted (forced): retired")
    code, out, _ = run("list", "--model", "digits", "--include-deleted")
    assert "(deleted)" in out
    code, out, _ = run("alias", "--model", "digits", "--alias", "staging", "--version", "3")
    code, out, _ = run("alias", "--model", "digits", "--alias", "staging", "--remove")
    assert (code, out.strip()) == (0, "digits: alias 'staging' removed (was v3)")


def test_errors_exit_1_and_bad_config_exits_2(cli):
    run, _ = cli
    code, _, err = run("show", "--model", "bert")
    assert code == 1 and err.strip() == "registry: no model named 'bert' in the registry (models: digits)"
    code, _, err = run("rollback", "--model", "digits", "--alias", "production")
    assert code == 1 and "no earlier holder" in err
    code, _, err = run("alias", "--model", "digits", "--alias", "v2", "--version", "2")
    assert code == 1 and "alias 'v2' is reserved" in err
    code, _, err = run("alias", "--model", "digits", "--version", "2")
    assert code == 2 and "registry alias needs --alias" in err
    assert main(["registry", "list", "train.steps=3"]) == 2
    assert main(["registry", "list", "registry.db_url=nonsense"]) == 2
