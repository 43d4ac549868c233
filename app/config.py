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


# ----------------------------------------------------------------------------- callbacks


class MagnitudePruningConfig(Section):
    """Gradual magnitude pruning during training (a model-mutating callback)."""

    name: Literal["magnitude_pruning"]
    """Callback name."""
    kind: Literal["unstructured", "rows", "heads", "2:4"] = "unstructured"
    """`unstructured` (single weights), `rows` (output channels), `heads` (attention heads), `2:4` (N:M semi-structured, 50%)."""
    scope: Literal["layer", "global"] = "global"
    """unstructured only: one threshold per layer, or one threshold over all targets (computed across shards)."""
    final_sparsity: float = Field(0.5, gt=0.0, lt=1.0)
    """Fraction of target weights (rows, heads) zeroed at `end_step`; 2:4 is always 0.5."""
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    """Sparsity applied at `start_step` (cubic schedule of Zhu & Gupta from it to `final_sparsity`)."""
    start_step: int = Field(0, ge=0)
    """Step at which pruning starts (2:4 is applied once here)."""
    end_step: int | None = Field(None, ge=1)
    """Step at which `final_sparsity` is reached (default: 75% of train.steps)."""
    update_every: int = Field(10, ge=1)
    """Masks are recomputed every N steps between start and end (re-applied after every step)."""
    targets: str = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate|up|down))\.weight"
    """Regex over parameter names selecting the weights to prune (default: every Linear inside the transformer blocks)."""

    @model_validator(mode="after")
    def _checks(self) -> "MagnitudePruningConfig":
        if self.kind == "2:4" and self.final_sparsity != 0.5:
            raise ValueError("train.callbacks[].final_sparsity must be 0.5 for kind '2:4' (2 of every 4 weights)")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError("train.callbacks[].initial_sparsity must be <= final_sparsity")
        try:
            re.compile(self.targets)
        except re.error as err:
            raise ValueError(f"train.callbacks[].targets is not a valid regex: {err}") from None
        return self


class EarlyStoppingConfig(Section):
    """Stop training when an evaluation metric stops improving (an observer callback)."""

    name: Literal["early_stopping"]
    """Callback name."""
    metric: str | None = None
    """Reported metric to watch (default: the model's primary metric, val_accuracy or val_loss)."""
    mode: Literal["min", "max"] | None = None
    """Whether lower or higher is better (default: the primary metric's)."""
    patience: int = Field(3, ge=1)
    """Evaluations without improvement before the run ends (with a checkpoint)."""
    min_delta: float = Field(0.0, ge=0.0)
    """Smallest change that counts as an improvement."""


CallbackConfig = Annotated[Union[MagnitudePruningConfig, EarlyStoppingConfig], Field(discriminator="name")]


