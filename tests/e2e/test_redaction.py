"""Secrets stay secret through a full `run`: a database password inside `registry.db_url` (given
on the command line, so it is part of the config), the API-key server secret and an API key
(given in the environment) appear in none of what the run writes down: the commands' output,
every file of the workspace (artifacts, checkpoints, saved configs, the Serve config, the MLflow
mirror's database and artifacts), the cluster's Ray logs, and every row of the registry's
PostgreSQL database (version configs, params, audit log).

The PostgreSQL server trusts local connections, so any password logs in: the test shows where a
password would travel, not that the server checked it."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CLI_TIMEOUT_S, QuickstartRun, last_json, summary_of

pytestmark = pytest.mark.e2e


def _cli(ws, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {**ws.head.env, **env}
    proc = subprocess.run([sys.executable, "-m", "app", *args], cwd=ws.path, env=full, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def _files_containing(root: Path, needles: dict[str, bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue  # a socket or a file removed meanwhile
            hits += [f"{name} in {path}" for name, value in needles.items() if value in data]
    return hits


def _database_rows(server, database: str) -> str:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=server.port, user=server.user, dbname=database) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'").fetchall()]
        assert {"versions", "audit_log"} <= set(tables), tables
        return "\n".join(str(row) for t in tables for row in conn.execute(f'SELECT row_to_json(x)::text FROM "{t}" x'))


def test_secrets_in_config_and_environment_are_written_nowhere(workspace, postgres_server):
    ws = workspace
    password = "pw-" + secrets.token_hex(12)
    key_secret = "ks-" + secrets.token_hex(24)
    database = postgres_server.create_database()
    db_url = postgres_server.url(database).replace(f"{postgres_server.user}@", f"{postgres_server.user}:{password}@")
    registry = (f"registry.db_url={db_url}", "registry.actor_name=redaction-registry", "registry.mlflow.enabled=true",
                f"registry.mlflow.tracking_uri=sqlite:///{ws.path}/redaction-mlflow.db",
                f"registry.mlflow.artifact_location={ws.path}/redaction-mlflow-artifacts")
    env = {"TEMPER_KEY_SECRET": key_secret}

    created = last_json(_cli(ws, env, "auth", "create-key", "redaction-admin", "--role", "admin", "--json", *registry[:2]).stdout)
    api_key = created["key"]
    env["TEMPER_API_KEY"] = api_key
    app = ("serve.app_name=redaction", "serve.route_prefix=/redaction", "auth.enabled=true")
    outputs = []
    try:
        run = _cli(ws, env, "run", "configs/quickstart.yaml", "name=redaction", *QuickstartRun.overrides,
                   "compress.methods=[onnx_int8]", *registry, *app, "--json")
        outputs.append(run.stdout + run.stderr)
        summary = summary_of(run)
        assert summary["client_answer"]["version"] == summary["served_version"]  # the client call passed auth with the key
        listed = _cli(ws, env, "registry", "list", "--model", "redaction", "--json", *registry)
        outputs.append(listed.stdout + listed.stderr)
        assert len(json.loads(listed.stdout)) >= 2  # trained + onnx_int8, written with the key's admin role
    finally:
        done = _cli(ws, env, "serve", "shutdown", "configs/quickstart.yaml", *registry, *app)
        outputs.append(done.stdout + done.stderr)

    needles = {"database password": password.encode(), "key server secret": key_secret.encode(), "API key": api_key.encode()}
    for text in outputs:
        for name, value in needles.items():
            assert value.decode() not in text, f"{name} printed by a command"
    assert not _files_containing(ws.path, needles)
    assert not _files_containing(ws.head.temp_dir, needles)  # every Ray log of the cluster (driver, actors, Serve)
    rows = _database_rows(postgres_server, database)
    assert "redaction-admin" in rows and "redaction" in rows  # the rows are there ...
    for name, value in needles.items():
        assert value.decode() not in rows, f"{name} in the registry database"  # ... without the secrets
