"""The job kinds (one pydantic model per verb) composed from the sections, the checks that span
sections, and parsing a job file for a verb.

    TrainJob    = name + storage_path + registry + model + data + train
    CompressJob = name + storage_path + registry + source + compress
    TuneJob     = TrainJob's sections + tune + compress
    ServeApp    = registry + serve + auth
    OptimizeJob = TrainJob's sections + [tune] + compress + serve + auth   (what `python -m app run` executes)

A full job file (the `run` kind) may be given to any verb: each takes the sections it reads and
leaves the others out (see `job_sections`); unknown keys inside a section are still errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from app.config.auth import AuthConfig
from app.config.base import (
    MODEL_NAME_PATTERN, ConfigError, Section, VersionRef, format_validation_error, read_config_tree, set_path,
)
from app.config.compress import CompressConfig
from app.config.data import DataSection, check_model_fits_data
from app.config.model import GPTConfig, ModelConfig
from app.config.registry import RegistryConfig
from app.config.serve import ServeConfig
from app.config.train import MagnitudePruningConfig, TrainConfig
from app.config.tune import TuneConfig


class JobBase(Section):
    """Fields common to jobs that write artifacts."""

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    """Run name: stable (no timestamps) so re-running resumes; also the registry model name."""
    storage_path: str = Field("temper_runs", min_length=1)
    """Root folder for checkpoints and artifacts (relative paths resolve against the driver's cwd)."""
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """Registry actor and database."""


class TrainJob(JobBase):
    """`python -m app train`: train a model with Ray Train and register it."""

    model: ModelConfig
    """Model architecture (`kind: gpt`, `vit` or `hf`)."""
    data: DataSection
    """Dataset: built-in (`name`) or files (`kind`)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Training loop."""

    @model_validator(mode="after")
    def _pairing(self) -> "TrainJob":
        check_model_fits_data(self.model, self.data)
        if self.train.steps == 0:
            check_import(self)
        if self.train.precision == "fp16" and not self.train.use_gpu:
            raise ValueError("train.precision 'fp16' needs CUDA (train.use_gpu: true); use bf16 on CPU")
        for i, cb in enumerate(self.train.callbacks):
            if isinstance(cb, MagnitudePruningConfig):
                end = cb.end_step or max(1, int(0.75 * self.train.steps))
                if not cb.start_step < end <= self.train.steps:
                    raise ValueError(f"train.callbacks.{i}: need start_step ({cb.start_step}) < end_step ({end}) <= train.steps ({self.train.steps})")
                if cb.kind == "heads" and self.model.kind == "hf":
                    # head pruning zeroes a head's slice of the fused qkv weight and of the output
                    # projection, which is the built-in models' layout; transformers models differ per family
                    raise ValueError(f"train.callbacks.{i}.kind 'heads' works on the built-in gpt / vit attention; "
                                     "for model.kind 'hf' use unstructured, rows or 2:4")
                if cb.kind == "2:4" and getattr(self.model, "d_model", 0) % 4:
                    raise ValueError(f"train.callbacks.{i}.kind '2:4' needs model.d_model divisible by 4")
        if isinstance(self.model, GPTConfig) and self.model.vocab_size != 256:
            raise ValueError("model.vocab_size must be 256 for the byte-level lm-code data")
        if self.train.distill is not None:
            check_distill(self)
        if self.train.finetune != "full":
            check_adapter_training(self)
        if self.train.distill is not None and self.train.distill.teacher == self.name:
            # Whether the teacher exists, is torch_fp32 and fits the data is asked of the registry
            # when training starts; this file alone cannot tell.
            raise ValueError(
                f"train.distill.teacher: {self.name!r} is this job's own model; the student is registered "
                "under `name`, so the teacher must be another registered model"
            )
        return self


def check_distill(job: TrainJob) -> None:
    """The distillation loss fits the model: embeddings (mse / cosine) for an hf embedding model,
    logits (kl) for every other; `student_layers` cuts an hf embedding teacher only. Whether the
    indices exist in the teacher is checked when the teacher is loaded from the registry."""
    d = job.train.distill
    embedding = job.model.kind == "hf" and job.model.task == "embedding"
    if embedding and d.loss == "kl":
        raise ValueError("train.distill.loss: an hf embedding model has no logits to distill; use 'mse' or 'cosine'")
    if not embedding and d.loss != "kl":
        what = f"model.task {job.model.task!r}" if job.model.kind == "hf" else f"model.kind {job.model.kind!r}"
        raise ValueError(f"train.distill.loss {d.loss!r} compares embeddings (hf task 'embedding'); {what} distills logits with 'kl'")
    if d.student_layers is not None and not embedding:
        raise ValueError("train.distill.student_layers cuts an hf embedding teacher (model.kind 'hf', model.task 'embedding') to a student")


# strategies whose wrapping of a model with frozen base weights is tested (tests/ray/test_lora_train.py)
ADAPTER_STRATEGIES = {"lora": ("ddp", "fsdp", "zero2"), "qlora": ("ddp",)}


def check_adapter_training(job: TrainJob) -> None:
    """`train.finetune: lora | qlora` trains adapters on a frozen hf causal LM."""
    tc, how = job.train, f"train.finetune: {job.train.finetune}"
    if job.model.kind != "hf" or job.model.task != "causal_lm":
        what = f"model.task {job.model.task!r}" if job.model.kind == "hf" else f"model.kind {job.model.kind!r}"
        raise ValueError(f"{how} adapts an hf causal LM (model.kind 'hf', model.task 'causal_lm'), not {what}")
    if tc.strategy not in ADAPTER_STRATEGIES[tc.finetune]:
        raise ValueError(f"{how} with train.strategy: {tc.strategy} is not supported; use train.strategy "
                         f"{' | '.join(ADAPTER_STRATEGIES[tc.finetune])}")
    if tc.steps == 0:
        raise ValueError(f"{how} trains adapters: train.steps must be >= 1")
    if tc.distill is not None or tc.callbacks:
        raise ValueError(f"{how} trains adapters only: no train.distill or train.callbacks (they change or read the full weights)")
    if tc.finetune == "qlora":
        import importlib.util

        if not tc.use_gpu:
            raise ValueError("train.finetune: qlora quantizes the base to 4 bits with bitsandbytes on CUDA: it needs "
                             "train.use_gpu: true (use train.finetune: lora on CPU)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("train.finetune: qlora needs the bitsandbytes package, which is not installed "
                             "(pip install bitsandbytes, or use train.finetune: lora)")


def check_import(job: TrainJob) -> None:
    """`train.steps: 0` registers a pretrained `hf` model as it is: nothing else of `train` applies."""
    if job.model.kind != "hf":
        raise ValueError(
            f"train.steps 0 registers a pretrained model as it is, which needs model.kind 'hf'; "
            f"a {job.model.kind!r} model starts from random weights and must be trained (train.steps >= 1)"
        )
    for key in ("distill", "pause_at_step"):
        if getattr(job.train, key) is not None:
            raise ValueError(f"train.{key} needs training; train.steps 0 registers the model as it is")
    if job.train.callbacks:
        raise ValueError("train.callbacks run during training; train.steps 0 registers the model as it is")


class CompressJob(JobBase):
    """`python -m app compress`: produce compressed variants of a registered version."""

    source: VersionRef = "latest"
    """Version of model `name` to compress: a number, an alias, or `latest`."""
    compress: CompressConfig = Field(default_factory=CompressConfig)
    """Compression methods and evaluation."""


class ServeApp(Section):
    """`python -m app serve`: host registered versions on Ray Serve."""

    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """Registry actor and database."""
    serve: ServeConfig
    """Serve application."""
    auth: AuthConfig = Field(default_factory=AuthConfig)
    """Who may call the served models and change the registry (API keys, JWTs, roles)."""

    @model_validator(mode="after")
    def _has_models(self) -> "ServeApp":
        if not self.serve.models:
            raise ValueError("serve.models must list at least one model to serve")
        for i, served in enumerate(self.serve.models):
            if served.model is None:
                raise ValueError(f"serve.models[{i}].model: required (a registry model name) in a file without a job `name`")
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
    auth: AuthConfig = Field(default_factory=AuthConfig)
    """Who may call the served models and change the registry (API keys, JWTs, roles)."""

    @model_validator(mode="before")
    @classmethod
    def _serve_own_model(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return with_served_model_defaults(data)
        return data

    @model_validator(mode="after")
    def _cross_sections(self) -> "OptimizeJob":
        if self.tune is not None:
            check_tune_section(self, self.tune)
        produced = ["torch_fp32", *self.compress.methods]
        for i, served in enumerate(self.serve.models):
            if served.model is None:  # built in Python rather than from a file
                served.model = self.name
            if served.model != self.name:
                raise ValueError(
                    f"serve.models[{i}].model: {served.model!r} is not this job's model {self.name!r}; a run serves "
                    "the model it trains (leave serve.models[].model out to mean the job's name)"
                )
            if served.backend is not None and served.backend not in produced:
                raise ValueError(
                    f"serve.models[{i}].backend: {served.backend!r} is not made by this run "
                    f"(training makes torch_fp32, compress.methods makes {list(self.compress.methods)})"
                )
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
        set_path(tree, key, value)
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
    if job.train.steps == 0:
        raise ValueError("tune: a sweep compares training runs; train.steps 0 registers the model as it is, without one")
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

_JOB_FILE_KEYS = frozenset(OptimizeJob.model_fields) | frozenset(CompressJob.model_fields)
"""Top-level keys some verb reads; any other top-level key is an error for every verb."""


def with_served_model_defaults(tree: dict) -> dict:
    """A copy of a job file tree whose `serve.models[]` entries without `model` name the job's `name`."""
    name, serve = tree.get("name"), tree.get("serve")
    if not isinstance(name, str) or not isinstance(serve, dict) or not isinstance(serve.get("models"), list):
        return tree
    models = [{**m, "model": name} if isinstance(m, dict) and m.get("model") is None else m for m in serve["models"]]
    return {**tree, "serve": {**serve, "models": models}}


def job_sections(kind: str, tree: dict) -> dict:
    """The part of a job file that verb `kind` reads.

    `run` reads everything. The other verbs accept a full job file: top-level sections that another
    verb reads are left out, while keys no verb knows stay in, so validation still names them.
    `serve` given a job file (one with `name`) serves the job's model: entries without `model` name
    it, and no entries at all means its `production` alias, as `run` serves it."""
    if kind == "run":
        return tree
    fields = JOB_KINDS[kind].model_fields
    if kind == "serve" and isinstance(tree.get("name"), str):
        serve = tree.get("serve")
        if serve is None or (isinstance(serve, dict) and not serve.get("models")):
            serve = {**(serve or {}), "models": [{"model": tree["name"]}]}
        tree = with_served_model_defaults({**tree, "serve": serve})
    return {k: v for k, v in tree.items() if k in fields or k not in _JOB_FILE_KEYS}


def parse_config(kind: str, tree: dict) -> Section:
    """Validate a config dict for a job kind, raising ConfigError naming the keys at fault."""
    cls = JOB_KINDS[kind]
    if not isinstance(tree, dict):
        raise ConfigError(f"<root>: a {cls.__name__} config must be a mapping, got {type(tree).__name__}")
    try:
        return cls.model_validate(job_sections(kind, tree))
    except ValidationError as err:
        raise ConfigError(f"invalid {cls.__name__} config:\n{format_validation_error(err)}") from None


def load_config(kind: str, path: str | Path, overrides: list[str] | None = None) -> Section:
    """Read a YAML file, apply `key.sub=value` overrides, and validate it as job `kind`."""
    return parse_config(kind, read_config_tree(path, overrides))
