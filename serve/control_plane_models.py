"""The request and response bodies of the control plane's routes (serve/control_plane.py): the
OpenAPI schema documents them, and schemathesis generates requests from it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from actors.registry.validation import TRANSFORMATIONS
from app.config.base import MODEL_NAME_PATTERN
from app.config.formats import ArtifactFormat


class TrainingJobRequest(BaseModel):
    """A job to submit: the verb and its config, the same tree a job file holds."""

    model_config = ConfigDict(extra="forbid")

    verb: Literal["train", "tune", "run"] = "train"
    """`python -m app <verb>` runs the job."""
    config: dict[str, Any]
    """The job config (the YAML file's content as JSON), e.g. configs/quickstart.yaml's, with an
    absolute `storage_path`; its `registry` section, if any, must name this server's registry
    actor, and is replaced by the server's."""


class TrainingJob(BaseModel):
    """A training job as Ray Jobs knows it."""

    job_id: str
    status: str
    """Ray's job status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    verb: str
    name: str
    """The run's (and the registry model's) name."""
    config_path: str
    message: str | None = None
    start_time: int | None = None
    end_time: int | None = None


class TrainingProgress(BaseModel):
    """The run's latest reported numbers (null until the run reports them)."""

    job_id: str
    status: str
    name: str
    step: int | None = None
    steps: int | None = None
    """Total steps of the run."""
    loss: float | None = None
    """Mean training loss over the last `train.log_every` steps."""
    lr: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    metric: str | None = None
    """The run's eval metric (e.g. val_accuracy)."""
    metric_value: float | None = None
    eval_step: int | None = None
    """The step of the last evaluation."""
    updated_at: float | None = None


class StoppedJob(TrainingJob):
    stop_sent: bool
    """False when the job had already ended."""


class VersionRecord(BaseModel):
    """A registry version record (the fields `registry show --json` prints)."""

    model_config = ConfigDict(extra="allow")

    model: str
    version: int
    format: str
    artifact_uri: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    aliases: list[str] = Field(default_factory=list)


class VersionList(BaseModel):
    model: str
    versions: list[VersionRecord]


class ParentRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int | str
    """A version number, an alias or `latest`."""


class RegisterRequest(BaseModel):
    """An artifact to register as the next version of a model (what `registry register` takes)."""

    model_config = ConfigDict(extra="forbid")

    artifact_uri: str = Field(min_length=1, max_length=4096)
    """The artifact folder: an absolute path on storage this server and the replicas share, or a URI."""
    format: ArtifactFormat
    parent: ParentRef | None = None
    """The version this one was derived from (it must exist)."""
    transformation: Literal[TRANSFORMATIONS] = "imported"  # type: ignore[valid-type]
    metrics: dict[str, float] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    label: str | None = Field(None, max_length=128)
    """An optional semantic name (e.g. 1.4.0), unique within the model."""


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | str
    """A version number, another alias or `latest`."""
    reason: str = Field("", max_length=500)


class ReasonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500)


class AliasChange(BaseModel):
    """The registry's answer to an alias move."""

    model_config = ConfigDict(extra="allow")

    model: str
    alias: str
    version: int | None = None
    from_version: int | None = None


class DeletedVersion(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    version: int
    forced: bool = False
    aliases_removed: list[str] = Field(default_factory=list)
