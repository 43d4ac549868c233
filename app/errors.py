"""The one base class of Temper's own errors.

Every mistake a user can make (a bad config key, a missing model or version, an artifact that
cannot be read) raises a subclass of `TemperError`; the CLI turns any of them into one line on
stderr and a non-zero exit, never a traceback. Subclasses keep the built-in base that matches
their meaning too (`ValueError` for bad input, `LookupError` for a missing thing), so callers
that catch those still work.
"""

from __future__ import annotations


class TemperError(Exception):
    """A user-facing error: its message is complete and is shown as is."""
