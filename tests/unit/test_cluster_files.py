"""cluster/ manifests parse, the RayJob runs the quickstart, the pip runtime env is complete and
the default one installs nothing (the alert rules and the dashboard: test_monitoring.py; the
KubeRay manifests against the Kubernetes and CRD schemas: test_kuberay_manifests.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_parses(path):
    assert all(list(yaml.safe_load_all(path.read_text())))


def test_rayjob_runs_the_quickstart():
    [job] = [d for d in yaml.safe_load_all((CLUSTER / "rayjob-quickstart.yaml").read_text()) if d["kind"] == "RayJob"]
    assert "python -m app run configs/quickstart.yaml" in job["spec"]["entrypoint"]


def _requirements(lines) -> dict:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs}


def test_default_runtime_env_uploads_our_code_and_installs_nothing():
    """cluster/runtime_env.yaml is for nodes that hold the dependencies: the repository as working
    directory (every package of ours inside it, none excluded) and no pip, conda, uv or container
    section that would make Ray build an environment per job."""
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert not {"pip", "conda", "uv", "container", "image_uri", "py_executable"} & set(env), sorted(env)
    root = CLUSTER.parent
    for pkg in ("app", "actors", "pipelines", "serve", "tune", "configs"):
        assert (root / pkg).is_dir() and pkg not in env.get("excludes", []), pkg
    pip_env = yaml.safe_load((CLUSTER / "runtime_env.pip.yaml").read_text())
    assert {k: v for k, v in pip_env.items() if k != "pip"} == env, "the two runtime envs differ beyond `pip`"


def test_runtime_env_lists_every_dependency():
    """Every runtime dependency of pyproject.toml (torch and ray may come with the image) is in the
    pip runtime_env with the same extras and version range, or with constraints.txt's exact pin; every
    `==` version satisfies pyproject's range; nothing is listed that the project does not depend on."""
    import tomllib

    root = CLUSTER.parent
    deps = _requirements(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])
    pins = _requirements(line.split("#")[0].strip() for line in (root / "constraints.txt").read_text().splitlines()
                         if line.split("#")[0].strip())
    env = _requirements(yaml.safe_load((CLUSTER / "runtime_env.pip.yaml").read_text())["pip"]["packages"])
    assert deps and env

    missing = sorted(set(deps) - set(env) - {"torch", "ray"})
    assert not missing, f"cluster/runtime_env.pip.yaml lacks {missing} (pyproject.toml dependencies)"
    stray = sorted(set(env) - set(deps))
    assert not stray, f"cluster/runtime_env.pip.yaml lists {stray}, which pyproject.toml does not depend on"
    for name, req in env.items():
        dep = deps[name]
        assert req.extras >= dep.extras, f"{name}: runtime_env extras {req.extras} lack {dep.extras - req.extras}"
        if name in pins:
            assert req.specifier == pins[name].specifier, f"{name}: runtime_env {req.specifier} but constraints.txt {pins[name].specifier}"
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            assert dep.specifier.contains(exact[0]), f"{name}=={exact[0]} is outside pyproject.toml's {dep.specifier}"
        else:
            assert req.specifier == dep.specifier, f"{name}: runtime_env {req.specifier or 'any'} but pyproject.toml {dep.specifier}"


def test_runtime_env_covers_every_third_party_import():
    """Each third-party module the project's code imports comes from a runtime_env package or a
    direct requirement of one (starlette through fastapi); the GPU extra's modules are exempt."""
    import ast
    import sys
    import tomllib
    from importlib.metadata import packages_distributions, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = CLUSTER.parent
    ours = ("app", "actors", "pipelines", "serve", "tune")
    imported = set()
    for pkg in ours:
        for path in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = sorted(m for m in imported - set(ours) - set(sys.stdlib_module_names) if m != "__future__")
    env = _requirements(yaml.safe_load((CLUSTER / "runtime_env.pip.yaml").read_text())["pip"]["packages"])
    covered = set(env)
    for name in env:
        covered |= {canonicalize_name(Requirement(r).name) for r in requires(name) or () if "extra ==" not in r}
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    exempt = {canonicalize_name(Requirement(r).name) for r in extras.get("gpu", [])}
    dists = packages_distributions()
    uncovered = [m for m in third_party
                 if not {canonicalize_name(d) for d in dists.get(m, [m])} & (covered | exempt)]
    assert "torch" in third_party and not uncovered, f"imported but not in cluster/runtime_env.pip.yaml: {uncovered}"
