"""The folder layout is the architecture, so it is checked: which package of src/chatqueue may import
which, and no import cycles between top-level packages. Imports are read with `ast`, so the ones
inside functions and under TYPE_CHECKING count too."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "chatqueue"
ROOT = "chatqueue"  # the package's own __init__, which re-exports the server's ChatQueue

# The faces of the package: the HTTP server, the chat page, the CLI, the console, `chatqueue bench`.
FACES = {"server", "web", "cli", "console", "bench"}

# What each layer must never import, by top-level name under chatqueue/. The cluster (Ray Serve)
# and the fronts (several API servers over one core) sit above the server: they may import
# server, api and config; nothing but the CLI imports them.
ABOVE = {"cluster", "fronts"}
NEVER = {
    "scheduler": {"engine", "api", "chat", "history", *ABOVE, *FACES},
    "engine": {"api", "chat", "history", *ABOVE, *FACES},
    "text": {"engine", *ABOVE, *FACES},
    "history": {"engine", "api", "chat", *ABOVE, *FACES},
    "api": {"chat", *ABOVE, *FACES},
    "chat": {"engine", *ABOVE, *FACES},
    **{
        top: {"engine", "scheduler", "chat", "history", *(ABOVE - {top}), *(FACES - {"server"})}
        for top in ABOVE
    },
    **{face: ABOVE for face in FACES - {"cli"}},
}

# The scheduler is plain data: testable with no model, and nothing in it waits on the outside world.
NOT_IN_SCHEDULER = {
    *("torch", "transformers", "gguf", "accelerate", "triton"),
    *("asyncio", "threading", "concurrent", "multiprocessing", "subprocess", "signal"),
    *("socket", "select", "selectors", "ssl", "http", "urllib", "httpx", "aiohttp"),
    *("fastapi", "starlette", "uvicorn", "redis", "sqlite3"),
    *("io", "os", "shutil", "pathlib", "tempfile"),
}


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module under chatqueue/, e.g. "scheduler.scheduler"; "" for ROOT
    target: str  # what it imports, absolute: "chatqueue.engine.sequence", "torch"
    where: str  # "scheduler/scheduler.py:18"

    @property
    def importer_package(self) -> str:
        return self.importer.split(".")[0] or ROOT

    @property
    def is_internal(self) -> bool:
        return self.target == ROOT or self.target.startswith(ROOT + ".")

    @property
    def target_package(self) -> str:
        """The top-level package under chatqueue/ (ROOT for the package itself), or the
        distribution's top-level module for a third-party or standard library import."""
        parts = self.target.split(".")
        if self.is_internal:
            return parts[1] if len(parts) > 1 else ROOT
        return parts[0]


def imports_of(src: Path) -> list[Import]:
    """Every import statement in the package at `src`, wherever it sits in a file."""
    found = []
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = parts[:-1] if is_package else parts
        package = module if is_package else module[:-1]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        for node in sorted(nodes, key=lambda n: n.lineno):
            for target in _targets(node, package, src):
                found.append(
                    Import(".".join(module), target, f"{path.relative_to(src)}:{node.lineno}")
                )
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: tuple[str, ...], src: Path) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: `from ..engine import loop` inside chatqueue/scheduler/
        base_parts = [ROOT, *package][: len(package) + 2 - node.level]
        base = ".".join([*base_parts, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    # `from chatqueue import engine` imports the module chatqueue.engine, not only the root.
    return [
        f"{base}.{alias.name}" if _is_module(src, f"{base}.{alias.name}") else base
        for alias in node.names
    ]


def _is_module(src: Path, dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != ROOT:
        return False
    path = src.joinpath(*parts[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def broken_rules(imports: Iterable[Import]) -> list[str]:
    broken = []
    for i in imports:
        if i.is_internal and i.target_package in NEVER.get(i.importer_package, ()):
            broken.append(f"{i.where}: {i.importer_package} must not import {i.target}")
        if i.importer_package == "scheduler" and i.target_package in NOT_IN_SCHEDULER:
            broken.append(f"{i.where}: scheduler must not import {i.target}")
    return broken


def package_graph(imports: Iterable[Import]) -> dict[str, set[str]]:
    """Which top-level package imports which, each module under chatqueue/ standing for itself."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        if i.is_internal and i.target_package != i.importer_package:
            graph.setdefault(i.importer_package, set()).add(i.target_package)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as a path that ends where it starts, or [] when there is none."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt, [*path, node]):
                return cycle
        done.add(node)
        return []

    for start in sorted(graph):
        if cycle := visit(start, []):
            return cycle
    return []


def test_no_import_cycles_between_top_level_packages() -> None:
    cycle = find_cycle(package_graph(imports_of(SRC)))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_layer_imports_what_it_must_not() -> None:
    broken = broken_rules(imports_of(SRC))
    assert not broken, "\n".join(["layer rules broken:", *broken])


def test_the_checks_see_every_import_and_name_where_it_is(tmp_path: Path) -> None:
    src = tmp_path / "chatqueue"
    files = {
        "__init__.py": "",
        "types.py": "",
        "scheduler/__init__.py": "from chatqueue import types\n",
        "scheduler/plan.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from chatqueue.engine.loop import Loop\n"
            "def later():\n"
            "    import torch.nn\n"
            "    from ..server import app\n"
        ),
        "engine/__init__.py": "",
        "engine/loop.py": "from chatqueue import scheduler\nfrom . import mock\n",
        "engine/mock.py": "import asyncio\n",
        "server/__init__.py": "",
        "server/app.py": "from chatqueue.engine import loop\n",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)

    imports = imports_of(src)

    assert broken_rules(imports) == [
        "scheduler/plan.py:3: scheduler must not import chatqueue.engine.loop",
        "scheduler/plan.py:5: scheduler must not import torch.nn",
        "scheduler/plan.py:6: scheduler must not import chatqueue.server.app",
    ]
    assert package_graph(imports) == {
        "scheduler": {"types", "engine", "server"},
        "engine": {"scheduler"},
        "server": {"engine"},
    }
    assert find_cycle(package_graph(imports)) == ["engine", "scheduler", "engine"]
