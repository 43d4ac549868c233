"""`registry.artifact_roots`: the registry refuses a version whose artifact lies outside every
configured root (after following symlinks; URI prefixes compare whole path segments), and the
config makes local roots absolute. Without roots any absolute path is accepted, as before."""

from __future__ import annotations

import asyncio
import os

import pytest

from actors.registry.actor import ModelRegistry
from app.config.registry import RegistryConfig


def _registry(tmp_path, roots):
    cfg = RegistryConfig.model_validate({"db_url": f"sqlite:///{tmp_path / 'registry.db'}", "artifact_roots": roots})
    return ModelRegistry.__ray_actor_class__(cfg.db_url, None, None, cfg.artifact_roots)  # the actor's class, without Ray


def test_local_roots_become_absolute_and_uri_prefixes_lose_their_slash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RegistryConfig.model_validate({"artifact_roots": ["runs", "s3://bucket/models/"]})
    assert cfg.artifact_roots == [str(tmp_path.resolve() / "runs"), "s3://bucket/models"]
    with pytest.raises(ValueError, match="registry.artifact_roots: an empty root"):
        RegistryConfig.model_validate({"artifact_roots": [" "]})


def test_registering_outside_the_roots_is_refused(tmp_path):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    (runs / "v1").mkdir(parents=True)
    elsewhere.mkdir()
    (runs / "escape").symlink_to(elsewhere)  # inside by name, outside in fact
    registry = _registry(tmp_path, [str(runs), "s3://bucket/models"])

    async def calls():
        ok = [await registry.register_version("m", uri, "torch_fp32")
              for uri in (str(runs / "v1"), (runs / "v1").as_uri(), "s3://bucket/models/m/v3")]
        refused = []
        for uri in (str(elsewhere), str(runs / "escape"), str(tmp_path / "runs-other"), "s3://bucket/models-x/m",
                    "gs://bucket/models/m"):
            with pytest.raises(ValueError, match="is outside registry.artifact_roots") as err:
                await registry.register_version("m", uri, "torch_fp32")
            refused.append(str(err.value))
        return ok, refused, await registry.list_versions("m")

    ok, refused, versions = asyncio.run(calls())
    assert [r["version"] for r in ok] == [1, 2, 3]
    assert len(versions) == 3  # nothing was registered by the refused calls
    assert all(str(runs) in msg and "s3://bucket/models" in msg for msg in refused)


def test_without_roots_any_absolute_path_registers(tmp_path):
    registry = _registry(tmp_path, [])
    record = asyncio.run(registry.register_version("m", os.fspath(tmp_path / "anywhere"), "torch_fp32"))
    assert record["version"] == 1
