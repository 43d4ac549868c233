"""Instruction / chat rows (`data.format: instructions`) as token ids with completion-only labels.

A jsonl row is either a conversation or a prompt / completion pair:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}
    {"prompt": "reverse: abc\\n", "completion": "cba"}

Every row is checked as it is read (app/data/files.py's rules: a bad row names the file, the
1-based line and the field, e.g. `messages[1].role`, or is counted with `skip_bad_rows`).

Rendering (what the model reads):
- messages, with the tokenizer's chat template when the folder has one: the conversation as the
  template writes it; the tokens of each assistant turn (what the template writes for it after the
  generation prompt, usually the content and its end-of-turn token) are trained on.
- messages, without a chat template: the plain template, `<bos>` (when the tokenizer has one) then
  per turn `### System:\\n{content}\\n\\n`, `### User:\\n{content}\\n\\n` or
  `### Assistant:\\n{content}<eos>\\n\\n`; the assistant's content and `<eos>` are trained on.
- prompt / completion: `<bos>{prompt}{completion}<eos>`, no template; completion and `<eos>` trained.

Labels are -100 (cross-entropy's ignore_index) on every other token. Trained characters are known
from the rendering; the whole text is tokenized once and a token is trained when its first
character is (offsets of a fast tokenizer), so tokenization across a boundary is the real one.
An example longer than `max_length` is cut at the end; one left without a trained token is
dropped (and counted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from app.data.chat_template import PLAIN_TURN, ROLES
from app.data.files import (
    MAX_REASONS, BadRow, DataFileError, ReadResult, Splits, _jsonl_records, collect_rows, split_examples,
)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class InstructionExample:
    """One good row: `messages` ((role, content), ...) or `prompt` + `completion`."""

    messages: tuple[tuple[str, str], ...] | None
    prompt: str | None
    completion: str | None
    file: str
    line: int
    label = None  # no class label (the stats and split code read it)
    text_pair = None

    @property
    def key(self) -> tuple[str, None]:
        """What makes two rows the same example (duplicates, train/val overlap, the split hash)."""
        content = self.messages if self.messages is not None else (self.prompt, self.completion)
        return (json.dumps(content), None)


def check_instruction_row(record: dict, file: str, line: int) -> InstructionExample:
    """A record as an InstructionExample, or BadRow naming file, line and field."""

    def bad(name: str, reason: str) -> BadRow:
        return BadRow(f"{file}:{line}: field {name!r}: {reason}")

    def text(value, name: str) -> str:
        if value is None:
            raise bad(name, "missing")
        if not isinstance(value, str):
            raise bad(name, f"expected a string, got {type(value).__name__} {value!r:.40}")
        if not value.strip():
            raise bad(name, "empty text")
        return value

    has_messages, has_pair = "messages" in record, "prompt" in record or "completion" in record
    if has_messages and has_pair:
        raise bad("messages", "a row holds either messages or prompt + completion, not both")
    if not has_messages and not has_pair:
        raise bad("messages", "missing (a row holds messages, or prompt + completion)")
    if has_pair:
        return InstructionExample(None, text(record.get("prompt"), "prompt"), text(record.get("completion"), "completion"),
                                  file, line)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"expected a non-empty list of {{role, content}}, got {messages!r:.60}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"expected an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role is None:
            raise bad(f"messages[{i}].role", "missing")
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"unknown role {role!r:.40} (roles: {', '.join(ROLES)})")
        turns.append((role, text(m.get("content"), f"messages[{i}].content")))
    if not any(role == "assistant" for role, _ in turns):
        raise bad("messages", "no assistant turn: nothing to train on")
    return InstructionExample(tuple(turns), None, None, file, line)


def read_instructions(path: str | Path, *, skip_bad_rows: bool = False) -> ReadResult:
    """All good rows of one jsonl file; a bad row raises DataFileError unless `skip_bad_rows`."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    return collect_rows(path, _jsonl_records(path, None), lambda record, line: check_instruction_row(record, str(path), line),
                        skip_bad_rows)


def instruction_splits(cfg) -> Splits:
    """Train and val examples of a `data.format: instructions` section (a FileDataConfig)."""
    bad, reasons = 0, []

    def read(p: str) -> list[InstructionExample]:
        nonlocal bad
        result = read_instructions(p, skip_bad_rows=cfg.skip_bad_rows)
        bad += result.bad_rows
        reasons.extend(result.reasons[: MAX_REASONS - len(reasons)])
        return result.examples

    if cfg.path is not None:
        train, val = split_examples(read(cfg.path), cfg.val_fraction, cfg.seed)  # type: ignore[arg-type]
    else:
        train, val = read(cfg.train_path), read(cfg.val_path)
    return Splits(train=train, val=val, labels=None, bad_rows=bad, reasons=reasons)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Rendering and tokenization


