"""The CUDA paths, run on a machine with a GPU and skipped everywhere else (CI has none).

One process, no Ray: a worker's model, optimizer and strategy are built exactly as a Ray Train
worker builds them (pipelines/optimization.py, pipelines/strategies.py) inside a one-rank NCCL
process group, and stepped with the worker loop's batches.

- fp16 with GradScaler, and bf16 autocast, under DDP and FSDP2, and fp16 / bf16 under DeepSpeed
  ZeRO-2 and ZeRO-3 (where deepspeed is installed): they train and end within 2% of the fp32 loss
  of the same seed; fp16's loss scale stays finite (a scaler that never unscales, or a wrong
  cast, moves the loss far more).
- QLoRA: the base is 4-bit NF4 (bitsandbytes `Linear4bit`), only the adapters train and sit in
  the optimizer, the base bytes do not change, and the adapter learns the word-swap task
  (greedy exact match from 0 to >= 0.4, as LoRA does on CPU).
- A transformers BERT classifier in bf16 under ddp, fsdp and zero3, and LoRA on the tiny Llama
  in bf16 under ddp, fsdp and zero2 (the strategies adapters may use): bf16 matmuls, the fp32
  loss, and the adapter learns the word-swap task.
- The built-in GPT in bf16 on CUDA (torch SDPA or flash-attn) gives the CPU fp32 logits.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hf_folders import swap_words_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def nccl():
    """A one-rank NCCL process group (what Ray Train sets up on each GPU worker)."""
    import torch.distributed as dist

    from conftest import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        t = torch.ones(4, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [1.0] * 4
        yield torch.device("cuda", 0)
    finally:
        dist.destroy_process_group()


def _gpt_job(tmp_path: Path, strategy: str, precision: str):
    from app.config.jobs import TrainJob

    return TrainJob.model_validate({
        "name": f"gpu-{strategy}-{precision}", "storage_path": str(tmp_path),
        "model": {"kind": "gpt", "n_layer": 2, "d_model": 64, "n_head": 4, "block_size": 32},
        "data": {"name": "lm-code", "max_bytes": 200_000},
        "train": {"num_workers": 1, "use_gpu": True, "strategy": strategy, "precision": precision, "steps": 40,
                  "batch_size": 16, "lr": 3e-3, "warmup_steps": 4}})


def _train(job, device, steps: int | None = None, linear_dtypes: set | None = None) -> tuple[list[float], object]:
    """Per-step losses of the worker loop's inner steps; the strategy it stepped. `linear_dtypes`
    collects the dtype of every Linear output in the forward passes (the precision the matmuls
    really ran in: autocast, FSDP's param dtype or DeepSpeed's half weights all show there)."""
    from app.data import build_data, train_batches
    from app.evaluation import metric_kind, task_loss
    from pipelines.optimization import build_optimizer, build_train_model, lr_factor
    from pipelines.strategies import build_strategy

    tc = job.train
    torch.manual_seed(tc.seed)
    data = build_data(job.data, job.model)
    model = build_train_model(job, device, labels=getattr(data, "labels", None))
    strategy = build_strategy(job, model, lambda m: build_optimizer(m, tc), device)
    if linear_dtypes is not None:
        for m in strategy.module.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda _m, _i, out: linear_dtypes.add(out.dtype))
    scheduler = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps, tc.min_lr_ratio))
    kind, losses = metric_kind(job.model), []
    batches = train_batches(data, tc.seed, 0, 0, tc.batch_size)
    for _ in range(tc.steps if steps is None else steps):
        strategy.train()
        x, y = (t.to(device) for t in next(batches))
        loss = task_loss(kind, strategy.forward(x), y)
        strategy.backward(loss, last_micro=True)
        strategy.step()
        scheduler.step()
        losses.append(loss.item())
    return losses, strategy


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_mixed_precision_trains_like_fp32(nccl, tmp_path, strategy, precision):
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    reference_dtypes, dtypes = set(), set()
    reference, _ = _train(_gpt_job(tmp_path, strategy, "fp32"), nccl, linear_dtypes=reference_dtypes)
    losses, trained = _train(_gpt_job(tmp_path, strategy, precision), nccl, linear_dtypes=dtypes)
    assert reference_dtypes == {torch.float32}
    assert dtypes == {torch.float16 if precision == "fp16" else torch.bfloat16}, dtypes  # the matmuls ran low
    tail = sum(losses[-5:]) / 5
    assert tail < losses[0] - 0.5, losses  # learning: byte-level loss starts near ln 256 = 5.55
    assert tail == pytest.approx(sum(reference[-5:]) / 5, rel=0.02), (losses[-5:], reference[-5:])
    scale = None
    if precision == "fp16":  # torch's GradScaler, or DeepSpeed's dynamic loss scaler
        scaler = getattr(trained, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else trained.ds_optimizer.cur_scale
        assert (scaler is None or scaler.is_enabled()) and 0 < scale < float("inf")
    print(f"[gpu] {strategy} {precision}: loss {losses[0]:.5f} -> {tail:.5f} (fp32 {reference[0]:.5f} -> "
          f"{sum(reference[-5:]) / 5:.5f})"
          + (f", loss scale {scale:.0f}" if scale else ""))


def _hf_classifier_job(tmp_path: Path, strategy: str, precision: str):
    import json

    from app.config.jobs import TrainJob
    from hf_folders import sentiment_rows, tiny_bert

    if not (tmp_path / "bert").exists():
        tiny_bert(tmp_path / "bert")
        (tmp_path / "sent.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(200)))
    return TrainJob.model_validate({
        "name": f"gpu-cls-{strategy}-{precision}", "storage_path": str(tmp_path / "runs"),
        "model": {"kind": "hf", "path": str(tmp_path / "bert"), "task": "sequence_classification"},
        "data": {"kind": "jsonl", "path": str(tmp_path / "sent.jsonl"), "label_field": "label", "max_length": 16,
                 "val_fraction": 0.25},
        "train": {"num_workers": 1, "use_gpu": True, "strategy": strategy, "precision": precision, "steps": 40,
                  "batch_size": 16, "lr": 3e-3, "warmup_steps": 2}})


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_hf_classifier_trains_in_bf16_like_fp32(nccl, tmp_path, strategy):
    """A transformers BERT under each strategy on CUDA: bf16 matmuls, and the fp32 run's loss."""
    reference, _ = _train(_hf_classifier_job(tmp_path, strategy, "fp32"), nccl)
    dtypes = set()
    losses, _ = _train(_hf_classifier_job(tmp_path, strategy, "bf16"), nccl, linear_dtypes=dtypes)
    assert dtypes == {torch.bfloat16}, dtypes
    tail, ref_tail = sum(losses[-5:]) / 5, sum(reference[-5:]) / 5
    print(f"[gpu] hf classifier {strategy} bf16: loss {losses[0]:.5f} -> {tail:.5f} (fp32 {ref_tail:.5f})")
    assert tail < 0.5 * losses[0], losses  # two balanced labels: ln 2 = 0.69 untrained
    assert tail == pytest.approx(ref_tail, abs=0.1), (losses[-5:], reference[-5:])  # seen: 0.02-0.045 apart


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2"])
def test_lora_learns_in_bf16_under_each_adapter_strategy(nccl, tmp_path, strategy):
    """LoRA on CUDA in bf16 under every strategy the config allows for adapters: the adapter
    learns the word-swap task (greedy exact match from 0 to >= 0.4), judged on a fresh model
    holding the consolidated weights (what a checkpoint saves; a sharded module cannot generate)."""
    from app.data import build_data
    from pipelines.optimization import build_train_model

    job = swap_words_job(tmp_path, name=f"swap-{strategy}", use_gpu=True, strategy=strategy, precision="bf16")
    data = build_data(job.data, job.model)
    dtypes = set()
    losses, trained = _train(job, nccl, linear_dtypes=dtypes)
    assert torch.bfloat16 in dtypes, dtypes
    state = trained.full_state_dict()
    fresh = build_train_model(job, nccl).to(nccl)
    missing, unexpected = fresh.load_state_dict({k: v.to(nccl) for k, v in state.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k], (missing, unexpected)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        after = _exact_match(fresh, data, nccl)
    print(f"[gpu] lora {strategy} bf16: loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}, exact match {after:.2f}")
    assert after >= 0.4, after


def test_gpt_bf16_logits_on_cuda_equal_cpu_fp32(tmp_path):
    from app.data import build_data
    from app.models import build_model

    job = _gpt_job(tmp_path, "ddp", "fp32")
    torch.manual_seed(0)
    model = build_model(job.model).eval()
    x, _ = next(build_data(job.data, job.model).val_batches(1, 8))
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model.cuda()(x.cuda()).float().cpu()
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)


