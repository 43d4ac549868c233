"""Checks of everything a caller hands the registry, before any SQL runs.

Each `check_*` returns its (normalized) value or raises `ValueError` naming the field and the
value, so a bad call fails the same way whether it reaches the store directly or through the
actor. Also here: the metric filter (`'val_loss<2.5'`) and time parsing, and `flatten_dict`,
the dotted-key view of a config used by `compare` and the MLflow mirror.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from actors.registry.schema import MAX_KEY_LEN
from app.config.base import MODEL_NAME_PATTERN

TRANSFORMATIONS = ("trained", "quantized", "pruned", "distilled", "tuned", "imported", "lora", "merged")
"""How a version was produced from its parent (or from nothing, for `trained`/`imported`)."""

ARTIFACT_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
"""URI schemes an artifact may live under: those `pyarrow.fs.FileSystem.from_uri` opens."""

MODEL_NAME_RE = re.compile(MODEL_NAME_PATTERN)
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_VERSION_LIKE_ALIAS_RE = re.compile(r"^[vV][0-9]+$")  # "v3" reads as version 3 (and MLflow reserves it)
FORMAT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # torch_fp32, torch_int8, onnx_fp32, onnx_int8, ...
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")  # e.g. 1.4.0, 2024-q3-rc.1, distilled+int8
URI_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_WHERE_RE = re.compile(r"^\s*(?P<key>[^\s<>=!]+)\s*(?P<op><=|>=|==|!=|<|>|=)\s*(?P<value>\S+)\s*$")
WHERE_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "=": operator.eq, "==": operator.eq, "!=": operator.ne,
}


def check_model_name(name: Any) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        raise ValueError(f"model name {name!r} is invalid: it must match {MODEL_NAME_RE.pattern}")
    return name


def check_alias(alias: Any, *, new: bool = False) -> str:
    """Alias names start with a letter; `new` (setting one) also refuses the version-like `v3`,
    which schema-v1 registries allowed, so existing ones can still be read, moved back or removed."""
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias):
        raise ValueError(
            f"alias {alias!r} is invalid: it must match {ALIAS_RE.pattern} "
            "(start with a letter, so it never looks like a version number)"
        )
    if alias.lower() == "latest":
        raise ValueError(f"alias {alias!r} is reserved: 'latest' always means the highest version number")
    if new and _VERSION_LIKE_ALIAS_RE.fullmatch(alias):
        raise ValueError(f"alias {alias!r} is reserved: it reads as a version number (and MLflow refuses it)")
    return alias


def check_format(format: Any) -> str:
    if not isinstance(format, str) or not FORMAT_RE.fullmatch(format):
        raise ValueError(f"format {format!r} is invalid: it must match {FORMAT_RE.pattern} (e.g. torch_int8)")
    return format


def check_transformation(transformation: Any) -> str:
    if transformation not in TRANSFORMATIONS:
        raise ValueError(f"transformation {transformation!r} is not one of {list(TRANSFORMATIONS)}")
    return transformation


def check_text(field: str, value: Any, *, max_len: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > max_len:
        kind = "string" if allow_empty else "non-empty string"
        raise ValueError(f"{field} must be a {kind} of at most {max_len} characters, got {value!r}")
    return value


def check_metrics(values: Any) -> dict[str, float]:
    """Metric keys are short strings; values must be finite real numbers (NaN/inf refused)."""
    if not isinstance(values, dict):
        raise ValueError(f"metrics must be a dict of name -> number, got {type(values).__name__}")
    out: dict[str, float] = {}
    for key, value in values.items():
        check_text("metric name", key, max_len=MAX_KEY_LEN)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"metric {key!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"metric {key!r} must be finite, got {value}")
        out[key] = value
    return out


def check_step(step: Any) -> int | None:
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"metric step must be a non-negative int or None, got {step!r}")
    return step


def check_params(params: Any) -> dict[str, Any]:
    """Hyperparameters: a flat dict of short keys to JSON scalars (str, int, float, bool, None)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of name -> scalar, got {type(params).__name__}")
    for key, value in params.items():
        check_text("param name", key, max_len=MAX_KEY_LEN)
        if value is not None and not isinstance(value, (str, bool, int, float)):
            raise ValueError(f"param {key!r} must be a string, number, bool or None, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"param {key!r} must be finite, got {value}")
        if isinstance(value, str) and len(value) > 6000:
            raise ValueError(f"param {key!r} is longer than 6000 characters")
    return dict(params)


def check_artifact_uri(uri: Any) -> str:
    """A local absolute path or a URI of a known filesystem scheme, with no `..` segment.

    The registry is read by other processes on other nodes, with other working directories, so
    a relative path would point somewhere else for each reader; `..` could point a version at
    files outside the folder it claims (and `%2e%2e` is decoded before that check).
    """
    check_text("artifact_uri", uri, max_len=4096)
    if any(ord(ch) < 32 for ch in uri) or "\\" in uri:
        raise ValueError(f"artifact_uri {uri!r} contains a control character or a backslash")
    if URI_SCHEME_RE.match(uri):
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme not in ARTIFACT_SCHEMES:
            raise ValueError(
                f"artifact_uri {uri!r} has scheme {scheme!r}, which is not one of {list(ARTIFACT_SCHEMES)} "
                "(a local absolute path or a pyarrow.fs URI such as s3://bucket/key)"
            )
        if parts.fragment:
            raise ValueError(f"artifact_uri {uri!r} must not have a #fragment")
        if scheme == "file":
            if parts.netloc not in ("", "localhost") or parts.query:
                raise ValueError(f"artifact_uri {uri!r}: a file:// URI must be file:///absolute/path")
        elif not parts.netloc or parts.netloc in (".", ".."):
            raise ValueError(f"artifact_uri {uri!r} names no bucket or host after {scheme}://")
        path = unquote(parts.path)
    elif Path(uri).is_absolute():
        path = uri
    else:
        raise ValueError(f"artifact_uri {uri!r} must be an absolute path or a URI such as s3://bucket/key")
    if ".." in path.split("/"):
        raise ValueError(f"artifact_uri {uri!r} contains a '..' segment (path traversal is refused)")
    return uri


def check_tags(tags: Any) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise ValueError(f"tags must be a dict of str -> str, got {type(tags).__name__}")
    for key, value in tags.items():
        check_text("tag name", key, max_len=MAX_KEY_LEN)
        if not isinstance(value, str):
            raise ValueError(f"tag {key!r} must have a string value, got {value!r}")
    return dict(tags)


def check_label(label: Any) -> str | None:
    if label is not None and (not isinstance(label, str) or not LABEL_RE.fullmatch(label)):
        raise ValueError(f"label {label!r} is invalid: it must match {LABEL_RE.pattern} (e.g. 1.4.0)")
    return label


def check_parent(parent: Any) -> dict | None:
    if parent is not None and (not isinstance(parent, dict) or set(parent) != {"model", "version"}):
        raise ValueError(f"parent must be {{'model': name, 'version': number}}, got {parent!r}")
    return parent


def config_json(config: Any) -> str | None:
    """The resolved job config as sorted compact JSON (the form stored and hashed), or None."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict (the resolved job config), got {type(config).__name__}")
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config is not JSON-serializable: {err}") from None


def parse_where(where: str | list[str] | None) -> list[tuple[str, str, float]]:
    """'val_loss<2.5' -> ('val_loss', '<', 2.5); a list means all conditions must hold."""
    if where is None:
        return []
    items = [where] if isinstance(where, str) else list(where)
    out = []
    for item in items:
        m = _WHERE_RE.match(item) if isinstance(item, str) else None
        try:
            value = float(m["value"]) if m else math.nan
        except ValueError:
            value = math.nan
        if m is None or not math.isfinite(value):
            raise ValueError(
                f"metric filter {item!r} is invalid: write METRIC OP NUMBER with OP one of "
                f"{', '.join(WHERE_OPS)} (e.g. 'val_loss<2.5')"
            )
        out.append((m["key"], m["op"], value))
    return out


def parse_time(when: Any) -> datetime:
    """A datetime or an ISO 8601 string; naive values are taken as UTC."""
    if isinstance(when, str):
        try:
            when = datetime.fromisoformat(when.strip())
        except ValueError:
            raise ValueError(f"time {when!r} is not ISO 8601 (e.g. 2025-01-31T14:00:00+00:00)") from None
    if not isinstance(when, datetime):
        raise ValueError(f"time must be a datetime or an ISO 8601 string, got {when!r}")
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def flatten_dict(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 3e-3}} -> {'train.lr': 3e-3}; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten_dict(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
