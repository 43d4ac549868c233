"""Where registered artifacts may live: `registry.artifact_roots`.

A root is an absolute local folder or a URI prefix (`s3://bucket/prefix`). An artifact is under a
root when its path, after following symlinks (a folder inside the root may link elsewhere), is the
root or lies below it; URIs compare scheme, bucket and path segments, so `s3://b/runs` does not
admit `s3://b/runs-other/x`. No roots: no restriction.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from app.errors import TemperError


class ArtifactOutsideRootsError(TemperError, ValueError):
    """An artifact URI outside every configured root; the message names the URI and the roots."""


def is_uri(value: str) -> bool:
    return "://" in value and not value.startswith("file://")


def normalize_artifact_root(root: str) -> str:
    """A root as stored: an absolute, symlink-free local path, or a URI prefix without a trailing slash."""
    if not isinstance(root, str) or not root.strip():
        raise ValueError("registry.artifact_roots: an empty root")
    if is_uri(root):
        parts = urlsplit(root)
        if not parts.netloc:
            raise ValueError(f"registry.artifact_roots: {root!r} names no bucket or host")
        return f"{parts.scheme.lower()}://{parts.netloc}{parts.path.rstrip('/')}"
    return os.path.realpath(os.path.abspath(os.path.expanduser(root.removeprefix("file://"))))


def check_under_roots(uri: str, roots: list[str] | tuple[str, ...]) -> None:
    """Raise ArtifactOutsideRootsError unless `uri` lies under one of `roots` (none: any)."""
    if not roots:
        return
    if is_uri(uri):
        parts = urlsplit(uri)
        target = f"{parts.scheme.lower()}://{parts.netloc}{unquote(parts.path)}"
        inside = any(target == r or target.startswith(r + "/") for r in roots if is_uri(r))
    else:
        local = Path(os.path.realpath(unquote(uri.removeprefix("file://"))))
        inside = any(local.is_relative_to(r) for r in roots if not is_uri(r))
    if not inside:
        raise ArtifactOutsideRootsError(
            f"artifact_uri {uri!r} is outside registry.artifact_roots {list(roots)}: refused"
        )
