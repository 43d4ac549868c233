"""The `train` section: the distributed training loop, its callbacks and distillation."""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from app.config.base import MODEL_NAME_PATTERN, Section, VersionRef


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
    targets: str | None = None
    """Regex over parameter names selecting the 2-D weights to prune; default: every Linear weight inside the transformer blocks (attention and MLP projections; never the embeddings or the output head). An `hf` model's blocks are the layer classes it lists in `_no_split_modules` (e.g. BertLayer, LlamaDecoderLayer)."""

    @model_validator(mode="after")
    def _checks(self) -> "MagnitudePruningConfig":
        if self.kind == "2:4" and self.final_sparsity != 0.5:
            raise ValueError("train.callbacks[].final_sparsity must be 0.5 for kind '2:4' (2 of every 4 weights)")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError("train.callbacks[].initial_sparsity must be <= final_sparsity")
        try:
            re.compile(self.targets or "")
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
    """Knowledge distillation from a registered teacher.

    `loss: kl` (built-in models, hf classifiers and causal LMs): alpha*CE + (1-alpha)*T^2*KL of the
    logits. `loss: mse | cosine` (hf embedding models): the student's pooled embeddings are pulled
    to the teacher's on unlabeled text (no labels, so alpha and temperature do not apply)."""

    teacher: str = Field(pattern=MODEL_NAME_PATTERN)
    """Registry model name of the teacher (same dataset as the student; for an hf embedding teacher, the same tokenizer)."""
    teacher_version: VersionRef = "production"
    """Teacher version number, alias, or `latest`."""
    loss: Literal["kl", "mse", "cosine"] = "kl"
    """`kl`: soft-target logits (classifiers, LMs); `mse` or `cosine` (1 - cosine similarity): embeddings, hf `embedding` models only."""
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    """loss kl only: weight of the hard-label cross-entropy; 1 - alpha goes to the soft-target KL term."""
    temperature: float = Field(2.0, gt=0.0, le=20.0)
    """loss kl only: softmax temperature T applied to both student and teacher logits in the KL term."""
    student_layers: list[int] | None = None
    """hf `embedding` only: the student is the teacher cut to these encoder layers (0-based, sorted, unique), e.g. `[0, 2, 4]` of 6; its embeddings, those layers and the pooling are copied from the teacher (DistilBERT-style) into a new hf folder. Unset: the student is `model.path` as it is."""

    @model_validator(mode="after")
    def _checks(self) -> "DistillConfig":
        # by value, not by `model_fields_set`: a dumped config is validated again in the workers
        if self.loss != "kl" and (self.alpha, self.temperature) != (0.5, 2.0):
            raise ValueError(f"train.distill.alpha / temperature apply to train.distill.loss 'kl', not {self.loss!r}")
        if self.student_layers is not None:
            layers = self.student_layers
            if not layers:
                raise ValueError("train.distill.student_layers: give at least one layer index")
            if min(layers) < 0:
                raise ValueError(f"train.distill.student_layers {layers}: indices are 0-based, none negative")
            if layers != sorted(set(layers)):
                raise ValueError(f"train.distill.student_layers {layers}: must be sorted and unique, e.g. {sorted(set(layers))}")
        return self


class LoraSettings(Section):
    """Low-rank adapters (peft LoRA) trained on a frozen `hf` causal LM (`train.finetune: lora | qlora`)."""

    r: int = Field(8, ge=1, le=1024)
    """Rank of each adapter (the update of a weight W is B @ A with A: r x in, B: out x r)."""
    alpha: float = Field(16.0, gt=0)
    """Scale of the update: alpha / r."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter's input during training."""
    target_modules: list[str] | Literal["all-linear"] | None = None
    """Module names (or name suffixes, e.g. `[q_proj, v_proj]`) that get adapters; `all-linear`: every Linear layer but the output head; default: peft's choice for the architecture (e.g. q_proj, v_proj for Llama)."""

    @model_validator(mode="after")
    def _targets(self) -> "LoraSettings":
        if isinstance(self.target_modules, list) and (not self.target_modules or not all(t.strip() for t in self.target_modules)):
            raise ValueError(f"train.lora.target_modules: give module names, got {self.target_modules}")
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
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers' placement-group bundles on nodes: `PACK` as few nodes as possible (the default), `SPREAD` one per node where it can (a worker group restarted after a node loss may still pack onto the nodes left), `STRICT_*` refuse to start otherwise."""
    use_gpu: bool = False
    """One GPU per worker with NCCL; gloo on CPU otherwise."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype. bf16 works on CPU and CUDA; fp16 (with GradScaler) needs CUDA."""
    steps: int = Field(200, ge=0)
    """Total optimizer steps of the run (a resumed run continues up to this count). 0: nothing to train, the `hf` model is registered as it is (transformation `imported`); only without `distill`, `callbacks`, `pause_at_step` and `tune`."""
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
    finetune: Literal["full", "lora", "qlora"] = "full"
    """`full`: every weight trains. `lora`: the `hf` model's weights stay frozen and only low-rank adapters (`train.lora`, peft) train; the result is registered as an adapter version whose parent is the base model's version. `qlora`: lora over a 4-bit (NF4, bitsandbytes) base; needs CUDA (`train.use_gpu`) and bitsandbytes."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    """Adapter settings for `finetune: lora | qlora`."""
    distill: DistillConfig | None = None
    """Train this model as a student of a registered teacher (knowledge distillation); unset = plain training."""
    contrastive_scale: float = Field(20.0, gt=0.0, le=100.0)
    """hf `embedding` models trained without `distill`: in-batch contrastive loss, cross-entropy over scale x the cosine-similarity matrix of texts and their pairs (the same text again without a pair field)."""
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
