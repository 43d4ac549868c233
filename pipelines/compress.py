"""Compression recipe: registered fp32 version -> compressed variants -> new registry versions.

For the source and each variant: quality on the fixed validation batches, size on disk, and
median batch-1 / batch-32 latency measured in this process one after another (same
machine, same threads). Each variant is registered with `parent` = the source version and
`transformation: quantized`, so lineage answers "where did this int8 model come from".

`hf` models are measured on the texts of the job's validation split, each variant against its
fp32 source in this one process: embedding = mean and minimum cosine to the source's vectors and
recall@10 of the source's nearest neighbours; classification = accuracy and macro-F1; causal LM
= perplexity (and val_loss, its log). Latency: the validation text of median token length, alone
and as a batch of 32.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from actors.registry.client import caller_credentials, find_version_by_artifact
from app.artifacts import artifact_size_bytes, local_path
from app.compression import METHODS
from app.config.jobs import CompressJob, TrainJob
from app.config.registry import redact_secrets
from app.data import build_data
from app.evaluation import eval_sums, metric_kind, metrics_from_sums, primary_metric, quality_drop
from app.inference import Predictor, TextPredictor, load_predictor, median_ms, time_batch


# hf quality columns shown next to the primary metric in the report
SECONDARY = {"embedding": ("min_cosine", "recall_at_10"), "classifier": ("val_macro_f1",), "lm": ("val_perplexity",)}


@dataclass
class VariantReport:
    method: str
    version: int
    artifact_path: str
    metrics: dict[str, float]
    rejected: bool


def measure(pred: Predictor, job: CompressJob, train_job: TrainJob) -> dict[str, float]:
    """Quality + size-independent speed numbers of one predictor."""
    data = build_data(train_job.data, train_job.model)
    cc = job.compress
    sums = eval_sums(train_job.model.kind, lambda x: pred.logits(x.numpy()), data.val_batches(cc.eval_batches, cc.eval_batch_size))
    metrics = metrics_from_sums(train_job.model.kind, sums)
    metrics["latency_b1_ms"] = time_batch(pred, data.example_input(1).numpy(), cc.latency_iters)
    metrics["latency_b32_ms"] = time_batch(pred, data.example_input(32).numpy(), max(5, cc.latency_iters // 5))
    return metrics


@dataclass
class TextEval:
    """The validation texts an hf model is measured on, and its fp32 source's outputs on them."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int] | None
    reference: object = None  # the source's embeddings (N, H), for an embedding model


def text_eval(train_job: TrainJob, cc, tokenizer=None) -> TextEval:
    """`tokenizer`: renders instruction rows (data.format instructions) as the model reads them; the
    perplexity of a causal LM is then over the whole rendered conversation."""
    from app.data.text import read_splits

    splits = read_splits(train_job.data)
    val = splits.val[: cc.eval_batches * cc.eval_batch_size]
    if not val:
        raise ValueError(f"data: the validation split of data.kind {train_job.data.kind!r} is empty; nothing to measure on")
    if getattr(train_job.data, "format", "text") == "instructions":
        from app.data.instructions import render

        return TextEval([render(ex, tokenizer)[0] for ex in val], None, None)
    pairs = [ex.text_pair for ex in val] if val[0].text_pair is not None else None
    labels = [splits.labels.index(ex.label) for ex in val] if splits.labels is not None else None
    return TextEval([ex.text for ex in val], pairs, labels)


