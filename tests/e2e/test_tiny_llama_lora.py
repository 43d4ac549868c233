"""configs/tiny-llama-lora.yaml end to end through the real CLI, made shorter by overrides: the base
Llama is built from the config's architecture and pre-trained on the standard library's code
(`model.build`), registered (v1), LoRA-tuned on configs/data/swap-keywords.jsonl (v2, parent v1),
merged (v3, parent v2) and quantized (v4); the base and its adapter are then served on the OpenAI
routes, and the official `openai` client's greedy answers equal transformers' own greedy decoding
of the built base and of the adapter merged into it (peft)."""

from __future__ import annotations

import json

import pytest

from .conftest import summary_of

pytestmark = pytest.mark.e2e

APP = ("serve.app_name=tinyllama", "serve.route_prefix=/tinyllama")
SMALL = ("model.build.pretrain.steps=60", "model.build.pretrain.max_bytes=400000", "train.steps=60",
         "train.eval_every=30", "train.checkpoint_every=30", "compress.eval_batches=2")
CHAT = [{"role": "user", "content": "Swap: def class"}]


def test_the_base_is_built_tuned_merged_and_served_with_its_adapter_on_the_openai_routes(workspace):
    openai = pytest.importorskip("openai")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.data.chat_template import render_chat
    from hf_folders import greedy_ids, merged_lora_model

    ws = workspace
    try:
        proc = ws.cli("run", "configs/tiny-llama-lora.yaml", *SMALL, *APP, "--keep-serving", "--json")
        console = proc.stdout + proc.stderr
        assert "pre-training 60 steps" in console and "[1/4 train] tiny-llama-lora" in console
        folder = ws.path / "temper_runs" / "models" / "tiny-llama"
        built = json.loads((folder / "temper-build.json").read_text())
        assert built["pretrain_metrics"]["val_loss"] < built["uniform_loss"]

        summary = summary_of(proc)
        versions = {v["version"]: v for v in summary["versions"]}
        assert [versions[i]["format"] for i in (1, 2, 3, 4)] == ["torch_fp32", "lora_adapter", "torch_fp32", "torch_int8"]
        base, adapter = versions[1], versions[2]
        assert base["transformation"] == "imported" and base["tags"]["source_build"].startswith("llama (num_hidden_layers 2")
        assert adapter["transformation"] == "lora" and adapter["parent"] == {"model": "tiny-llama-lora", "version": 1}
        assert versions[3]["parent"]["version"] == 2 and versions[4]["parent"]["version"] == 3
        assert summary["served_models"] == ["tiny-llama-lora v1 (+ adapters swap)"]
        assert "served: tiny-llama-lora v1 (+ adapters swap) at " in console

        # transformers' own greedy answers: the built folder, and the registered adapter merged into it
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        ids = tok(render_chat(tok, CHAT), add_special_tokens=False)["input_ids"]  # the rendered chat holds its bos
        nets = {"tiny-llama-lora": AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval(),
                "tiny-llama-lora:swap": merged_lora_model(folder, adapter["artifact_uri"])}
        with openai.OpenAI(base_url=f"{ws.url}/tinyllama/v1", api_key="unused", timeout=60.0, max_retries=0) as client:
            assert {m.id for m in client.models.list().data} == set(nets)
            for name, net in nets.items():
                got = client.chat.completions.create(model=name, messages=CHAT, max_tokens=4, temperature=0)
                want = tok.decode(greedy_ids(net, ids, 4), skip_special_tokens=True)
                assert got.choices[0].message.content == want, (name, got.choices[0].message.content, want)
    finally:
        ws.cli("serve", "shutdown", "configs/tiny-llama-lora.yaml", *APP, check=False)
