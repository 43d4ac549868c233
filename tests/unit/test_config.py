"""Config validation: every malformed config is refused with an error naming its key."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from app.config.base import MODEL_NAME_PATTERN, ConfigError, apply_overrides, config_hash, tree_hash
from app.config.formats import FORMATS, ArtifactFormat, CompressMethod
from app.config.jobs import JOB_KINDS, OptimizeJob, load_config, parse_config
from app.config.reference import config_reference
from app.config.serve import ServedModel
from app.errors import TemperError

ROOT = Path(__file__).resolve().parents[2]
BASE = {"name": "t", "model": {"kind": "vit"}, "data": {"name": "digits"}}


def with_(patch: dict) -> dict:
    tree = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in patch.items():
        apply_overrides(tree, [f"{dotted}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"])
    return tree


MALFORMED = [
    (with_({"train.lrr": 0.1}), "train.lrr", "unknown key"),
    (with_({"train.steps": -5}), "train.steps", "greater than or equal to 0"),
    (with_({"model.n_head": 5}), "model.n_head", "must divide"),
    (with_({"train.precision": "fp8"}), "train.precision", "fp32"),
    (with_({"train.precision": "fp16"}), "train.precision", "needs CUDA"),
    (with_({"data.name": "imagenet"}), "data.name", "lm-code"),
    (with_({"model.kind": "gpt"}), "model.kind", "does not fit data.name"),
    (with_({"serve.models": [{"model": "t", "max_batch_size": 64, "max_ongoing_requests": 8}]}), "max_ongoing_requests", ">= max_batch_size"),
    (with_({"train.checkpoint_every": 30, "train.eval_every": 20}), "train.checkpoint_every", "multiple of train.eval_every"),
    (with_({"registry.db_url": "registry.db"}), "registry.db_url", "SQLAlchemy URL"),
    (with_({"compress.methods": ["gzip"]}), "compress.methods.0", "torch_int8"),
    ({"model": {"kind": "vit"}, "data": {"name": "digits"}}, "name", "Field required"),
    # types and ranges
    (with_({"train.batch_size": 0}), "train.batch_size", "greater than or equal to 1"),
    (with_({"train.num_workers": "two"}), "train.num_workers", "valid integer"),
    (with_({"train.lr": 0}), "train.lr", "greater than 0"),
    (with_({"train.strategy": "tp"}), "train.strategy", "'zero3'"),
    (with_({"train.cpus_per_worker": 0}), "train.cpus_per_worker", "greater than 0"),
    (with_({"model.d_model": 0}), "model.d_model", "greater than or equal to 8"),
    (with_({"compress.max_quality_drop": -1}), "compress.max_quality_drop", "greater than or equal to 0"),
    (with_({"compress.methods": []}), "compress.methods", "at least 1 item"),
    (with_({"serve.port": 70000}), "serve.port", "less than or equal to 65535"),
    (with_({"serve.host": ""}), "serve.host", "at least 1 character"),
    (with_({"storage_path": ""}), "storage_path", "at least 1 character"),
    (with_({"name": "has space"}), "name", "String should match pattern"),
    (with_({"serve.models": [{"model": "t", "batch_wait_timeout_s": -1}]}), "serve.models.0.batch_wait_timeout_s", "greater than or equal to 0"),
    (with_({"serve.models": [{"model": "t", "version": "newest!"}]}), "serve.models.0.version", "pattern"),
    (with_({"registry.db_url": "mysql://x"}), "registry.db_url", "'mysql' is not supported"),
    (with_({"auth": {"key_secret_env": "lower"}}), "auth.key_secret_env", "pattern"),
    # unknown keys and names
    (with_({"trainn": {}}), "trainn", "unknown key"),
    (with_({"train.callbacks": [{"name": "early_stop"}]}), "train.callbacks.0", "'early_stopping'"),
    (with_({"train.callbacks": [{"name": "early_stopping", "patience": 0}]}), "train.callbacks.0.patience", "greater than or equal to 1"),
    # combinations within and across sections
    (with_({"train.warmup_steps": 500}), "train.warmup_steps", "must be < train.steps"),
    (with_({"train.offload_params": True}), "train.offload_params", "needs train.strategy 'zero3'"),
    (with_({"train.callbacks": [{"name": "magnitude_pruning", "kind": "2:4", "final_sparsity": 0.7}]}), "final_sparsity", "must be 0.5 for kind '2:4'"),
    (with_({"train.callbacks": [{"name": "magnitude_pruning", "start_step": 500}]}), "train.callbacks.0", "need start_step (500) < end_step"),
    (with_({"train.callbacks": [{"name": "magnitude_pruning", "targets": "(["}]}), "targets", "not a valid regex"),
    (with_({"train.steps": 0}), "train.steps 0", "needs model.kind 'hf'"),
    (with_({"model.patch_size": 3}), "model.patch_size", "must divide model.image_size"),
    (with_({"model.kind": "hf"}), "model.path", "Field required"),
    (with_({"tune": {"search_space": {"train.lr": {"type": "loguniform", "low": 1, "high": 0.1}}}}), "tune.search_space.train.lr", "must be < high"),
    (with_({"tune": {"search_space": {"train.nope": {"type": "choice", "values": [1]}}}}), "tune.search_space.train.nope", "not a key of this job's config"),
    (with_({"tune": {"search_space": {}}}), "tune.search_space", "at least 1 item"),
]


@pytest.mark.parametrize("tree,key,fragment", MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_config_names_the_key(tree, key, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config("run", tree)
    text = str(err.value)
    assert key in text, text
    assert fragment in text, text


def test_malformed_configs_exit_2_through_the_cli_naming_the_key(tmp_path, capsys):
    """Every MALFORMED tree as a file given to `python -m app validate run` (the CLI's own entry,
    in this process): exit status 2, the key on stderr, nothing on stdout."""
    from app.cli.main import main

    assert len(MALFORMED) >= 30
    for i, (tree, key, _) in enumerate(MALFORMED):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(tree))
        assert main(["validate", "run", str(path)]) == 2, tree
        out, err = capsys.readouterr()
        assert key in err and not out, (tree, err)


def test_valid_config_resolves_defaults_and_hash_is_stable():
    a = parse_config("run", with_({}))
    b = parse_config("run", with_({}))
    assert isinstance(a, OptimizeJob) and a.train.num_workers == 2
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(parse_config("run", with_({"train.lr": 0.01})))


def test_overrides_carry_types_and_reach_lists(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "serve": {"models": [{"model": "t"}]}}))
    job = load_config("run", path, ["train.lr=3e-4", "train.steps=70", "serve.models.0.max_batch_size=4"])
    assert job.train.lr == pytest.approx(3e-4) and job.train.steps == 70
    assert job.serve.models[0].max_batch_size == 4
    with pytest.raises(ConfigError, match="serve.models.5"):
        load_config("run", path, ["serve.models.5.model=x"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("run", path, ["train.lr"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_and_name_their_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run: python -m app run configs/" + path.name)
    load_config("run", path)


def test_cli_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_({"train.batch_size": 0})))
    proc = subprocess.run([sys.executable, "-m", "app", "validate", "run", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "train.batch_size" in proc.stderr


def test_readme_config_reference_is_in_sync():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- generated by `python -m app schema`.*?(?=\n<!-- end of generated reference -->)", readme, re.S)
    assert m, "README.md lacks the generated configuration reference"
    assert m.group(0).strip() == config_reference().strip(), "README reference is stale: paste `python -m app schema`"


# ----------------------------------------------------------------------------- job files and verbs

VERB_KINDS = {"run": "run", "train": "train", "compress": "compress", "tune": "tune", "serve": "serve"}


def header_verbs(path: Path) -> set[str]:
    """Job kinds named by the commands in a config's header comment (`serve status|deploy` is `serve`)."""
    verbs = set()
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        for m in re.finditer(r"python -m app ([a-z|]+)", line):
            verbs.update(VERB_KINDS[v] for v in m.group(1).split("|") if v in VERB_KINDS)  # not `registry alias`
    return verbs


SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))
VERB_CASES = [(p, kind) for p in SHIPPED for kind in sorted(header_verbs(p) | ({"run"} if p.parent.name == "configs" else set()))]


@pytest.mark.parametrize("path,kind", VERB_CASES, ids=[f"{k}-{p.name}" for p, k in VERB_CASES])
def test_every_shipped_config_validates_with_every_verb_its_header_names(path, kind):
    job = load_config(kind, path)
    assert isinstance(job, JOB_KINDS[kind])


def test_every_shipped_config_names_a_verb_and_job_files_name_train_and_compress():
    assert len(SHIPPED) >= 3
    for path in SHIPPED:
        verbs = header_verbs(path)
        assert verbs, path
        if path.parent.name == "configs":
            assert {"run", "train", "compress", "serve"} <= verbs, (path, verbs)


def test_cli_validate_train_takes_a_full_job_file():
    proc = subprocess.run([sys.executable, "-m", "app", "validate", "train", "configs/quickstart.yaml"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


FULL = {**BASE, "compress": {"methods": ["torch_int8"]}, "serve": {"models": [{"max_batch_size": 4}]},
        "tune": {"search_space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}}


@pytest.mark.parametrize("kind", ["train", "compress", "tune", "serve"])
def test_each_verb_takes_its_sections_of_a_full_job_file(kind):
    job = parse_config(kind, FULL)
    assert set(job.model_dump()) <= set(JOB_KINDS[kind].model_fields)
    assert isinstance(job, JOB_KINDS[kind])


@pytest.mark.parametrize("kind,key", [("train", "train"), ("compress", "compress"), ("serve", "serve"), ("tune", "tune"), ("run", "train")])
def test_unknown_key_inside_a_section_is_still_an_error(kind, key):
    tree = yaml.safe_load(yaml.safe_dump(FULL))
    tree.setdefault(key, {})["lrr"] = 1
    with pytest.raises(ConfigError, match=rf"{key}\.lrr: unknown key"):
        parse_config(kind, tree)


@pytest.mark.parametrize("kind", sorted(JOB_KINDS))
def test_a_top_level_key_no_verb_reads_is_an_error_for_every_verb(kind):
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        parse_config(kind, {**FULL, "trian": {"steps": 3}})


def test_a_section_of_another_verb_is_still_validated_by_run():
    with pytest.raises(ConfigError, match=r"compress\.methods\.0"):
        parse_config("run", {**FULL, "compress": {"methods": ["gzip"]}})
    assert parse_config("train", {**FULL, "compress": {"methods": ["gzip"]}}).name == "t"  # not train's section


# ----------------------------------------------------------------------------- served model default and references


def test_run_serves_its_own_model_by_default_and_follows_a_renamed_run(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**BASE, "serve": {"models": [{"version": "production"}]}}))
    assert load_config("run", path).serve.models[0].model == "t"
    assert load_config("run", path, ["name=mine"]).serve.models[0].model == "mine"
    assert load_config("serve", path, ["name=mine"]).serve.models[0].model == "mine"
    assert load_config("run", ROOT / "configs/lm-code.yaml", ["name=mine"]).serve.models[0].model == "mine"


def test_serve_given_a_job_file_without_models_serves_the_jobs_production_alias():
    app = parse_config("serve", {**BASE})
    assert [(m.model, m.version) for m in app.serve.models] == [("t", "production")]


def test_a_serve_file_without_a_job_name_must_name_its_models():
    with pytest.raises(ConfigError, match=r"serve\.models\[0\]\.model: required"):
        parse_config("serve", {"serve": {"models": [{"version": "production"}]}})


CROSS = [
    ({"serve.models": [{"model": "lm-code"}]}, r"serve\.models\[0\]\.model: 'lm-code' is not this job's model 't'"),
    ({"serve.models": [{"backend": "onnx_fp32"}]}, r"serve\.models\[0\]\.backend: 'onnx_fp32' is not made by this run"),
    ({"train.distill": {"teacher": "t"}}, r"train\.distill\.teacher: 't' is this job's own model"),
    ({"train.distill": {"teacher": "big", "teacher_version": "no such ref!"}}, r"train\.distill\.teacher_version"),
    ({"train.distill": {"teacher": "bad name!"}}, r"train\.distill\.teacher"),
    ({"tune": {"search_space": {"train.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}}}, r"tune\.search_space\.train\.lrr"),
]


@pytest.mark.parametrize("patch,pattern", CROSS, ids=[c[1][:40] for c in CROSS])
def test_references_across_sections_are_checked_before_anything_runs(patch, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        parse_config("run", with_(patch))
    assert "<root>" not in str(err.value)


def test_a_backend_the_run_makes_and_another_teacher_are_accepted():
    job = parse_config("run", with_({"serve.models": [{"backend": "torch_int8"}], "train.distill": {"teacher": "big"}}))
    assert job.serve.models[0].backend == "torch_int8" and job.train.distill.teacher == "big"


def test_compress_source_must_be_a_version_reference():
    assert parse_config("compress", {"name": "t", "source": "production"}).source == "production"
    with pytest.raises(ConfigError, match="source"):
        parse_config("compress", {"name": "t", "source": "v 3"})


# ----------------------------------------------------------------------------- shared facts


def test_tree_hash_is_the_config_hash_recipe_and_errors_share_the_base():
    job = parse_config("run", with_({}))
    assert tree_hash(job.model_dump(mode="json")) == config_hash(job)
    assert tree_hash({"b": 1, "a": [1, 2]}) == tree_hash({"a": [1, 2], "b": 1})
    assert re.fullmatch(r"[0-9a-f]{16}", tree_hash({}))
    assert issubclass(ConfigError, TemperError) and issubclass(ConfigError, ValueError)
    assert re.fullmatch(MODEL_NAME_PATTERN, "quickstart-digits") and not re.fullmatch(MODEL_NAME_PATTERN, "-x")


def test_one_list_of_artifact_formats():
    from app.artifacts import WEIGHT_FILES

    assert tuple(WEIGHT_FILES) == FORMATS
    assert typing.get_args(ServedModel.model_fields["backend"].annotation)[0] is ArtifactFormat
    assert set(typing.get_args(CompressMethod)) == set(FORMATS) - {"torch_fp32"}


def test_reference_documents_callbacks_and_distillation_without_raw_reprs():
    text = config_reference()
    for title in ("`train.callbacks[]` (name: magnitude_pruning)", "`train.callbacks[]` (name: early_stopping)", "`train.distill`"):
        assert f"#### {title}" in text
    assert "| `initial_sparsity` |" in text and "| `patience` |" in text
    assert "FieldInfo" not in text and "Annotated" not in text
    assert "list[MagnitudePruningConfig \\| EarlyStoppingConfig]" in text


def test_a_version_number_given_as_a_yaml_int_is_a_version_reference(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**BASE, "serve": {"models": [{"version": 2}]}}))
    assert load_config("compress", path, ["source=3"]).source == "3"
    assert load_config("run", path, ["train.distill={teacher: big, teacher_version: 4}"]).train.distill.teacher_version == "4"
    assert load_config("serve", path).serve.models[0].version == "2"


@pytest.mark.parametrize("prefix,ok", [("/", True), ("/api-a", True), ("/a/b", True), ("/x/", False), ("x", False), ("//", False)])
def test_route_prefix_has_no_trailing_slash(prefix, ok):
    """Ray Serve refuses a trailing slash at deploy time; the config says so before anything runs."""
    tree = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    apply_overrides(tree, [f"serve.route_prefix={prefix}"])
    if ok:
        assert parse_config("serve", tree).serve.route_prefix == prefix
    else:
        with pytest.raises(ConfigError, match="serve.route_prefix"):
            parse_config("serve", tree)
