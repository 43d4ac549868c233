"""Gradual 50% magnitude pruning vs one-shot 50% vs dense, on the lm-code GPT, side by side.

- dense:    train N steps (2 DDP workers on Ray Train).
- gradual:  the same N steps with a magnitude_pruning callback (global unstructured, cubic
            schedule from 40% to 90% of N by default, masks re-applied after every step) reaching 50%.
- one-shot: the dense model's weights, 50% pruned at once (same global magnitude rule), no
            retraining.
Quality = validation loss on the same fixed batches; prints each with its relative change vs
dense and writes benchmarks/results/pruning.json. Goal: gradual <= 2% relative loss vs dense.

    .venv/bin/python benchmarks/pruning.py [--steps 600] [--start-frac 0.4] [--end-frac 0.9] [--quick]

`--quick` (a smoke run): 20 steps of a 2-layer d=64 model on 200 kB of text, 4 eval batches.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray
import torch

from app.artifacts import load_fp32
from app.compression.pruning import RowView, sparsity_of, unstructured_masks
from app.config.jobs import TrainJob
from app.data import build_data
from app.evaluation import eval_sums, metrics_from_sums
from app.models import block_linear_weights
from pipelines.train import fit


def evaluate(model, job: TrainJob, batches: int) -> float:
    data = build_data(job.data, job.model)
    with torch.no_grad():
        return metrics_from_sums("gpt", eval_sums("gpt", model, data.val_batches(batches, 32)))["val_loss"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--start-frac", type=float, default=0.4, help="schedule start, as a fraction of --steps")
    ap.add_argument("--end-frac", type=float, default=0.9, help="schedule end, as a fraction of --steps")
    ap.add_argument("--quick", action="store_true", help="20 steps of a tiny model")
    ap.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    size = {"n_layer": 4, "d_model": 128, "n_head": 4, "block_size": 128}
    max_bytes, batch_size = 2_000_000, 16
    if args.quick:
        args.steps, args.eval_batches = 20, 4
        size, max_bytes, batch_size = {"n_layer": 2, "d_model": 64, "n_head": 4, "block_size": 64}, 200_000, 8
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    steps = args.steps
    prune = {"name": "magnitude_pruning", "kind": "unstructured", "scope": "global", "final_sparsity": 0.5,
             "start_step": int(steps * args.start_frac), "end_step": int(steps * args.end_frac), "update_every": max(1, steps // 60)}
    with tempfile.TemporaryDirectory() as tmp:
        def job(name, callbacks):
            return TrainJob.model_validate({
                "name": name, "storage_path": tmp,
                "model": {"kind": "gpt", **size},
                "data": {"name": "lm-code", "max_bytes": max_bytes},
                "train": {"num_workers": 2, "steps": steps, "batch_size": batch_size, "lr": 3e-3, "warmup_steps": max(1, steps // 20),
                          "eval_every": steps // 2, "checkpoint_every": steps // 2, "log_every": steps // 4,
                          "callbacks": callbacks},
            })

        dense_job, gradual_job = job("dense", []), job("gradual", [prune])
        dense_path = fit(dense_job).artifact_path
        dense_model, _ = load_fp32(dense_path)
        gradual_model, _ = load_fp32(fit(gradual_job).artifact_path)

        # the callback's default targets: every Linear weight inside the transformer blocks
        names = set(block_linear_weights(dense_model))
        oneshot_model, _ = load_fp32(dense_path)
        targets = {n: p for n, p in oneshot_model.named_parameters() if n in names}
        masks = unstructured_masks({n: RowView(p.data, 0, tuple(p.shape)) for n, p in targets.items()}, 0.5, "global")
        with torch.no_grad():
            for n, p in targets.items():
                p.mul_(masks[n])

        rows = {}
        for name, model in (("dense", dense_model), ("gradual", gradual_model), ("one-shot", oneshot_model)):
            weights = [p for n, p in model.named_parameters() if n in names]
            rows[name] = {"val_loss": evaluate(model, dense_job, args.eval_batches), "sparsity": sparsity_of(weights)}
    ray.shutdown()

    base = rows["dense"]["val_loss"]
    print(f"\nlm-code GPT ({size['n_layer']} layers, d={size['d_model']}), {steps} steps, 2 DDP workers; sparsity over the block Linear weights")
    print(f"  {'variant':<9} {'sparsity':>8} {'val_loss':>9} {'vs dense':>9}")
    for name, r in rows.items():
        r["relative_loss_change"] = (r["val_loss"] - base) / base
        print(f"  {name:<9} {r['sparsity']:>8.3f} {r['val_loss']:>9.4f} {r['relative_loss_change']:>+9.2%}")
    gradual = rows["gradual"]["relative_loss_change"]
    goals = [{"goal": "gradual 50% pruning: val_loss <= 2% above dense", "figure": f"{gradual:+.2%}", "met": gradual <= 0.02}]
    print(f"goal: {goals[0]['goal']}: {goals[0]['figure']} -> {'met' if goals[0]['met'] else 'NOT met'}")
    out = args.results_dir / "pruning.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "pruning", "quick": args.quick, "steps": steps, "model": size, "goals": goals,
                               "schedule": prune, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
