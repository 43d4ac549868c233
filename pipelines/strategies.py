"""Parallelism strategies behind one small protocol: ddp, fsdp (FSDP2), zero1/2/3 (DeepSpeed).

The training loop only ever calls:

    strategy = build_strategy(job, model, optimizer_factory, device)
    logits = strategy.forward(x)
    strategy.backward(loss, last_micro=...)   # gradient accumulation aware
    info = strategy.step()                    # clip + optimizer step (+ loss scaling)
    strategy.save(folder) / strategy.load(folder)   # every rank writes/reads its part
    strategy.full_state_dict()                # consolidated fp32 weights (a collective)
    strategy.memory()                         # this rank's parameter / gradient / optimizer bytes
    strategy.weight_views(names) / strategy.apply_masks(masks)   # pruning callbacks' access to weights

so switching `train.strategy` never changes the math: same seed -> same initial weights
(built before wrapping), same batches, same fp32 loss; only where state lives differs.

Ordering rule (why `setup` is one straight-line function per strategy): weights must be final
(seeded init) before wrapping, because DDP broadcasts rank 0's weights and FSDP/ZeRO shard
whatever they are given; the optimizer must be built *after* FSDP2 sharding (its params become
DTensors) but *before* DeepSpeed (which wraps a client optimizer); resume happens after both,
since each strategy restores into its own sharded layout.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn

from app.artifacts import refuse_unsafe_pickles
from app.compression.pruning import Reduce, RowView
from app.config.jobs import TrainJob
from app.models import transformer_blocks

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DCP_DIR = "dcp"
DDP_OPTIMIZER = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class StepInfo:
    grad_norm: float
    skipped: bool  # fp16 overflow: the optimizer step was skipped and the loss scale lowered


class Strategy(Protocol):
    name: str
    module: nn.Module           # the plain (unwrapped) module, for names and eval
    optimizer: torch.optim.Optimizer  # the torch optimizer whose param_groups carry the lr

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor, last_micro: bool) -> None: ...
    def step(self) -> StepInfo: ...
    def train(self, mode: bool = True) -> None: ...
    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...
    def full_state_dict(self) -> dict[str, torch.Tensor]: ...
    def memory(self) -> dict[str, int]: ...
    def extra_state(self) -> dict: ...
    def load_extra_state(self, state: dict) -> None: ...

    def weight_views(self, names: list[str]) -> tuple[dict[str, RowView], Reduce]:
        """The named weights as this rank holds them, for pruning: (name -> RowView, reduce).

        A `RowView` is the local rows of one weight (its start row and the full shape); `reduce`
        sums a tensor over the ranks that hold different rows (identity when every rank sees the
        whole weight). Every rank must call it with the same names: it may be a collective."""
        ...

    def apply_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Zero the weights where `masks` (full-shape 0/1 tensors by name) is 0, in every copy the
        strategy keeps (master weights and the module's copy), so pruned weights stay zero after
        the optimizer step. Called by every rank after each step."""
        ...


# ----------------------------------------------------------------------------- memory


def _tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (by address), counting only this rank's shard of a DTensor."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        if hasattr(t, "to_local"):  # DTensor: only this rank's shard is resident
            t = t.to_local()
        if t.numel() == 0 or (t.data_ptr(), t.device) in seen:
            continue
        seen.add((t.data_ptr(), t.device))
        total += t.numel() * t.element_size()
    return total


def _optimizer_state_tensors(opt: torch.optim.Optimizer):
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                yield v


# ----------------------------------------------------------------------------- ddp / fsdp (torch)


