"""Python's standard-library docstrings as text examples: unlabeled text that ships with Python.

Every module, class and function docstring of 40+ characters (whitespace collapsed) under the
standard library's root, tests and site-packages left out. Files are read in the order of a hash
of their path relative to that root, docstrings in source order, each distinct text once: a fixed
sequence for a given Python, whatever order the filesystem lists files in. Callers take as many
texts as they need from its start, so a sample of a thousand parses a fifth of the files (the
whole library, ~7,000 docstrings in ~740 files, takes seconds).

`data: {kind: docstrings, max_texts, max_length, val_fraction, seed}` reads them as a train / val
split (by a hash of each text, as for a single data file); benchmarks/embeddings.py embeds them.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from app.config.data import DocstringsDataConfig
from app.data.files import DataFileError, Example, Splits, split_examples

MIN_CHARS = 40
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _library_files(root: Path) -> list[Path]:
    """The library's .py files (no tests, no site-packages), in the order of a hash of their relative path."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages") or any(part.startswith("test") for part in rel):
            continue
        files.append(path)
    return sorted(files, key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest())


def stdlib_docstrings() -> Iterator[Example]:
    """The standard library's docstrings in their fixed order (see the module docstring); `file`
    is the path relative to the library root, `line` where the documented object starts."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for path in _library_files(root):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few library files are templates or in other encodings
        rel = path.relative_to(root).as_posix()
        # ast.walk is breadth first: order the documented nodes by position instead
        nodes = sorted((n for n in ast.walk(tree) if isinstance(n, _DOCUMENTED)), key=lambda n: getattr(n, "lineno", 0))
        for node in nodes:
            doc = ast.get_docstring(node)
            text = " ".join(doc.split()) if doc else ""
            if len(text) >= MIN_CHARS and text not in seen:
                seen.add(text)
                yield Example(text=text, text_pair=None, label=None, file=rel, line=getattr(node, "lineno", 1))


@lru_cache(maxsize=4)
def docstring_examples(max_texts: int) -> tuple[Example, ...]:
    """The first `max_texts` docstrings of `stdlib_docstrings`."""
    examples = tuple(itertools.islice(stdlib_docstrings(), max_texts))
    if len(examples) < max_texts:
        raise DataFileError(f"data.max_texts: this Python's standard library has {len(examples)} docstrings, "
                            f"{max_texts} asked")
    return examples


def docstring_splits(cfg: DocstringsDataConfig) -> Splits:
    """Train and val docstrings of a `kind: docstrings` section (no labels)."""
    train, val = split_examples(list(docstring_examples(cfg.max_texts)), cfg.val_fraction, cfg.seed)
    return Splits(train=train, val=val, labels=None)
