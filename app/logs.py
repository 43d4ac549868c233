"""Machine-readable event lines: one per served request (the ingress) and one per training
report (rank 0), as a JSON object on one line, or `event key=value ...` for humans.

Only fields named by the caller are written, and callers pass no credentials: request lines
carry the request id, route, model, version, backend, status, latency and batch size, never
headers, query strings or bodies.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Literal

LogFormat = Literal["json", "text", "off"]
LOG_FORMAT_ENV = "TEMPER_LOG_FORMAT"
"""Environment variable choosing the format of training's progress and report lines: text (the
default, for people), json (one object per line) or off."""


def format_event(event: str, fields: dict[str, Any], fmt: LogFormat = "json") -> str:
    """One line: `{"event": ..., **fields}` as compact JSON, or `event k=v k=v` (None fields left out)."""
    if fmt == "json":
        return json.dumps({"event": event, **fields}, separators=(",", ":"), default=str)
    return " ".join([event] + [f"{k}={v}" for k, v in fields.items() if v is not None])


def env_format(default: LogFormat = "json") -> LogFormat:
    """The format `TEMPER_LOG_FORMAT` asks for (`default` when unset); an unknown value is a ValueError naming it."""
    value = os.environ.get(LOG_FORMAT_ENV, default).strip().lower() or default
    if value not in ("json", "text", "off"):
        raise ValueError(f"{LOG_FORMAT_ENV}={value!r}: expected json, text or off")
    return value  # type: ignore[return-value]


def line_logger(name: str) -> logging.Logger:
    """A logger that writes each record's message alone on its own line to stderr (no level or
    time prefix: the line is the event), at INFO, not passed on to the root logger's handlers."""
    logger = logging.getLogger(name)
    if not any(getattr(h, "_temper_lines", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._temper_lines = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def emit(logger: logging.Logger, event: str, fields: dict[str, Any], fmt: LogFormat) -> None:
    """Log one event line at INFO (nothing when `fmt` is off)."""
    if fmt != "off":
        logger.info(format_event(event, fields, fmt))
