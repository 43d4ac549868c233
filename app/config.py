"""Temper's configuration schema: one pydantic model per job kind.

Every section forbids unknown keys, documents each field, and checks cross-field rules with
errors that name the field. Jobs compose sections:

    TrainJob    = name + storage_path + registry + model + data + train
    CompressJob = name + storage_path + registry + source + compress
    ServeApp    = registry + serve
    OptimizeJob = TrainJob's sections + compress + serve   (what `python -m app run` executes)

YAML files are loaded with `load_config(path, overrides)`, where overrides are `key.sub=value`
strings whose value is parsed as YAML (so `train.lr=3e-4`, `train.steps=10`,
`serve.keep_serving=true` carry types).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, docstrings become field docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# ----------------------------------------------------------------------------- models


class GPTConfig(Section):
    """A byte-level GPT-style decoder (RoPE, RMSNorm, SwiGLU, SDPA attention)."""

    kind: Literal["gpt"] = "gpt"
    """Model family; `gpt` pairs with the `lm-code` dataset."""
    vocab_size: int = Field(256, ge=2)
    """Vocabulary size; 256 for byte-level text."""
    block_size: int = Field(128, ge=8, le=8192)
    """Context length in tokens (sequence length used for training and the serving cap)."""
    n_layer: int = Field(4, ge=1, le=64)
    """Number of transformer blocks."""
    n_head: int = Field(4, ge=1)
    """Attention heads per block; must divide `d_model`."""
    d_model: int = Field(128, ge=8)
    """Residual stream width."""
    ffn_mult: float = Field(2.75, gt=0)
    """SwiGLU hidden width as a multiple of `d_model` (rounded up to a multiple of 8)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention output and MLP output during training."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base frequency."""
    use_flash_attn: bool = True
    """Use flash-attn when it is importable and the model runs on CUDA in fp16/bf16; SDPA otherwise."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "GPTConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"model.n_head ({self.n_head}) must divide model.d_model ({self.d_model})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("model.d_model / model.n_head must be even for RoPE")
        return self


class ViTConfig(Section):
    """A small vision transformer for 8x8 single-channel images (scikit-learn digits)."""

    kind: Literal["vit"] = "vit"
    """Model family; `vit` pairs with the `digits` dataset."""
    image_size: int = Field(8, ge=2)
    """Side of the square input image in pixels."""
    patch_size: int = Field(2, ge=1)
    """Side of a square patch; must divide `image_size`."""
    in_channels: int = Field(1, ge=1)
    """Input channels."""
    num_classes: int = Field(10, ge=2)
    """Number of output classes."""
    n_layer: int = Field(2, ge=1, le=32)
    """Number of transformer blocks."""
    n_head: int = Field(4, ge=1)
    """Attention heads per block; must divide `d_model`."""
    d_model: int = Field(64, ge=8)
    """Token width."""
    ffn_mult: float = Field(2.0, gt=0)
    """MLP hidden width as a multiple of `d_model`."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout during training."""

    @model_validator(mode="after")
    def _shapes(self) -> "ViTConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"model.patch_size ({self.patch_size}) must divide model.image_size ({self.image_size})")
        if self.d_model % self.n_head:
            raise ValueError(f"model.n_head ({self.n_head}) must divide model.d_model ({self.d_model})")
        return self


ModelConfig = Annotated[Union[GPTConfig, ViTConfig], Field(discriminator="kind")]


# ----------------------------------------------------------------------------- data


