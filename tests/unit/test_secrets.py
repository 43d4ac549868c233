"""The registry database's password is never written down: artifact meta, registry records, saved
sweeps and Serve config files hold it masked; `registry.password_env` keeps it out of the config
altogether. Runs against SQLite and the session's real PostgreSQL server (trust auth: it accepts
the connection whatever the password, so the password's path is what is checked here)."""

from __future__ import annotations

import json

import pytest

from actors.registry.client import database_url, open_store
from app.artifacts import write_meta
from app.config.base import ConfigError
from app.config.jobs import parse_config
from app.config.registry import RegistryConfig, mask_url_password, redact_secrets

SECRET = "s3cr3t-Pa55"


def _with_password(url: str) -> str:
    return url.replace("://temper@", f"://temper:{SECRET}@")


def test_masking_hides_only_the_password():
    url = f"postgresql+psycopg://temper:{SECRET}@db.internal:5432/registry"
    assert mask_url_password(url) == "postgresql+psycopg://temper:***@db.internal:5432/registry"
    assert mask_url_password("sqlite:////tmp/r.db") == "sqlite:////tmp/r.db"
    tree = {"name": "x", "registry": {"db_url": url, "actor_name": "a"}, "train": {"lr": 1}}
    assert SECRET not in json.dumps(redact_secrets(tree)) and tree["registry"]["db_url"] == url  # a copy


def test_a_job_with_a_password_writes_none_into_its_artifact_meta(tmp_path):
    job = parse_config("train", {"name": "t", "model": {"kind": "vit"}, "data": {"name": "digits"},
                                 "registry": {"db_url": f"postgresql+psycopg://temper:{SECRET}@db/registry"}})
    write_meta(tmp_path, job, "torch_fp32")
    text = (tmp_path / "config.json").read_text()
    assert SECRET not in text and "temper:***@db/registry" in text


def test_password_env_and_an_inline_password_do_not_mix():
    with pytest.raises(ValueError, match="registry.password_env is set and registry.db_url holds a password too"):
        RegistryConfig(db_url=f"postgresql+psycopg://temper:{SECRET}@db/r", password_env="TEMPER_DB_PASSWORD")


def test_the_connect_url_takes_the_password_from_the_environment(registry_db_url, monkeypatch):
    cfg = RegistryConfig(db_url=registry_db_url, password_env="TEMPER_TEST_DB_PASSWORD")
    monkeypatch.delenv("TEMPER_TEST_DB_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="TEMPER_TEST_DB_PASSWORD is not set"):
        database_url(cfg)
    monkeypatch.setenv("TEMPER_TEST_DB_PASSWORD", SECRET)
    if registry_db_url.startswith("postgresql"):
        assert database_url(cfg) == _with_password(registry_db_url)
    store = open_store(cfg)  # connects (PostgreSQL: with the password from the environment)
    try:
        assert store.list_models() == []
    finally:
        store.close()


def test_a_config_read_back_with_its_password_masked_says_so_instead_of_failing_to_log_in(registry_db_url):
    if not registry_db_url.startswith("postgresql"):
        pytest.skip("a SQLite URL has no password")
    masked = mask_url_password(_with_password(registry_db_url))
    with pytest.raises(ConfigError, match="written down with its password masked"):
        database_url(RegistryConfig(db_url=masked))
