"""`model.build`: a causal LM made from an architecture config on first use, pre-trained briefly on
the Python standard library's code, and saved as a plain transformers folder at `model.path`.

What a user would otherwise do by hand before fine-tuning: write a config, train a tokenizer,
initialise, pre-train, `save_pretrained`. Every later job (LoRA, compression, serving) then reads
`model.path` as any other local folder, and the folder checks of app/models/hf.py apply to it.

Steps, in the driver before any other work (`with_built_model`, called by the CLI where it
resolves the model folder):
1. the pre-training text: the `lm-code` corpus (the standard library's `.py` files in sorted path
   order, up to `pretrain.max_bytes`) cut at line ends into chunks of about three characters per
   token of `pretrain.max_length`, written as JSONL rows;
2. a byte-level BPE tokenizer (the `tokenizers` library) trained on those chunks and on the job's
   own data file (weighted to a tenth of the text), so the fine-tuning data's words get tokens of
   their own; `<pad>`, `<s>`, `</s>`
   are its special tokens. It has no chat template: instruction rows use Temper's plain one;
3. the model: `AutoConfig.for_model(**architecture)` with the tokenizer's size and special ids,
   random weights drawn from `pretrain.seed`;
4. pre-training: Temper's own training loop in this process (`fit_in_process`: one worker, the
   next-token loss, progress lines with rate and ETA, a checkpoint a re-run resumes from);
5. the folder: `config.json`, `model.safetensors` (the pre-trained weights), the tokenizer files,
   and `temper-build.json` saying what it was built from. Everything is written into a hidden
   sibling folder first and renamed when complete, so a crash never leaves a half-built model at
   `model.path`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import TypeVar

from app.config.model import BUILD_FILE, HFBuildConfig, HFModelConfig

Job = TypeVar("Job")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
DATA_SHARE = 0.1
"""Share of the tokenizer's training text given to the job's own data file (see build_model_folder)."""
CHARS_PER_TOKEN = 3
"""Chunk size of the pre-training text, in characters per token of `max_length` (byte-level BPE at
about a thousand tokens averages a little over three characters per token on Python code)."""


def with_built_model(job: Job) -> Job:
    """`job` unchanged, after making its `model.path` when `model.build` asks for it and the
    folder is not there yet."""
    model = getattr(job, "model", None)
    if not isinstance(model, HFModelConfig) or model.build is None or Path(model.path).is_dir():
        return job
    build_model_folder(model, Path(job.storage_path), data_files(job))
    return type(job).model_validate(job.model_dump(mode="json"))  # the folder checks now run on it


def data_files(job) -> list[Path]:
    """The job's own data files (for the tokenizer's vocabulary); none for built-in datasets."""
    data = getattr(job, "data", None)
    paths = [getattr(data, key, None) for key in ("path", "train_path", "val_path")]
    return [Path(p) for p in paths if p and Path(p).is_file()]


def pretraining_chunks(max_bytes: int, chunk_chars: int, seed: int) -> list[str]:
    """The standard library's code (the `lm-code` corpus, train part) cut at line ends into chunks
    of at most `chunk_chars` characters (longer lines are cut)."""
    from app.data import stdlib_text

    chunks, current = [], ""
    for line in stdlib_text(max_bytes, seed).splitlines(keepends=True):
        while len(line) > chunk_chars:
            chunks.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if len(current) + len(line) > chunk_chars:
            chunks.append(current)
            current = ""
        current += line
    chunks.append(current)
    return [c for c in chunks if c.strip()]


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """A byte-level BPE tokenizer trained on `texts`, saved in `out` (AutoTokenizer loads it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return fast


def init_model(build: HFBuildConfig, tokenizer, out: Path) -> int:
    """A model of `build.architecture` over `tokenizer`'s vocabulary, random weights from the
    pre-training seed, saved in `out` with the tokenizer beside it; returns its parameter count."""
    import torch

    from app.models.hf_imports import lean_transformers

    lean_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = {f"{name}_token_id": tokenizer.convert_tokens_to_ids(tok) for name, tok in zip(("pad", "bos", "eos"), SPECIAL_TOKENS)}
    try:
        config = AutoConfig.for_model(**build.architecture, vocab_size=len(tokenizer), **ids)
    except (ValueError, TypeError) as e:
        raise ValueError(f"model.build.architecture: {e}") from None
    torch.manual_seed(build.pretrain.seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ValueError(f"model.build.architecture: model_type {config.model_type!r} has no causal LM class ({e})") from None
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def pretrain_job(build: HFBuildConfig, name: str, storage_path: Path, init_dir: Path, text_file: Path):
    """The one-worker training job that pre-trains the initialised folder on the chunks."""
    from app.config.jobs import TrainJob

    pc = build.pretrain
    return TrainJob.model_validate({
        "name": name, "storage_path": str(storage_path),
        "model": {"kind": "hf", "path": str(init_dir), "task": "causal_lm"},
        "data": {"kind": "jsonl", "path": str(text_file), "max_length": pc.max_length, "val_fraction": 0.05,
                 "seed": pc.seed},
        "train": {"num_workers": 1, "strategy": "ddp", "steps": pc.steps, "batch_size": pc.batch_size, "lr": pc.lr,
                  "warmup_steps": min(20, pc.steps // 10), "weight_decay": 0.01, "seed": pc.seed,
                  "eval_every": pc.steps, "checkpoint_every": pc.steps, "log_every": max(1, pc.steps // 10),
                  "eval_batches": 8},
    })


def build_model_folder(model: HFModelConfig, storage_path: Path, extra_texts: list[Path]) -> Path:
    """Make `model.path` (see the module docstring); returns it."""
    import torch.distributed as dist

    from pipelines.train import fit_in_process

    build, target = model.build, Path(model.path)
    pc = build.pretrain
    work = target.with_name(f".{target.name}.build")  # stable: a re-run after a crash resumes the pre-training
    init_dir, staged = work / "init", work / "folder"
    shutil.rmtree(init_dir, ignore_errors=True)
    shutil.rmtree(staged, ignore_errors=True)
    init_dir.mkdir(parents=True)
    t0 = time.perf_counter()

    chunks = pretraining_chunks(pc.max_bytes, CHARS_PER_TOKEN * pc.max_length, pc.seed)
    text_file = work / "pretrain.jsonl"
    text_file.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
    own = [line for f in extra_texts for line in f.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    # BPE merges the most frequent pairs: a small data file next to megabytes of code would get no
    # merges of its own, so its lines are repeated up to DATA_SHARE of the tokenizer's text.
    repeats = max(1, round(DATA_SHARE * sum(map(len, chunks)) / max(1, sum(map(len, own)))))
    tokenizer = train_tokenizer(chunks + own * repeats, build.tokenizer_vocab_size, init_dir)
    params = init_model(build, tokenizer, init_dir)
    print(f"[build] {target}: {build.architecture['model_type']} of {params / 1e6:.2f}M parameters, byte-level BPE "
          f"of {len(tokenizer)} tokens (trained on {len(chunks)} chunks of standard-library code"
          f"{f' and {len(own)} lines of the data file' if own else ''}); pre-training {pc.steps} steps", flush=True)

    metrics: dict = {}
    if pc.steps > 0:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{target.name}-pretrain")[:64]
        had_group = dist.is_initialized()
        try:
            result = fit_in_process(pretrain_job(build, name, storage_path, init_dir, text_file))
        finally:
            if not had_group and dist.is_initialized():
                dist.destroy_process_group()  # the one-rank group was only for this loop
        metrics = {k: v for k, v in result.metrics.items() if k.startswith("val_")}
        weights = Path(result.artifact_path) / "model.safetensors"
    else:
        weights = init_dir / "model.safetensors"

    shutil.copytree(init_dir, staged)
    shutil.copyfile(weights, staged / "model.safetensors")
    uniform = math.log(len(tokenizer))  # the loss of a guess that knows nothing
    (staged / BUILD_FILE).write_text(json.dumps({
        "build": build.model_dump(mode="json"), "tokenizer_vocab_size": len(tokenizer), "parameters": params,
        "pretrain_chunks": len(chunks), "pretrain_metrics": metrics, "uniform_loss": uniform,
    }, indent=2) + "\n")
    os.rename(staged, target)
    shutil.rmtree(work, ignore_errors=True)
    loss = f", val_loss {metrics['val_loss']:.3f} (uniform {uniform:.3f})" if "val_loss" in metrics else ""
    print(f"[build] {target}: done in {time.perf_counter() - t0:.0f}s{loss}", flush=True)
    return target