class DataConfig(Section):
    """A built-in dataset. Nothing is downloaded: both ship with Python or scikit-learn."""

    name: Literal["lm-code", "digits"]
    """`lm-code`: the Python standard library's own .py files as bytes; `digits`: scikit-learn's 8x8 digits."""
    max_bytes: int = Field(4_000_000, ge=10_000)
    """lm-code only: cap on corpus bytes read (files taken in sorted path order)."""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Share of files (lm-code, by path hash) or samples (digits, by index hash) held out for validation."""
    split_seed: int = 0
    """Salt of the deterministic train/val split hash."""


# ----------------------------------------------------------------------------- registry


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

    actor_name: str = Field("temper-registry", pattern=_NAME_RE)
    """Name of the detached registry actor (get-or-create)."""
    namespace: str = Field("temper", pattern=_NAME_RE)
    """Ray namespace of the registry actor."""
    db_url: str = "sqlite:///temper_runs/registry.db"
    """SQLAlchemy URL of the registry database: `sqlite:///path.db` (a relative path is resolved against the driver's working directory) or `postgresql+psycopg://user:pass@host/db` (psycopg 3, the `postgres` extra) on clusters. Older schemas are migrated on open."""
    mlflow: MlflowMirrorConfig = Field(default_factory=MlflowMirrorConfig)
    """Optional MLflow mirror (off by default)."""

    @model_validator(mode="after")
    def _url(self) -> "RegistryConfig":
        if "://" not in self.db_url:
            raise ValueError(f"registry.db_url must be a SQLAlchemy URL such as sqlite:///path.db, got {self.db_url!r}")
        m = self.mlflow
        if m.enabled and not self.db_url.startswith("sqlite") and (m.tracking_uri is None or m.artifact_location is None):
            raise ValueError(
                "registry.mlflow.tracking_uri and registry.mlflow.artifact_location must be set when "
                "registry.mlflow.enabled is true and registry.db_url is not SQLite (their defaults sit next to a SQLite file)"
            )
        return self


# ----------------------------------------------------------------------------- train


class TrainConfig(Section):
    """The distributed training loop run by Ray Train's TorchTrainer."""

    num_workers: int = Field(2, ge=1, le=1024)
    """Number of Ray Train workers (data-parallel ranks)."""
    strategy: Literal["ddp", "fsdp", "zero1", "zero2", "zero3"] = "ddp"
    """Parallelism: `ddp` (replicated), `fsdp` (torch FSDP2 fully_shard: params, grads, optimizer sharded), `zero1`/`zero2`/`zero3` (DeepSpeed ZeRO stage 1/2/3)."""
    offload_optimizer: bool = False
    """ZeRO only: keep optimizer state (and the fp32 master weights) in CPU memory."""
    offload_params: bool = False
    """ZeRO-3 only: keep parameter partitions in CPU memory."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Logical CPUs each worker reserves."""
    use_gpu: bool = False
    """One GPU per worker with NCCL; gloo on CPU otherwise."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype. bf16 works on CPU and CUDA; fp16 (with GradScaler) needs CUDA."""
    steps: int = Field(200, ge=1)
    """Total optimizer steps of the run (a resumed run continues up to this count)."""
    batch_size: int = Field(32, ge=1)
    """Samples per worker per micro-batch (global batch = batch_size x grad_accum_steps x num_workers)."""
    grad_accum_steps: int = Field(1, ge=1, le=1024)
    """Micro-batches accumulated into one optimizer step (gradients synchronised on the last one)."""
    lr: float = Field(3e-3, gt=0, lt=10)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay, applied to matrices only (not norms or biases)."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine schedule floor as a fraction of `lr`."""
    grad_clip: float = Field(1.0, ge=0)
    """Global gradient-norm clip; 0 disables."""
    eval_every: int = Field(50, ge=1)
    """Evaluate (and report to Ray Train) every N steps, and at the last step."""
    eval_batches: int = Field(8, ge=1)
    """Validation batches per evaluation."""
    checkpoint_every: int = Field(50, ge=1)
    """Write a checkpoint every N steps (a multiple of `eval_every`), and at the last step."""
    keep_last: int = Field(2, ge=1)
    """Checkpoints kept by Ray Train."""
    pause_at_step: int | None = Field(None, ge=1)
    """Stop this run once this step is done, with a checkpoint, without finishing the schedule; re-running the job continues to `steps` (time-boxed or preemptible budgets)."""
    log_every: int = Field(10, ge=1)
    """Rank 0 prints a progress line (loss, rate, ETA) every N steps."""
    seed: int = 1337
    """Seed of model init and data sampling; the same seed gives the same loss curve."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray Train attempts after a failure (-1 = unlimited)."""

    @model_validator(mode="after")
    def _checks(self) -> "TrainConfig":
        if self.warmup_steps >= self.steps and self.steps > 1:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be < train.steps ({self.steps})")
        if self.pause_at_step is not None and self.pause_at_step >= self.steps:
            raise ValueError(f"train.pause_at_step ({self.pause_at_step}) must be < train.steps ({self.steps})")
        if self.offload_optimizer and not self.strategy.startswith("zero"):
            raise ValueError(f"train.offload_optimizer needs a ZeRO strategy (zero1/zero2/zero3), not train.strategy {self.strategy!r}")
        if self.offload_params and self.strategy != "zero3":
            raise ValueError(f"train.offload_params needs train.strategy 'zero3', not {self.strategy!r}")
        if self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"train.checkpoint_every ({self.checkpoint_every}) must be a multiple of train.eval_every "
                f"({self.eval_every}): checkpoints are reported with evaluation results"
            )
        return self


