"""LoRA fine-tuning under Ray Train (2 workers) on instruction rows: a tiny Llama with a chat
template, adapters on q_proj / v_proj.

ddp, through `train_and_register`: the base is registered first (`imported`), the adapter is a
`lora_adapter` version whose parent is the base, with rank, targets and trainable-parameter count;
only the adapter's weights are in the artifact, and they moved (lora_B starts at zero); the base
folder is unchanged. `compress` then merges the adapter (a torch_fp32 version whose parent is the
adapter) and quantizes the merged version. fsdp and zero2 (on two local ranks running the worker
loop: tests/local_ranks.py): a few steps each, the adapter written and loadable; the loss is the
same as under ddp within tolerance (same seed, same batches).
"""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.config.jobs import CompressJob, TrainJob
from hf_folders import tiny_chat_llama
from local_ranks import LocalRanks

pytestmark = pytest.mark.ray

WORDS = "red blue green gold pink gray black white".split()
TRAIN = {"num_workers": 2, "strategy": "ddp", "steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1,
         "eval_every": 3, "checkpoint_every": 3, "log_every": 3, "eval_batches": 2, "finetune": "lora",
         "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    import ray

    from actors.registry.client import get_or_create_registry
    from pipelines.compress import compress
    from pipelines.register import train_and_register

    root = tmp_path_factory.mktemp("lora")
    folder = tiny_chat_llama(root / "llama", WORDS, initializer_range=0.2)
    rows = [{"messages": [{"role": "user", "content": f"{a} {b}"}, {"role": "assistant", "content": f"{b} {a}"}]}
            for a, b in itertools.permutations(WORDS, 2)]
    (root / "swap.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    registry_cfg = {"actor_name": f"lora-{uuid.uuid4().hex[:6]}", "db_url": f"sqlite:///{root}/registry.db"}
    base = {"name": "swap-lora", "storage_path": str(root / "runs"), "registry": registry_cfg,
            "model": {"kind": "hf", "path": str(folder), "task": "causal_lm"},
            "data": {"kind": "jsonl", "path": str(root / "swap.jsonl"), "format": "instructions", "max_length": 16,
                     "val_fraction": 0.25}, "train": TRAIN}
    jobs = {s: TrainJob.model_validate({**base, "name": f"swap-lora-{s}", "train": {**TRAIN, "strategy": s}})
            for s in ("ddp", "fsdp", "zero2")}
    weights_before = load_file(str(folder / "model.safetensors"))
    registry = get_or_create_registry(jobs["ddp"].registry)

    def registered():
        adapter = train_and_register(jobs["ddp"], registry)
        source, reports = compress(CompressJob.model_validate({
            "name": jobs["ddp"].name, "storage_path": base["storage_path"], "registry": registry_cfg,
            "source": str(adapter["version"]),
            "compress": {"methods": ["torch_int8"], "eval_batches": 1, "eval_batch_size": 8, "latency_iters": 2}}),
            registry)
        versions = ray.get(registry.list_versions.remote(jobs["ddp"].name))
        return adapter, source, reports, versions

    try:
        # fsdp and zero2 run the worker loop on two local ranks (tests/local_ranks.py), without Ray
        # Train's start-up per fit; ddp goes through Ray Train and the registry.
        with LocalRanks(2) as ranks:
            result = ranks.fit_all({s: jobs[s] for s in ("fsdp", "zero2")})
            results = {s: result(s) for s in ("fsdp", "zero2")}
        yield jobs, {"ddp": registered(), **results}, weights_before
    finally:
        ray.kill(registry)


def test_adapter_is_a_version_whose_parent_is_the_base(runs):
    jobs, results, weights_before = runs
    adapter, merged, reports, versions = results["ddp"]
    by_version = {v["version"]: v for v in versions}
    base = by_version[adapter["parent"]["version"]]
    assert (base["format"], base["transformation"], base["parent"]) == ("torch_fp32", "imported", None)
    assert (adapter["format"], adapter["transformation"]) == ("lora_adapter", "lora")
    assert adapter["tags"]["lora_rank"] == "4" and adapter["tags"]["target_modules"] == "q_proj,v_proj"
    # 2 layers x (q_proj: A 4x64 + B 64x4, v_proj: A 4x64 + B 32x4) (2 key/value heads of 16)
    assert adapter["tags"]["trainable_params"] == str(2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4))
    assert adapter["metrics"]["trainable_params"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)

    artifact = Path(adapter["artifact_uri"].removeprefix("file://"))
    assert sorted(p.name for p in artifact.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "config.json"]
    weights = load_file(str(artifact / "adapter_model.safetensors"))
    assert len(weights) == 8 and all("lora_" in k for k in weights)
    assert all(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at zero: it trained
    after = load_file(str(Path(jobs["ddp"].model.path) / "model.safetensors"))
    assert all(torch.equal(weights_before[k], after[k]) for k in weights_before)  # the base folder is untouched


def test_compress_merges_the_adapter_first(runs):
    _, results, _ = runs
    adapter, merged, reports, _ = results["ddp"]
    assert (merged["format"], merged["transformation"]) == ("torch_fp32", "merged")
    assert merged["parent"] == {"model": adapter["model"], "version": adapter["version"]}
    [int8] = reports
    assert int8.method == "torch_int8" and int8.version > merged["version"]
    assert int8.metrics["quality_drop"] < 0.05


@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_sharded_strategies_train_the_same_adapter(runs, strategy):
    from app.models.lora import load_adapter

    jobs, results, _ = runs
    res = results[strategy]
    ddp_loss = results["ddp"][0]["metrics"]["val_loss"]
    assert res.metrics["val_loss"] == pytest.approx(ddp_loss, rel=1e-3)
    model, job = load_adapter(res.artifact_path)
    assert job.train.strategy == strategy
    x = torch.tensor([[[2, 6, 7, 8, 9, 14, 5, 6, 7], [1] * 9]])
    assert torch.isfinite(model(x)).all()
