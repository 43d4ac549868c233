"""Tiny Hugging Face model folders built offline from configs (random weights, `save_pretrained`),
with a word-level tokenizer, for the tests of the `hf` model kind and file datasets."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "the a cat dog sat on mat ran fast slow red blue big small house tree".split()


def save_word_tokenizer(folder: Path) -> None:
    """A word-level BERT-style tokenizer ([CLS] text [SEP]) that AutoTokenizer loads from `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(folder)


def tiny_bert_config(layers: int = 2, initializer_range: float = 0.02):
    """A `layers`-layer, 32-wide BERT config over the word-level vocabulary."""
    from transformers import BertConfig

    return BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, initializer_range=initializer_range)


def tiny_bert(folder: Path, layers: int = 2, initializer_range: float = 0.02) -> Path:
    """A `layers`-layer (default 2), 32-wide BertModel (no classification head) in `folder`.
    A larger `initializer_range` makes each layer change the vectors more (at BERT's 0.02 a
    random encoder's output is mostly its embeddings, whatever its layers)."""
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(tiny_bert_config(layers, initializer_range)).save_pretrained(folder)
    save_word_tokenizer(folder)
    return folder


def with_sentence_transformers_files(folder: Path) -> Path:
    """`folder` with sentence-transformers' module files added: mean pooling, then Normalize."""
    import json

    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


def tiny_llama(folder: Path, tie_word_embeddings: bool = True, initializer_range: float = 0.02) -> Path:
    """A 2-layer, 32-wide LlamaForCausalLM in `folder` (output head tied to the embedding by default).

    At the default `initializer_range` its next-token distribution is near uniform and greedy
    decoding repeats one token; a larger one (0.5) gives peaked logits that vary with the context."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=5 + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         tie_word_embeddings=tie_word_embeddings, initializer_range=initializer_range)
    LlamaForCausalLM(config).save_pretrained(folder)
    save_word_tokenizer(folder)
    return folder


def sentiment_rows(n: int) -> list[dict]:
    """Labelled sentences a tiny model can learn: 'pos' rows say fast/big things, 'neg' slow/small."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        words = [rng.choice(["cat", "dog", "house", "tree"]), rng.choice(["ran", "sat"])]
        words += rng.sample(["fast", "big", "red"] if pos else ["slow", "small", "blue"], 2)
        rows.append({"text": " ".join(["the", *words]), "label": "pos" if pos else "neg"})
    return rows


def lora_adapter(base_folder: Path, out: Path, seed: int, target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A peft LoRA adapter for the causal LM in `base_folder`, saved in `out` (adapter_config.json +
    adapter_model.safetensors). No training: its B matrices (zero at init, which would leave the
    base unchanged) are drawn at random from `seed`, large enough that greedy answers change."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, local_files_only=True, use_safetensors=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(target_modules),
                                            task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


def merged_lora_model(base_folder: Path, adapter: Path):
    """The base causal LM with `adapter` merged into its weights (peft's merge_and_unload), in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, local_files_only=True, use_safetensors=True)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def greedy_ids(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation of one prompt: the new ids, up to and including an
    end-of-sequence id."""
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
    new = out[0, len(prompt_ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    for i, t in enumerate(new):
        if t in eos:
            return new[:i + 1]
    return new


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
"""A small chat template: `<user> text <assistant> answer </s> `; the generation prompt is `<assistant>`."""


def save_chat_tokenizer(folder: Path, words: list[str], chat_template: str | None = CHAT_TEMPLATE) -> None:
    """A word-level tokenizer with `<s>` / `</s>` (bos / eos), the words of the plain template and of
    CHAT_TEMPLATE, and `words`; no special tokens are added around a text. `chat_template` None:
    the folder has none (the plain template applies)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>"]
    template = ["<", ">", "system", "user", "assistant", "###", "System", "User", "Assistant", ":"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + template + list(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)


def tiny_chat_llama(folder: Path, words: list[str], *, chat_template: str | None = CHAT_TEMPLATE, hidden: int = 64,
                    initializer_range: float = 0.02) -> Path:
    """A 2-layer LlamaForCausalLM (`hidden` wide, output head tied to the embedding) with
    save_chat_tokenizer's tokenizer; eos `</s>` in its generation config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    save_chat_tokenizer(folder, words, chat_template)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True, initializer_range=initializer_range)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def tiny_llama_artifact(root: Path, lines: int = 40, max_length: int = 16) -> tuple[str, object]:
    """(torch_fp32 artifact folder, the transformers model saved into it): a 2-layer Llama from
    `tiny_llama` at initializer_range 0.5 (greedy tokens vary with the context), as `train` would
    register it on a text file of `lines` sentiment lines."""
    from app.artifacts import save_fp32
    from app.config.jobs import parse_config
    from app.models import build_model

    text = root / "lines.txt"
    text.write_text("".join(r["text"] + "\n" for r in sentiment_rows(lines)))
    job = parse_config("train", {
        "name": "lm", "model": {"kind": "hf", "path": str(tiny_llama(root / "llama", initializer_range=0.5)), "task": "causal_lm"},
        "data": {"kind": "text", "path": str(text), "max_length": max_length, "val_fraction": 0.3}})
    torch.manual_seed(0)
    model = build_model(job.model).eval()
    return str(save_fp32(root / "fp32", model, job)), model


SWAP_WORDS = "red blue green gold pink gray black white cat dog cow pig hen fox owl bee".split()
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def swap_words_job(root: Path, name: str = "swap", **train):
    """A LoRA job (TrainJob) on a word-swap chat task a tiny model learns in 200 steps: a tiny chat
    Llama over SWAP_WORDS (initializer_range 0.2) and every ordered pair "a b" -> "b a" as JSONL in
    `root` (written once), adapters on every projection; `train` overrides the train section."""
    import itertools
    import json

    from app.config.jobs import TrainJob

    folder = root / "llama"
    if not folder.exists():
        tiny_chat_llama(folder, SWAP_WORDS, initializer_range=0.2)
        rows = [{"messages": [{"role": "user", "content": f"{a} {b}"}, {"role": "assistant", "content": f"{b} {a}"}]}
                for a, b in itertools.permutations(SWAP_WORDS, 2)]
        (root / "swap.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TrainJob.model_validate({
        "name": name, "storage_path": str(root / "runs"),
        "model": {"kind": "hf", "path": str(folder), "task": "causal_lm"},
        "data": {"kind": "jsonl", "path": str(root / "swap.jsonl"), "format": "instructions", "max_length": 16,
                 "val_fraction": 0.2},
        "train": {"num_workers": 1, "steps": 200, "batch_size": 16, "lr": 1e-2, "warmup_steps": 5, "finetune": "lora",
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": LLAMA_PROJECTIONS}, **train}})
