"""Training callbacks: four hooks, registered by name, configured from YAML.

    on_setup(state)               after the strategy is built and any checkpoint restored
    on_step_end(state) -> metrics after each optimizer step
    on_eval_end(state, metrics) -> metrics   after each evaluation
    state_dict() / load_state_dict(d)        checkpointed with the trainer state

Callbacks that change the model (`mutates_model = True`, e.g. pruning) run before observers,
so observers always see the model as the step left it. The math lives in
`app/compression/pruning.py`; a callback only decides *when* and *where* (which shards).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

import torch

from app.compression import pruning
from app.config.train import EarlyStoppingConfig, MagnitudePruningConfig
from app.config.jobs import TrainJob
from app.models import block_linear_weights


@dataclass
class TrainState:
    """What hooks may read: the job, the strategy (for weight access), ranks and the step count."""

    job: TrainJob
    strategy: object
    rank: int
    world: int
    step: int = 0
    resumed_from: int = 0
    metrics: dict = field(default_factory=dict)
    should_stop: bool = False  # set by an observer (early stopping); the loop checkpoints and ends the run


class Callback(Protocol):
    name: str
    mutates_model: bool

    def on_setup(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> dict[str, float]: ...
    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class MagnitudePruning:
    """Gradual magnitude pruning with masks kept as our own tensors on each rank's local rows."""

    name = "magnitude_pruning"
    mutates_model = True

    def __init__(self, cfg: MagnitudePruningConfig, job: TrainJob, module: torch.nn.Module):
        self.cfg = cfg
        self.end = cfg.end_step or max(1, int(0.75 * job.train.steps))
        self.n_head = getattr(job.model, "n_head", 0)
        if cfg.targets is None:
            self.targets = block_linear_weights(module)
        else:
            pattern = re.compile(cfg.targets)
            # ZeRO-3 replaces partitioned parameters by empty placeholders; their real shape is ds_shape.
            self.targets = [n for n, p in module.named_parameters()
                            if pattern.fullmatch(n) and len(getattr(p, "ds_shape", p.shape)) == 2]
        if not self.targets:
            raise ValueError(f"train.callbacks: magnitude_pruning.targets {cfg.targets!r} matches no 2-D weight")
        if cfg.kind == "heads":
            self.pairs = [(n, n.replace("attn.qkv", "attn.proj")) for n in self.targets if n.endswith("attn.qkv.weight")]
            if not self.pairs:
                raise ValueError("train.callbacks: kind 'heads' needs attention qkv weights among the targets")
            self.targets = [n for pair in self.pairs for n in pair]
        self.sparsity = 0.0          # the sparsity the current masks implement
        self.masks: dict[str, torch.Tensor] | None = None

    # --- schedule
    def target_sparsity(self, step: int) -> float:
        if self.cfg.kind == "2:4":
            return 0.5 if step >= self.cfg.start_step else 0.0
        return pruning.cubic_sparsity(step, self.cfg.start_step, self.end, self.cfg.initial_sparsity,
                                      self.cfg.final_sparsity, self.cfg.update_every)

    def _compute_masks(self, strategy, sparsity: float) -> dict[str, torch.Tensor]:
        views, reduce = strategy.weight_views(self.targets)
        kind = self.cfg.kind
        if kind == "unstructured":
            return pruning.unstructured_masks(views, sparsity, self.cfg.scope, reduce)
        if kind == "rows":
            return pruning.row_masks(views, sparsity, reduce)
        if kind == "2:4":
            return {n: pruning.nm_mask(v.local, 2, 4) for n, v in views.items()}
        masks = {}
        for qkv, proj in self.pairs:
            masks[qkv], masks[proj] = pruning.head_masks(views[qkv], views[proj], self.n_head, sparsity, reduce)
        return masks

    # --- hooks
    def on_setup(self, state: TrainState) -> None:
        if self.sparsity > 0:  # resumed mid-schedule: pruned weights are exact zeros, so they are the masks
            views, _ = state.strategy.weight_views(self.targets)
            self.masks = {n: v.local != 0 for n, v in views.items()}

    def on_step_end(self, state: TrainState) -> dict[str, float]:
        target = self.target_sparsity(state.step)
        if target != self.sparsity:
            self.masks = self._compute_masks(state.strategy, target)
            self.sparsity = target
        if self.masks is not None:
            state.strategy.apply_masks(self.masks)  # after every optimizer step: pruned weights stay zero
        return {"target_sparsity": target}

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> dict[str, float]:
        views, reduce = state.strategy.weight_views(self.targets)
        counts = torch.tensor([sum(float((v.local == 0).sum()) for v in views.values()),
                               sum(float(v.local.numel()) for v in views.values())], dtype=torch.float64)
        zeros, total = reduce(counts).tolist()
        return {"sparsity": zeros / total}

    def state_dict(self) -> dict:
        return {"sparsity": self.sparsity}

    def load_state_dict(self, state: dict) -> None:
        self.sparsity = float(state["sparsity"])


class EarlyStopping:
    """Observer: ends the run when the evaluation metric has not improved for `patience` evaluations.

    Every rank sees the same (all-reduced) metrics, so every rank decides the same. The decision is
    checkpointed: re-running an early-stopped job does not train further."""

    name = "early_stopping"
    mutates_model = False

    def __init__(self, cfg: EarlyStoppingConfig, job: TrainJob, module: torch.nn.Module):
        from app.evaluation import metric_kind, training_metric

        self.cfg = cfg
        default_metric, default_mode = training_metric(metric_kind(job.model))
        self.metric = cfg.metric or default_metric
        self.mode = cfg.mode or default_mode
        self.best: float | None = None
        self.bad_evals = 0
        self.stopped = False

    def on_setup(self, state: TrainState) -> None:
        state.should_stop = state.should_stop or self.stopped

    def on_step_end(self, state: TrainState) -> dict[str, float]:
        return {}

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> dict[str, float]:
        if self.metric not in metrics:
            raise ValueError(f"train.callbacks: early_stopping.metric {self.metric!r} is not reported (have {sorted(metrics)})")
        value = metrics[self.metric]
        better = self.best is None or (value < self.best - self.cfg.min_delta if self.mode == "min" else value > self.best + self.cfg.min_delta)
        if better:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        if self.bad_evals >= self.cfg.patience:
            self.stopped = state.should_stop = True
        return {"early_stopping_bad_evals": float(self.bad_evals)}

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evals, self.stopped = state["best"], int(state["bad_evals"]), bool(state["stopped"])


CALLBACKS = {"magnitude_pruning": MagnitudePruning, "early_stopping": EarlyStopping}


def build_callbacks(job: TrainJob, module: torch.nn.Module) -> list[Callback]:
    """Instantiate `train.callbacks` in order, model-mutating callbacks first."""
    built = [CALLBACKS[cfg.name](cfg, job, module) for cfg in job.train.callbacks]
    return sorted(built, key=lambda cb: not cb.mutates_model)