def render(ex: InstructionExample, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(the text the model reads, the character spans [start, end) that are trained on)."""
    eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
    if ex.messages is None:
        return bos + ex.prompt + ex.completion + eos, [(len(bos) + len(ex.prompt), len(bos) + len(ex.prompt) + len(ex.completion) + len(eos))]
    if getattr(tokenizer, "chat_template", None):
        return _render_with_template(ex, tokenizer)
    text, spans = bos, []
    for role, content in ex.messages:
        if role == "assistant":
            text += PLAIN_TURN["assistant"]
            spans.append((len(text), len(text) + len(content) + len(eos)))
            text += content + eos + "\n\n"
        else:
            text += PLAIN_TURN[role].format(content)
    return text, spans


def _render_with_template(ex: InstructionExample, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's text; an assistant turn's span is what rendering it adds after the
    conversation so far plus the generation prompt (the template must render turns as prefixes)."""
    messages = [{"role": role, "content": content} for role, content in ex.messages]

    def apply(upto: int, prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)
        except Exception as e:  # jinja2's TemplateError and the template's own raise_exception
            raise DataFileError(f"{ex.file}:{ex.line}: field 'messages': the tokenizer's chat template refused "
                                f"the conversation: {e}") from None

    spans = []
    for i, (role, _) in enumerate(ex.messages):
        if role != "assistant":
            continue
        before, through = apply(i, True), apply(i + 1, False)
        if not through.startswith(before):
            raise DataFileError(
                f"{ex.file}:{ex.line}: field 'messages[{i}]': the tokenizer's chat template does not render the "
                "conversation up to an assistant turn (with the generation prompt) as the start of the conversation "
                "through that turn, so the turn's tokens cannot be told apart; use prompt / completion rows"
            )
        spans.append((len(before), len(through)))
    return apply(len(messages), False), spans


def encode(ex: InstructionExample, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one example, cut to max_length; labels -100 outside the trained spans."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataFileError(f"data.format 'instructions' needs a fast tokenizer (tokenizer.json in the model folder): "
                            f"{type(tokenizer).__name__} gives no character offsets")
    text, spans = render(ex, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = enc["input_ids"][:max_length]
    labels = [tid if any(a <= start < b for a, b in spans) else IGNORE_INDEX
              for tid, (start, _) in zip(ids, enc["offset_mapping"][:max_length])]
    return ids, labels


@dataclass
class EncodedInstructions:
    """Token ids and labels per example; `dropped`: examples left without a trained token by max_length."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    dropped: int = 0
    lengths: list[int] = field(default_factory=list)  # before truncation, for the stats


def encode_all(examples: list[InstructionExample], tokenizer, max_length: int) -> EncodedInstructions:
    out = EncodedInstructions([], [])
    for ex in examples:
        ids, labels = encode(ex, tokenizer, 10**9)
        out.lengths.append(len(ids))
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels[1:]):  # the first token is never a target
            out.dropped += 1
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
    return out


def completion_share(enc: EncodedInstructions) -> float:
    """Share of the (truncated) tokens that are trained on."""
    total = sum(len(ids) for ids in enc.input_ids)
    return sum(t != IGNORE_INDEX for labels in enc.labels for t in labels) / max(total, 1)


def pack_rows(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Examples (by index) grouped into rows of at most max_length tokens: taken in a seeded
    shuffled order, each goes to the first row it fits in (first-fit), so a row holds whole examples."""
    order = np.random.default_rng([seed, 0x9ACC]).permutation(len(lengths))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order.tolist():
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return rows


def batch(enc: EncodedInstructions, rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, 2, T) = input_ids and the attention-mask row, targets (B, T): the next token's label.

    A row of several examples (packing) carries segment numbers 1, 2, ... in the mask row instead
    of 1s (0 = padding); app/models/hf_task.py turns them into a block-diagonal causal mask and
    positions restarting per example. The target of an example's last token is -100: the next
    token belongs to another example."""
    from app.models.hf_task import pack

    width = max(sum(len(enc.input_ids[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for segment, i in enumerate(row, start=1):
            n = len(enc.input_ids[i])
            ids[b, t:t + n] = torch.tensor(enc.input_ids[i])
            mask[b, t:t + n] = segment
            target[b, t:t + n - 1] = torch.tensor(enc.labels[i][1:], dtype=torch.long)
            t += n
    return pack(ids, mask), target
