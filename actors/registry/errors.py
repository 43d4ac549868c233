"""The registry's user-facing errors; the CLI prints any of them as one line.

Each also keeps the built-in base that says what kind of failure it is, so code that
catches `LookupError` or `RuntimeError` still catches it.
"""

from __future__ import annotations

from app.errors import TemperError


class RegistryNotFound(TemperError, LookupError):
    """A model, version or alias that the registry does not have; the message names it."""


class RegistryConflict(TemperError, RuntimeError):
    """A write refused because of the registry's current state (e.g. deleting a version an alias
    points at, reusing a label); the message says what to do instead."""


class RegistrySchemaError(TemperError, RuntimeError):
    """The database's layout cannot be used by this build (newer, foreign or damaged); the message says why."""
