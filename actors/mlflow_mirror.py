"""Mirror of the registry into MLflow (tracking + model registry, aliases rather than stages).

The registry database stays the source of truth; MLflow is brought in line with it, one
model at a time, by `MlflowMirror.sync_model(store, model)`, which the registry actor calls on
its mirror thread after a write to that model. Each sync is idempotent and converges:

- every registry version gets one MLflow run in the configured experiment (run name
  `<model>-v<N>`, found again by its `temper.model` / `temper.version` tags), holding the
  version's params, its flattened config (`config.train.lr`, ...), every logged metric value
  with its step, tags naming format, transformation, parent, config hash and dataset
  fingerprint, and (unless `log_artifacts` is off) a copy of the local artifact folder under
  `artifact/`;
- every version that is not deleted gets an MLflow registered model version of the
  registered model of the same name, `source` = the registry's artifact URI, linked to that
  run, tagged `temper.version`; a version deleted in the registry is tagged `temper.deleted`;
- the MLflow registered model's aliases are set to exactly the registry's aliases.

Metrics are sent incrementally: the run's `temper.metrics_synced_through` tag holds the last
registry metrics row sent, so a restarted actor resumes where MLflow stopped (a crash between
sending a batch and updating the tag can repeat that batch's points in MLflow; never lose them).
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from actors.registry.store import RegistryStore
from actors.registry.validation import flatten_dict

log = logging.getLogger(__name__)

_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
_METRICS_PER_BATCH = 1000
_PARAM_VALUE_MAX = 6000
_MLFLOW_RESERVED_ALIAS_RE = re.compile(r"latest|[vV][0-9]+", re.IGNORECASE)  # e.g. `v3` set by a schema-v1 registry


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def _local_dir(artifact_uri: str) -> Path | None:
    """The local file or folder of an artifact URI, or None for object-store URIs."""
    if artifact_uri.startswith("file://"):
        artifact_uri = artifact_uri.removeprefix("file://").removeprefix("localhost")
    if "://" in artifact_uri:
        return None
    return Path(artifact_uri)


class MlflowMirror:
    """Brings one MLflow tracking server / model registry in line with the registry database.

    `settings` come from `actors.registry.client.resolve_mirror_settings`: tracking_uri, registry_uri,
    artifact_location, experiment, log_artifacts. Not thread-safe: one mirror thread calls it.
    """

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self._client = None
        self._experiment_id: str | None = None
        self._runs: dict[tuple[str, int], str] = {}  # (model, version) -> run id
        self._synced: dict[tuple[str, int], int] = {}  # (model, version) -> last metrics row id sent

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient  # imported here: it is slow, and only the mirror needs it

            self._client = MlflowClient(tracking_uri=self.settings["tracking_uri"],
                                        registry_uri=self.settings["registry_uri"])
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            name = self.settings["experiment"]
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        name, artifact_location=self.settings["artifact_location"], tags={"temper.mirror": "true"}
                    )
                except MlflowException:  # created by another process meanwhile
                    self._experiment_id = self.client.get_experiment_by_name(name).experiment_id
            else:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    # ---- one model

    def sync_model(self, store: RegistryStore, model: str) -> None:
        after = {version: row for (name, version), row in self._synced.items() if name == model}
        snapshot = store.mirror_snapshot(model, metrics_after=after)
        self._ensure_registered_model(model)
        mirrored = self._model_versions(model)
        for rec in snapshot["versions"]:
            key = (model, rec["version"])
            if rec["deleted"] is not None and rec["version"] not in mirrored and key not in self._runs:
                continue  # deleted before it was ever mirrored: nothing to show in MLflow
            run_id = self._ensure_run(model, rec)
            self._send_metrics(model, rec, run_id)
            mv = mirrored.get(rec["version"])
            if mv is None and rec["deleted"] is None:
                mirrored[rec["version"]] = self.client.create_model_version(
                    name=model, source=rec["artifact_uri"], run_id=run_id, tags=self._version_tags(rec),
                    description=f"Temper registry {model} v{rec['version']}: {rec['transformation']} {rec['format']}",
                )
            elif mv is not None and rec["deleted"] is not None and mv.tags.get("temper.deleted") != "true":
                self.client.set_model_version_tag(model, mv.version, "temper.deleted", "true")
        self._sync_aliases(model, snapshot["aliases"], mirrored)

    def _ensure_registered_model(self, model: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(model)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.client.create_registered_model(
                model, tags={"temper.mirror": "true"}, description="Mirrored from the Temper model registry."
            )

    def _model_versions(self, model: str) -> dict[int, Any]:
        """{registry version number: MLflow ModelVersion} of the versions already mirrored."""
        out: dict[int, Any] = {}
        token = None
        while True:
            page = self.client.search_model_versions(f"name='{model}'", page_token=token)
            for mv in page:
                if "temper.version" in mv.tags:
                    out[int(mv.tags["temper.version"])] = mv
            token = page.token
            if not token:
                return out

    @staticmethod
    def _version_tags(rec: dict) -> dict[str, str]:
        parent = rec["parent"]
        tags = {
            "temper.model": rec["model"],
            "temper.version": str(rec["version"]),
            "temper.format": rec["format"],
            "temper.transformation": rec["transformation"],
            "temper.artifact_uri": rec["artifact_uri"],
            "temper.parent": f"{parent['model']}:v{parent['version']}" if parent else "",
            "temper.config_hash": rec["config_hash"] or "",
            "temper.dataset_fingerprint": rec["dataset_fingerprint"] or "",
            "temper.label": rec["label"] or "",
        }
        return {k: v for k, v in tags.items() if v}

    def _ensure_run(self, model: str, rec: dict) -> str:
        key = (model, rec["version"])
        if key in self._runs:
            return self._runs[key]
        found = self.client.search_runs(
            [self.experiment_id()],
            filter_string=f"tags.`temper.model` = '{model}' and tags.`temper.version` = '{rec['version']}'",
            max_results=1,
        )
        if found:
            run = found[0]
            self._synced[key] = int(run.data.tags.get("temper.metrics_synced_through", "0"))
            complete = run.data.tags.get("temper.run_complete") == "true"
        else:
            tags = {**{k: v for k, v in rec["tags"].items() if not k.startswith("mlflow.")}, **self._version_tags(rec)}
            run = self.client.create_run(
                self.experiment_id(), start_time=_ms(rec["created_at"]), tags=tags, run_name=f"{model}-v{rec['version']}",
            )
            complete = False
        run_id = run.info.run_id
        if not complete:  # new, or created by a mirror that stopped half-way: params and artifacts are idempotent
            self._log_params(run_id, rec)
            local = _local_dir(rec["artifact_uri"])
            if self.settings["log_artifacts"] and local is not None and local.exists():
                if local.is_dir():
                    self.client.log_artifacts(run_id, str(local), artifact_path="artifact")
                else:
                    self.client.log_artifact(run_id, str(local), artifact_path="artifact")
            self.client.set_tag(run_id, "temper.run_complete", "true")
            self.client.set_terminated(run_id, "FINISHED", end_time=_ms(rec["created_at"]))
        self._runs[key] = run_id
        return run_id

    def _log_params(self, run_id: str, rec: dict) -> None:
        from mlflow.entities import Param

        values = {**{f"config.{k}": v for k, v in flatten_dict(rec["config"] or {}).items()}, **rec["params"]}
        params = [Param(k, str(v)[:_PARAM_VALUE_MAX]) for k, v in sorted(values.items())]
        for i in range(0, len(params), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i:i + _PARAMS_PER_BATCH])

    def _send_metrics(self, model: str, rec: dict, run_id: str) -> None:
        from mlflow.entities import Metric

        key = (model, rec["version"])
        rows = [r for r in rec["metric_rows"] if r["id"] > self._synced.get(key, 0)]
        if not rows:
            return
        for i in range(0, len(rows), _METRICS_PER_BATCH):
            chunk = rows[i:i + _METRICS_PER_BATCH]
            self.client.log_batch(run_id, metrics=[
                Metric(r["key"], r["value"], _ms(r["created_at"]), r["step"] if r["step"] is not None else 0)
                for r in chunk
            ])
            self.client.set_tag(run_id, "temper.metrics_synced_through", str(chunk[-1]["id"]))
            self._synced[key] = chunk[-1]["id"]

    def _sync_aliases(self, model: str, aliases: dict[str, int], mirrored: dict[int, Any]) -> None:
        desired = {alias: str(mirrored[v].version) for alias, v in aliases.items() if v in mirrored}
        for alias in [a for a in desired if _MLFLOW_RESERVED_ALIAS_RE.fullmatch(a)]:
            log.warning("alias %r of model %r is not mirrored: MLflow reserves that name", alias, model)
            del desired[alias]
        current = {alias: str(v) for alias, v in self.client.get_registered_model(model).aliases.items()}
        for alias, version in sorted(desired.items()):
            if current.get(alias) != version:
                self.client.set_registered_model_alias(model, alias, version)
        for alias in sorted(current.keys() - desired.keys()):
            self.client.delete_registered_model_alias(model, alias)
