"""What a user writes instead of deploying Temper: FastAPI + uvicorn around one model artifact.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/anchors/fastapi_server.py ARTIFACT_FOLDER --port 8123

The anchor of `benchmarks/serving_vs_fastapi.py`. It serves the same model object a Temper replica
serves (`app.inference.load_predictor` of the same artifact: ORT at OMP_NUM_THREADS intra-op
threads) on the same routes and JSON as Temper's `/api/v1/models/{model}/predict | embed`, so one
load generator drives both. One process; uvicorn with uvloop and httptools (its fastest setup).
The handlers are `async def` and call the model on the event loop: one model call at a time on one
thread, as a replica of 1 CPU computes. (`def` handlers would run in uvicorn's thread pool, several
calls at once since ORT releases the GIL: more threads than the replica is given.) No batching: a
plain server has none.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import uvicorn
from fastapi import FastAPI

from app.inference import classify, load_predictor


def build(artifact: str) -> FastAPI:
    pred = load_predictor(artifact)
    api = FastAPI()

    @api.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @api.post("/api/v1/models/{model}/predict")
    async def predict(model: str, body: dict) -> dict:
        images = np.asarray(body["inputs"], dtype=np.float32).reshape(len(body["inputs"]), 1, 8, 8)  # digits: 1x8x8
        return {"outputs": classify(pred, images, int(body.get("top_k", 1)))}

    @api.post("/api/v1/models/{model}/embed")
    async def embed(model: str, body: dict) -> dict:
        return {"embeddings": pred.embed(body["texts"]).tolist()}

    return api


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--port", type=int, default=8123)
    args = ap.parse_args()
    uvicorn.run(build(args.artifact), host="127.0.0.1", port=args.port, log_level="warning", loop="uvloop", http="httptools")
