"""The MLflow mirror without Ray: a RegistryStore plus `MlflowMirror.sync_model` against a local
MLflow tracking store (a temporary SQLite file and an explicit artifact folder), checked through
mlflow's own client API. (tests/ray/test_registry_actor.py checks the actor's hook.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.mlflow_mirror import MlflowMirror
from actors.registry.client import resolve_mirror_settings
from actors.registry.store import RegistryStore
from app.config.registry import MlflowMirrorConfig


@pytest.fixture
def env(tmp_path):
    store = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
    settings = resolve_mirror_settings(MlflowMirrorConfig(enabled=True), store.url)
    yield store, settings
    store.close()


def _artifact(tmp_path: Path, name: str) -> str:
    folder = tmp_path / "artifacts" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "config.json").write_text("{}")
    return str(folder)


def _client(settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings["tracking_uri"], registry_uri=settings["registry_uri"])


def test_default_locations_sit_next_to_the_registry_database(tmp_path):
    settings = resolve_mirror_settings(MlflowMirrorConfig(enabled=True), f"sqlite:///{tmp_path / 'reg.db'}")
    assert settings == {
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registry_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "artifact_location": (tmp_path / "mlflow-artifacts").as_uri(), "experiment": "temper", "log_artifacts": True,
    }
    assert resolve_mirror_settings(MlflowMirrorConfig(), f"sqlite:///{tmp_path / 'reg.db'}") is None
    explicit = MlflowMirrorConfig(enabled=True, tracking_uri="sqlite:///rel/mlflow.db", artifact_location="s3://b/mlflow")
    got = resolve_mirror_settings(explicit, "postgresql://u@db/registry", cwd=tmp_path)
    assert (got["tracking_uri"], got["artifact_location"]) == (f"sqlite:///{tmp_path / 'rel' / 'mlflow.db'}", "s3://b/mlflow")
    with pytest.raises(ValueError, match="must be set when registry.db_url is not a SQLite file"):
        resolve_mirror_settings(MlflowMirrorConfig(enabled=True), "postgresql://u@db/registry")


def test_versions_runs_metrics_artifacts_and_aliases_are_mirrored(env, tmp_path):
    store, settings = env
    store.register_version(
        "gpt", _artifact(tmp_path, "v1"), "torch_fp32", config={"train": {"lr": 0.003, "steps": 30}},
        params={"lr": 0.003, "optimizer": "adamw"}, metrics={"val_loss": 2.4}, dataset_fingerprint="lm-code:abc",
        tags={"run": "quickstart"}, label="1.0.0",
    )
    store.log_metrics_batch("gpt", 1, [{"step": s, "metrics": {"train_loss": 3.0 - s / 10}} for s in range(0, 30, 10)])
    store.register_version("gpt", _artifact(tmp_path, "v2"), "torch_int8", parent={"model": "gpt", "version": 1},
                           transformation="quantized", metrics={"val_loss": 2.45, "latency_ms": 0.4})
    store.set_alias("gpt", "production", 1, reason="baseline")
    store.set_alias("gpt", "production", 2, reason="int8 within budget")
    mirror = MlflowMirror(settings)
    mirror.sync_model(store, "gpt")

    client = _client(settings)
    model = client.get_registered_model("gpt")
    versions = {int(mv.tags["temper.version"]): mv for mv in client.search_model_versions("name='gpt'")}
    assert sorted(versions) == [1, 2]
    assert {k: str(v) for k, v in model.aliases.items()} == {"production": str(versions[2].version)}
    assert client.get_model_version_by_alias("gpt", "production").tags["temper.format"] == "torch_int8"
    assert versions[2].tags["temper.parent"] == "gpt:v1"
    assert versions[1].source == store.get_version("gpt", 1)["artifact_uri"]

    exp = client.get_experiment_by_name("temper")
    assert exp.artifact_location == settings["artifact_location"]  # never ./mlruns of the current folder
    run = client.get_run(versions[1].run_id)
    assert run.info.run_name == "gpt-v1" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.003" and run.data.params["config.train.steps"] == "30"
    assert run.data.tags["temper.dataset_fingerprint"] == "lm-code:abc" and run.data.tags["run"] == "quickstart"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] == [
        (0, 3.0), (10, 2.0), (20, 1.0)]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "artifact")) == [
        "artifact/config.json", "artifact/model.safetensors"]
    assert Path(settings["artifact_location"].removeprefix("file://")).is_dir()

    # later writes: more metrics and a rollback reach MLflow on the next sync, without duplicates
    store.log_metrics("gpt", 1, {"train_loss": 0.5}, step=30)
    store.rollback_alias("gpt", "production", reason="p99 regression")
    mirror.sync_model(store, "gpt")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 10, 20, 30]
    assert {k: str(v) for k, v in client.get_registered_model("gpt").aliases.items()} == {
        "production": str(versions[1].version)}

    # a restarted actor starts with a fresh mirror: it finds what exists instead of repeating it
    store.log_metrics("gpt", 1, {"train_loss": 0.4}, step=40)
    MlflowMirror(settings).sync_model(store, "gpt")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 10, 20, 30, 40]
    assert len(client.search_model_versions("name='gpt'")) == 2
    assert len(client.search_runs([exp.experiment_id])) == 2

    # a forced delete removes the alias in MLflow too and tags the mirrored version
    store.delete_version("gpt", 1, force=True, reason="bad data")
    mirror.sync_model(store, "gpt")
    assert client.get_registered_model("gpt").aliases == {}
    assert client.get_model_version("gpt", versions[1].version).tags["temper.deleted"] == "true"
