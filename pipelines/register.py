"""Where training meets the registry: one function registers a trained result.

`register_trained` is the only place a training run becomes a registry version: the `train`
verb and `run` call it through `train_and_register`, and a sweep calls it for its best trial.
A job with `train.steps: 0` trains nothing: its pretrained `hf` model is registered as it is
(transformation `imported`), through the same function.
It is idempotent: an artifact folder already registered is returned as it is, so re-running a
finished job registers nothing twice. Every version it makes carries the same record: the
resolved config and its hash, the hyperparameters as flat params (compare / MLflow show them),
and the data's identity (its config plus where its bytes come from).
"""

from __future__ import annotations

import hashlib
import json
import platform

import ray

from actors.registry.client import caller_credentials, find_version_by_artifact
from actors.registry.validation import flatten_dict
from app.config.jobs import TrainJob
from app.config.registry import redact_secrets
from app.models.sources import folder_provenance
from pipelines.train import cut_student, fit, import_pretrained


def dataset_fingerprint(job: TrainJob) -> str:
    """`<data name or kind>:<hash>` of the data config and the source of its bytes: lm-code and
    docstrings read this Python's standard library, digits ships with scikit-learn, file datasets
    are their files' contents."""
    import sklearn

    from app.config.data import DocstringsDataConfig, FileDataConfig

    if isinstance(job.data, FileDataConfig):
        from app.data.text import file_digest

        label, source = job.data.kind, f"files-{file_digest(job.data)}"
    elif isinstance(job.data, DocstringsDataConfig):
        label, source = job.data.kind, f"python-{platform.python_version()}"
    else:
        label = job.data.name
        source = f"python-{platform.python_version()}" if job.data.name == "lm-code" else f"sklearn-{sklearn.__version__}"
    data_id = json.dumps({"data": job.data.model_dump(mode="json"), "source": source}, sort_keys=True)
    return f"{label}:{hashlib.sha256(data_id.encode()).hexdigest()[:16]}"


def register_trained(registry, job: TrainJob, artifact_path: str, *, config_hash: str, metrics: dict[str, float],
                     transformation: str, tags: dict[str, str], parent: dict | None = None,
                     format: str = "torch_fp32") -> tuple[dict, bool]:
    """Register the weights in `artifact_path` (fp32, or a LoRA adapter), trained by `job`, as a new version of `job.name`.

    Returns (the version record, whether it is new): a folder registered before is found by its
    location and returned unchanged."""
    existing = find_version_by_artifact(registry, job.name, artifact_path)
    if existing is not None:
        print(f"[register] {artifact_path} already registered as {job.name} v{existing['version']}", flush=True)
        return existing, False
    params = flatten_dict({"model": job.model.model_dump(mode="json"), "train": job.train.model_dump(mode="json")})
    record = ray.get(registry.register_version.remote(
        job.name, artifact_path, format,
        config=redact_secrets(job.model_dump(mode="json")), config_hash=config_hash,
        metrics=metrics, transformation=transformation, parent=parent, tags=tags,
        params={k: v for k, v in params.items() if not isinstance(v, (list, dict))},
        dataset_fingerprint=dataset_fingerprint(job), credentials=caller_credentials(),
    ))
    return record, True


def train_and_register(job: TrainJob, registry) -> dict:
    """Train `job` (distilling from its registered teacher when `train.distill` names one) and
    register the result as a `trained` (or `distilled`) version; with `train.steps: 0`, register
    the model as it is (`imported`)."""
    if job.train.steps == 0:
        result = import_pretrained(job)
        record, _ = register_trained(
            registry, job, result.artifact_path, config_hash=result.config_hash, metrics=result.metrics,
            transformation="imported",
            tags={"run": job.name, "step": "0", "source": job.model.path, **folder_provenance(job.model.path)},
        )
        return record
    if job.train.finetune != "full":
        return train_adapter_and_register(job, registry)
    teacher = None
    if job.train.distill is not None:  # the teacher comes from the registry, by version or alias
        d = job.train.distill
        teacher = ray.get(registry.get_version.remote(d.teacher, d.teacher_version))
        if teacher["format"] != "torch_fp32":
            raise ValueError(f"train.distill: teacher {d.teacher} v{teacher['version']} is {teacher['format']!r}; "
                             "distillation needs a torch_fp32 version")
        how = f"alpha {d.alpha}, T {d.temperature}" if d.loss == "kl" else f"{d.loss} loss on the embeddings"
        print(f"[train] distilling from {d.teacher} v{teacher['version']} ({how})", flush=True)
        if d.student_layers is not None:
            job = cut_student(job, teacher["artifact_uri"])
    result = fit(job, teacher_artifact=teacher["artifact_uri"] if teacher else None)
    record, _ = register_trained(
        registry, job, result.artifact_path, config_hash=result.config_hash,
        metrics={**result.metrics, **instruction_eval_metrics(job, result.artifact_path)},
        transformation="distilled" if teacher else "trained",
        parent={"model": teacher["model"], "version": teacher["version"]} if teacher else None,
        tags={"run": job.name, "step": str(result.step), "checkpoint": result.checkpoint_path},
    )
    return record


