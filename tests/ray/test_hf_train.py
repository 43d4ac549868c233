"""`hf` models on file datasets under Ray Train (ddp, 2 workers): a tiny BERT classifier on a
JSONL file and a tiny Llama causal LM (output head tied to the embedding) on a text file.
Checked: the validation loss drops from the untrained model's, the causal LM pauses and resumes,
and the consolidated `model.safetensors` loads into the transformers Auto class with the logits
of the Temper model holding the same weights."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.config.jobs import TrainJob
from app.data import build_data
from app.evaluation import eval_sums, metric_kind, metrics_from_sums
from app.models import build_model
from conftest import running_two_at_a_time
from hf_folders import sentiment_rows, tiny_bert, tiny_llama
from pipelines.train import fit

pytestmark = pytest.mark.ray

TRAIN = {"num_workers": 2, "strategy": "ddp", "steps": 24, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2,
         "eval_every": 8, "checkpoint_every": 8, "log_every": 8, "eval_batches": 4}


def _jobs(root: Path) -> dict[str, TrainJob]:
    bert, llama = tiny_bert(root / "bert"), tiny_llama(root / "llama", tie_word_embeddings=True)
    rows = sentiment_rows(200)
    (root / "sent.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "lines.txt").write_text("".join(r["text"] + "\n" for r in rows))
    common = {"storage_path": str(root / "runs"), "train": TRAIN}
    return {
        "cls": TrainJob.model_validate({
            "name": "hf-cls", **common, "model": {"kind": "hf", "path": str(bert), "task": "sequence_classification"},
            "data": {"kind": "jsonl", "path": str(root / "sent.jsonl"), "label_field": "label", "max_length": 16,
                     "val_fraction": 0.25}}),
        "lm": TrainJob.model_validate({
            "name": "hf-lm", **common, "model": {"kind": "hf", "path": str(llama), "task": "causal_lm"},
            "data": {"kind": "text", "path": str(root / "lines.txt"), "max_length": 16, "val_fraction": 0.25}}),
    }


def _val_metrics(job: TrainJob, weights: dict | None) -> tuple[dict, torch.nn.Module, object]:
    """Metrics of the model the job starts from (weights None: seeded as the workers seed it) or of `weights`."""
    data = build_data(job.data, job.model)
    torch.manual_seed(job.train.seed)
    model = build_model(job.model, labels=data.labels)
    if weights is not None:
        model.load_state_dict(weights)
    model.eval()
    kind = metric_kind(job.model)
    with torch.no_grad():
        sums = eval_sums(kind, lambda x: model(x), data.val_batches(job.train.eval_batches, job.train.batch_size))
    return metrics_from_sums(kind, sums), model, data


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    jobs = _jobs(tmp_path_factory.mktemp("hf-train"))

    def paused_then_resumed(job: TrainJob):
        paused = fit(job.model_copy(update={"train": job.train.model_copy(update={"pause_at_step": 8})}))
        return paused, fit(job)

    with running_two_at_a_time({"cls": partial(fit, jobs["cls"]), "lm": partial(paused_then_resumed, jobs["lm"])}) as result:
        return jobs, {"cls": result("cls"), "lm": result("lm")}


def test_classifier_learns_and_reloads_into_the_auto_class(runs):
    from transformers import AutoModelForSequenceClassification

    jobs, results = runs
    job, res = jobs["cls"], results["cls"]
    before, _, _ = _val_metrics(job, None)
    weights = load_file(str(Path(res.artifact_path) / "model.safetensors"))
    after, model, data = _val_metrics(job, weights)
    assert res.metrics["val_loss"] == pytest.approx(after["val_loss"], rel=1e-3)  # the workers' eval, same weights
    assert after["val_loss"] < before["val_loss"] and after["val_accuracy"] >= 0.9, (before, after)

    auto = AutoModelForSequenceClassification.from_pretrained(job.model.path, local_files_only=True, num_labels=2).eval()
    auto.load_state_dict(weights, strict=True)
    x, _ = next(data.val_batches(1, 8))
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2]).logits, model(x))


def test_causal_lm_learns_resumes_and_reloads_with_tied_weights(runs):
    from transformers import AutoModelForCausalLM

    jobs, results = runs
    job, (paused, res) = jobs["lm"], results["lm"]
    assert paused.step == 8 and res.step == job.train.steps
    assert res.metrics["start_step"] == 8  # the second fit continued from the paused checkpoint
    before, _, _ = _val_metrics(job, None)
    weights = load_file(str(Path(res.artifact_path) / "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied: written once, under the embedding's name
    after, model, data = _val_metrics(job, weights)
    assert after["val_loss"] < 0.8 * before["val_loss"], (before, after)

    auto = AutoModelForCausalLM.from_pretrained(job.model.path, local_files_only=True).eval()
    missing, unexpected = auto.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    assert auto.lm_head.weight.data_ptr() == auto.model.embed_tokens.weight.data_ptr()
    x, _ = next(data.val_batches(1, 8))
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=x[:, 0], attention_mask=x[:, 1]).logits, model(x))
