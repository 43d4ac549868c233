"""The `registry` section: where the registry actor lives and persists, and its optional MLflow mirror."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from app.config.auth import ENV_NAME_PATTERN
from app.config.base import MODEL_NAME_PATTERN, Section

_PASSWORD_RE = re.compile(r"(://[^:/@]*:)[^/]*@")  # scheme://user:PASSWORD@host...
MASK = "***"


def mask_url_password(url: str) -> str:
    """`url` (a database, tracking or any other URL) with its password shown as `***`."""
    return _PASSWORD_RE.sub(rf"\1{MASK}@", url, count=1)


def redact_secrets(tree: dict[str, Any]) -> dict[str, Any]:
    """A job's config tree as it may be written down (artifact meta, registry record, saved sweep,
    Serve config file): the registry database's password masked. Nothing else in a config is
    secret: API keys, JWT secrets and passwords otherwise come from environment variables."""
    reg = tree.get("registry")
    if isinstance(reg, dict) and isinstance(reg.get("db_url"), str):
        tree = {**tree, "registry": {**reg, "db_url": mask_url_password(reg["db_url"])}}
    return tree


class MlflowMirrorConfig(Section):
    """Optional mirror of the registry into MLflow: runs, registered model versions and aliases."""

    enabled: bool = False
    """Mirror each registered version to an MLflow run (params, metrics with steps, artifacts) and a registered model version, and every alias change to the MLflow alias. The registry database stays the source of truth: a failed mirror write is logged and retried, never fails the registry call."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default `sqlite:///<folder of the registry database>/mlflow.db` (needs the full `mlflow` package). Required when `registry.db_url` is not SQLite."""
    registry_uri: str | None = None
    """MLflow model-registry URI; default: the tracking URI."""
    artifact_location: str | None = None
    """Artifact root of the MLflow experiment (a folder or object-store URI); default `<folder of the registry database>/mlflow-artifacts`, never MLflow's `./mlruns` of the current folder. Required when `registry.db_url` is not SQLite."""
    experiment: str = Field("temper", min_length=1, max_length=200)
    """MLflow experiment holding one run per registered version (run name `<model>-v<N>`)."""
    log_artifacts: bool = True
    """Copy each version's local artifact folder into its MLflow run; false records only the location."""


class RegistryConfig(Section):
    """Where the ModelRegistry actor lives and where it persists."""

    actor_name: str = Field("temper-registry", pattern=MODEL_NAME_PATTERN)
    """Name of the detached registry actor (get-or-create)."""
    namespace: str = Field("temper", pattern=MODEL_NAME_PATTERN)
    """Ray namespace of the registry actor."""
    db_url: str = "sqlite:///temper_runs/registry.db"
    """SQLAlchemy URL of the registry database: `sqlite:///path.db` (a relative path is resolved against the driver's working directory) or `postgresql+psycopg://user:pass@host/db` (psycopg 3, the `postgres` extra) on clusters. Older schemas are migrated on open."""
    password_env: str | None = Field(None, pattern=ENV_NAME_PATTERN)
    """Environment variable holding the database password, for a `db_url` without one (`postgresql+psycopg://user@host/db`); the password then appears in no file, record or Serve config. A password inside `db_url` works too, but is masked (`***`) wherever a config is written down, so a sweep saved with one resumes only with its config file given again."""
    mlflow: MlflowMirrorConfig = Field(default_factory=MlflowMirrorConfig)
    """Optional MLflow mirror (off by default)."""
    artifact_roots: list[str] = Field(default_factory=list)
    """Folders (made absolute from where the job was given) or URI prefixes (`s3://bucket/prefix`) that every registered artifact must lie under: the registry actor refuses to register a version whose `artifact_uri` is elsewhere (a symlink is followed first), and a Serve replica refuses to load one. Set it on shared clusters (e.g. to the jobs' `storage_path`); empty: any local absolute path or known URI scheme. Fixed when the registry actor starts."""

    @field_validator("artifact_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[str]) -> list[str]:
        from app.artifact_roots import normalize_artifact_root

        return [normalize_artifact_root(r) for r in roots]

    @model_validator(mode="after")
    def _url(self) -> "RegistryConfig":
        if "://" not in self.db_url:
            raise ValueError(f"registry.db_url must be a SQLAlchemy URL such as sqlite:///path.db, got {self.db_url!r}")
        if self.password_env is not None and mask_url_password(self.db_url) != self.db_url:
            raise ValueError("registry.password_env is set and registry.db_url holds a password too; keep one of them")
        dialect = self.db_url.split("://", 1)[0].split("+", 1)[0]
        if dialect not in ("sqlite", "postgresql"):
            # the store's SQL (upserts, row locks, migrations) is written and tested for these two
            raise ValueError(f"registry.db_url: database {dialect!r} is not supported; use sqlite:///path.db or postgresql+psycopg://...")
        m = self.mlflow
        if m.enabled and not self.db_url.startswith("sqlite") and (m.tracking_uri is None or m.artifact_location is None):
            raise ValueError(
                "registry.mlflow.tracking_uri and registry.mlflow.artifact_location must be set when "
                "registry.mlflow.enabled is true and registry.db_url is not SQLite (their defaults sit next to a SQLite file)"
            )
        return self
