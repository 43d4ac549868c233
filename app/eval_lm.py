"""Quality of a causal LM: perplexity, and exact match / token F1 of its greedy answers, per prompt
and overall, and a paired significance test between two versions scored on the same prompts.

- Perplexity is exp of the token-weighted mean negative log-likelihood: sum of -log p(token |
  tokens before it) over every scored token of every text, divided by the number of scored
  tokens (so a long text weighs more than a short one, as in training's `val_perplexity`). On a
  validation text set every token after the first is scored (`text_perplexity`); on prompt /
  reference pairs only the reference's tokens, given the prompt (`reference_nll`).
- Exact match and token F1 follow the SQuAD v1.1 evaluation script: both answers are normalised
  (lowercase; ASCII punctuation removed; the English articles a / an / the removed; whitespace
  collapsed), then EM is 1.0 when the normalised strings are equal, and F1 is the harmonic mean of
  the precision and recall of the multiset of shared whitespace tokens (both empty: 1.0; one
  empty: 0.0). `normalize=False` compares the texts as written, split on whitespace.
- Generation is greedy (`app.inference.generate_tokens`: the torch KV-cache path, or recompute on
  ONNX), stopping at `max_new_tokens` or the model's end-of-sequence token, which is not part of
  the answer.

How a prompt becomes tokens: a string prompt is tokenized as the model's tokenizer does one text
(its special tokens included, e.g. Llama's BOS); a chat prompt (the turns before the reference)
is rendered as serving and fine-tuning render it (`app.data.chat_template.render_chat`: the
tokenizer's chat template with the generation prompt, or the plain template when the folder has
none) and tokenized as it is (the rendered text carries its special tokens). The reference
follows the prompt's tokens, tokenized without special tokens.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import TYPE_CHECKING, Sequence

import numpy as np

from app.data.eval_pairs import EvalPair

if TYPE_CHECKING:
    from app.config.evaluation import EvalConfig
    from app.inference import TextPredictor

HIGHER_IS_BETTER = {"exact_match": True, "token_f1": True, "perplexity": False}
_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ----------------------------------------------------------------------------- answers


def answer_tokens(text: str, normalize: bool = True) -> list[str]:
    """The words EM and F1 compare (see the module docstring for the normalisation)."""
    if normalize:
        text = text.lower()
        text = "".join(ch for ch in text if ch not in _PUNCTUATION)
        text = _ARTICLES.sub(" ", text)
    return text.split()


def exact_match(prediction: str, reference: str, normalize: bool = True) -> float:
    """1.0 when the two answers are the same after normalisation, else 0.0."""
    return float(answer_tokens(prediction, normalize) == answer_tokens(reference, normalize))


def token_f1(prediction: str, reference: str, normalize: bool = True) -> float:
    """SQuAD's token F1 between a predicted and a reference answer."""
    pred, ref = answer_tokens(prediction, normalize), answer_tokens(reference, normalize)
    if not pred or not ref:
        return float(pred == ref)
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------- likelihood


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(token-weighted mean NLL) from the summed NLL of `n_tokens` scored tokens."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(nll_sum / n_tokens)


def scored_nll(pred: "TextPredictor", rows: Sequence[Sequence[int]], starts: Sequence[int],
               batch_size: int = 16) -> list[tuple[float, int]]:
    """Per row of token ids: (sum of -log p(row[t] | row[:t]) for t >= its start, count of those t).

    Rows are right-padded in batches with an attention mask (a causal model's logits at real
    positions do not see the padding after them). Works with every backend of the predictor.
    """
    import torch

    if len(rows) != len(starts):
        raise ValueError(f"{len(rows)} rows but {len(starts)} starts")
    out: list[tuple[float, int]] = []
    enc = {"input_ids": [list(map(int, r)) for r in rows]}
    for first in range(0, len(rows), batch_size):
        idx = list(range(first, min(first + batch_size, len(rows))))
        logits = pred.run(pred.pad(enc, idx))  # (B, T, V)
        logp = torch.log_softmax(torch.from_numpy(np.asarray(logits)).double(), dim=-1)
        for b, i in enumerate(idx):
            ids, start = enc["input_ids"][i], starts[i]
            if not 1 <= start < len(ids):
                raise ValueError(f"row {i}: nothing to score (start {start}, {len(ids)} tokens)")
            targets = torch.tensor(ids[start:], dtype=torch.long)
            given = logp[b, start - 1:len(ids) - 1].gather(-1, targets[:, None])  # (n, 1): log p of each target
            out.append((-float(given.sum()), len(ids) - start))
    return out


