"""Gradual 50% magnitude pruning vs one-shot 50% vs dense, on the lm-code GPT, side by side.

- dense:    train N steps (2 DDP workers on Ray Train).
- gradual:  the same N steps with a magnitude_pruning callback (global unstructured, cubic
            schedule from 40% to 90% of N by default, masks re-applied after every step) reaching 50%.
- one-shot: the dense model's weights, 50% pruned at once (same global magnitude rule), no
            retraining.
Quality = validation loss on the same fixed batches; prints each with its relative change vs
dense and writes benchmarks/results/pruning.json. Goal: gradual <= 2% relative loss vs dense.

    .venv/bin/python benchmarks/pruning.py [--steps 600] [--start-frac 0.4] [--end-frac 0.9]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import ray
import torch

from app.artifacts import load_fp32
from app.compression.pruning import RowView, sparsity_of, unstructured_masks
from app.config import MagnitudePruningConfig, TrainJob
from app.data import build_data
from app.evaluation import eval_sums, metrics_from_sums
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
    args = ap.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    steps = args.steps
    prune = {"name": "magnitude_pruning", "kind": "unstructured", "scope": "global", "final_sparsity": 0.5,
             "start_step": int(steps * args.start_frac), "end_step": int(steps * args.end_frac), "update_every": max(1, steps // 60)}
    with tempfile.TemporaryDirectory() as tmp:
        def job(name, callbacks):
            return TrainJob.model_validate({
                "name": name, "storage_path": tmp,
                "model": {"kind": "gpt", "n_layer": 4, "d_model": 128, "n_head": 4, "block_size": 128},
                "data": {"name": "lm-code", "max_bytes": 2_000_000},
                "train": {"num_workers": 2, "steps": steps, "batch_size": 16, "lr": 3e-3, "warmup_steps": steps // 20,
                          "eval_every": steps // 2, "checkpoint_every": steps // 2, "log_every": steps // 4,
                          "callbacks": callbacks},
            })

        dense_job, gradual_job = job("dense", []), job("gradual", [prune])
        dense_path = fit(dense_job).artifact_path
        dense_model, _ = load_fp32(dense_path)
        gradual_model, _ = load_fp32(fit(gradual_job).artifact_path)

        pattern = re.compile(MagnitudePruningConfig(name="magnitude_pruning").targets)
        oneshot_model, _ = load_fp32(dense_path)
        targets = {n: p for n, p in oneshot_model.named_parameters() if pattern.fullmatch(n)}
        masks = unstructured_masks({n: RowView(p.data, 0, tuple(p.shape)) for n, p in targets.items()}, 0.5, "global")
        with torch.no_grad():
            for n, p in targets.items():
                p.mul_(masks[n])

        rows = {}
        for name, model in (("dense", dense_model), ("gradual", gradual_model), ("one-shot", oneshot_model)):
            weights = [p for n, p in model.named_parameters() if pattern.fullmatch(n)]
            rows[name] = {"val_loss": evaluate(model, dense_job, args.eval_batches), "sparsity": sparsity_of(weights)}
    ray.shutdown()

    base = rows["dense"]["val_loss"]
    print(f"\nlm-code GPT (4 layers, d=128), {steps} steps, 2 DDP workers; sparsity over the block Linear weights")
    print(f"  {'variant':<9} {'sparsity':>8} {'val_loss':>9} {'vs dense':>9}")
    for name, r in rows.items():
        r["relative_loss_change"] = (r["val_loss"] - base) / base
        print(f"  {name:<9} {r['sparsity']:>8.3f} {r['val_loss']:>9.4f} {r['relative_loss_change']:>+9.2%}")
    out = Path(__file__).parent / "results" / "pruning.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"steps": steps, "schedule": prune, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
