"""Where the CLI's output goes: results on stdout, and with `--json` nothing but the JSON there
(our progress lines and the worker output Ray forwards go to stderr meanwhile); a user's
mistake as one line on stderr."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO


@contextlib.contextmanager
def results_stream(json_only: bool) -> Iterator[TextIO]:
    """Yields the stream a verb prints its result to (this process's stdout). With `json_only`,
    everything else printed meanwhile goes to stderr: `sys.stdout` is swapped for the whole
    process, which includes the thread that prints the lines Ray forwards from workers."""
    out = sys.stdout
    if not json_only:
        yield out
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield out


def error_message(err: BaseException) -> str:
    """The error's own message. An exception raised inside a Ray actor or task reaches the
    driver wrapped with the remote traceback; its `cause` is the original exception."""
    return str(getattr(err, "cause", None) or err).strip()
