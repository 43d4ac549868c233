"""Per-rank training-state bytes of each strategy at 2 ranks, and the ratio to DDP.

Trains the lm-code GPT for a few steps under ddp, fsdp, zero1, zero2, zero3 (fp32 and bf16),
reads each rank's parameter / gradient / optimizer-state bytes (measured at the step's peak:
gradients before the update, parameters and Adam moments after; only this rank's shard of
sharded tensors), prints a table with ratios to DDP and writes
benchmarks/results/strategy_memory.json. Goal: fsdp and zero3 <= 0.55x DDP.

    .venv/bin/python benchmarks/strategy_memory.py [--precisions fp32,bf16] [--d-model 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray

from app.config import TrainJob
from pipelines.train import fit

KINDS = ("param_bytes", "grad_bytes", "optimizer_bytes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", default="ddp,fsdp,zero1,zero2,zero3")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    args = ap.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            for strategy in args.strategies.split(","):
                job = TrainJob.model_validate({
                    "name": f"mem-{strategy}-{precision}", "storage_path": tmp,
                    "model": {"kind": "gpt", "n_layer": args.n_layer, "d_model": args.d_model, "n_head": 8, "block_size": 64},
                    "data": {"name": "lm-code", "max_bytes": 300_000},
                    "train": {"num_workers": 2, "strategy": strategy, "precision": precision, "steps": 3,
                              "batch_size": 4, "warmup_steps": 1, "eval_every": 3, "checkpoint_every": 3, "eval_batches": 2},
                })
                m = fit(job).metrics
                rows[(strategy, precision)] = [{k: int(m[f"mem_rank{r}_{k}"]) for k in KINDS} for r in (0, 1)]
                print(f"measured {strategy}/{precision}", flush=True)
    ray.shutdown()

    out = {}
    for precision in args.precisions.split(","):
        ddp_total = max(sum(r.values()) for r in rows[("ddp", precision)])
        print(f"\nper-rank bytes, 2 ranks, {precision} (GPT d={args.d_model}, {args.n_layer} layers)")
        print(f"  {'strategy':<8} {'rank':>4} {'params MB':>10} {'grads MB':>9} {'optim MB':>9} {'total MB':>9} {'x DDP':>6}")
        for strategy in args.strategies.split(","):
            for rank, r in enumerate(rows[(strategy, precision)]):
                total = sum(r.values())
                print(f"  {strategy:<8} {rank:>4} {r['param_bytes'] / 1e6:>10.2f} {r['grad_bytes'] / 1e6:>9.2f} "
                      f"{r['optimizer_bytes'] / 1e6:>9.2f} {total / 1e6:>9.2f} {total / ddp_total:>6.2f}")
                out.setdefault(precision, {}).setdefault(strategy, []).append({**r, "total": total, "ratio_to_ddp": total / ddp_total})
    path = Path(__file__).parent / "results" / "strategy_memory.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