def base_job(job: TrainJob) -> TrainJob:
    """The job that registers an adapter job's base model as it is (`train.steps: 0`, `imported`)."""
    return TrainJob.model_validate({**job.model_dump(mode="json", include={"name", "storage_path", "registry", "model", "data"}),
                                    "train": {"steps": 0}})


def instruction_eval_metrics(job: TrainJob, artifact_path: str, max_pairs: int = 64) -> dict[str, float]:
    """For `data.format: instructions`: exact match, token F1 (greedy answers) and perplexity of the
    trained model on up to `max_pairs` held-out rows with a reference answer (a prompt/completion
    row, or a chat whose last turn is the assistant's), as `eval_*` metrics to register with the
    version; {} for other data. Chats are rendered as serving renders them."""
    if getattr(job.data, "format", "text") != "instructions":
        return {}
    from app.config.evaluation import EvalConfig
    from app.data.eval_pairs import EvalPair
    from app.data.instructions import instruction_splits
    from app.eval_lm import lm_eval_metrics
    from app.inference import load_predictor

    pairs = []
    for ex in instruction_splits(job.data).val[:max_pairs]:
        if ex.messages is None:
            pairs.append(EvalPair(ex.prompt, ex.completion, ex.line))
        elif ex.messages[-1][0] == "assistant":
            turns = tuple({"role": role, "content": content} for role, content in ex.messages[:-1])
            pairs.append(EvalPair(turns, ex.messages[-1][1], ex.line))
    if not pairs:
        return {}
    pred = load_predictor(artifact_path)
    longest = max(len(pred.tokenizer(p.reference, add_special_tokens=False)["input_ids"]) for p in pairs)
    cfg = EvalConfig(data=job.data.path or job.data.val_path, max_new_tokens=min(longest + 2, 256))
    metrics = lm_eval_metrics(pred, pairs, cfg)
    print(f"[eval] {len(pairs)} held-out instruction rows: exact_match {metrics['eval_exact_match']:.4f}, "
          f"token_f1 {metrics['eval_token_f1']:.4f}, perplexity {metrics['eval_perplexity']:.4f}", flush=True)
    return metrics


def train_adapter_and_register(job: TrainJob, registry) -> dict:
    """`train.finetune: lora | qlora`: the base model is registered first (as it is, `imported`;
    found again when it already is), then the adapter trained on it is registered as a
    `lora_adapter` version whose parent is that base version (transformation `lora`)."""
    from app.models.lora import ADAPTER_FORMAT, count_adapter_params

    base = base_job(job)
    imported = import_pretrained(base)
    base_record, _ = register_trained(
        registry, base, imported.artifact_path, config_hash=imported.config_hash, metrics={}, transformation="imported",
        tags={"run": job.name, "step": "0", "source": job.model.path, **folder_provenance(job.model.path)},
    )
    result = fit(job)
    lc = job.train.lora
    trainable = count_adapter_params(result.artifact_path)
    targets = lc.target_modules if isinstance(lc.target_modules, str) else ",".join(lc.target_modules or ["peft-default"])
    record, _ = register_trained(
        registry, job, result.artifact_path, config_hash=result.config_hash,
        metrics={**result.metrics, **instruction_eval_metrics(job, result.artifact_path), "trainable_params": float(trainable),
                 "lora_rank": float(lc.r)},
        transformation="lora", format=ADAPTER_FORMAT,
        parent={"model": base_record["model"], "version": base_record["version"]},
        tags={"run": job.name, "step": str(result.step), "checkpoint": result.checkpoint_path, "finetune": job.train.finetune,
              "lora_rank": str(lc.r), "lora_alpha": str(lc.alpha), "target_modules": targets,
              "trainable_params": str(trainable)},
    )
    return record
