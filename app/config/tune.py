"""The `tune` section: a Ray Tune search over the training job's keys."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from app.config.base import Section


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
    synch: bool = False
    """pbt: wait until every live trial reached the perturbation step before exploiting (reproducible decisions; a trial that arrives first is paused and later resumed from its checkpoint). Asynchronous by default: a trial that starts late may find the strong trial already finished and never exploit it."""


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
