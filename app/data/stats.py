"""The numbers `data stats` shows before training: sizes, token lengths, labels, duplicates, leaks.

Token lengths are counted without truncation (with the special tokens the model adds), so
"over max_length" says how many examples training would cut. Percentiles are nearest-rank
(always a length that occurs). Duplicates and the train/val overlap compare exact
(text, text_pair) contents.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from app.data.files import Example

PERCENTILES = (50, 90, 99)


def token_lengths(examples: list[Example], tokenizer) -> list[int]:
    """Token count of each example as the model would see it before truncation."""
    if not examples:
        return []
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair for ex in examples] if examples[0].text_pair is not None else None
    # verbose=False: no "longer than the maximum" warning; counting long texts is the point
    enc = tokenizer(texts, pairs, truncation=False, padding=False, verbose=False)
    return [len(ids) for ids in enc["input_ids"]]


def split_stats(examples: list[Example], lengths: list[int], max_length: int) -> dict:
    """Rows, length percentiles, over-length count, label counts and duplicates of one split."""
    counts = Counter(ex.key for ex in examples)
    arr = np.asarray(lengths, dtype=np.int64)
    tokens = {f"p{q}": int(np.percentile(arr, q, method="inverted_cdf")) for q in PERCENTILES} if len(arr) else {}
    tokens["max"] = int(arr.max()) if len(arr) else 0
    labels = Counter(ex.label for ex in examples if ex.label is not None)
    return {
        "rows": len(examples),
        "tokens": tokens,
        "over_max_length": int((arr > max_length).sum()),
        "labels": dict(sorted(labels.items())),
        # rows that repeat an earlier row, and how many distinct contents repeat
        "duplicate_rows": sum(n - 1 for n in counts.values()),
        "duplicated_texts": sum(1 for n in counts.values() if n > 1),
    }


def data_stats(train: list[Example], val: list[Example], tokenizer, max_length: int) -> dict:
    """{'max_length', 'train': split_stats, 'val': split_stats, 'overlap': {...}}.

    overlap.val_rows: val rows whose content also occurs in train; overlap.distinct_texts: how
    many distinct contents are on both sides.
    """
    train_keys = {ex.key for ex in train}
    shared = train_keys & {ex.key for ex in val}
    return {
        "max_length": max_length,
        "train": split_stats(train, token_lengths(train, tokenizer), max_length),
        "val": split_stats(val, token_lengths(val, tokenizer), max_length),
        "overlap": {
            "val_rows": sum(1 for ex in val if ex.key in train_keys),
            "distinct_texts": len(shared),
        },
    }


def instruction_stats(train: list, val: list, tokenizer, max_length: int) -> dict:
    """`data_stats` of instruction rows (app/data/instructions.py): lengths of the rendered
    examples, and per split `completion_token_share` (trained tokens / all tokens, after cutting to
    max_length) and `dropped_no_completion` (examples max_length leaves without a trained token)."""
    from app.data.instructions import completion_share, encode_all

    out = {"max_length": max_length}
    for name, examples in (("train", train), ("val", val)):
        enc = encode_all(examples, tokenizer, max_length)
        out[name] = {**split_stats(examples, enc.lengths, max_length),
                     "completion_token_share": round(completion_share(enc), 4), "dropped_no_completion": enc.dropped}
    train_keys = {ex.key for ex in train}
    out["overlap"] = {"val_rows": sum(1 for ex in val if ex.key in train_keys),
                      "distinct_texts": len(train_keys & {ex.key for ex in val})}
    return out


def format_stats(stats: dict) -> str:
    """A plain-text table of `data_stats`' result, one column per split."""
    train, val = stats["train"], stats["val"]
    rows: list[tuple[str, object, object]] = [
        ("rows", train["rows"], val["rows"]),
        *((f"tokens {key}", train["tokens"].get(key, "-"), val["tokens"].get(key, "-")) for key in (
            *(f"p{q}" for q in PERCENTILES), "max")),
        (f"over max_length ({stats['max_length']})", train["over_max_length"], val["over_max_length"]),
        ("duplicate rows", train["duplicate_rows"], val["duplicate_rows"]),
        ("duplicated texts", train["duplicated_texts"], val["duplicated_texts"]),
    ]
    for key in ("completion_token_share", "dropped_no_completion"):
        if key in train:
            rows.append((key.replace("_", " "), train[key], val[key]))
    for label in sorted(set(train["labels"]) | set(val["labels"])):
        rows.append((f"label {label}", train["labels"].get(label, 0), val["labels"].get(label, 0)))
    rows.append(("val rows also in train", "", stats["overlap"]["val_rows"]))
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'':<{width}}  {'train':>9}  {'val':>9}"]
    lines += [f"{name:<{width}}  {a!s:>9}  {b!s:>9}" for name, a, b in rows]
    return "\n".join(lines)