def text_perplexity(pred: "TextPredictor", texts: Sequence[str], batch_size: int = 16) -> float:
    """Perplexity of a validation text set: every token after each text's first, each text
    tokenized as training does (special tokens included, truncated to the job's `data.max_length`)."""
    rows = pred.encode(list(texts), truncate=True)["input_ids"]
    kept = [r for r in rows if len(r) >= 2]
    if not kept:
        raise ValueError("no text has two or more tokens: nothing to score")
    sums = scored_nll(pred, kept, [1] * len(kept), batch_size)
    return perplexity(sum(s for s, _ in sums), sum(n for _, n in sums))


def prompt_ids(pred: "TextPredictor", prompt: str | tuple[dict[str, str], ...]) -> list[int]:
    """A prompt's token ids (see the module docstring)."""
    from app.data.chat_template import render_chat

    if isinstance(prompt, str):
        return pred.tokenize(prompt)
    return list(pred.tokenizer(render_chat(pred.tokenizer, list(prompt)), add_special_tokens=False)["input_ids"])


def _check_length(pred: "TextPredictor", n: int, pair: EvalPair, what: str) -> None:
    if pred.max_positions is not None and n > pred.max_positions:
        raise ValueError(f"line {pair.line}: {what} is {n} tokens; the model takes at most {pred.max_positions}")


def reference_nll(pred: "TextPredictor", pairs: Sequence[EvalPair], batch_size: int = 16) -> list[tuple[float, int]]:
    """Per pair: (summed NLL of the reference's tokens given the prompt, number of those tokens)."""
    rows, starts = [], []
    for pair in pairs:
        head = prompt_ids(pred, pair.prompt)
        tail = list(pred.tokenizer(pair.reference, add_special_tokens=False)["input_ids"])
        if not tail:
            raise ValueError(f"line {pair.line}: the reference has no tokens")
        _check_length(pred, len(head) + len(tail), pair, "prompt + reference")
        rows.append(head + tail)
        starts.append(len(head))
    return scored_nll(pred, rows, starts, batch_size)


# ----------------------------------------------------------------------------- generation


def greedy_answers(pred: "TextPredictor", pairs: Sequence[EvalPair], max_new_tokens: int,
                   batch_size: int = 16) -> list[str]:
    """Each prompt's greedy continuation as text (the end-of-sequence token left out)."""
    from app.inference import SamplingParams, generate_tokens

    rows = []
    for pair in pairs:
        ids = prompt_ids(pred, pair.prompt)
        _check_length(pred, len(ids) + max_new_tokens, pair, f"prompt + max_new_tokens ({max_new_tokens})")
        rows.append(np.asarray(ids, dtype=np.int64))
    answers = []
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        params = [SamplingParams(max_new_tokens=max_new_tokens)] * len(chunk)  # temperature 0: greedy
        for tokens in generate_tokens(pred, chunk, params):
            if tokens and tokens[-1] in pred.stop_ids:
                tokens = tokens[:-1]
            answers.append(pred.token_text(tokens))
    return answers


# ----------------------------------------------------------------------------- one version