class DistillConfig(Section):
    """Knowledge distillation from a registered teacher: loss = alpha*CE + (1-alpha)*T^2*KL."""

    teacher: str = Field(pattern=_NAME_RE)
    """Registry model name of the teacher (same dataset as the student)."""
    teacher_version: str = "production"
    """Teacher version number, alias, or `latest`."""
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the hard-label cross-entropy; 1 - alpha goes to the soft-target KL term."""
    temperature: float = Field(2.0, gt=0.0, le=20.0)
    """Softmax temperature T applied to both student and teacher logits in the KL term."""


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
    distill: DistillConfig | None = None
    """Train this model as a student of a registered teacher (knowledge distillation); unset = plain training."""
    callbacks: list[CallbackConfig] = Field(default_factory=list)
    """Training callbacks by name, e.g. `[{name: magnitude_pruning, final_sparsity: 0.5}]`; model-mutating ones run before observers."""
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

CompressMethod = Literal["torch_int8", "onnx_fp32", "onnx_int8", "onnx_int8_static", "torch_bf16", "torch_fp16"]


class CompressConfig(Section):
    """Post-training compression of a registered version; each method becomes a new version."""

    methods: list[CompressMethod] = Field(default_factory=lambda: ["torch_int8", "onnx_int8"], min_length=1)
    """Variants to produce: `torch_int8` (dynamic int8 Linear layers), `onnx_fp32` (ONNX Runtime), `onnx_int8` (ORT dynamic int8), `onnx_int8_static` (ORT static QDQ int8, calibrated), `torch_bf16` / `torch_fp16` (half-precision weights for GPU serving)."""
    eval_batches: int = Field(16, ge=1)
    """Validation batches used to score each variant (and the source, for the delta)."""
    eval_batch_size: int = Field(64, ge=1)
    """Samples per evaluation batch."""
    latency_iters: int = Field(50, ge=1)
    """Timed batch-1 forward passes per variant (after warmup) for the latency metric."""
    max_quality_drop: float = Field(0.05, ge=0)
    """A variant whose relative quality drop vs its source exceeds this is still registered but tagged `rejected`."""


# ----------------------------------------------------------------------------- serve

Backend = Literal["torch_fp32", "torch_bf16", "torch_fp16", "torch_int8", "onnx_fp32", "onnx_int8", "onnx_int8_static"]

_REF_RE = r"^([0-9]{1,9}|[A-Za-z][A-Za-z0-9_-]{0,63})$"
"""A version reference in serving: a version number, an alias, or `latest`."""


class AutoscalingSettings(Section):
    """Ray Serve autoscaling of a model's deployments (passed through as Serve's `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0, le=1024)
    """Fewest replicas; 0 lets an idle route scale to zero (its next request waits for a replica to start)."""
    max_replicas: int = Field(2, ge=1, le=1024)
    """Most replicas."""
    initial_replicas: int | None = Field(None, ge=0, le=1024)
    """Replicas started at deploy time (default: min_replicas)."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Ongoing requests per replica the autoscaler aims at. Near max_batch_size keeps batches full; far below it spreads load into small batches."""
    upscale_delay_s: float = Field(30.0, ge=0)
    """How long the load must stay above target before replicas are added."""
    downscale_delay_s: float = Field(600.0, ge=0)
    """How long the load must stay below target before replicas are removed."""

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) must be <= autoscaling.max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(
                f"autoscaling.initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                f"({self.min_replicas}) and max_replicas ({self.max_replicas})"
            )
        return self


class AutoRollbackConfig(Section):
    """Watch a canary route against a baseline route; roll the canary's alias back in the registry when it is worse."""

    canary: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    """Traffic route (a registry alias, e.g. `staging`) whose version is judged and rolled back."""
    baseline: str = Field(pattern=_REF_RE)
    """Traffic route the canary is compared with (e.g. `production`)."""
    window_s: float = Field(300.0, gt=0)
    """Sliding window of request outcomes compared (per route and version)."""
    check_interval_s: float = Field(60.0, gt=0)
    """How often the watcher compares (at most; it decides when outcomes arrive)."""
    min_requests: int = Field(20, ge=1)
    """Canary requests (successes + server errors) needed in the window before it is judged."""
    error_rate_factor: float = Field(1.1, ge=1.0)
    """Roll back when the canary's server-error rate exceeds the baseline's times this factor ..."""
    min_error_rate: float = Field(0.01, ge=0.0, le=1.0)
    """... and exceeds this absolute rate (so 1 error in 100 requests against a clean baseline is not enough)."""
    latency_p95_factor: float | None = Field(2.0, ge=1.0)
    """Roll back when the canary's p95 latency exceeds the baseline's times this factor (both with min_requests successes); null disables the latency check."""

    @model_validator(mode="after")
    def _distinct(self) -> "AutoRollbackConfig":
        if self.canary == self.baseline:
            raise ValueError(f"auto_rollback.canary and auto_rollback.baseline must differ (both {self.canary!r})")
        if self.canary == "latest":
            raise ValueError("auto_rollback.canary must be an alias that can be rolled back, not 'latest'")
        return self


class ServedModel(Section):
    """One registry model behind batched replicas: one deployment per traffic route."""

    model: str = Field(pattern=_NAME_RE)
    """Registry model name."""
    version: str = Field("production", pattern=_REF_RE)
    """Registry version number (e.g. `3`), alias (e.g. `production`) or `latest`; an alias is re-resolved every serve.alias_poll_interval_s. Leave at its default with `traffic`."""
    traffic: dict[str, int] | None = None
    """Weighted split over several versions served at once, e.g. `{production: 90, staging: 10}` (version refs -> integer percent, summing to 100). Each route is its own deployment; the first is the primary (`model-<name>`)."""
    backend: Backend | None = None
    """Expected backend of the version; when set, serving refuses a version of another format."""
    max_batch_size: int = Field(16, ge=1, le=1024)
    """Largest dynamic batch (live-reconfigurable through `user_config`)."""
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)
    """How long a batch waits for more requests after the first (live-reconfigurable). A request that finds its replica idle skips the wait."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests a replica accepts at once; must be >= max_batch_size or batches are silently capped."""
    max_queued_requests: int = Field(64, ge=1)
    """Requests waiting for a replica slot (per caller); beyond it requests are answered 503 with Retry-After instead of queueing forever."""
    num_replicas: int = Field(1, ge=1)
    """Replicas of each route's deployment (fixed); leave at 1 with `autoscaling`."""
    autoscaling: AutoscalingSettings | None = None
    """Autoscale each route's deployment instead of a fixed `num_replicas`."""
    cpus_per_replica: float = Field(0.5, gt=0)
    """Logical CPUs each replica reserves."""
    max_new_tokens: int = Field(64, ge=1, le=4096)
    """lm models: cap on generated tokens per request."""
    auto_rollback: AutoRollbackConfig | None = None
    """Watch `traffic`'s canary route and roll its alias back when it errs or slows down (needs `traffic`)."""

    def routes(self) -> dict[str, int]:
        """Version ref -> weight (percent) of every route, primary first."""
        return dict(self.traffic) if self.traffic else {self.version: 100}

    @model_validator(mode="after")
    def _checks(self) -> "ServedModel":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"serve.models[].max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                f"max_batch_size ({self.max_batch_size}); Serve would silently cap batches"
            )
        if self.traffic is not None:
            # By value, not by `model_fields_set`: configs are dumped and re-validated (workers, Serve
            # config files), which sets every field.
            if self.version != ServedModel.model_fields["version"].default:
                raise ValueError("serve.models[]: set either `version` (one route) or `traffic` (a split), not both")
            if not self.traffic:
                raise ValueError("serve.models[].traffic must name at least one version ref")
            for ref, weight in self.traffic.items():
                if not re.fullmatch(_REF_RE, ref):
                    raise ValueError(f"serve.models[].traffic: {ref!r} is not a version number, alias or 'latest'")
                if weight < 0:
                    raise ValueError(f"serve.models[].traffic.{ref}: weight {weight} must be >= 0")
            if sum(self.traffic.values()) != 100:
                raise ValueError(f"serve.models[].traffic: weights sum to {sum(self.traffic.values())}; they must sum to 100 (percent)")
        if self.autoscaling is not None:
            if self.num_replicas != ServedModel.model_fields["num_replicas"].default:
                raise ValueError("serve.models[]: set either `num_replicas` (fixed) or `autoscaling`, not both")
            if self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
                raise ValueError(
                    f"serve.models[].autoscaling.target_ongoing_requests ({self.autoscaling.target_ongoing_requests}) "
                    f"must be <= max_ongoing_requests ({self.max_ongoing_requests}): replicas never reach it"
                )
        if self.auto_rollback is not None:
            routes = self.routes()
            for role in ("canary", "baseline"):
                ref = getattr(self.auto_rollback, role)
                if self.traffic is None or ref not in routes:
                    raise ValueError(
                        f"serve.models[].auto_rollback.{role} {ref!r} must be a route of serve.models[].traffic "
                        f"(routes: {sorted(routes)})"
                    )
        return self

    def max_replicas(self) -> int:
        """Upper bound of replicas per route (sizes the ingress)."""
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas


class ServeConfig(Section):
    """The Ray Serve application: an HTTP ingress plus batched deployments (one per model route)."""

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
    """Ingress timeout for one model call (a whole generation, streamed or not); beyond it the answer is 504."""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Request bodies above this size are refused with 413."""
    max_items_per_request: int = Field(256, ge=1, le=1024)
    """Images (predict) or texts (score) one request may carry; more is refused with 413."""
    sticky_header: str = Field("x-temper-route-key", pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
    """Request header whose value pins a caller to one traffic route (hashed; same value -> same route while the weights stand)."""
    alias_poll_interval_s: float = Field(5.0, gt=0, le=3600)
    """How often each replica re-resolves its alias in the registry; a moved alias is hot-swapped without a redeploy."""
    retry_after_s: int = Field(1, ge=0, le=3600)
    """Retry-After (seconds) sent with 503 answers under overload."""

    @model_validator(mode="after")
    def _unique(self) -> "ServeConfig":
        names = [m.model for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"serve.models: model {dup[0]!r} is listed twice")
        return self


# ----------------------------------------------------------------------------- tune


class SearchDimension(Section):
    """One searched key: a distribution (`uniform`, `loguniform`, `int`, `choice`) or an exhaustive `grid`."""

    type: Literal["uniform", "loguniform", "int", "choice", "grid"]
    """`uniform` / `loguniform` floats in [low, high]; `int` integers in [low, high] (inclusive); `choice` one of `values` (sampled); `grid` every one of `values` (cross product with the other grid keys)."""
    low: float | None = None
    """Lower bound (uniform, loguniform, int)."""
    high: float | None = None
    """Upper bound (uniform, loguniform, int; inclusive for int)."""
    values: list[Any] | None = None
    """Candidates (choice, grid)."""

    @model_validator(mode="after")
    def _shape(self) -> "SearchDimension":
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"type {self.type!r} needs a non-empty `values` list")
            if self.low is not None or self.high is not None:
                raise ValueError(f"type {self.type!r} takes `values`, not low/high")
            return self
        if self.values is not None:
            raise ValueError(f"type {self.type!r} takes low/high, not `values`")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type!r} needs both `low` and `high`")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"type 'loguniform' needs low > 0, got {self.low}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"type 'int' needs whole-number bounds, got {self.low}..{self.high}")
        return self

    def sample_values(self) -> list[Any]:
        """Representative values (bounds or candidates): used to validate the key paths up front."""
        if self.values is not None:
            return list(self.values)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class TuneScheduler(Section):
    """Trial scheduler: `fifo` runs every trial to the end; `asha` / `hyperband` stop weak trials at rungs; `pbt` copies strong trials into weak ones and mutates their hyperparameters."""

    name: Literal["fifo", "asha", "hyperband", "pbt"] = "fifo"
    """Scheduler."""
    grace_period: int = Field(50, ge=1)
    """asha: training steps every trial runs before it can be stopped (the first rung)."""
    reduction_factor: float = Field(3.0, gt=1.0)
    """asha / hyperband: 1/reduction_factor of the trials at a rung go on to the next."""
    max_t: int | None = Field(None, ge=1)
    """asha / hyperband: steps of the last rung (default: train.steps)."""
    brackets: int = Field(1, ge=1, le=8)
    """asha: number of brackets (different first rungs)."""
    perturbation_interval: int = Field(50, ge=1)
    """pbt: steps between exploit/explore decisions (make it a multiple of train.checkpoint_every)."""
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5)
    """pbt: bottom fraction of trials that copy one of the top fraction."""
    resample_probability: float = Field(0.25, ge=0.0, le=1.0)
    """pbt: chance that a mutated value is resampled from its distribution instead of perturbed (x0.8 / x1.2)."""


class TuneSearcher(Section):
    """How trial configurations are proposed."""

    name: Literal["random", "grid", "optuna"] = "random"
    """`random` (samples the distributions; `grid` keys are crossed), `grid` (only `grid`/`choice` keys, every combination), `optuna` (TPE via Ray Tune's Optuna integration; no `grid` keys)."""
    seed: int | None = 0
    """Seed of the sampler (same seed, same proposals); null for a random seed."""
    n_startup_trials: int = Field(4, ge=1)
    """optuna: random proposals before TPE takes over."""
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    """optuna / random: known-good configurations tried first, as `{key path: value}` (e.g. `{train.lr: 0.003}`)."""


class TuneConfig(Section):
    """Hyperparameter search with Ray Tune: every trial runs the same Ray Train pipeline (any strategy, 1+ workers).

    Per-trial resources are the trial's training workers: `train.num_workers` x `train.cpus_per_worker`
    (and a GPU each with `train.use_gpu`); those keys can themselves be searched."""

    search_space: dict[str, SearchDimension] = Field(min_length=1)
    """Searched keys as dotted paths into the job (`train.lr`, `model.n_layer`, `train.callbacks.0.final_sparsity`) -> a dimension."""
    metric: str | None = None
    """Reported metric to optimise (default: the model's primary metric, val_accuracy or val_loss)."""
    mode: Literal["min", "max"] | None = None
    """Whether lower or higher is better (default: the primary metric's)."""
    num_samples: int = Field(8, ge=1, le=10000)
    """Trials to run (with `grid` keys: repetitions of the whole grid)."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials running at once (default: as many as the cluster's CPUs fit, from train.num_workers x cpus_per_worker)."""
    scheduler: TuneScheduler = Field(default_factory=TuneScheduler)
    """Early stopping / population-based training."""
    searcher: TuneSearcher = Field(default_factory=TuneSearcher)
    """Proposal strategy."""
    keep_checkpoints: int = Field(2, ge=1)
    """Tune checkpoints kept per trial, for resume (pbt keeps all of them: a donor's checkpoint is cloned some time after it was reported)."""
    max_failures: int = Field(0, ge=0)
    """Times a failed trial is retried from its last checkpoint before it counts as errored."""
    compress_best: bool = False
    """`python -m app tune`: hand the best trial's version on to the `compress` section afterwards (`run` always compresses)."""

    @model_validator(mode="after")
    def _checks(self) -> "TuneConfig":
        for key, dim in self.search_space.items():
            if not re.fullmatch(r"(model|data|train)(\.[A-Za-z0-9_]+)+", key):
                raise ValueError(
                    f"tune.search_space.{key}: keys are dotted paths under model., data. or train. "
                    "(compress settings apply to the best trial after the sweep)"
                )
            if self.searcher.name == "optuna" and dim.type == "grid":
                raise ValueError(f"tune.search_space.{key}: searcher 'optuna' cannot take `grid` keys; use `choice`")
            if self.searcher.name == "grid" and dim.type not in ("grid", "choice"):
                raise ValueError(f"tune.search_space.{key}: searcher 'grid' needs `grid` or `choice` keys, not {dim.type!r}")
            if self.scheduler.name == "pbt" and (not key.startswith("train.") or key.split(".")[:2] in _PBT_FIXED):
                raise ValueError(
                    f"tune.search_space.{key}: scheduler 'pbt' copies checkpoints between trials, so it can only "
                    "mutate train.* keys that keep the model and its checkpoint layout (e.g. train.lr, train.weight_decay)"
                )
        for i, point in enumerate(self.searcher.points_to_evaluate):
            unknown = sorted(set(point) - set(self.search_space))
            if unknown:
                raise ValueError(f"tune.searcher.points_to_evaluate.{i}: {unknown} are not keys of tune.search_space")
        return self


_PBT_FIXED = [["train", k] for k in ("strategy", "num_workers", "steps", "callbacks", "precision", "cpus_per_worker",
                                      "use_gpu", "grad_accum_steps", "distill")]
"""train keys PBT must not mutate: a copied checkpoint would no longer fit the trial."""


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
        for i, cb in enumerate(self.train.callbacks):
            if isinstance(cb, MagnitudePruningConfig):
                end = cb.end_step or max(1, int(0.75 * self.train.steps))
                if not cb.start_step < end <= self.train.steps:
                    raise ValueError(f"train.callbacks.{i}: need start_step ({cb.start_step}) < end_step ({end}) <= train.steps ({self.train.steps})")
                if cb.kind == "2:4" and self.model.d_model % 4:
                    raise ValueError(f"train.callbacks.{i}.kind '2:4' needs model.d_model divisible by 4")
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


class TuneJob(TrainJob):
    """`python -m app tune`: a Ray Tune sweep over the training job; the best trial is registered (`tuned`)."""

    tune: TuneConfig
    """Search space, metric, scheduler and searcher."""
    compress: CompressConfig = Field(default_factory=CompressConfig)
    """Used after the sweep when `tune.compress_best` is true."""

    @model_validator(mode="after")
    def _trial_configs(self) -> "TuneJob":
        check_tune_section(self, self.tune)
        return self


class OptimizeJob(TrainJob):
    """`python -m app run`: [tune ->] train -> register -> compress -> serve -> one client call."""

    tune: TuneConfig | None = None
    """When set, the train stage is a Ray Tune sweep and the best trial goes on to compress and serve."""
    compress: CompressConfig = Field(default_factory=CompressConfig)
    """Compression stage."""
    serve: ServeConfig = Field(default_factory=ServeConfig)
    """Serving stage."""

    @model_validator(mode="after")
    def _trial_configs(self) -> "OptimizeJob":
        if self.tune is not None:
            check_tune_section(self, self.tune)
        return self

    def tune_job(self) -> "TuneJob":
        return TuneJob.model_validate(self.model_dump(include=set(TuneJob.model_fields)))

    def train_job(self) -> TrainJob:
        return TrainJob.model_validate(self.model_dump(include=set(TrainJob.model_fields)))

    def compress_job(self, source: str) -> CompressJob:
        return CompressJob(
            name=self.name, storage_path=self.storage_path, registry=self.registry,
            source=source, compress=self.compress,
        )


def trial_tree(job: TrainJob, values: dict[str, Any]) -> dict:
    """The training-job config tree of one trial: `job`'s train sections with `values` (key path -> value) set."""
    tree = job.model_dump(mode="json", include=set(TrainJob.model_fields))
    for key, value in values.items():
        _set_path(tree, key, value)
    return tree


def _check_trial(job: TrainJob, values: dict[str, Any], where: str) -> None:
    try:
        TrainJob.model_validate(trial_tree(job, values))
    except (ValidationError, ConfigError) as err:
        detail = format_validation_error(err) if isinstance(err, ValidationError) else str(err)
        raise ValueError(f"{where} gives an invalid job: {detail}") from None


def check_tune_section(job: TrainJob, tune: "TuneConfig") -> None:
    """Every searched path must exist and every searched value must make a valid training job.

    Raises a ValueError naming `tune.search_space.<key>`: a typo'd path or an out-of-range bound is
    caught before any trial starts, not as N errored trials."""
    base = job.model_dump(mode="json", include=set(TrainJob.model_fields))
    for key, dim in tune.search_space.items():
        node: Any = base
        for part in key.split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise ValueError(f"tune.search_space.{key}: {part!r} is not a key of this job's config")
        for value in dim.sample_values():
            _check_trial(job, {key: value}, f"tune.search_space.{key}: value {value!r}")
    for i, point in enumerate(tune.searcher.points_to_evaluate):
        _check_trial(job, point, f"tune.searcher.points_to_evaluate.{i}:")
    metric = tune.metric
    if metric is not None and tune.mode is None:
        raise ValueError(f"tune.mode must be set (min or max) when tune.metric ({metric!r}) is set")


JOB_KINDS: dict[str, type[Section]] = {
    "run": OptimizeJob,
    "train": TrainJob,
    "tune": TuneJob,
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
        # Discriminated unions put the tag in the path (model.gpt.n_head): drop it.
        loc = ".".join(str(p) for p in e["loc"] if p not in ("gpt", "vit", "magnitude_pruning", "early_stopping")) or "<root>"
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