class TorchStrategy:
    """DDP or FSDP2 with torch autocast / MixedPrecisionPolicy and GradScaler for fp16."""

    def __init__(self, job: TrainJob, model: nn.Module, make_optimizer: OptimizerFactory, device: torch.device):
        tc = job.train
        self.name = tc.strategy
        self.grad_clip = tc.grad_clip
        self.accum = tc.grad_accum_steps
        self.device = device
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.precision = tc.precision
        # train.finetune lora | qlora: checkpoints hold the trainable (adapter) weights only
        self.partial_weights = tc.finetune != "full"
        model = model.to(device)
        self.module = model
        if tc.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            # Shard each transformer block, then the root (embeddings, head, norms). Params are computed in
            # `precision` and gradients reduced in fp32 so the update matches the fp32 math.
            mp = MixedPrecisionPolicy(param_dtype=_DTYPES[tc.precision], reduce_dtype=torch.float32)
            for _, block in transformer_blocks(model):
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            self.engine = model
            self.autocast = contextlib.nullcontext  # the policy casts params; no op-level autocast
        else:
            if self.world > 1:
                from torch.nn.parallel import DistributedDataParallel

                self.engine = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            else:
                self.engine = model
            dtype = _DTYPES[tc.precision]
            self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if tc.precision != "fp32" else contextlib.nullcontext
        self.optimizer = make_optimizer(model)  # after sharding: FSDP2 params are DTensors now
        self.scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.engine(x)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        # Gradients are averaged over micro-batches; they are synchronised on the last one only.
        loss = loss / self.accum
        ctx = contextlib.nullcontext()
        if self.name == "fsdp":
            self.engine.set_requires_gradient_sync(last_micro)
        elif self.world > 1 and not last_micro:
            ctx = self.engine.no_sync()
        with ctx:
            self.scaler.scale(loss).backward()

    def step(self) -> StepInfo:
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.module.parameters() if p.grad is not None])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        grad_bytes = _tensor_bytes(p.grad for p in self.module.parameters())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._memory = {"grad_bytes": grad_bytes, **self._state_bytes()}
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        self.optimizer.zero_grad(set_to_none=True)
        return StepInfo(float(norm), bool(skipped))

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    # --- checkpoints
    def save(self, folder: Path) -> None:
        if self.name == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / DCP_DIR))
        elif _rank() == 0:  # DDP: identical on every rank; weights are the consolidated model.safetensors
            torch.save(self.optimizer.state_dict(), folder / DDP_OPTIMIZER)

    def load(self, folder: Path) -> None:
        if self.name == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(folder / DCP_DIR))
            set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            from safetensors.torch import load_file

            weights = load_file(str(folder / "model.safetensors"), device=str(self.device))
            if self.partial_weights:  # the adapter's weights; the frozen base is loaded from model.path
                trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
                if set(weights) != trainable:
                    raise ValueError(f"{folder}/model.safetensors holds {len(weights)} tensors, not the {len(trainable)} "
                                     "adapter weights of this model (train.lora changed?); start under a new `name`")
                self.module.load_state_dict(weights, strict=False)
            else:
                self.module.load_state_dict(weights)
            self.optimizer.load_state_dict(torch.load(folder / DDP_OPTIMIZER, map_location=self.device, weights_only=True))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.name == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # A collective: every rank gathers; full tensors end on every rank (small models) —
            # cpu_offload keeps them off the accelerator.
            sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False))
            return {k: v.float() for k, v in sd.items()}
        return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}

    # --- pruning access (pipelines/callbacks.py): rows of weights this rank holds
    def weight_views(self, names: list[str]):
        """(name -> RowView, reduce): FSDP2 shards dim 0, so a view is this rank's rows and `reduce`
        sums over ranks; DDP views are whole weights (identical on every rank), `reduce` is identity."""
        from app.compression.pruning import RowView, no_reduce

        params = dict(self.module.named_parameters())
        if self.name != "fsdp" or self.world == 1:
            return {n: RowView(params[n].data, 0, tuple(params[n].shape)) for n in names}, no_reduce
        rank = dist.get_rank()
        views = {}
        for n in names:
            p = params[n]
            chunk = math.ceil(p.shape[0] / self.world)  # FSDP2 shards dim 0 like torch.chunk
            views[n] = RowView(p.to_local().data, min(rank * chunk, p.shape[0]), tuple(p.shape))
        return views, _all_reduce_sum

    def apply_masks(self, masks: dict[str, torch.Tensor]) -> None:
        views, _ = self.weight_views(list(masks))
        with torch.no_grad():
            for n, mask in masks.items():
                views[n].local.mul_(mask.to(views[n].local.dtype))

    def extra_state(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])

    def _state_bytes(self) -> dict[str, int]:
        return {
            "param_bytes": _tensor_bytes(self.module.parameters()),
            "optimizer_bytes": _tensor_bytes(_optimizer_state_tensors(self.optimizer)),
        }

    def memory(self) -> dict[str, int]:
        """Bytes at the last step's peak: gradients before the update, params and optimizer state after."""
        return getattr(self, "_memory", None) or {"grad_bytes": 0, **self._state_bytes()}