def evaluate_pairs(pred: "TextPredictor", pairs: Sequence[EvalPair], cfg: "EvalConfig") -> dict:
    """{"metrics": {name: overall value}, "per_prompt": {name: [one score per pair]}, "answers": [...]}.

    Overall EM / F1 are the means of the per-prompt scores; overall perplexity is token-weighted
    over all references, and its per-prompt score is that prompt's mean NLL per reference token
    (what the paired test compares: lower is better, like perplexity).
    """
    if not pairs:
        raise ValueError("no prompts to evaluate")
    metrics: dict[str, float] = {}
    per_prompt: dict[str, list[float]] = {}
    answers: list[str] | None = None
    if {"exact_match", "token_f1"} & set(cfg.metrics):
        answers = greedy_answers(pred, pairs, cfg.max_new_tokens, cfg.batch_size)
    for name in cfg.metrics:
        if name == "perplexity":
            sums = reference_nll(pred, pairs, cfg.batch_size)
            per_prompt[name] = [s / n for s, n in sums]
            metrics[name] = perplexity(sum(s for s, _ in sums), sum(n for _, n in sums))
        else:
            score = exact_match if name == "exact_match" else token_f1
            per_prompt[name] = [score(a, p.reference, cfg.normalize) for a, p in zip(answers, pairs)]
            metrics[name] = float(np.mean(per_prompt[name]))
    return {"metrics": metrics, "per_prompt": per_prompt, "answers": answers}


def lm_eval_metrics(pred: "TextPredictor", pairs: Sequence[EvalPair], cfg: "EvalConfig") -> dict[str, float]:
    """Registry metrics of one version on held-out pairs: `eval_<metric>` for each of
    `cfg.metrics`, and `eval_prompts` (how many pairs)."""
    result = evaluate_pairs(pred, pairs, cfg)
    return {**{f"eval_{k}": v for k, v in result["metrics"].items()}, "eval_prompts": float(len(pairs))}


# ----------------------------------------------------------------------------- two versions


def paired_p_value(a: Sequence[float], b: Sequence[float], n_resamples: int = 9999, seed: int = 0) -> float:
    """Two-sided p-value that versions A and B score the same on average, from per-prompt scores.

    A paired permutation (sign-flip) test of the mean difference, scipy's `permutation_test` with
    `permutation_type="samples"`: under the null each prompt's A and B scores are exchangeable, so
    every difference's sign is flipped at random (exactly, over all 2^n flips, when n is small).
    Chosen over the Wilcoxon signed-rank test because per-prompt EM scores are 0/1 and F1 scores
    are often 0 or 1: most differences are zero or tied, which Wilcoxon drops or approximates
    (all zero differences make it fail), while the sign-flip test counts them as they are: zero
    differences contribute nothing, identical scores give p = 1.0, and on 0/1 scores it is the
    exact McNemar test. It compares means, which is what the reported metric is. The seed makes
    the resampled p-value the same on every run.
    """
    from scipy.stats import permutation_test

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores need two lists of one length, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("no paired scores")
    if x.size == 1:  # both sign flips of one difference are as extreme as it: p = 1 (scipy needs two)
        return 1.0

    def mean_difference(x, y, axis):
        return np.mean(x - y, axis=axis)

    result = permutation_test((x, y), mean_difference, permutation_type="samples", vectorized=True,
                              n_resamples=n_resamples, alternative="two-sided", rng=np.random.default_rng(seed))
    return float(min(1.0, result.pvalue))


def compare_results(a: dict, b: dict) -> list[dict]:
    """Per metric of two `evaluate_pairs` results on the same pairs: A's and B's value, delta (B - A),
    the paired test's p-value over the prompts and the number of prompts."""
    rows = []
    for name in a["metrics"]:
        sa, sb = a["per_prompt"][name], b["per_prompt"][name]
        rows.append({
            "metric": name, "a": a["metrics"][name], "b": b["metrics"][name],
            "delta": b["metrics"][name] - a["metrics"][name], "p_value": paired_p_value(sa, sb),
            "prompts": len(sa), "higher_is_better": HIGHER_IS_BETTER[name],
        })
    return rows
