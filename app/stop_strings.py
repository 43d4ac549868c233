"""Stop strings of a generation: where one starts in the generated text (the text is cut there,
the stop string left out), and how much of a growing text a stream may show without ever
showing (part of) a stop string. Pure string functions: the replica (which ends a row at a stop
string) and the ingress (which streams the text, and imports no torch) share them.
"""

from __future__ import annotations


def find_stop(text: str, stops: tuple[str, ...] | list[str]) -> int | None:
    """Where the earliest stop string starts in `text` (None when none occurs): the generated
    text is cut there, the stop string itself left out."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def visible_text(text: str, stops: tuple[str, ...] | list[str], final: bool) -> tuple[str, bool]:
    """(the part of a growing generated `text` that can be handed out, whether a stop string
    ended it). Streaming holds back a tail that may still grow into a stop string (the longest
    suffix that is a prefix of one), so no stop text is ever shown; `final` hands out the rest."""
    cut = find_stop(text, stops)
    if cut is not None:
        return text[:cut], True
    if final:
        return text, False
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold], False
