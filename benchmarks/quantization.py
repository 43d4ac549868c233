"""fp32 torch vs torch int8 vs ORT fp32 vs ORT int8, side by side in one process.

For each built-in model (a digits ViT and an lm-code GPT, each trained briefly in-process so
quality deltas mean something): quality, size on disk and median batch-1 / batch-32 latency,
with ratios to fp32 torch; then the best int8 variant against the goal (<= 0.5x fp32 latency
with <= 1% quality loss). Writes benchmarks/results/quantization.json.

    .venv/bin/python benchmarks/quantization.py [--threads N] [--quick]

`--quick` (a smoke run): 20 training steps, a 2-layer d=64 GPT, 5 timing calls, 2 eval batches,
and only the variants the goal compares (torch int8, ORT fp32, ORT int8).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from app.artifacts import artifact_size_bytes, save_fp32
from app.compression import METHODS
from app.config.jobs import CompressJob, TrainJob
from app.data import build_data
from app.evaluation import primary_metric, task_loss
from app.inference import load_predictor
from app.models import build_model
from pipelines.compress import measure
from pipelines.optimization import lr_factor, param_groups

WORKLOADS = {
    "digits-vit": {"model": {"kind": "vit"}, "data": {"name": "digits"}, "train_steps": 300},
    "lm-code-gpt": {"model": {"kind": "gpt", "n_layer": 4, "d_model": 256, "n_head": 8, "block_size": 64},
                    "data": {"name": "lm-code", "max_bytes": 1_000_000}, "train_steps": 150},
}


def quick_train(job: TrainJob, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(job.model)
    if steps:
        data = build_data(job.data, job.model)
        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, steps, 0.1))
        for step in range(steps):
            x, y = data.train_batch(0, step, 0, 64 if job.model.kind == "vit" else 16)
            loss = task_loss(job.model.kind, model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps and timing calls")
    ap.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    workloads, eval_batches, methods = WORKLOADS, 8, dict(METHODS)
    if args.quick:
        args.iters, eval_batches = 5, 2
        methods = {m: METHODS[m] for m in ("torch_int8", "onnx_fp32", "onnx_int8")}
        workloads = {
            "digits-vit": {**WORKLOADS["digits-vit"], "model": {"kind": "vit", "d_model": 32, "n_layer": 1, "n_head": 4}, "train_steps": 20},
            "lm-code-gpt": {"model": {"kind": "gpt", "n_layer": 2, "d_model": 64, "n_head": 4, "block_size": 64},
                            "data": {"name": "lm-code", "max_bytes": 200_000}, "train_steps": 20},
        }
    torch.set_num_threads(args.threads)
    results = {}
    goals = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in workloads.items():
            job = TrainJob.model_validate({"name": name, "model": spec["model"], "data": spec["data"]})
            cjob = CompressJob(name=name, compress={"latency_iters": args.iters, "eval_batches": eval_batches})
            root = Path(tmp) / name
            save_fp32(root / "torch_fp32", quick_train(job, spec["train_steps"]), job)
            for method, fn in methods.items():
                fn(root / "torch_fp32", root / method)
            metric, _ = primary_metric(job.model.kind)
            rows = {}
            for fmt in ("torch_fp32", *methods):
                m = measure(load_predictor(str(root / fmt)), cjob, job)
                m["size_bytes"] = artifact_size_bytes(root / fmt)
                rows[fmt] = m
            base = rows["torch_fp32"]
            print(f"\n{name} (threads={args.threads}; quality = {metric})")
            print(f"  {'variant':<11} {metric:>12} {'size MB':>8} {'size x':>7} {'b1 ms':>7} {'b1 x':>6} {'b32 ms':>8} {'b32 x':>6}")
            for fmt, m in rows.items():
                print(f"  {fmt:<11} {m[metric]:>12.4f} {m['size_bytes'] / 1e6:>8.3f} {m['size_bytes'] / base['size_bytes']:>7.2f} "
                      f"{m['latency_b1_ms']:>7.3f} {m['latency_b1_ms'] / base['latency_b1_ms']:>6.2f} "
                      f"{m['latency_b32_ms']:>8.3f} {m['latency_b32_ms'] / base['latency_b32_ms']:>6.2f}")
            _, mode = primary_metric(job.model.kind)
            for fmt in ("torch_int8", "onnx_int8"):
                drop = (base[metric] - rows[fmt][metric]) if mode == "max" else (rows[fmt][metric] - base[metric])
                rows[fmt]["quality_loss_rel"] = drop / abs(base[metric])
            best = min(("torch_int8", "onnx_int8"), key=lambda f: rows[f]["latency_b1_ms"])
            b = rows[best]
            ok = b["latency_b1_ms"] <= 0.5 * base["latency_b1_ms"] and b["quality_loss_rel"] <= 0.01
            print(f"  best int8: {best}: batch-1 {b['latency_b1_ms'] / base['latency_b1_ms']:.2f}x, batch-32 "
                  f"{b['latency_b32_ms'] / base['latency_b32_ms']:.2f}x fp32 latency, quality loss {b['quality_loss_rel']:+.2%} "
                  f"-> goal (<= 0.5x, <= 1%) {'met' if ok else 'NOT met'}")
            results[name] = {"metric": metric, "variants": rows, "best_int8": best, "goal_met": ok}
            goals += [{"goal": f"{name}: best int8 ({best}) batch-1 latency <= 0.5x fp32",
                       "figure": f"{b['latency_b1_ms'] / base['latency_b1_ms']:.2f}x", "met": b["latency_b1_ms"] <= 0.5 * base["latency_b1_ms"]},
                      {"goal": f"{name}: best int8 ({best}) quality loss <= 1%",
                       "figure": f"{b['quality_loss_rel']:+.2%}", "met": b["quality_loss_rel"] <= 0.01}]
    out = args.results_dir / "quantization.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "quantization", "quick": args.quick, "threads": args.threads, "goals": goals,
                               "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
