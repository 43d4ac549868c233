"""A distilled embedding student against its teacher: texts/s and mean cosine on held-out texts.

The two fp32 artifacts are loaded as registered (torch, eval mode) and run at the same settings:
one intra-op thread, batch 32, each batch padded to its longest text (app.models.hf.embed_texts),
tokenization included. The texts are the validation split of the student's data section (for
configs/minilm-distill.yaml: 808 standard-library docstrings the student never trained on).
Timed passes alternate teacher and student, so load from other processes falls on both alike;
the best pass of each is kept.

    .venv/bin/python benchmarks/students/minilm_student.py [--teacher ARTIFACT] [--student ARTIFACT] [--repeats 3]

Not one of `make bench`'s scripts (benchmarks/*.py): it measures what the two configs trained
and registered, so it runs after them, not on its own.

Defaults: the artifacts `python -m app train configs/minilm.yaml` and
`python -m app run configs/minilm-distill.yaml` leave under temper_runs/ (minilm's imported v1,
minilm-l3's latest trained one). Goals: student >= 1.8x the teacher's texts/s, mean cosine >= 0.90.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from app.artifacts import load_fp32
from app.data.text import read_splits
from app.models.hf import embed_texts, load_tokenizer

BATCH = 32


def _latest(pattern: str) -> Path:
    found = sorted(Path("temper_runs").glob(pattern))
    if not found:
        raise SystemExit(f"no artifact temper_runs/{pattern}: run the configs first (see the module docstring)")
    return found[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path, help="teacher fp32 artifact folder")
    ap.add_argument("--student", type=Path, help="student fp32 artifact folder")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of each model (the best is kept)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    teacher, _ = load_fp32(args.teacher or _latest("minilm/artifacts/imported-*"))
    student, job = load_fp32(args.student or _latest("minilm-l3/artifacts/trained-*"))
    tokenizer = load_tokenizer(job.model.path)
    texts = [ex.text for ex in read_splits(job.data).val]
    max_length = job.data.max_length

    best = {"teacher": float("inf"), "student": float("inf")}
    vectors = {}
    for _ in range(args.repeats):
        for name, model in (("teacher", teacher), ("student", student)):
            t0 = time.perf_counter()
            vectors[name] = embed_texts(model, tokenizer, texts, max_length=max_length, batch_size=BATCH)
            best[name] = min(best[name], time.perf_counter() - t0)
    rate = {name: len(texts) / seconds for name, seconds in best.items()}
    cosine = F.cosine_similarity(vectors["student"], vectors["teacher"], dim=-1)
    result = {
        "texts": len(texts), "threads": 1, "batch": BATCH, "max_length": max_length,
        "teacher_layers": teacher.config.num_hidden_layers, "student_layers": student.config.num_hidden_layers,
        "teacher_texts_per_s": round(rate["teacher"], 2), "student_texts_per_s": round(rate["student"], 2),
        "speedup": round(rate["student"] / rate["teacher"], 3),
        "mean_cosine": round(cosine.mean().item(), 4), "min_cosine": round(cosine.min().item(), 4),
    }
    result["goals_met"] = {"speedup >= 1.8": result["speedup"] >= 1.8, "mean_cosine >= 0.90": result["mean_cosine"] >= 0.90}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
