"""`python -m app status` on the session's cluster: nodes and free CPUs as Ray counts them, the
registry's models with their latest versions and aliases read from the database, jobs and Tune
trials from Ray's state API, in a table and as JSON."""

from __future__ import annotations

import json

import pytest

from actors.registry.client import open_store
from app.cli.main import main
from app.cli.status import collect_status, format_status
from app.config.registry import RegistryConfig

pytestmark = pytest.mark.ray


def test_status_shows_cluster_registry_jobs_and_trials(ray_cluster, tmp_path, capsys):
    cfg = RegistryConfig.model_validate({"db_url": f"sqlite:///{tmp_path}/registry.db"})
    store = open_store(cfg)
    for i in (1, 2):
        store.register_version("digits", str(tmp_path / f"v{i}"), "torch_fp32")
    store.register_version("other", str(tmp_path / "o1"), "onnx_int8")
    store.set_alias("digits", "production", 1)
    store.close()

    st = collect_status(cfg)
    resources = ray_cluster.cluster_resources()
    assert st["cluster"]["cpus"]["total"] == resources["CPU"] == 4
    assert len(st["cluster"]["nodes"]) == len([n for n in ray_cluster.nodes() if n["Alive"]]) == 1
    assert 0 <= st["cluster"]["cpus"]["free"] <= 4
    assert st["registry"]["models"] == [
        {"name": "digits", "versions": 2, "latest": 2, "aliases": {"production": 1}},
        {"name": "other", "versions": 1, "latest": 1, "aliases": {}},
    ]
    assert st["jobs"] == {"running": []}  # nothing submitted with `ray job submit` here
    assert st["trials"] == {"running": 0}
    text = format_status(st)
    assert "CPUs" in text and "of 4" in text and "production->1" in text

    assert main(["status", "--json", f"registry.db_url=sqlite:///{tmp_path}/registry.db"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["registry"]["models"] == st["registry"]["models"]
