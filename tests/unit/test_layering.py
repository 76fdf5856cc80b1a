"""The folders are the architecture: this test fails when an import crosses a layer.

* engine/core imports only the standard library's pure modules, pydantic, transitions and
  engine.core itself: no I/O library, no process, socket or thread call;
* engine/effects.py (the boundary protocol) imports only the core;
* engine/adapters import the core, the effects protocol and each other, never the
  orchestrator, steps, recovery, replay or the CLI;
* only engine/__main__.py (and the console script) import engine/cli;
* no import cycle anywhere in engine/, lazy (function-level) imports included.

Imports are read with `ast` from the source, so a violation is found without running it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "engine"

# Pure standard-library modules the core may use. An allow-list, not a deny-list: a new
# import has to be thought about (os, threading, socket, subprocess... are deliberately absent).
CORE_STDLIB = {
    "__future__",
    "abc",
    "bisect",
    "collections",
    "dataclasses",
    "datetime",
    "enum",
    "functools",
    "hashlib",
    "heapq",
    "itertools",
    "json",
    "math",
    "operator",
    "re",
    "statistics",
    "string",
    "textwrap",
    "types",
    "typing",
    "unicodedata",
}
CORE_THIRD_PARTY = {"pydantic", "transitions"}
ADAPTER_MAY_IMPORT = ("engine.core", "engine.effects", "engine.adapters")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import statement, at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] == "engine":
                # `from engine import steps` imports the module engine.steps
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    file = root.parent / Path(*candidate.split("."))
                    is_module = file.with_suffix(".py").exists() or file.is_dir()
                    yield node.lineno, candidate if is_module else base
            else:
                yield node.lineno, base


def engine_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def layering_problems(root: Path = ROOT) -> list[str]:
    problems = []
    for name, path in engine_modules(root).items():
        for line, imported in imports_of(path, root):
            top = imported.split(".")[0]
            where = f"{path.relative_to(root.parent)}:{line} imports {imported}"
            if name.startswith("engine.core"):
                internal = imported == "engine.core" or imported.startswith("engine.core.")
                if top == "engine" and not internal:
                    problems.append(f"{where}: the core may import only engine.core")
                elif top != "engine" and top not in CORE_STDLIB | CORE_THIRD_PARTY:
                    problems.append(f"{where}: the core does no I/O (not an allowed import)")
            elif name == "engine.effects":
                if top == "engine" and not imported.startswith("engine.core"):
                    problems.append(f"{where}: the effects protocol may import only the core")
            elif (
                name.startswith("engine.adapters")
                and top == "engine"
                and not imported.startswith(ADAPTER_MAY_IMPORT)
            ):
                problems.append(f"{where}: an adapter may not import the orchestration")
            if imported.startswith("engine.cli") and not (
                name.startswith("engine.cli") or name == "engine.__main__"
            ):
                problems.append(f"{where}: only engine.__main__ imports the CLI")
    return problems


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    modules = engine_modules(root)
    graph = {
        name: sorted({imp for _, imp in imports_of(path, root) if imp in modules and imp != name})
        for name, path in modules.items()
    }
    cycles: list[list[str]] = []
    colour: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        colour[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if colour.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in colour:
                visit(nxt)
        path.pop()
        colour[node] = 2

    for node in graph:
        if node not in colour:
            visit(node)
    return cycles


def test_every_import_respects_its_layer() -> None:
    assert layering_problems() == []


def test_there_is_no_import_cycle_in_engine() -> None:
    assert import_cycles() == []


def test_the_folders_hold_what_the_readme_says() -> None:
    modules = engine_modules()
    for name in ("events", "machine", "state", "evolve", "decide", "rules", "request"):
        assert f"engine.core.{name}" in modules
    for name in ("journal", "process", "health", "gpu", "hub", "runtime"):
        assert f"engine.adapters.{name}" in modules
    top = {n for n in modules if n.count(".") == 1}
    assert top == {
        "engine.__main__",
        "engine.adapters",
        "engine.catalog",
        "engine.cli",
        "engine.core",
        "engine.effects",
        "engine.metrics",
        "engine.node",
        "engine.orchestrator",
        "engine.recovery",
        "engine.replay",
        "engine.service",
        "engine.steps",
    }


# The checker itself must be able to fail: each case plants one violation in a copy.
PLANTED = [
    ("core/events.py", "import sqlalchemy\n", "the core does no I/O"),
    ("core/rules.py", "import threading\n", "the core does no I/O"),
    ("core/decide.py", "from os import kill\n", "the core does no I/O"),
    ("core/state.py", "from engine.effects import CancelToken\n", "may import only engine.core"),
    ("adapters/health.py", "from engine.orchestrator import Engine\n", "may not import"),
    ("adapters/journal.py", "from engine import steps\n", "may not import"),
    ("steps.py", "from engine.cli.main import main\n", "only engine.__main__ imports the CLI"),
]


@pytest.mark.parametrize(("module", "line", "message"), PLANTED, ids=[p[0] for p in PLANTED])
def test_a_planted_violation_is_caught(
    tmp_path: Path, module: str, line: str, message: str
) -> None:
    copy = tmp_path / "engine"
    for source in ROOT.rglob("*.py"):
        target = copy / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text())
    planted = copy / module
    planted.write_text(line + planted.read_text())
    assert any(message in problem for problem in layering_problems(copy))


def test_a_planted_cycle_is_caught(tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    for source in ROOT.rglob("*.py"):
        target = copy / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text())
    steps = copy / "steps.py"
    steps.write_text("from engine.orchestrator import Engine\n" + steps.read_text())
    assert any("engine.steps" in cycle for cycle in import_cycles(copy))
