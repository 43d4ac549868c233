"""`hf` models on file datasets under Ray Train (2 workers): a tiny BERT classifier on a JSONL
file under ddp, fsdp (one shard unit per transformer layer, found from the model) and zero3, and a
tiny Llama causal LM (output head tied to the embedding) on a text file under fsdp and zero3 (the
sharded paths, where tied weights are the hard part; ddp saves the module's own state dict).
Checked: the validation loss drops from the untrained model's; the causal LM pauses and resumes
under zero3 (resume under ddp and fsdp is the same code path as the built-in GPT's, tested in
test_strategies.py); the classifier is pruned to its target sparsity under fsdp (unstructured) and
zero3 (2:4) with the default targets, the Linear weights inside the layers, while embeddings and
the head keep every weight; the consolidated `model.safetensors` loads into the transformers
Auto class with the logits of the Temper model holding the same weights. And a 2-layer embedding
student cut from a registered 4-layer BERT teacher, distilled on the text file (ddp), moves
towards the teacher's vectors and is registered with the teacher as its parent; and an embedding
model fine-tuned with the in-batch contrastive loss on `text` / `text_pair` rows (ddp) puts each
text nearer its own pair than before.

Eight fits of a few seconds of compute each (and one import). The pruned zero3 classifier and the
registered teacher and student run on Ray Train workers; the others run the same worker loop on
two local ranks (tests/local_ranks.py), without Ray Train's start-up per fit.
"""

from __future__ import annotations

import json
import re
import uuid
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.config.jobs import TrainJob
from app.config.train import MagnitudePruningConfig
from app.data import build_data
from app.evaluation import eval_sums, metric_kind, metrics_from_sums
from app.models import build_model
from conftest import running_two_at_a_time
from local_ranks import LocalRanks
from hf_folders import WORDS, sentiment_rows, tiny_bert, tiny_llama, with_sentence_transformers_files
from pipelines.register import train_and_register
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
        **_embedding_jobs(root, common),
        "pairs": _pairs_job(root, common),
    }


def _pairs_job(root: Path, common: dict) -> TrainJob:
    """A 2-layer BERT embedder (mean pooling + Normalize) fine-tuned with the in-batch contrastive
    loss on rows whose `text_pair` holds the text's three words in another order: to tell a text's
    pair from the batch's other pairs, the vectors must come to reflect which words a text has."""
    import random

    rng = random.Random(1)
    rows = []
    for _ in range(240):
        words = rng.sample(WORDS, 3)
        rows.append({"text": " ".join(words), "text_pair": " ".join(rng.sample(words, 3))})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = with_sentence_transformers_files(tiny_bert(root / "bert-pairs", initializer_range=0.2))
    return TrainJob.model_validate({
        "name": "emb-pairs", **common, "model": {"kind": "hf", "path": str(folder), "task": "embedding"},
        "data": {"kind": "jsonl", "path": str(root / "pairs.jsonl"), "text_pair_field": "text_pair", "max_length": 8,
                 "val_fraction": 0.25},
        "train": {**TRAIN, "steps": 30, "eval_every": 30, "checkpoint_every": 30, "log_every": 10}})


def _embedding_jobs(root: Path, common: dict) -> dict[str, TrainJob]:
    """A 4-layer BERT teacher (mean pooling + Normalize) registered as it is, and its student of layers [0, 2].
    Initialised at std 0.2, the teacher's dropped layers matter: the cut student starts far from
    its vectors (at BERT's 0.02 it would start at cosine ~0.99)."""
    teacher = with_sentence_transformers_files(tiny_bert(root / "bert4", layers=4, initializer_range=0.2))
    registry = {"actor_name": f"hf-train-{uuid.uuid4().hex[:6]}", "db_url": f"sqlite:///{root}/registry.db"}
    shared = {**common, "registry": registry, "model": {"kind": "hf", "path": str(teacher), "task": "embedding"},
              "data": {"kind": "text", "path": str(root / "lines.txt"), "max_length": 16, "val_fraction": 0.25}}
    return {
        "emb-teacher": TrainJob.model_validate({**shared, "name": "emb-teacher", "train": {"steps": 0}}),
        "emb": TrainJob.model_validate({**shared, "name": "emb-student", "train": {
            **TRAIN, "steps": 20, "eval_every": 20, "checkpoint_every": 20, "log_every": 10,
            "distill": {"teacher": "emb-teacher", "teacher_version": "latest", "loss": "cosine", "student_layers": [0, 2]}}}),
    }