# ----------------------------------------------------------------------------- compress

CompressMethod = Literal["torch_int8", "onnx_fp32", "onnx_int8"]


class CompressConfig(Section):
    """Post-training compression of a registered version; each method becomes a new version."""

    methods: list[CompressMethod] = Field(default_factory=lambda: ["torch_int8", "onnx_int8"], min_length=1)
    """Variants to produce: `torch_int8` (dynamic int8 Linear layers), `onnx_fp32` (ONNX Runtime), `onnx_int8` (ORT dynamic int8)."""
    eval_batches: int = Field(16, ge=1)
    """Validation batches used to score each variant (and the source, for the delta)."""
    eval_batch_size: int = Field(64, ge=1)
    """Samples per evaluation batch."""
    latency_iters: int = Field(50, ge=1)
    """Timed batch-1 forward passes per variant (after warmup) for the latency metric."""
    max_quality_drop: float = Field(0.05, ge=0)
    """A variant whose relative quality drop vs its source exceeds this is still registered but tagged `rejected`."""


# ----------------------------------------------------------------------------- serve

Backend = Literal["torch_fp32", "torch_int8", "onnx_fp32", "onnx_int8"]


class ServedModel(Section):
    """One model version hosted by a batched replica."""

    model: str = Field(pattern=_NAME_RE)
    """Registry model name."""
    version: str = "production"
    """Registry version number (e.g. `3`) or alias (e.g. `production`)."""
    backend: Backend | None = None
    """Expected backend of the version; when set, serving refuses a version of another format."""
    max_batch_size: int = Field(16, ge=1, le=1024)
    """Largest dynamic batch (live-reconfigurable through `user_config`)."""
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)
    """How long a batch waits for more requests after the first (live-reconfigurable)."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests a replica accepts at once; must be >= max_batch_size or batches are silently capped."""
    num_replicas: int = Field(1, ge=1)
    """Replicas of this model's deployment."""
    cpus_per_replica: float = Field(0.5, gt=0)
    """Logical CPUs each replica reserves."""
    max_new_tokens: int = Field(64, ge=1, le=4096)
    """lm models: cap on generated tokens per request."""

    @model_validator(mode="after")
    def _batch_fits(self) -> "ServedModel":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"serve.models[].max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                f"max_batch_size ({self.max_batch_size}); Serve would silently cap batches"
            )
        return self


