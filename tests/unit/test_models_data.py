"""Models and built-in data: shapes, causality, determinism, split hygiene."""

from __future__ import annotations

import numpy as np
import torch

from app.config.data import DataConfig
from app.config.model import GPTConfig, ViTConfig
from app.data import build_data
from app.models import build_model

SMALL_LM = DataConfig(name="lm-code", max_bytes=300_000)


def test_gpt_is_causal_and_shapes_fit():
    torch.manual_seed(0)
    model = build_model(GPTConfig(n_layer=2, d_model=64, n_head=4, block_size=32)).eval()
    x = torch.randint(0, 256, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 256)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256  # change the future only
    assert torch.allclose(model(x2)[:, :10], logits[:, :10], atol=1e-5)
    assert not torch.allclose(model(x2)[:, 10:], logits[:, 10:], atol=1e-3)


def test_rope_scores_depend_only_on_relative_position():
    from app.models.transformer import apply_rope, rope_tables

    cos, sin = rope_tables(64, 16, 10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, 16), cos[i:i + 1], sin[i:i + 1]).flatten()
        kj = apply_rope(k.view(1, 1, 1, 16), cos[j:j + 1], sin[j:j + 1]).flatten()
        return float(qi @ kj)

    assert abs(score(5, 2) - score(40, 37)) < 1e-4  # same distance, same score
    assert abs(score(5, 2) - score(5, 4)) > 1e-3    # another distance, another score


def test_vit_classifies_batches():
    model = build_model(ViTConfig()).eval()
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)


def test_lm_code_split_is_by_file_and_deterministic():
    a = build_data(SMALL_LM, GPTConfig(block_size=32))
    b = build_data(SMALL_LM, GPTConfig(block_size=32))
    assert a.train.size + a.val.size >= 290_000 and a.val.size > 0
    assert a.describe() == b.describe()
    xa, ya = a.train_batch(seed=1, step=7, rank=0, batch_size=4)
    xb, yb = b.train_batch(seed=1, step=7, rank=0, batch_size=4)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are inputs shifted by one byte
    other_rank, _ = a.train_batch(seed=1, step=7, rank=1, batch_size=4)
    assert not torch.equal(xa, other_rank)
    v1 = [x for x, _ in a.val_batches(3, 4)]
    v2 = [x for x, _ in b.val_batches(3, 4)]
    assert all(torch.equal(p, q) for p, q in zip(v1, v2))


def test_lm_code_val_files_are_not_in_train():
    data = build_data(SMALL_LM, GPTConfig(block_size=32))
    # a 64-byte chunk from the middle of the val stream should not occur in train
    probe = data.val[data.val.size // 2: data.val.size // 2 + 64].tobytes()
    assert probe not in data.train.tobytes()


def test_digits_split_is_disjoint_and_scaled():
    data = build_data(DataConfig(name="digits"), ViTConfig())
    assert len(data.y_train) + len(data.y_val) == 1797
    assert 0.05 < len(data.y_val) / 1797 < 0.2
    assert data.x_train.min() >= 0 and data.x_train.max() <= 1
    train_rows = {r.tobytes() for r in data.x_train}
    overlap = sum(r.tobytes() in train_rows for r in data.x_val)
    assert overlap < 0.05 * len(data.y_val)  # digits has a few exact duplicate images, nothing more
    assert np.array_equal(next(data.val_batches(1, 8))[1].numpy(), data.y_val[:8])
