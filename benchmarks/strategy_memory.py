"""Per-rank training-state bytes of each strategy at 2 ranks, and the ratio to DDP.

Trains the lm-code GPT for a few steps under ddp, fsdp, zero1, zero2, zero3 (fp32 and bf16),
reads each rank's parameter / gradient / optimizer-state bytes (measured at the step's peak:
gradients before the update, parameters and Adam moments after; only this rank's shard of
sharded tensors), prints a table with ratios to DDP and writes
benchmarks/results/strategy_memory.json. Goal: fsdp and zero3 <= 0.55x DDP.

    .venv/bin/python benchmarks/strategy_memory.py [--precisions fp32,bf16] [--d-model 256] [--quick]

`--quick` (a smoke run, well under a minute): ddp, fsdp and zero3 in fp32 on a 2-layer d=64 model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray

from app.config.jobs import TrainJob
from pipelines.train import fit

KINDS = ("param_bytes", "grad_bytes", "optimizer_bytes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", default="ddp,fsdp,zero1,zero2,zero3")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="ddp, fsdp, zero3 in fp32 on a tiny model")
    ap.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.quick:
        args.strategies, args.precisions, args.d_model, args.n_layer = "ddp,fsdp,zero3", "fp32", 64, 2
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
    goals = [
        {"goal": f"{strategy} per-rank bytes <= 0.55x DDP ({precision})",
         "figure": f"{max(r['ratio_to_ddp'] for r in out[precision][strategy]):.2f}x",
         "met": max(r["ratio_to_ddp"] for r in out[precision][strategy]) <= 0.55}
        for precision in out for strategy in ("fsdp", "zero3") if strategy in out[precision]
    ]
    for g in goals:
        print(f"goal: {g['goal']}: {g['figure']} -> {'met' if g['met'] else 'NOT met'}")
    path = args.results_dir / "strategy_memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "strategy_memory", "quick": args.quick, "args": vars(args) | {"results_dir": str(args.results_dir)},
                                "goals": goals, "results": out}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
