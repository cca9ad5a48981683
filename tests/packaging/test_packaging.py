"""Entry points of the installed package that do not need a build: the trainer's CLI without its extra."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

WITHOUT_SCIPY = textwrap.dedent("""
    import importlib.abc, sys

    class NoScipy(importlib.abc.MetaPathFinder):  # as if the 'train' extra were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "scipy":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoScipy())
    from rcps_train.__main__ import main
    raise SystemExit(main(["--help"]))
""")


def test_the_trainer_names_its_extra_when_it_is_missing():
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_SCIPY],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "module 'scipy' is missing" in proc.stderr and 'pip install "rcps-kernels[train]"' in proc.stderr


def test_the_trainer_help_works_with_its_extra():
    proc = subprocess.run(
        [sys.executable, "-m", "rcps_train", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "make-synthetic" in proc.stdout


def _imports_of(module: str, path: Path, package: str) -> set[str]:
    """The modules of `package` that `module` (a file at `path`) imports, at any depth of its code
    (an import inside a function still closes a circle when the function runs)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            stem = node.module
            if node.level:  # relative to the module's package (a package's __init__ is its own)
                package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = package_parts[: len(package_parts) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)  # `from . import x` names a module
    return {name for name in found if name == package or name.startswith(package + ".")}


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (its __init__ files excluded as targets: every
    submodule import runs them, so an edge to a package adds no order of its own)."""
    root = REPO_ROOT / package
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return {
        name: {target for target in _imports_of(name, path, package) if target in modules and target != name}
        - {n for n, p in modules.items() if p.name == "__init__.py"}
        for name, path in modules.items()
    }


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (its modules in order, the first repeated last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_the_circle_finder_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize(
    "package,module,imports",
    [
        ("rcps_kernels", "rcps_kernels.functional", {"rcps_kernels.backends", "rcps_kernels.ops.infonce"}),
        ("rcps_train", "rcps_train.engine", {"rcps_train.checkpoint", "rcps_train.model", "rcps_train.step"}),
        ("rcps_nnunet", "rcps_nnunet.trainer", {"rcps_nnunet.losses"}),
    ],
)
def test_no_import_circle(package, module, imports):
    graph = import_graph(package)
    assert graph[module] >= imports  # the graph is read from the sources
    assert find_circle(graph) is None, find_circle(graph)
