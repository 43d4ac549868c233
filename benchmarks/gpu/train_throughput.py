"""Training throughput on one CUDA GPU: a GPT-2-small-class decoder in bf16 under ddp, fsdp and zero2.

Tokens/s and model FLOPs utilisation (MFU) of the worker loop's inner step (forward, backward,
optimizer step) for Temper's byte-level GPT at GPT-2-small size (12 layers, d_model 768, 12
heads, context 1024: 85M parameters in the blocks), built exactly as a Ray Train worker builds it
(`pipelines/optimization.py`, `pipelines/strategies.py`) inside a one-rank NCCL process group, so
no Ray is needed on the GPU machine. FLOPs per token follow the PaLM paper's count: 6 x parameters
for the matrix products of forward and backward, plus 12 x layers x d_model x context for
attention. MFU divides by the GPU's dense bf16 peak (H100 / H200 SXM: 989 TFLOP/s).

Lives outside `make bench`'s `benchmarks/*.py` (which runs on the CPU machine): run it where a
GPU is, and commit its JSON, named after the device, into `benchmarks/gpu/`. `benchmarks/report.py`
lists every committed one in RESULTS.md.

    python benchmarks/gpu/train_throughput.py [--strategies ddp,fsdp,zero2] [--batch-size 16] [--out DIR]

Without CUDA it says so and writes nothing. zero2 is measured where `deepspeed` imports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HERE = Path(__file__).resolve().parent

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def flops_per_token(n_params: int, n_layer: int, d_model: int, context: int) -> float:
    return 6 * n_params + 12 * n_layer * d_model * context


def init_one_rank_group() -> torch.device:
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    return torch.device("cuda", 0)


def measure(strategy_name: str, args, device: torch.device, storage: str) -> dict:
    from app.config.jobs import TrainJob
    from app.data import build_data, train_batches
    from app.evaluation import metric_kind, task_loss
    from pipelines.optimization import build_optimizer, build_train_model
    from pipelines.strategies import build_strategy

    job = TrainJob.model_validate({
        "name": f"gpu-{strategy_name}", "storage_path": storage,
        "model": {"kind": "gpt", "n_layer": args.n_layer, "d_model": args.d_model, "n_head": args.n_head,
                  "block_size": args.context},
        "data": {"name": "lm-code", "max_bytes": 4_000_000},
        "train": {"num_workers": 1, "use_gpu": True, "strategy": strategy_name, "precision": "bf16",
                  "steps": args.warmup + args.steps, "batch_size": args.batch_size, "lr": 3e-4, "warmup_steps": 2}})
    tc = job.train
    torch.manual_seed(tc.seed)
    data = build_data(job.data, job.model)
    model = build_train_model(job, device)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "emb" not in n)
    strategy = build_strategy(job, model, lambda m: build_optimizer(m, tc), device)
    kind = metric_kind(job.model)
    batches = train_batches(data, tc.seed, 0, 0, tc.batch_size)
    losses = []

    def step():
        strategy.train()
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        loss = task_loss(kind, strategy.forward(x), y)
        strategy.backward(loss, last_micro=True)
        strategy.step()
        losses.append(loss.detach())

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens_s = args.steps * args.batch_size * args.context / elapsed
    fpt = flops_per_token(n_params, args.n_layer, args.d_model, args.context)
    peak = peak_flops(torch.cuda.get_device_name(0))
    row = {"strategy": strategy_name, "precision": "bf16", "params": n_params, "step_ms": 1000 * elapsed / args.steps,
           "tokens_per_s": tokens_s, "tflops_per_s": tokens_s * fpt / 1e12,
           "mfu": tokens_s * fpt / peak if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
           "loss_first": float(losses[0]), "loss_last": float(losses[-1])}
    del strategy, model
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategies", default="ddp,fsdp,zero2")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=HERE, help="folder for <device>.json (default: beside this script)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (this benchmark needs a GPU)")
        return
    device = init_one_rank_group()
    name = torch.cuda.get_device_name(0)
    from app.models.transformer import flash_attn_func

    attention = "flash-attn" if flash_attn_func is not None else "torch SDPA (flash-attn not installed)"
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for s in args.strategies.split(","):
            if s.startswith("zero"):
                try:
                    import deepspeed  # noqa: F401
                except ImportError as err:
                    rows.append({"strategy": s, "skipped": f"deepspeed does not import: {err}"})
                    print(f"[gpu] {s}: skipped (deepspeed does not import: {err})", flush=True)
                    continue
            row = measure(s, args, device, storage)
            rows.append(row)
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "n/a"
            print(f"[gpu] {s:5s} bf16: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, "
                  f"{row['tflops_per_s']:.0f} TFLOP/s, MFU {mfu}, peak {row['peak_mem_gib']:.1f} GiB, "
                  f"loss {row['loss_first']:.2f} -> {row['loss_last']:.2f}", flush=True)
    out = {"benchmark": "gpu_train_throughput", "device": name, "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "attention": attention,
           "peak_bf16_flops": peak_flops(name), "time_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "model": {"kind": "gpt", "n_layer": args.n_layer, "d_model": args.d_model, "n_head": args.n_head,
                     "context": args.context, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup},
           "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_throughput-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
