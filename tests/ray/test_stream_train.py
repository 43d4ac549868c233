"""A JSONL file streamed through Ray Data into Ray Train (`data.stream: true`, app/data/stream.py):
two workers each iterate their own shard of the train rows (the Dataset training uses, split as
Ray Train splits it, each shard read through the worker-side data object, the lines recorded per
rank), and a tiny BERT classifier trained by `fit` on the streamed file learns, its workers'
validation loss equal to the in-memory path's on the same val rows. Two bad rows are skipped and
counted by the driver's survey pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from app.config.jobs import TrainJob
from app.data.stream import ray_summaries, survey_files, train_dataset
from hf_folders import sentiment_rows, tiny_bert
from pipelines.train import fit

pytestmark = pytest.mark.ray

BATCH = 8


def _job(root: Path) -> TrainJob:
    rows = sentiment_rows(200)
    lines = [json.dumps(r) for r in rows]
    lines[10], lines[150] = json.dumps({"text": "", "label": "pos"}), json.dumps({"text": "the cat", "label": "meh"})
    (root / "sent.jsonl").write_text("".join(line + "\n" for line in lines))
    return TrainJob.model_validate({
        "name": "stream-cls", "storage_path": str(root / "runs"),
        "model": {"kind": "hf", "path": str(tiny_bert(root / "bert")), "task": "sequence_classification"},
        "data": {"kind": "jsonl", "path": str(root / "sent.jsonl"), "label_field": "label", "labels": ["neg", "pos"],
                 "max_length": 16, "val_fraction": 0.25, "stream": True, "skip_bad_rows": True},
        "train": {"num_workers": 2, "strategy": "ddp", "steps": 16, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 16, "checkpoint_every": 16, "log_every": 8, "eval_batches": 4},
    })


def _lines_per_rank(job: TrainJob) -> tuple[list[list[int]], dict]:
    """One epoch of each worker's shard through StreamedTextData.stream_batches: the lines it saw.

    The shards are made as Ray Train makes them for its workers (`streaming_split(world_size,
    equal=True)` of the train Dataset, its default DataConfig) and read at the same time, one
    thread per rank, as two workers would: without a second Ray Train start-up in this module
    (`fit` below trains on the streamed file through Ray Train)."""
    from concurrent.futures import ThreadPoolExecutor

    from app.data.stream import StreamedTextData

    summary = survey_files(job.data, keep_val=job.train.eval_batches * job.train.batch_size)
    batches_per_rank = summary["n_train"] // 2 // BATCH
    shards = train_dataset(job.data, job.model, summary["labels"]).streaming_split(2, equal=True)

    def read(rank: int) -> list[int]:
        data = StreamedTextData(job.data, job.model, summary, shards[rank])
        batches = data.stream_batches(0, rank, BATCH)
        return [int(line) for _ in range(batches_per_rank) for line in next(batches)[2][:, 1]]

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(read, range(2))), summary


@pytest.fixture(scope="module")
def streamed(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-train")
    job = _job(root)
    seen, summary = _lines_per_rank(job)
    return job, seen, summary, fit(job)


def test_each_worker_iterates_its_own_shard(streamed):
    from app.data.text import read_splits

    job, (rank0, rank1), summary, _ = streamed
    memory = read_splits(job.data)  # the in-memory path: the same rows, the same split
    assert summary["bad_rows"] == memory.bad_rows == 2 and summary["n_train"] == len(memory.train)
    train_lines = {ex.line for ex in memory.train}
    per_rank = summary["n_train"] // 2 // BATCH * BATCH
    assert len(rank0) == len(set(rank0)) == per_rank == len(rank1) == len(set(rank1)) > 0
    assert not set(rank0) & set(rank1)  # different rows on each worker
    assert set(rank0) | set(rank1) <= train_lines  # only good train rows, never a val or bad one


def test_classifier_trains_on_the_streamed_file(streamed):
    import torch

    from app.artifacts import read_meta
    from app.data import build_data
    from app.evaluation import eval_sums, metric_kind, metrics_from_sums
    from app.models import build_model

    job, _, _, res = streamed
    data = build_data(job.data, job.model)  # in memory: its val batches are the streamed run's val rows

    def val_metrics(weights):
        torch.manual_seed(job.train.seed)
        model = build_model(job.model, labels=data.labels)
        if weights is not None:
            model.load_state_dict(weights)
        with torch.no_grad():
            sums = eval_sums(metric_kind(job.model), model.eval(), data.val_batches(job.train.eval_batches, job.train.batch_size))
        return metrics_from_sums(metric_kind(job.model), sums)

    before = val_metrics(None)
    after = val_metrics(load_file(str(Path(res.artifact_path) / "model.safetensors")))
    assert res.step == 16
    assert read_meta(res.artifact_path)[1]["labels"] == ["neg", "pos"]  # loading it needs no pass over the file
    assert res.metrics["val_loss"] == pytest.approx(after["val_loss"], rel=1e-3)  # the workers evaluated the same rows
    assert after["val_loss"] < before["val_loss"], (before, after)


def test_an_error_inside_a_read_task_reaches_the_driver_as_itself(ray_cluster, tmp_path):
    """Bytes that are not UTF-8 deep in the file (past what the driver reads to check the file):
    the read task raises, and the driver gets the same DataFileError the in-memory path raises."""
    from app.config.data import FileDataConfig
    from app.data.files import DataFileError
    from app.data.text import read_splits

    path = tmp_path / "broken.jsonl"
    path.write_bytes(b"".join(b'{"text": "the cat sat %d"}\n' % i for i in range(5000)) + b'{"text": "\xff"}\n')
    cfg = FileDataConfig(kind="jsonl", path=str(path), stream=True)
    with pytest.raises(DataFileError) as memory:
        read_splits(cfg)
    with pytest.raises(DataFileError) as streamed_error:
        survey_files(cfg, keep_val=8, summaries=ray_summaries)  # a small file: Ray tasks asked for
    assert str(streamed_error.value) == str(memory.value) and str(memory.value).startswith(f"{path}: not UTF-8 text")
