"""What every config section shares: the `Section` base, `ConfigError`, YAML loading with
`key.sub=value` overrides, one-line-per-key validation messages, and the content hash.

Overrides are parsed as YAML, so `train.lr=3e-4`, `train.steps=10` and
`serve.keep_serving=true` carry types.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, StringConstraints, ValidationError

from app.errors import TemperError

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A registry model name (also a run name): it becomes part of folder names and URLs."""

VERSION_REF_PATTERN = r"^([0-9]{1,9}|[A-Za-z][A-Za-z0-9_-]{0,63})$"
"""A reference to one version of a model: a version number, an alias, or `latest`."""


def _version_number_as_text(value: Any) -> Any:
    # YAML and `key=value` overrides read `source=3` as the int 3; a version reference is text.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


VersionRef = Annotated[str, BeforeValidator(_version_number_as_text), StringConstraints(pattern=VERSION_REF_PATTERN)]
"""A config field holding a version reference (`3`, `production`, `latest`)."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, docstrings become field docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class ConfigError(TemperError, ValueError):
    """A config that cannot be loaded; the message names the offending key."""


def set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set `value` at a dotted key path of a config tree; a digit indexes a list (`serve.models.0.port`)."""
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i + 1])} is not an index of a list of {len(node)}")
            node = node[int(key)]
            continue
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i + 1])} is a value, not a section")
        node = nxt
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {dotted!r}: {last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        set_path(tree, key, yaml.safe_load(raw) if raw != "" else "")
    return tree


def read_config_tree(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read a YAML job file and apply `key.sub=value` overrides (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(tree, dict):
        apply_overrides(tree, overrides or [])
    return tree


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each starting with the dotted key it concerns."""
    lines = []
    for e in err.errors():
        # Discriminated unions put the tag in the path (model.gpt.n_head): drop it.
        loc = ".".join(str(p) for p in e["loc"] if p not in ("gpt", "vit", "hf", "builtin-data", "file-data", "docstrings-data", "magnitude_pruning", "early_stopping")) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of the schema)"
        if loc == "<root>" and re.match(r"[a-z_]+[a-z0-9_.\[\]]*[ :]", msg):
            lines.append(msg)  # a check across sections: its message starts with the key it concerns
            continue
        lines.append(f"{loc}: {msg}")
    return "\n".join(lines)


def tree_hash(tree: dict) -> str:
    """Content hash of a JSON-able tree: sha256 of its sorted, compact JSON, 16 hex characters."""
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_hash(cfg: BaseModel) -> str:
    """Content hash of a resolved config, the id written next to every artifact."""
    return tree_hash(cfg.model_dump(mode="json"))
