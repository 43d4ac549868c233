"""Chat messages as one prompt text, the same way for serving (`/v1/chat/completions`) and for
fine-tuning on chat data.

With a tokenizer that carries a chat template (`tokenizer.chat_template`, from the folder's
`tokenizer_config.json` or `chat_template.jinja`) the text is that template's rendering
(`apply_chat_template(..., tokenize=False)`), which usually holds the model's own special
tokens: tokenize it with `add_special_tokens=False`.

Without one (a tokenizer with no template, or the byte-level GPT, `tokenizer=None`) the plain
template is used, the one fine-tuning on chat rows uses too (so a model tuned on it is served
the same text): the tokenizer's bos token, then per message

    ### System:\n{content}\n\n      ### User:\n{content}\n\n      ### Assistant:\n{content}{eos}\n\n

and an open `### Assistant:\n` for the answer when `add_generation_prompt`. The bos and eos
tokens are part of the text here too: tokenize it with `add_special_tokens=False` in both cases.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
PLAIN_TURN = {"system": "### System:\n{}\n\n", "user": "### User:\n{}\n\n", "assistant": "### Assistant:\n"}
"""The plain template's turn headers; an assistant turn is its header, the content, eos and a blank line."""


class ChatFormatError(ValueError):
    """A message list that cannot be rendered; `field` names the offending place (`messages.2.role`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def check_messages(messages: list) -> list[dict[str, str]]:
    """`messages` as [{role, content}] with text contents (OpenAI's content parts of type text
    joined); raises ChatFormatError naming the message and key."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"messages.{i}", "must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"messages.{i}.role", f"{role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, list):  # content parts: only text ones can be rendered
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ChatFormatError(f"messages.{i}.content", "only text content parts ({type: text, text}) are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ChatFormatError(f"messages.{i}.content", "must be a string")
        out.append({"role": role, "content": content})
    return out


def uses_own_template(tokenizer) -> bool:
    """Whether `render_chat` renders with the tokenizer's own chat template."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list, add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` (see the module docstring)."""
    messages = check_messages(messages)
    if uses_own_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    bos = (getattr(tokenizer, "bos_token", None) or "") if tokenizer is not None else ""
    eos = (getattr(tokenizer, "eos_token", None) or "") if tokenizer is not None else ""
    text = bos
    for m in messages:
        if m["role"] == "assistant":
            text += PLAIN_TURN["assistant"] + m["content"] + eos + "\n\n"
        else:
            text += PLAIN_TURN[m["role"]].format(m["content"])
    return text + (PLAIN_TURN["assistant"] if add_generation_prompt else "")
