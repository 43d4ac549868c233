"""Full grid vs ASHA over the same search space, side by side in one Ray session.

Both sweeps run the same 9 learning rates (1e-4..1e-2) (a fixed shuffled order, so the first trials to reach
a rung are not all from one end of the range) on the digits ViT, 1 training worker per trial:

- grid: FIFO scheduler, every trial trains all `--steps` steps;
- ASHA: the same 9 configs, stopped at rungs grace, grace*rf, ... (time attribute: step).

Prints the total training steps of each, the best final val_loss of each and the ratios, and
writes benchmarks/results/tune_asha.json. Goal: ASHA within 2% of the grid's best val_loss
using <= 35% of its steps.

    .venv/bin/python benchmarks/tune_asha.py [--steps 180] [--grace 20] [--rf 3] [--concurrency 3] [--wide] [--quick]

`--quick` (a smoke run): 3 learning rates, 30 steps, grace 10, all 3 trials at once; its ratios
say little (a single ASHA rung over 3 trials).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from app.config.jobs import parse_config
from tune.sweep import run_sweep

LRS = [2e-3, 1e-4, 1e-2, 2e-4, 7e-3, 4e-4, 4e-3, 1e-3, 7e-4]
"""1e-4..1e-2 in a fixed shuffled order. `--wide` uses 1e-4..3e-2, where the fastest early
learners are not the best late ones (short-horizon bias: see the README for what ASHA does there)."""
WIDE_LRS = [3e-3, 1e-4, 3e-2, 3e-4, 1e-2, 6e-4, 2e-2, 1.5e-3, 6e-3]


def sweep(root: str, name: str, scheduler: dict, args) -> dict:
    job = parse_config("tune", {
        "name": name, "storage_path": root,
        "model": {"kind": "vit", "d_model": 32, "n_layer": 2, "n_head": 4},
        "data": {"name": "digits"},
        "train": {"num_workers": 1, "cpus_per_worker": 1.0, "steps": args.steps, "batch_size": 32, "warmup_steps": 5,
                  "eval_every": args.grace, "checkpoint_every": args.grace, "log_every": args.steps, "eval_batches": 8},
        "tune": {"search_space": {"train.lr": {"type": "grid", "values": args.lrs}}, "num_samples": 1,
                 "max_concurrent_trials": args.concurrency, "metric": "val_loss", "mode": "min",
                 "searcher": {"name": "grid"}, "scheduler": scheduler},
    })
    t0 = time.perf_counter()
    result = run_sweep(job)
    return {
        "total_steps": result.total_steps,
        "best_val_loss": result.best.metric_last,
        "best_lr": result.best.values["train.lr"],
        "steps_per_trial": {f"{r.values['train.lr']:g}": r.steps for r in result.trials},
        "curves": {f"{r.values['train.lr']:g}": r.curve for r in result.trials},
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=180)
    ap.add_argument("--grace", type=int, default=20)
    ap.add_argument("--rf", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--wide", action="store_true", help="learning rates up to 3e-2 instead of 1e-2")
    ap.add_argument("--quick", action="store_true", help="3 learning rates, 30 steps, grace 10")
    ap.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    args.lrs = WIDE_LRS if args.wide else LRS
    if args.quick:
        args.lrs, args.steps, args.grace, args.concurrency = args.lrs[:3], 30, 10, 3
    # RAY_ADDRESS: a cluster started with `ray start --head` (see the README); else an embedded one.
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    with tempfile.TemporaryDirectory() as root:
        grid = sweep(root, "grid", {"name": "fifo"}, args)
        asha = sweep(root, "asha", {"name": "asha", "grace_period": args.grace, "reduction_factor": args.rf}, args)
    ray.shutdown()

    step_ratio = asha["total_steps"] / grid["total_steps"]
    gap = (asha["best_val_loss"] - grid["best_val_loss"]) / grid["best_val_loss"]
    print(f"\n{len(args.lrs)} learning rates ({'1e-4..3e-2' if args.wide else '1e-4..1e-2'}), digits ViT, {args.steps} steps max, ASHA grace {args.grace} rf {args.rf:g}")
    print(f"  {'sweep':<5} {'steps':>6} {'best val_loss':>14} {'best lr':>8} {'wall s':>7}")
    for name, r in (("grid", grid), ("asha", asha)):
        print(f"  {name:<5} {r['total_steps']:>6} {r['best_val_loss']:>14.4f} {r['best_lr']:>8.2g} {r['wall_s']:>7.0f}")
    print(f"  ASHA used {step_ratio:.1%} of the grid's steps; its best is {gap:+.2%} vs the grid's best "
          f"(goal: <= 35% of the steps, within 2%) -> {'met' if step_ratio <= 0.35 and gap <= 0.02 else 'NOT met'}")
    print(f"  steps per trial (ASHA): {asha['steps_per_trial']}")
    goals = [{"goal": "ASHA uses <= 35% of the grid's training steps", "figure": f"{step_ratio:.1%}", "met": step_ratio <= 0.35},
             {"goal": "ASHA's best val_loss within 2% of the grid's best", "figure": f"{gap:+.2%}", "met": gap <= 0.02}]
    out = args.results_dir / "tune_asha.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "tune_asha", "quick": args.quick, "args": vars(args) | {"results_dir": str(args.results_dir)},
                               "goals": goals, "grid": grid, "asha": asha, "step_ratio": step_ratio, "best_gap": gap}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
