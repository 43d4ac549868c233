"""Training `hf` embedding models, without Ray: a student cut from a teacher's layers, the
`train.distill` checks, the embedding losses against hand computations, and embedding batches."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from app.compression.distillation import embedding_distillation_loss, in_batch_contrastive_loss
from app.config.base import ConfigError
from app.config.jobs import parse_config
from app.data import build_data
from app.models.hf import HFModelError, keep_layers, load_hf_model, save_student_folder
from hf_folders import sentiment_rows, tiny_bert, with_sentence_transformers_files


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 4-layer tiny BERT with sentence-transformers files (mean pooling, Normalize)."""
    return with_sentence_transformers_files(tiny_bert(tmp_path_factory.mktemp("teacher") / "m", layers=4))


def test_student_folder_keeps_exactly_the_chosen_layers(tmp_path, teacher_dir):
    teacher = load_hf_model(teacher_dir, "embedding")
    out = save_student_folder(teacher, teacher_dir, [0, 3], tmp_path / "student")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "tokenizer.json").is_file()

    t = teacher.encoder.state_dict()
    s = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("encoder.layer.2.") for k in s)
    for key, value in s.items():
        if key.startswith("encoder.layer."):
            index, rest = key.removeprefix("encoder.layer.").split(".", 1)
            source = f"encoder.layer.{[0, 3][int(index)]}.{rest}"
        else:
            source = key
        torch.testing.assert_close(value, t[source], rtol=0, atol=0)
    # the saved folder loads as any hf embedding folder, with the teacher's pooling
    student = load_hf_model(out, "embedding")
    assert student.pooling == teacher.pooling and student.config.num_hidden_layers == 2


def test_a_student_of_all_layers_embeds_as_the_teacher(teacher_dir):
    teacher = load_hf_model(teacher_dir, "embedding").eval()
    same = keep_layers(teacher.encoder, [0, 1, 2, 3]).eval()
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(same(input_ids=ids, attention_mask=mask).last_hidden_state,
                               teacher.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_layers_outside_the_teacher_are_refused(teacher_dir):
    teacher = load_hf_model(teacher_dir, "embedding")
    with pytest.raises(HFModelError, match=r"student_layers \[0, 4\]: \[4\] not among the teacher's 4 layers"):
        keep_layers(teacher.encoder, [0, 4])


def test_embedding_distillation_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert embedding_distillation_loss(s, t, "mse").item() == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert embedding_distillation_loss(s, t, "cosine").item() == pytest.approx(((1 - 0) + (1 - 1)) / 2)


def test_in_batch_contrastive_loss_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    p = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    # cosines: row 0: (1, 1/sqrt2); row 1: (0, 1/sqrt2); scale 20, right answers on the diagonal
    c = 1 / 2 ** 0.5
    row0 = -20 * 1 + math.log(math.exp(20 * 1) + math.exp(20 * c))
    row1 = -20 * c + math.log(math.exp(0) + math.exp(20 * c))
    assert in_batch_contrastive_loss(a, p, 20.0).item() == pytest.approx((row0 + row1) / 2, rel=1e-4)
    assert F.cross_entropy(torch.zeros(2, 2), torch.arange(2)).item() == pytest.approx(
        in_batch_contrastive_loss(a, p, 1e-9).item(), rel=1e-5)  # no scale: uniform over the batch, log 2


def _tree(teacher_dir, tmp_path, **distill):
    rows = sentiment_rows(40)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"], "pair": r["text"].upper()}) + "\n" for r in rows))
    train = {"steps": 4, "warmup_steps": 1}
    if distill:
        train["distill"] = {"teacher": "teacher", **distill}
    return {"name": "student", "storage_path": str(tmp_path), "model": {"kind": "hf", "path": str(teacher_dir), "task": "embedding"},
            "data": {"kind": "jsonl", "path": str(data), "text_pair_field": "pair", "max_length": 16, "val_fraction": 0.25},
            "train": train}


@pytest.mark.parametrize("distill, message", [
    ({"loss": "kl"}, "an hf embedding model has no logits to distill; use 'mse' or 'cosine'"),
    ({"loss": "cosine", "student_layers": [2, 0]}, r"student_layers \[2, 0\]: must be sorted and unique"),
    ({"loss": "cosine", "student_layers": [0, 0]}, r"student_layers \[0, 0\]: must be sorted and unique"),
    ({"loss": "cosine", "student_layers": [-1, 0]}, "0-based, none negative"),
    ({"loss": "cosine", "student_layers": []}, "at least one layer index"),
    ({"loss": "mse", "alpha": 0.2}, "alpha / temperature apply to train.distill.loss 'kl'"),
])
def test_distill_config_errors_name_the_keys(teacher_dir, tmp_path, distill, message):
    with pytest.raises(ConfigError, match=message):
        parse_config("train", _tree(teacher_dir, tmp_path, **distill))


def test_embedding_losses_and_student_layers_fit_only_embedding_models(tmp_path):
    tree = {"name": "d", "model": {"kind": "vit"}, "data": {"name": "digits"},
            "train": {"distill": {"teacher": "t", "loss": "mse"}}}
    with pytest.raises(ConfigError, match="train.distill.loss 'mse' compares embeddings .* model.kind 'vit' distills logits"):
        parse_config("train", tree)
    tree["train"]["distill"] = {"teacher": "t", "student_layers": [0]}
    with pytest.raises(ConfigError, match="train.distill.student_layers cuts an hf embedding teacher"):
        parse_config("train", tree)


def test_a_valid_distill_section_survives_the_trip_to_a_worker(teacher_dir, tmp_path):
    job = parse_config("train", _tree(teacher_dir, tmp_path, loss="cosine", student_layers=[0, 2]))
    assert job.train.distill.student_layers == [0, 2]
    assert type(job).model_validate(job.model_dump(mode="json")) == job


def test_embedding_batches_pair_texts_with_their_pairs(teacher_dir, tmp_path):
    job = parse_config("train", _tree(teacher_dir, tmp_path))
    data = build_data(job.data, job.model)
    x, y = data.train_batch(0, 0, 0, 8)
    assert x.shape == y.shape and x.shape[:2] == (8, 3)
    # the pair is the upper-cased text: unknown to the word-level vocabulary, [UNK] per word
    assert (y[:, 0][y[:, 1] == 1] != 1).sum() == 2 * 8  # only [CLS] and [SEP] are known words
    assert ((x[:, 0] == 1) & (x[:, 1] == 1)).sum() == 0
    val_x, val_y = next(data.val_batches(1, 4))
    assert val_x.shape == val_y.shape
