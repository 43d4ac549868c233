"""Imports go one way: no module-level import cycle among the project's modules, and the floors
of the house are respected (read from the source with `ast`, nothing is imported).

- Ground: `app/` minus the CLI imports no other top-level folder.
- Only the CLI (`app/cli/`, `app/__main__.py`) and the end-to-end recipe (`pipelines/recipe.py`)
  import `serve/` or `tune/` (anywhere in a module, function-level imports included).
- Nothing but the CLI imports the recipe.

Run it alone: `python -m pytest -q tests/unit/test_import_layers.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "actors", "pipelines", "serve", "tune")
RECIPE = "pipelines.recipe"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                mods[_module_name(path)] = path
    return mods


MODULES = _project_modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(project modules imported at module level, project modules imported anywhere)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    top: set[str] = set()
    anywhere: set[str] = set()

    def targets(node: ast.AST) -> set[str]:
        found = set()
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            candidates = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            return found
        for c in candidates:
            # the longest prefix that is a project module (`import app.config.base` -> app.config.base)
            parts = c.split(".")
            for i in range(len(parts), 0, -1):
                prefix = ".".join(parts[:i])
                if prefix in MODULES:
                    found.add(prefix)
                    break
        return found

    def walk(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                t = targets(child) - {name}
                anywhere.update(t)
                if module_level:
                    top.update(t)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                walk(child, False)  # never executed at run time
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                walk(child, False)
            else:
                walk(child, module_level)

    walk(tree, True)
    return top, anywhere


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _is_cli(module: str) -> bool:
    return module == "app.__main__" or module == "app.cli" or module.startswith("app.cli.")


def _folder(module: str) -> str:
    return module.split(".")[0]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_sees_the_project():
    # a guard against the test passing because it read nothing
    assert {"app.__main__", "pipelines.recipe", "pipelines.train", "tune.sweep"} <= set(MODULES)
    assert "tune.sweep" in GRAPH["pipelines.recipe"][1]
    assert "pipelines.train" in GRAPH["pipelines.register"][0]


def test_no_module_level_import_cycle():
    cycles = _cycles({m: top for m, (top, _) in GRAPH.items()})
    assert not cycles, f"module-level import cycles: {cycles}"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_cli_and_the_recipe_import_serve_or_tune():
    bad = sorted(
        f"{m} imports {t}"
        for m, (_, anywhere) in GRAPH.items()
        for t in anywhere
        if _folder(t) in ("serve", "tune") and _folder(t) != _folder(m) and not (_is_cli(m) or m == RECIPE)
    )
    assert not bad, "only the CLI and pipelines/recipe.py may import serve/ or tune/:\n" + "\n".join(bad)


def test_nothing_but_the_cli_imports_the_recipe():
    bad = sorted(m for m, (_, anywhere) in GRAPH.items() if RECIPE in anywhere and not _is_cli(m))
    assert not bad, f"the recipe is imported by {bad}"


def test_app_is_the_ground():
    bad = sorted(
        f"{m} imports {t}"
        for m, (_, anywhere) in GRAPH.items()
        if _folder(m) == "app" and not _is_cli(m)
        for t in anywhere
        if _folder(t) != "app"
    )
    assert not bad, "app/ (the ground) imports another top-level folder outside the CLI:\n" + "\n".join(bad)