# ----------------------------------------------------------------------------- ZeRO (DeepSpeed)


# DeepSpeed's checkpoint engine unpickles its files with torch.load(weights_only=False), so a
# crafted file in a checkpoint folder could run code on resume. Its files are scanned first; these
# are the only classes beyond torch's weights_only set that DeepSpeed 0.19 writes (ZeRO 1-3, fp32
# and bf16, optimizer offload).
DEEPSPEED_STATE_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def _skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed on the gloo process group Ray Train set up, without its CPU shared-memory op.

    On CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce (a C++ extension
    built with g++ on first use: 1-3 minutes on 2 cores, under ~/.cache/torch_extensions, rebuilt
    for each virtualenv path), and a build interrupted midway leaves a lock file on which every
    later DeepSpeed start waits forever. It only speeds up large CPU all-reduces; gloo does the same
    collectives. DeepSpeed builds an op only when `deepspeed.ops.__compatible_ops__` marks it
    compatible, so marking it not compatible is the switch (DeepSpeed offers no option for it).
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def deepspeed_config(job: TrainJob) -> dict:
    """The DeepSpeed config, derived from our pydantic config (never a hand-kept JSON)."""
    tc = job.train
    stage = {"zero1": 1, "zero2": 2, "zero3": 3}[tc.strategy]
    zero: dict = {"stage": stage}
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    if tc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    if stage == 3:
        # Small models: gather every parameter just in time, never keep a persistent copy,
        # so ZeRO-3 really holds only its partition between steps.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 1e9,
                     "stage3_prefetch_bucket_size": 0})
    cfg = {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum_steps,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if tc.offload_optimizer:
        # Our client torch optimizer steps the offloaded fp32 partition on the CPU. DeepSpeed refuses
        # that by default in favour of its DeepSpeedCPUAdam, a C++ op JIT-compiled on first use
        # (40-60 s with g++); the torch optimizer needs no build and does the same math.
        cfg["zero_force_ds_cpu_optimizer"] = False
    if tc.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif tc.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    return cfg


class DeepSpeedStrategy:
    """ZeRO stage 1/2/3 through DeepSpeed, reusing the process group Ray Train set up."""

    def __init__(self, job: TrainJob, model: nn.Module, make_optimizer: OptimizerFactory, device: torch.device):
        import deepspeed

        tc = job.train
        self.name = tc.strategy
        self.stage = {"zero1": 1, "zero2": 2, "zero3": 3}[tc.strategy]
        self.device = device
        self.precision = tc.precision
        self.input_dtype = _DTYPES[tc.precision]
        model = model.to(device)
        self.module = model
        self.optimizer = make_optimizer(model)
        if device.type == "cpu":
            _skip_shared_memory_allreduce()
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=deepspeed_config(job), dist_init_required=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():  # DeepSpeed casts the module itself; inputs must follow
            x = x.to(self.input_dtype)
        return self.engine(x.to(self.device))

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself, so callers pass the raw mean loss.
        self.engine.backward(loss)
        if not last_micro:
            self.engine.step()  # only advances the micro-step counter off a boundary

    def step(self) -> StepInfo:
        grad_bytes = self._grad_bytes()
        self.engine.step()
        self._memory = {"grad_bytes": grad_bytes, **self._state_bytes()}
        norm = self.engine.get_global_grad_norm()
        skipped = bool(getattr(self.engine, "skipped_steps", 0) and getattr(self.ds_optimizer, "overflow", False))
        return StepInfo(float(norm) if norm is not None and math.isfinite(float(norm)) else float("nan"), skipped)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, folder: Path) -> None:
        # Every rank writes its optimizer (and, for stage 3, parameter) partition.
        self.engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)

    def load(self, folder: Path) -> None:
        refuse_unsafe_pickles(folder / DEEPSPEED_DIR, DEEPSPEED_STATE_GLOBALS)
        path, _ = self.engine.load_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder / DEEPSPEED_DIR}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        # The fp32 master weights (not the bf16 module copy); a collective under stage 3. A frozen
        # parameter (a LoRA base) has none: it is not in the optimizer, its module copy is the weight.
        out = {}
        for name, p in self.module.named_parameters():
            master = safe_get_full_fp32_param(p)
            out[name] = (master if master is not None else p).detach().float().cpu()
        return out

    # --- pruning access: whole fp32 master weights (a collective: every rank, same order)
    def weight_views(self, names: list[str]):
        from deepspeed.utils import safe_get_full_fp32_param

        from app.compression.pruning import RowView, no_reduce

        params = dict(self.module.named_parameters())
        views = {}
        for n in names:
            full = safe_get_full_fp32_param(params[n]).detach()  # full shape, also under stage 3
            views[n] = RowView(full, 0, tuple(full.shape))
        return views, no_reduce

    def apply_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Mask the fp32 master weights (what the optimizer updates) and the module's copy (what
        forward reads: the whole low-precision weight under stage 1/2, this rank's flat partition
        under stage 3)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for n, mask in masks.items():
                p = params[n]
                full = safe_get_full_fp32_param(p) * mask.to(torch.float32)
                safe_set_full_fp32_param(p, full)
                if self.stage < 3:
                    p.data.copy_(full.to(p.dtype))
                else:
                    part = p.ds_tensor
                    flat = full.flatten().to(part.dtype)
                    start = dist.get_rank() * part.numel()
                    chunk = flat[start:start + part.numel()]
                    part.data[: chunk.numel()].copy_(chunk)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        return None

    def _grad_bytes(self) -> int:
        """Gradient memory before the step: full .grad under stage 1, ZeRO's partitioned buffers under 2/3."""
        opt, grads = self.ds_optimizer, []
        if self.stage == 1:
            grads += [p.grad for p in self.module.parameters()]
        for attr in ("averaged_gradients", "grad_partitions_flat_buffer"):
            value = getattr(opt, attr, None)
            values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            for v in values:
                grads += v if isinstance(v, list) else [v]
        return _tensor_bytes(grads)

    def _state_bytes(self) -> dict[str, int]:
        """Module params (stage 3: only the partition `ds_tensor`) + fp32 master partitions; Adam moments."""
        opt = self.ds_optimizer
        module_params = [getattr(p, "ds_tensor", None) if self.stage == 3 else p for p in self.module.parameters()]
        masters = []
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            masters += list(getattr(opt, attr, []) or [])
        # DeepSpeed clones the fp32 master partition even in fp32 training; a buffer that really is
        # shared would have the same address and be counted once.
        return {
            "param_bytes": _tensor_bytes(list(module_params) + masters),
            "optimizer_bytes": _tensor_bytes(_optimizer_state_tensors(getattr(opt, "optimizer", self.optimizer))),
        }

    def memory(self) -> dict[str, int]:
        return getattr(self, "_memory", None) or {"grad_bytes": 0, **self._state_bytes()}


# ----------------------------------------------------------------------------- registry


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


STRATEGIES = {
    "ddp": TorchStrategy,
    "fsdp": TorchStrategy,
    "zero1": DeepSpeedStrategy,
    "zero2": DeepSpeedStrategy,
    "zero3": DeepSpeedStrategy,
}


def build_strategy(job: TrainJob, model: nn.Module, make_optimizer: OptimizerFactory, device: torch.device) -> Strategy:
    """Wrap `model` (already seeded and initialised) in the configured strategy."""
    return STRATEGIES[job.train.strategy](job, model, make_optimizer, device)
