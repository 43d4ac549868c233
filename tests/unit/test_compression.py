"""Compression: each variant round-trips through its artifact and keeps quality close to fp32.

Tolerance: on a trained digits ViT, int8 (torch dynamic, ORT dynamic) may lose at most 2
accuracy points on the 193 held-out digits (~4 images); ORT fp32 must match torch fp32 to 1e-4
in logits. A model trained for a few seconds is enough: quantization error is a property of
the weights' ranges, which training shapes within a few hundred steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.artifacts import ArtifactError, artifact_size_bytes, load_int8, save_fp32
from app.compression import METHODS
from app.config.jobs import TrainJob
from app.data import build_data
from app.evaluation import eval_sums, metrics_from_sums, task_loss
from app.inference import classify, generate_text, load_predictor, score_text
from app.models import build_model
from pipelines.optimization import lr_factor, param_groups


def _train_digits(steps: int = 250) -> tuple[torch.nn.Module, TrainJob]:
    job = TrainJob.model_validate({"name": "unit", "model": {"kind": "vit"}, "data": {"name": "digits"},
                                   "train": {"steps": steps, "lr": 3e-3}})
    torch.manual_seed(0)
    model = build_model(job.model)
    data = build_data(job.data, job.model)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, steps, 0.1))
    for step in range(steps):
        x, y = data.train_batch(0, step, 0, 64)
        loss = task_loss("vit", model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval(), job


@pytest.fixture(scope="module")
def digits_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("art")
    model, job = _train_digits()
    save_fp32(root / "fp32", model, job)
    for method, fn in METHODS.items():
        fn(root / "fp32", root / method)
    return root, job


def _accuracy(pred, job) -> float:
    data = build_data(job.data, job.model)
    sums = eval_sums("vit", lambda x: pred.logits(x.numpy()), data.val_batches(100, 64))
    return metrics_from_sums("vit", sums)["val_accuracy"]


def test_int8_variants_within_tolerance_of_fp32(digits_artifacts):
    root, job = digits_artifacts
    fp32 = _accuracy(load_predictor(str(root / "fp32")), job)
    assert fp32 > 0.9, f"the trained model should be good before quantizing (got {fp32:.3f})"
    for method in ("torch_int8", "onnx_int8", "onnx_int8_static", "torch_bf16", "torch_fp16"):
        acc = _accuracy(load_predictor(str(root / method)), job)
        assert acc >= fp32 - 0.02, f"{method}: accuracy {acc:.3f} vs fp32 {fp32:.3f}"


def test_half_precision_variants_halve_the_weights(digits_artifacts):
    root, _ = digits_artifacts
    for method in ("torch_bf16", "torch_fp16"):
        ratio = artifact_size_bytes(root / method) / artifact_size_bytes(root / "fp32")
        assert 0.45 < ratio < 0.55, (method, ratio)


def test_distillation_loss_blends_labels_and_teacher():
    import torch.nn.functional as F

    from app.compression.distillation import distillation_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert distillation_loss(s, t, y, alpha=1.0, temperature=2.0) == pytest.approx(F.cross_entropy(s, y).item())
    assert distillation_loss(t, t, y, alpha=0.0, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    # the soft term pulls the student toward the teacher's distribution
    s.requires_grad_(True)
    distillation_loss(s, t, y, alpha=0.0, temperature=1.0).backward()
    moved = s - 0.5 * s.grad
    before = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    after = F.kl_div(F.log_softmax(moved, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    assert after < before


def test_onnx_fp32_matches_torch_and_int8_files_are_smaller(digits_artifacts):
    root, job = digits_artifacts
    x = build_data(job.data, job.model).example_input(16).numpy()
    ref = load_predictor(str(root / "fp32")).logits(x)
    np.testing.assert_allclose(load_predictor(str(root / "onnx_fp32")).logits(x), ref, atol=1e-4)
    # Linear weights go from 4 bytes to 1 (+ per-channel scales); embeddings/norms stay fp32.
    assert artifact_size_bytes(root / "torch_int8") < 0.5 * artifact_size_bytes(root / "fp32")
    assert artifact_size_bytes(root / "onnx_int8") < 0.6 * artifact_size_bytes(root / "onnx_fp32")


def test_int8_artifact_round_trips_exactly(digits_artifacts):
    root, job = digits_artifacts
    from app.artifacts import load_fp32, quantize_dynamic_int8

    direct = quantize_dynamic_int8(load_fp32(root / "fp32")[0])
    loaded, _ = load_int8(root / "torch_int8")
    x = build_data(job.data, job.model).example_input(8)
    assert torch.equal(direct(x), loaded(x))


def test_predictor_refuses_wrong_backend_and_missing_artifact(digits_artifacts, tmp_path):
    root, _ = digits_artifacts
    with pytest.raises(ArtifactError, match="torch_int8"):
        load_predictor(str(root / "onnx_int8"), expect_backend="torch_int8")
    with pytest.raises(ArtifactError, match="config.json"):
        load_predictor(str(tmp_path))


def test_classify_and_lm_helpers(digits_artifacts, tmp_path):
    root, job = digits_artifacts
    pred = load_predictor(str(root / "torch_int8"))
    x = build_data(job.data, job.model).example_input(4).numpy()
    out = classify(pred, x, top_k=3)
    assert len(out) == 4 and all(len(o["top_k"]) == 3 for o in out)
    assert all(o["label"] == o["top_k"][0]["label"] for o in out)
    # The top-k are the k largest softmax probabilities of the model's own logits, in order.
    logits = pred.logits(x.astype(np.float32)).astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    for o, row in zip(out, probs):
        got = [p["probability"] for p in o["top_k"]]
        assert got == sorted(got, reverse=True) and sum(got) < 1.0  # 3 of 10 classes
        assert [p["label"] for p in o["top_k"]] == list(np.argsort(-row)[:3])
        np.testing.assert_allclose(got, np.sort(row)[::-1][:3], rtol=1e-4, atol=1e-6)

    lm_job = TrainJob.model_validate({"name": "lm", "model": {"kind": "gpt", "n_layer": 1, "d_model": 32, "n_head": 2, "block_size": 16},
                                      "data": {"name": "lm-code", "max_bytes": 100_000}})
    torch.manual_seed(0)
    save_fp32(tmp_path / "lm", build_model(lm_job.model), lm_job)
    lm = load_predictor(str(tmp_path / "lm"))
    prompt = np.frombuffer(b"def f(x):", dtype=np.uint8).astype(np.int64)[None, :]
    new = generate_text(lm, prompt, 20)  # longer than block_size: the context is cropped
    assert new.shape == (1, 20)
    ref = lm._torch_model.generate(torch.from_numpy(prompt), 20)[:, prompt.shape[1]:]
    assert np.array_equal(new, ref.numpy())
    scored = score_text(lm, prompt, top_k=5)[0]
    assert scored["nll"] > 0 and len(scored["next"]) == 5


def test_onnx_int8_uses_7_bit_weights_where_the_cpu_int8_matmul_can_saturate(digits_artifacts):
    """x86 without VNNI (this CI machine: AVX2 only) gets `reduce_range`, recorded in the artifact;
    the quickstart ViT lost 6.7 accuracy points to saturation without it."""
    from app.artifacts import read_meta
    from app.compression import ort_int8_needs_reduce_range

    root, _ = digits_artifacts
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    if "avx2" in flags and "vnni" not in flags:
        assert ort_int8_needs_reduce_range()
    _, meta = read_meta(root / "onnx_int8")
    assert meta["reduce_range"] is ort_int8_needs_reduce_range()
