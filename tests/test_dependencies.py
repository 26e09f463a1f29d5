"""The server's imports come from its own dependencies, not from the `dev` extra.

`pip install .` (the Docker image) installs only `[project] dependencies` and what they require; a module
the server imports that only the dev extra brings (jsonschema was one) passes every test here and stops
the image at start-up.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _closure(requirements: list[str]) -> set[str]:
    """The distributions `pip install` brings for `requirements`, extras followed (normalised names)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (_normal(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.distribution(req.name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for child in map(Requirement, requires):
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in {*req.extras, ""}):
                todo.append(child)
    return {name for name, _ in seen}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level(package: Path) -> set[str]:
    names: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"server", "__future__"}


def test_every_module_the_server_imports_is_a_runtime_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    runtime = _closure(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    providers = metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_top_level(ROOT / "server")):
        dists = {_normal(d) for d in providers.get(module, [])}
        assert dists, f"the server imports {module!r}, which no installed distribution provides"
        if not dists & runtime:
            missing[module] = sorted(dists)
    assert not missing, f"imported by the server but not brought by [project] dependencies: {missing}"