def _distilled(teacher_job: TrainJob, job: TrainJob) -> tuple[dict, dict]:
    """(teacher record, student record): the teacher imported, then the student distilled from it."""
    import ray

    from actors.registry.client import get_or_create_registry

    registry = get_or_create_registry(job.registry)
    try:
        return train_and_register(teacher_job, registry), train_and_register(job, registry)
    finally:
        ray.kill(registry)


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


PRUNING = {"fsdp": {"name": "magnitude_pruning", "kind": "unstructured", "final_sparsity": 0.5, "end_step": 16,
                    "update_every": 4},
           "zero3": {"name": "magnitude_pruning", "kind": "2:4", "start_step": 8}}
STRATEGIES = ["ddp", "fsdp", "zero3"]
LM_STRATEGIES = ["fsdp", "zero3"]
RESUMED_LM = ("zero3",)
ON_RAY_TRAIN = "zero3"  # the classifier fit that runs on Ray Train workers (2:4 pruning over ZeRO-3 shards)


def _with(job: TrainJob, **train) -> TrainJob:
    return job.model_copy(update={"name": f"{job.name}-{train['strategy']}",
                                  "train": job.train.model_copy(update=train)})


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    base = _jobs(tmp_path_factory.mktemp("hf-train"))
    jobs = {}
    for s in STRATEGIES:
        callbacks = [MagnitudePruningConfig.model_validate(PRUNING[s])] if s in PRUNING else []
        jobs["cls", s] = _with(base["cls"], strategy=s, callbacks=callbacks)
        if s in LM_STRATEGIES:
            jobs["lm", s] = _with(base["lm"], strategy=s)

    def paused(job: TrainJob) -> TrainJob:
        return job.model_copy(update={"train": job.train.model_copy(update={"pause_at_step": 8})})

    jobs["pairs"] = base["pairs"]
    # On two local ranks (the worker loop without Ray Train's start-up per fit: tests/local_ranks.py)
    local = {("cls", s): jobs["cls", s] for s in STRATEGIES if s != ON_RAY_TRAIN}
    local.update({("lm", s): [paused(jobs["lm", s]), jobs["lm", s]] if s in RESUMED_LM else jobs["lm", s] for s in LM_STRATEGIES})
    local["pairs"] = base["pairs"]
    with LocalRanks(2) as ranks:
        result = ranks.fit_all(local)
        results = {key: result(key) for key in local}
    # On Ray Train: the pruned zero3 classifier, and the teacher and student through the registry
    tasks = {("cls", ON_RAY_TRAIN): partial(fit, jobs["cls", ON_RAY_TRAIN]),
             "emb": partial(_distilled, base["emb-teacher"], base["emb"])}
    with running_two_at_a_time(tasks) as result:
        return jobs, {**results, **{key: result(key) for key in tasks}}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_classifier_learns_and_reloads_into_the_auto_class(runs, strategy):
    from transformers import AutoModelForSequenceClassification

    jobs, results = runs
    job, res = jobs["cls", strategy], results["cls", strategy]
    before, _, _ = _val_metrics(job, None)
    weights = load_file(str(Path(res.artifact_path) / "model.safetensors"))
    after, model, data = _val_metrics(job, weights)
    assert res.metrics["val_loss"] == pytest.approx(after["val_loss"], rel=1e-3)  # the workers' eval, same weights
    assert after["val_loss"] < before["val_loss"], (before, after)
    if strategy not in PRUNING:  # half of the layers' weights pruned within 24 steps costs accuracy on a 32-wide model
        assert after["val_accuracy"] >= 0.9, (before, after)

    auto = AutoModelForSequenceClassification.from_pretrained(job.model.path, local_files_only=True, num_labels=2).eval()
    auto.load_state_dict(weights, strict=True)
    x, _ = next(data.val_batches(1, 8))
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2]).logits, model(x))


@pytest.mark.parametrize("strategy", list(PRUNING))
def test_classifier_is_pruned_inside_the_layers_only(runs, strategy):
    jobs, results = runs
    res = results["cls", strategy]
    weights = load_file(str(Path(res.artifact_path) / "model.safetensors"))
    layer_linears = [n for n in weights if re.fullmatch(r"bert\.encoder\.layer\.\d+\..*dense\.weight|"
                                                        r"bert\.encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.weight", n)]
    assert len(layer_linears) == 12  # 2 layers x (q, k, v, attention out, intermediate, output)
    zeros = sum(int((weights[n] == 0).sum()) for n in layer_linears)
    total = sum(weights[n].numel() for n in layer_linears)
    assert zeros / total == pytest.approx(0.5, abs=0.01)
    assert res.metrics["sparsity"] == pytest.approx(zeros / total, abs=1e-6)
    if strategy == "zero3":  # 2:4: two zeros in every group of four consecutive input weights
        groups = torch.cat([weights[n].reshape(-1, 4) for n in layer_linears])
        assert bool(((groups == 0).sum(dim=1) == 2).all())
    # (the word embeddings are left out: their [PAD] row is zero from the start)
    untouched = ["bert.embeddings.position_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"]
    assert all(int((weights[n] == 0).sum()) == 0 for n in untouched)