def _exact_match(model, data, device) -> float:
    hits = 0
    model.eval()
    with torch.no_grad():
        for ids, labels in zip(data.val.input_ids, data.val.labels):
            start = next(i for i, t in enumerate(labels) if t != -100)
            prompt = torch.tensor([ids[:start]], device=device)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=len(ids) - start + 2, eos_token_id=ids[-1], pad_token_id=data.pad_id)
            hits += out[0, start:].tolist() == ids[start:]
    return hits / len(data.val.input_ids)


def test_qlora_trains_adapters_over_a_4bit_base(nccl, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")

    from app.data import build_data
    from app.models.lora import adapter_state, save_adapter

    job = swap_words_job(tmp_path, name="swap-qlora", use_gpu=True, finetune="qlora")
    data = build_data(job.data, job.model)
    losses, strategy = _train(job, nccl, steps=0)  # built, not stepped: the untrained adapter
    model = strategy.module
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7, "every targeted projection of the 2 layers should be a 4-bit Linear"
    in_optimizer = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert in_optimizer == {id(p) for n, p in named.items() if "lora_" in n}
    base_bytes = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    before = _exact_match(model, data, nccl)

    losses, strategy = _train(job, nccl)
    model = strategy.module
    after = _exact_match(model, data, nccl)
    print(f"[gpu] qlora: loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}, exact match {before:.2f} -> {after:.2f}")
    assert before == 0.0 and after >= 0.4, (before, after)
    assert all(torch.equal(m.weight.data, base_bytes[n]) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))

    folder = save_adapter(tmp_path / "adapter", model, adapter_state(model, strategy.full_state_dict()))
    from safetensors.torch import load_file

    saved = load_file(str(folder / "adapter_model.safetensors"))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in saved.values()) == n_trainable and all("lora_" in k for k in saved)

