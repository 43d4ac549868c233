"""`python -m app registry compare A B --eval FILE` as a subprocess, without Ray, against a registry
database the test writes: a tiny Llama trained in this process on a deterministic mapping
(prompt `w1 w2` -> the word three places after w1) against its untrained base must come out
better with p < 0.05; two versions with the same weights give p = 1.0 and zero deltas. A bad eval file
exits 2 naming the key; a version that is not a causal LM exits 1 with one line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from app.runtime import VERBOSE_ENV
from hf_folders import WORDS, sentiment_rows, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
N_PROMPTS = 40


def answer(prompt: str) -> str:
    return WORDS[(WORDS.index(prompt.split()[0]) + 3) % len(WORDS)]


def _app(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", VERBOSE_ENV)}
    return subprocess.run([sys.executable, "-m", "app", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """(registry config file, eval file): model `llm` v1 = the base, v2 = trained (alias `tuned`), v3 = a
    ViT, v4 = v2's weights saved again."""
    from actors.registry.client import open_store
    from app.artifacts import save_fp32
    from app.config.jobs import parse_config
    from app.config.registry import RegistryConfig
    from app.models import build_model

    root = tmp_path_factory.mktemp("compare-eval")
    text = root / "lines.txt"
    text.write_text("".join(r["text"] + "\n" for r in sentiment_rows(20)))
    job = parse_config("train", {
        "name": "llm", "model": {"kind": "hf", "path": str(tiny_llama(root / "llama", initializer_range=0.2)), "task": "causal_lm"},
        "data": {"kind": "text", "path": str(text), "max_length": 16, "val_fraction": 0.3}})
    base = build_model(job.model).eval()
    base_dir = save_fp32(root / "base", base, job)

    # every `w1 w2` prompt -> answer(w1), then the end-of-sequence token; the loss is on those two only
    model = build_model(job.model)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(root / "llama")
    vocab, eos = tok.get_vocab(), model.generation_config.eos_token_id
    prompts = [f"{a} {b}" for a in WORDS for b in WORDS]
    ids = torch.tensor([tok(p)["input_ids"] + [vocab[answer(p)], eos] for p in prompts])
    labels = ids.clone()
    labels[:, :-2] = -100
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(80):
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.1
    trained_dir = save_fp32(root / "trained", model.eval(), job)
    copy_dir = save_fp32(root / "trained-copy", model, job)  # the same weights, another version

    vit_job = parse_config("train", {"name": "digits", "model": {"kind": "vit"}, "data": {"name": "digits"}})
    vit_dir = save_fp32(root / "vit", build_model(vit_job.model), vit_job)

    db_url = f"sqlite:///{root / 'registry.db'}"
    store = open_store(RegistryConfig(db_url=db_url))
    try:
        store.register_version("llm", str(base_dir), "torch_fp32", transformation="imported")
        store.register_version("llm", str(trained_dir), "torch_fp32", parent={"model": "llm", "version": 1})
        store.set_alias("llm", "tuned", 2, reason="test", actor="test")
        store.register_version("llm", str(vit_dir), "torch_fp32")
        store.register_version("llm", str(copy_dir), "torch_fp32", parent={"model": "llm", "version": 1})
    finally:
        store.close()
    config = root / "registry.yaml"
    config.write_text(yaml.safe_dump({"registry": {"db_url": db_url, "actor_name": "compare-eval-never-started"}}))

    rng = random.Random(0)
    rows = [{"prompt": p, "completion": answer(p)} for p in rng.sample(prompts, N_PROMPTS)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_file = root / "eval.yaml"
    eval_file.write_text(yaml.safe_dump({"data": str(data), "max_new_tokens": 3}))
    return str(config), str(eval_file)


def test_a_trained_version_beats_its_base_significantly(registry):
    config, eval_file = registry
    proc = _app("registry", "compare", "--model", "llm", "1", "tuned", "--eval", eval_file, "--json", "--config", config)
    assert proc.returncode == 0, proc.stderr
    assert "[ray]" not in proc.stderr  # a read: the database is opened here, no Ray started
    out = json.loads(proc.stdout)
    assert (out["a"]["version"], out["b"]["version"], out["eval"]["prompts"]) == (1, 2, N_PROMPTS)
    rows = {m["metric"]: m for m in out["metrics"]}
    assert set(rows) == {"exact_match", "token_f1", "perplexity"}
    em, f1, ppl = rows["exact_match"], rows["token_f1"], rows["perplexity"]
    assert em["b"] >= 0.9 and em["a"] <= 0.3 and em["delta"] == pytest.approx(em["b"] - em["a"])
    assert f1["b"] >= em["b"] and f1["b"] > f1["a"]
    assert ppl["b"] < 2.0 < ppl["a"] and ppl["higher_is_better"] is False
    for m in rows.values():
        assert m["p_value"] < 0.05 and m["prompts"] == N_PROMPTS


def test_two_versions_with_the_same_weights_give_p_one(registry):
    config, eval_file = registry
    proc = _app("registry", "compare", "--model", "llm", "tuned", "4", "--eval", eval_file, "--config", config)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "a: llm v2 (torch_fp32)   b: llm v4 (torch_fp32)"
    assert lines[1].endswith(f"pairs.jsonl, {N_PROMPTS} prompts, greedy, max_new_tokens 3")
    assert lines[3].split() == ["metric", "a", "b", "delta", "p_value", "prompts"]
    rows = {line.split()[0]: line.split() for line in lines[5:8]}
    assert set(rows) == {"exact_match", "token_f1", "perplexity"}
    for name, row in rows.items():
        a, b, delta, p_value, prompts = row[-5:]
        assert a == b and float(delta) == 0.0 and p_value == "1" and prompts == str(N_PROMPTS), row


def test_bad_eval_file_and_a_non_lm_version_are_one_line_errors(registry, tmp_path):
    config, eval_file = registry
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": yaml.safe_load(Path(eval_file).read_text())["data"], "max_new_tokens": -1,
                                   "metric": ["exact_match"]}))
    proc = _app("registry", "compare", "--model", "llm", "1", "2", "--eval", str(bad), "--config", config)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert "max_new_tokens: Input should be greater than or equal to 1" in proc.stderr
    assert "metric: unknown key" in proc.stderr

    proc = _app("registry", "compare", "--model", "llm", "1", "3", "--eval", eval_file, "--config", config)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "registry: llm v3 is a vit model; --eval compares causal LMs (model.kind hf, task causal_lm)")