def measure_text(pred: TextPredictor, job: CompressJob, ev: TextEval) -> dict[str, float]:
    """Quality (against ev.reference / the labels) and latency of one hf predictor."""
    import numpy as np

    from app.compression import hf_quality

    cc = job.compress
    metrics: dict[str, float] = {}
    if pred.task == "embedding":
        emb = pred.forward(ev.texts, truncate=True, batch_size=cc.eval_batch_size)
        ref = emb if ev.reference is None else ev.reference
        metrics["mean_cosine"], metrics["min_cosine"] = hf_quality.cosine_to_reference(emb, ref)
        k = min(10, len(ev.texts) - 1)
        metrics[f"recall_at_{k}"] = hf_quality.recall_at_k(emb, ref, k)
    elif pred.task == "sequence_classification":
        predicted = pred.forward(ev.texts, pairs=ev.pairs, truncate=True, batch_size=cc.eval_batch_size).argmax(-1)
        metrics["val_accuracy"] = hf_quality.accuracy(predicted, np.asarray(ev.labels))
        metrics["val_macro_f1"] = hf_quality.macro_f1(predicted, np.asarray(ev.labels), len(pred.labels or []) or None)
    else:  # causal_lm: token-weighted mean of each batch's next-token loss
        enc = pred.encode(ev.texts, truncate=True)
        nll = count = 0.0
        for start in range(0, len(ev.texts), cc.eval_batch_size):
            batch = pred.pad(enc, range(start, min(start + cc.eval_batch_size, len(ev.texts))))
            n = float(batch["attention_mask"][:, 1:].sum())
            if n:
                nll += n * np.log(hf_quality.perplexity(pred.run(batch), batch["input_ids"], batch["attention_mask"]))
                count += n
        if not count:
            raise ValueError("the validation texts hold no next tokens to score (every text is one token)")
        metrics["val_loss"] = nll / count
        metrics["val_perplexity"] = float(np.exp(metrics["val_loss"]))
    enc = pred.encode(ev.texts, truncate=True)
    typical = int(np.argsort([len(r) for r in enc["input_ids"]])[len(ev.texts) // 2])
    metrics["latency_b1_ms"] = _time_run(pred, pred.pad(enc, [typical]), cc.latency_iters)
    metrics["latency_b32_ms"] = _time_run(pred, pred.pad(enc, [typical] * 32), max(5, cc.latency_iters // 5))
    return metrics


def _time_run(pred: TextPredictor, batch: dict, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of one padded batch through the model (tokenization not included)."""
    return median_ms(lambda: pred.run(batch), iters, warmup)


def _measure(pred, job: CompressJob, train_job: TrainJob, ev: TextEval | None) -> dict[str, float]:
    return measure_text(pred, job, ev) if isinstance(pred, TextPredictor) else measure(pred, job, train_job)


def compress(job: CompressJob, registry) -> tuple[dict, list[VariantReport]]:
    """Produce `job.compress.methods` variants of version `job.source` of model `job.name`.

    Returns (source record with its measured metrics, one report per variant).
    """
    source = ray.get(registry.get_version.remote(job.name, job.source))
    if source["format"] == "lora_adapter":  # merged into its base first; the variants are made of that
        source = merge_adapter_version(registry, job, source)
    if source["format"] != "torch_fp32":
        raise ValueError(f"source: version {source['version']} of {job.name!r} is {source['format']!r}; compression starts from a torch_fp32 version")
    src_path = local_path(source["artifact_uri"])
    src_pred = load_predictor(str(src_path))
    train_job = src_pred.job
    kind = metric_kind(train_job.model)
    metric_name, _ = primary_metric(kind)
    ev = text_eval(train_job, job.compress, src_pred.tokenizer) if isinstance(src_pred, TextPredictor) else None

    _say(f"[compress] source v{source['version']}: measuring fp32 baseline")
    src_metrics = {**_measure(src_pred, job, train_job, ev), "size_bytes": float(artifact_size_bytes(src_path))}
    if ev is not None and src_pred.task == "embedding":
        ev.reference = src_pred.forward(ev.texts, truncate=True, batch_size=job.compress.eval_batch_size)
    ray.get(registry.log_metrics.remote(job.name, source["version"], src_metrics, credentials=caller_credentials()))
    source = {**source, "metrics": {**source["metrics"], **src_metrics}}

    reports = []
    out_root = Path(job.storage_path).resolve() / job.name / "artifacts"
    for method in job.compress.methods:
        t0 = time.perf_counter()
        dst = out_root / f"{method}-from-v{source['version']}-{source['config_hash']}"
        existing = find_version_by_artifact(registry, job.name, str(dst))
        if existing is not None and dst.is_dir():
            _say(f"[compress] {method}: already registered as v{existing['version']}")
            reports.append(VariantReport(method, existing["version"], str(dst), existing["metrics"],
                                         existing["tags"].get("rejected") == "true"))
            continue
        METHODS[method](src_path, dst)
        pred = load_predictor(str(dst))
        metrics = {**_measure(pred, job, train_job, ev), "size_bytes": float(artifact_size_bytes(dst))}
        drop = quality_drop(kind, src_metrics, metrics)
        metrics["quality_drop"] = drop
        rejected = drop > job.compress.max_quality_drop
        record = ray.get(registry.register_version.remote(
            job.name, str(dst), method,
            config=redact_secrets(train_job.model_dump(mode="json")), config_hash=source["config_hash"],
            metrics=metrics, parent={"model": job.name, "version": source["version"]},
            transformation="quantized",
            tags={"method": method, "rejected": str(rejected).lower()}, credentials=caller_credentials(),
        ))
        _say(
            f"[compress] {method}: v{record['version']} {metric_name} {metrics[metric_name]:.4f} "
            f"(fp32 {src_metrics[metric_name]:.4f}), size {metrics['size_bytes'] / 1e6:.2f} MB "
            f"({metrics['size_bytes'] / src_metrics['size_bytes']:.2f}x), batch-1 {metrics['latency_b1_ms']:.2f} ms "
            f"({metrics['latency_b1_ms'] / src_metrics['latency_b1_ms']:.2f}x){'  REJECTED: quality drop' if rejected else ''}"
            f" [{time.perf_counter() - t0:.1f}s]"
        )
        reports.append(VariantReport(method, record["version"], str(dst), metrics, rejected))
    report = write_report(job, source, src_metrics, reports, kind)
    _say(f"[compress] report: {report} (+ {report.with_suffix('.png').name})")
    return source, reports


def merge_adapter_version(registry, job: CompressJob, adapter: dict) -> dict:
    """The adapter version's weights merged into its base (peft merge_and_unload), registered as a
    torch_fp32 version whose parent is the adapter (transformation `merged`); found again when it is."""
    from app.models.lora import merge_adapter

    dst = Path(job.storage_path).resolve() / job.name / "artifacts" / f"merged-from-v{adapter['version']}-{adapter['config_hash']}"
    existing = find_version_by_artifact(registry, job.name, str(dst))
    if existing is not None and dst.is_dir():
        _say(f"[compress] merge: v{adapter['version']} already merged as v{existing['version']}")
        return existing
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merge_adapter(local_path(adapter["artifact_uri"]), tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    record = ray.get(registry.register_version.remote(
        job.name, str(dst), "torch_fp32", config=adapter["config"], config_hash=adapter["config_hash"],
        metrics={}, parent={"model": job.name, "version": adapter["version"]}, transformation="merged",
        tags={"method": "merge_and_unload", "adapter": str(adapter["version"])}, credentials=caller_credentials(),
    ))
    _say(f"[compress] merge: adapter v{adapter['version']} merged into its base as v{record['version']}")
    return record


def write_report(job: CompressJob, source: dict, src_metrics: dict, reports: list[VariantReport], kind: str) -> Path:
    """Markdown table + a PNG Pareto plot (quality vs batch-1 latency, marker area ~ size on disk)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, mode = primary_metric(kind)
    folder = Path(job.storage_path).resolve() / job.name / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"compress-v{source['version']}"
    rows = [("torch_fp32 (source)", source["version"], src_metrics, False)] + [
        (r.method, r.version, r.metrics, r.rejected) for r in reports
    ]
    base_lat, base_size = src_metrics["latency_b1_ms"], src_metrics["size_bytes"]
    extra = SECONDARY.get(kind, ())
    lines = [
        f"# Compression report: {job.name} v{source['version']}",
        "",
        f"Quality = `{metric}` ({'higher' if mode == 'max' else 'lower'} is better) on {job.compress.eval_batches} x "
        f"{job.compress.eval_batch_size} held-out samples; latency = median of {job.compress.latency_iters} calls in one process.",
        "",
        f"| variant | version | {metric} | quality drop | size MB | size x | batch-1 ms | batch-1 x | batch-32 ms | status |"
        + "".join(f" {key} |" for key in extra),
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra),
    ]
    for name, version, m, rejected in rows:
        drop = m.get("quality_drop", 0.0)
        lines.append(
            f"| {name} | v{version} | {m[metric]:.4f} | {drop:+.2%} | {m['size_bytes'] / 1e6:.3f} | {m['size_bytes'] / base_size:.2f} | "
            f"{m['latency_b1_ms']:.3f} | {m['latency_b1_ms'] / base_lat:.2f} | {m['latency_b32_ms']:.3f} | "
            f"{'rejected (quality)' if rejected else 'ok'} |"
            + "".join(f" {m[key]:.4f} |" if key in m else " - |" for key in extra)
        )
    lines += ["", f"![Pareto plot]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sizes = [m["size_bytes"] for _, _, m, _ in rows]
    scale = 900 / max(sizes)
    for name, version, m, rejected in rows:
        ax.scatter(m["latency_b1_ms"], m[metric], s=max(30, m["size_bytes"] * scale), alpha=0.6,
                   marker="x" if rejected else "o", label=f"v{version} {name}")
        ax.annotate(f"v{version}", (m["latency_b1_ms"], m[metric]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("batch-1 latency (ms, log scale)")
    ax.set_xscale("log")
    ax.set_ylabel(metric + (" (higher is better)" if mode == "max" else " (lower is better)"))
    ax.set_title(f"{job.name}: quality vs latency (marker area ~ size on disk)")
    ax.legend(fontsize=7, loc="best", markerscale=0.3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)
    return stem.with_suffix(".md")


def _say(msg: str) -> None:
    print(msg, flush=True)
