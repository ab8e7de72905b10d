"""The package's import graph has no circle: every import, lazy ones inside functions and ones under
TYPE_CHECKING included, read from the source with `ast`, so a circle that lazy imports hide at run time
still fails here, naming the modules in it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "orca_lora"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports: `import a.b`, `from a import b` (module a.b if there is one,
    else a), and relative imports, each resolved to the deepest known module."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import module` needs the module; `from pkg import name` needs pkg itself
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                         for alias in node.names)
    own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
    targets = set()
    for candidate in found:
        while candidate and candidate not in known:
            candidate = candidate.rpartition(".")[0]
        if candidate and candidate != name:
            targets.add(candidate)
            # importing a.b.c first runs a and a.b (their __init__), except the packages that hold this module,
            # which started before it did
            parts = candidate.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in own)
    return targets


def import_graph(root: Path) -> dict[str, set[str]]:
    paths = sorted(root.rglob("*.py"))
    known = {module_name(path, root) for path in paths}
    return {module_name(path, root): imported_modules(path, root, known) for path in paths}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return stack[stack.index(successor):] + [successor]
            if successor not in state and (circle := visit(successor)):
                return circle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def describe(circle: list[str]) -> str:
    return "import circle: " + " -> ".join(circle)


def test_the_package_has_no_import_circle():
    circle = find_circle(import_graph(PACKAGE))
    assert circle is None, describe(circle)


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root / "pkg"


def test_a_circle_through_a_package_init_is_found(tmp_path):
    """`from pkg.data import shapes` runs pkg/data/__init__.py first; when that imports back the module that
    started it (the circle of models.source and data.planted_tasks), the import fails at run time."""
    package = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/models/__init__.py": "",
        "pkg/models/source.py": "from pkg.data import shapes\n\ndef count():\n    return 1\n",
        "pkg/data/__init__.py": "from pkg.data import tasks\n",
        "pkg/data/shapes.py": "import os\n",
        "pkg/data/tasks.py": "from pkg.models.source import count\n",
    })
    circle = find_circle(import_graph(package))
    assert circle == ["pkg.data", "pkg.data.tasks", "pkg.models.source", "pkg.data"]


def test_a_planted_circle_is_found_and_named(tmp_path):
    """A circle closed only by a lazy import inside a function, through a relative import."""
    package = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/config.py": "def load():\n    from pkg.checks import validate\n    return validate\n",
        "pkg/checks.py": "from .spec import get_method\n",
        "pkg/spec.py": "from pkg import config\n",
        "pkg/leaf.py": "import os\n",
    })
    circle = find_circle(import_graph(package))
    assert circle == ["pkg.checks", "pkg.spec", "pkg.config", "pkg.checks"]
    assert describe(circle) == "import circle: pkg.checks -> pkg.spec -> pkg.config -> pkg.checks"


@pytest.mark.parametrize("statement, expected", [
    ("from pkg.sub import thing\n", {"pkg.sub"}),
    ("from pkg.sub import mod\n", {"pkg.sub.mod"}),
    ("from pkg.sub import mod, thing\n", {"pkg.sub", "pkg.sub.mod"}),
    ("import pkg.sub.mod as m\n", {"pkg.sub.mod"}),
    ("from .mod import x\n", {"pkg.sub.mod"}),
    ("from .. import leaf\n", {"pkg.leaf"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.leaf import T\n", {"pkg.leaf"}),
])
def test_imports_resolve_to_package_modules(tmp_path, statement, expected):
    package = write(tmp_path, {"pkg/__init__.py": "", "pkg/leaf.py": "", "pkg/sub/__init__.py": "",
                               "pkg/sub/mod.py": "", "pkg/sub/user.py": statement})
    assert import_graph(package)["pkg.sub.user"] == expected
