"""The verbs a user runs one by one, through the real CLI on the folder's cluster: `train`, then
`compress` of what it registered, then `serve deploy` of a compressed version and predictions
over plain HTTP; and `schema`. Each job verb is given the full quickstart file (it takes the
sections it needs), shortened by overrides, under its own model name so the quickstart's
versions are untouched."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from .conftest import ROOT, last_json, served_digits_accuracy

pytestmark = pytest.mark.e2e

MODEL = "e2e-verbs"
SHORT = ("train.steps=60", "train.eval_every=30", "train.checkpoint_every=60", "train.log_every=20", "train.lr=0.004")


def test_train_compress_then_serve_deploy_answers_over_http(workspace):
    ws = workspace
    trained = last_json(ws.cli("train", "configs/quickstart.yaml", f"name={MODEL}", *SHORT, "--json").stdout)
    assert (trained["model"], trained["version"], trained["format"], trained["transformation"]) == (MODEL, 1, "torch_fp32", "trained")
    assert trained["metrics"]["val_accuracy"] > 0.3  # 60 steps: far above chance (0.1), far from done
    assert (ws.path / "temper_runs" / "train" / MODEL).is_dir()

    ws.cli("compress", "configs/quickstart.yaml", f"name={MODEL}", "source=1", "compress.methods=[onnx_int8]",
           "compress.latency_iters=5", "--json")
    versions = last_json(ws.cli("registry", "list", "--model", MODEL, "--json").stdout)
    onnx = [v for v in versions if v["format"] == "onnx_int8"]
    assert len(onnx) == 1 and onnx[0]["parent"] == {"model": MODEL, "version": 1} and onnx[0]["transformation"] == "quantized"

    # Its own application and prefix: the quickstart's app (same Serve proxy, same port) keeps running.
    # The cluster runs Serve's throughput-optimized mode (conftest): with serve.direct_ingress the
    # printed URL is the ingress replica's own port, and the proxy's URL answers the same.
    app = ("serve.app_name=e2e-verbs", "serve.route_prefix=/verbs", "serve.direct_ingress=true",
           f"serve.models=[{{model: {MODEL}, version: {onnx[0]['version']}}}]")
    out = ws.cli("serve", "deploy", "configs/quickstart.yaml", *app).stdout
    [base] = re.findall(r"\[serve\] e2e-verbs at (http://127\.0\.0\.1:\d+/verbs)/api/v1/", out)
    assert base != f"{ws.url}/verbs", out
    assert httpx.get(f"{ws.url}/verbs/api/v1/health", timeout=30).json() == httpx.get(f"{base}/api/v1/health", timeout=30).json()
    try:
        digit = [[0, 0, 5, 13, 9, 1, 0, 0]] * 8  # any 8x8 image in [0, 16] / 16 is a valid input
        body = httpx.post(f"{base}/api/v1/models/{MODEL}/predict", json={"inputs": [[[v / 16 for v in row] for row in digit]], "top_k": 3},
                          timeout=30).raise_for_status().json()
        assert (body["model"], body["version"], body["backend"]) == (MODEL, onnx[0]["version"], "onnx_int8")
        probs = body["probabilities"][0]
        assert len(probs) == 3 and body["outputs"][0] == probs[0]["label"]
        assert probs[0]["probability"] >= probs[1]["probability"] >= probs[2]["probability"] > 0
        # and the answers are the version's: its registered accuracy, reproduced over HTTP (see test_quickstart)
        accuracy, answered_by = served_digits_accuracy(base, MODEL, onnx[0])
        assert answered_by == {onnx[0]["version"]}
        assert abs(accuracy - onnx[0]["metrics"]["val_accuracy"]) <= 0.02, (accuracy, onnx[0]["metrics"])
        status = ws.cli("serve", "status", "configs/quickstart.yaml", *app).stdout
        assert f"at {ws.url}/verbs/api/v1/" in status and f"direct ingress: {base}/api/v1/" in status, status
    finally:
        ws.cli("serve", "shutdown", "configs/quickstart.yaml", *app)


def test_schema_prints_every_section():
    proc = subprocess.run([sys.executable, "-m", "app", "schema"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for heading in ("OptimizeJob (`python -m app run`)", "TrainJob (`python -m app train`)", "CompressJob", "TuneJob",
                    "ServeApp", "#### `train`", "#### `tune.search_space.<key path>`", "#### `serve.models[]`",
                    "#### `registry`", "train.callbacks[]", "#### `train.distill`"):
        assert heading in out, heading
    assert "FieldInfo(" not in out and "Annotated[" not in out
    # the README's reference is this output (tests/unit/test_config.py checks it line by line)
    assert out.strip().splitlines()[-1] in (ROOT / "README.md").read_text()