class ServeConfig(Section):
    """The Ray Serve application: an HTTP ingress plus one batched deployment per model."""

    app_name: str = Field("temper", pattern=_NAME_RE)
    """Serve application name."""
    host: str = "127.0.0.1"
    """HTTP bind address of Serve's proxy."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of Serve's proxy."""
    route_prefix: str = Field("/", pattern=r"^/")
    """Route prefix of the ingress; endpoints live under `<prefix>api/v1/`."""
    models: list[ServedModel] = Field(default_factory=list)
    """Models to host. In `run`, an empty list means: the best compressed variant of the run's model."""
    request_timeout_s: float = Field(30.0, gt=0)
    """Ingress timeout for one model call."""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Request bodies above this size are refused with 413."""

    @model_validator(mode="after")
    def _unique(self) -> "ServeConfig":
        names = [m.model for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"serve.models: model {dup[0]!r} is listed twice")
        return self


# ----------------------------------------------------------------------------- jobs


class JobBase(Section):
    """Fields common to jobs that write artifacts."""

    name: str = Field(pattern=_NAME_RE)
    """Run name: stable (no timestamps) so re-running resumes; also the registry model name."""
    storage_path: str = "temper_runs"
    """Root folder for checkpoints and artifacts (relative paths resolve against the driver's cwd)."""
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """Registry actor and database."""


class TrainJob(JobBase):
    """`python -m app train`: train a model with Ray Train and register it."""

    model: ModelConfig
    """Model architecture (`kind: gpt` or `kind: vit`)."""
    data: DataConfig
    """Dataset."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Training loop."""

    @model_validator(mode="after")
    def _pairing(self) -> "TrainJob":
        want = {"lm-code": "gpt", "digits": "vit"}[self.data.name]
        if self.model.kind != want:
            raise ValueError(f"model.kind {self.model.kind!r} does not fit data.name {self.data.name!r} (needs {want!r})")
        if self.train.precision == "fp16" and not self.train.use_gpu:
            raise ValueError("train.precision 'fp16' needs CUDA (train.use_gpu: true); use bf16 on CPU")
        if isinstance(self.model, GPTConfig) and self.model.vocab_size != 256:
            raise ValueError("model.vocab_size must be 256 for the byte-level lm-code data")
        return self


class CompressJob(JobBase):
    """`python -m app compress`: produce compressed variants of a registered version."""

    source: str = "latest"
    """Version of model `name` to compress: a number, an alias, or `latest`."""
    compress: CompressConfig = Field(default_factory=CompressConfig)
    """Compression methods and evaluation."""


class ServeApp(Section):
    """`python -m app serve`: host registered versions on Ray Serve."""

    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """Registry actor and database."""
    serve: ServeConfig
    """Serve application."""

    @model_validator(mode="after")
    def _has_models(self) -> "ServeApp":
        if not self.serve.models:
            raise ValueError("serve.models must list at least one model to serve")
        return self


class OptimizeJob(TrainJob):
    """`python -m app run`: train -> register -> compress -> serve -> one client call."""

    compress: CompressConfig = Field(default_factory=CompressConfig)
    """Compression stage."""
    serve: ServeConfig = Field(default_factory=ServeConfig)
    """Serving stage."""

    def train_job(self) -> TrainJob:
        return TrainJob.model_validate(self.model_dump(include=set(TrainJob.model_fields)))

    def compress_job(self, source: str) -> CompressJob:
        return CompressJob(
            name=self.name, storage_path=self.storage_path, registry=self.registry,
            source=source, compress=self.compress,
        )


JOB_KINDS: dict[str, type[Section]] = {
    "run": OptimizeJob,
    "train": TrainJob,
    "compress": CompressJob,
    "serve": ServeApp,
}


# ----------------------------------------------------------------------------- loading


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the offending key."""


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i + 1])} is not an index of a list of {len(node)}")
            node = node[int(key)]
            continue
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i + 1])} is a value, not a section")
        node = nxt
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {dotted!r}: {last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        _set_path(tree, key, yaml.safe_load(raw) if raw != "" else "")
    return tree


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each starting with the dotted key it concerns."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("gpt", "vit")) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of the schema)"
        lines.append(f"{loc}: {msg}")
    return "\n".join(lines)


def parse_config(kind: str, tree: dict) -> Section:
    """Validate a config dict for a job kind, raising ConfigError naming the keys at fault."""
    cls = JOB_KINDS[kind]
    if not isinstance(tree, dict):
        raise ConfigError(f"<root>: a {cls.__name__} config must be a mapping, got {type(tree).__name__}")
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid {cls.__name__} config:\n{format_validation_error(err)}") from None


def load_config(kind: str, path: str | Path, overrides: list[str] | None = None) -> Section:
    """Read a YAML file, apply `key.sub=value` overrides, and validate it as job `kind`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(tree, dict):
        apply_overrides(tree, overrides or [])
    return parse_config(kind, tree)


def config_hash(cfg: BaseModel) -> str:
    """Content hash of a resolved config (sorted JSON), the id written next to every artifact."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