@pytest.mark.parametrize("strategy", LM_STRATEGIES)
def test_causal_lm_learns_and_reloads_with_tied_weights(runs, strategy):
    from transformers import AutoModelForCausalLM

    jobs, results = runs
    job = jobs["lm", strategy]
    res = results["lm", strategy]
    if strategy in RESUMED_LM:
        paused, res = res
        assert paused.step == 8 and res.step == job.train.steps
        assert res.metrics["start_step"] == 8  # the second fit continued from the paused checkpoint
    before, _, _ = _val_metrics(job, None)
    weights = load_file(str(Path(res.artifact_path) / "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied: written once, under the embedding's name
    after, model, data = _val_metrics(job, weights)
    assert after["val_loss"] < 0.8 * before["val_loss"], (before, after)
    assert res.metrics["val_loss"] == pytest.approx(after["val_loss"], rel=1e-3)

    auto = AutoModelForCausalLM.from_pretrained(job.model.path, local_files_only=True).eval()
    missing, unexpected = auto.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    assert auto.lm_head.weight.data_ptr() == auto.model.embed_tokens.weight.data_ptr()
    x, _ = next(data.val_batches(1, 8))
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=x[:, 0], attention_mask=x[:, 1]).logits, model(x))


def test_embedding_student_distils_towards_its_registered_teacher(runs):
    from app.artifacts import load_fp32
    from app.compression.distillation import embedding_distillation_loss

    jobs, results = runs
    teacher_record, student = results["emb"]
    assert student["transformation"] == "distilled"
    assert student["parent"] == {"model": "emb-teacher", "version": teacher_record["version"]}
    # the registered student is a 2-layer hf folder of its own, cut from the teacher
    student_job = TrainJob.model_validate(student["config"])
    assert json.loads((Path(student_job.model.path) / "config.json").read_text())["num_hidden_layers"] == 2

    teacher, _ = load_fp32(teacher_record["artifact_uri"])
    start = build_model(student_job.model).eval()  # as cut, before training
    trained, _ = load_fp32(student["artifact_uri"])
    data = build_data(student_job.data, student_job.model)
    x, _ = next(data.val_batches(1, 64))
    with torch.no_grad():
        target = teacher(x)
        cos_before, cos_after = (torch.nn.functional.cosine_similarity(m(x), target).mean().item() for m in (start, trained))
        loss_before = embedding_distillation_loss(start(x), target, "cosine").item()
    metrics = student["metrics"]
    assert metrics["val_loss"] < loss_before and cos_after > cos_before, (cos_before, cos_after, metrics)
    assert metrics["val_mean_cosine"] == pytest.approx(cos_after, abs=1e-3)  # the workers' eval of the same weights


def test_contrastive_fine_tuning_brings_each_text_nearer_its_pair(runs):
    from app.compression.distillation import in_batch_contrastive_loss
    from app.evaluation import embedding_sums

    jobs, results = runs
    job, res = jobs["pairs"], results["pairs"]
    data = build_data(job.data, job.model)
    torch.manual_seed(job.train.seed)
    start = build_model(job.model).eval()  # as the workers start it
    trained = build_model(job.model)
    trained.load_state_dict(load_file(str(Path(res.artifact_path) / "model.safetensors")))
    trained.eval()
    scale = job.train.contrastive_scale
    measured = {}
    with torch.no_grad():  # the workers' val metrics, recomputed here: loss, pair cosine, own pair nearest
        for name, model in (("start", start), ("trained", trained)):
            sums = sum(embedding_sums(model(x), model(y), in_batch_contrastive_loss(model(x), model(y), scale), scale)
                       for x, y in data.val_batches(job.train.eval_batches, job.train.batch_size))
            measured[name] = metrics_from_sums("embedding", sums)
    before, after = measured["start"], measured["trained"]
    assert res.metrics["val_loss"] == pytest.approx(after["val_loss"], rel=1e-3)  # the workers' eval, same weights
    assert after["val_loss"] < 0.7 * before["val_loss"], measured
    assert after["val_accuracy"] > before["val_accuracy"] + 0.2, measured
