"""Prompt / reference pairs for evaluating a causal LM, read from a JSONL file.

Each line is one JSON object in one of two shapes:
- `{"prompt": "...", "completion": "..."}`: the completion is the reference answer;
- `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`: a chat whose
  last turn is the assistant's reference answer; the turns before it are the prompt (rendered
  with the model's chat template when generating).

A bad line is an error naming the file, the 1-based line and the field (`messages[2].role`).
Blank lines are skipped. Nothing is truncated or deduplicated: every pair is one prompt of the
evaluation, in file order, so two versions are scored on exactly the same list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from app.data.chat_template import ROLES
from app.data.files import DataFileError


@dataclass(frozen=True)
class EvalPair:
    """One prompt and its reference. `prompt` is a string (prompt/completion rows) or the chat
    turns before the reference, as ({"role", "content"}, ...) (messages rows)."""

    prompt: str | tuple[dict[str, str], ...]
    reference: str
    line: int


def _text(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        raise DataFileError(f"{where}: field {name!r}: missing")
    if not isinstance(value, str):
        raise DataFileError(f"{where}: field {name!r}: expected a string, got {type(value).__name__} {value!r:.40}")
    return value


def _chat(messages: object, where: str) -> tuple[tuple[dict[str, str], ...], str]:
    """(the turns before the last, the last turn's content) of a messages list, checked."""
    if not isinstance(messages, list):
        raise DataFileError(f"{where}: field 'messages': expected a list of turns, got {type(messages).__name__}")
    if len(messages) < 2:
        raise DataFileError(f"{where}: field 'messages': needs at least one turn before the final assistant turn, "
                            f"got {len(messages)} turn(s)")
    turns = []
    for i, turn in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise DataFileError(f"{where}: field {field!r}: expected an object with role and content, "
                                f"got {type(turn).__name__}")
        extra = sorted(set(turn) - {"role", "content"})
        if extra:
            raise DataFileError(f"{where}: field '{field}.{extra[0]}': unknown key (a turn has role and content)")
        role = turn.get("role")
        if role not in ROLES:
            raise DataFileError(f"{where}: field '{field}.role': expected one of {', '.join(ROLES)}, got {role!r}")
        content = turn.get("content")
        if not isinstance(content, str):
            raise DataFileError(f"{where}: field '{field}.content': expected a string, got {type(content).__name__}")
        turns.append({"role": role, "content": content})
    last = len(turns) - 1
    if turns[-1]["role"] != "assistant":
        raise DataFileError(f"{where}: field 'messages[{last}].role': the last turn is the reference answer and "
                            f"must be 'assistant', got {turns[-1]['role']!r}")
    if not turns[-1]["content"].strip():
        raise DataFileError(f"{where}: field 'messages[{last}].content': empty reference answer")
    return tuple(turns[:-1]), turns[-1]["content"]


def parse_eval_pair(record: object, file: str, line: int) -> EvalPair:
    """One JSON value as an EvalPair, or DataFileError naming file, line and field."""
    where = f"{file}:{line}"
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise DataFileError(f"{where}: field 'messages': give either messages or prompt + completion, not both")
        extra = sorted(set(record) - {"messages"})
        if extra:
            raise DataFileError(f"{where}: field {extra[0]!r}: unknown key in a messages row")
        prompt, reference = _chat(record["messages"], where)
        return EvalPair(prompt, reference, line)
    if "prompt" not in record and "completion" not in record:
        raise DataFileError(f"{where}: field 'prompt': missing (a row is prompt + completion, or messages); "
                            f"keys: {', '.join(sorted(record)) or 'none'}")
    extra = sorted(set(record) - {"prompt", "completion"})
    if extra:
        raise DataFileError(f"{where}: field {extra[0]!r}: unknown key in a prompt/completion row")
    prompt, reference = _text(record, "prompt", where), _text(record, "completion", where)
    if not prompt.strip():
        raise DataFileError(f"{where}: field 'prompt': empty text")
    if not reference.strip():
        raise DataFileError(f"{where}: field 'completion': empty reference answer")
    return EvalPair(prompt, reference, line)


def read_eval_pairs(path: str | Path) -> list[EvalPair]:
    """Every pair of a JSONL file, in order; the first bad line raises DataFileError."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    pairs = []
    try:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFileError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                pairs.append(parse_eval_pair(record, str(path), line_no))
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not pairs:
        raise DataFileError(f"{path}: no prompt/reference rows")
    return pairs
