"""The package's import graph, read from the source with `ast` (nothing of ours is imported).

Three rules (issue 21):
- no import circles among vrypt_worker's modules, counting imports inside functions too (they
  run later, but a circle through one still means two modules that each need the other);
- no module takes a name starting with `_` from another of ours, by `from x import _name` or by
  `x._name` on a module it imported;
- the I/O-free cores (framing, h1_protocol, h2's frames, HPACK decoder, answers and connection,
  the answer, response, settings) import no I/O (gevent, socket, select, ssl...) and no module of
  ours that does, however indirectly.

An edge goes to the module named: `from vrypt_worker import framing` is an edge to
vrypt_worker.framing, `from vrypt_worker.h2 import H2Config` one to vrypt_worker.h2. The package
`__init__` files Python runs on the way are not followed (vrypt_worker/__init__.py imports the
worker for gunicorn's `-k vrypt_worker.VryptWorker`).

`python -m tests.test_imports` prints the graph: each module and the modules it imports.
"""

from __future__ import annotations

import ast
import functools
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vrypt_worker"

# The cores that must stay I/O-free: no gevent, no sockets, nothing of ours that has them.
CORES = (
    "vrypt_worker.framing",
    "vrypt_worker.h1_protocol",
    "vrypt_worker.owed",
    "vrypt_worker.uwsgi_framing",
    "vrypt_worker.uwsgi_protocol",
    "vrypt_worker.h2.frames",
    "vrypt_worker.h2.hpack_decoder",
    "vrypt_worker.h2.answers",
    "vrypt_worker.h2.connection",
    "vrypt_worker.h2.control",
    "vrypt_worker.h2.output",
    "vrypt_worker.h2.requests",
    "vrypt_worker.h2.state",
    "vrypt_worker.h3.answers",
    "vrypt_worker.h3.session",
    "vrypt_worker.h3.endpoint",
    "vrypt_worker.wheel",
    "vrypt_worker.answer",
    "vrypt_worker.response",
    "vrypt_worker.settings",
)
# Top-level modules that do I/O or run an event loop: a module of ours that imports one of them
# does I/O.
IO_MODULES = frozenset(
    ("gevent", "greenlet", "socket", "_socket", "select", "selectors", "ssl", "asyncio")
)


@dataclass
class Module:
    name: str
    path: Path
    imports: dict[str, list[int]] = field(default_factory=dict)  # ours: module -> lines
    external: dict[str, list[int]] = field(default_factory=dict)  # top-level name -> lines
    private: list[str] = field(default_factory=list)  # "line N: what"


def module_names(package: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def read_module(name: str, path: Path, ours: dict[str, Path]) -> Module:
    module = Module(name, path)
    root = name.split(".")[0]
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    bound: dict[str, str] = {}  # local name -> module of ours it stands for

    def edge(target: str, line: int) -> None:
        if target != name:
            module.imports.setdefault(target, []).append(line)

    for node in ast.walk(tree):  # every import, at the top or inside a function
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top != root:
                    module.external.setdefault(top, []).append(node.lineno)
                    continue
                target = alias.name
                while target not in ours:
                    target = target.rpartition(".")[0]
                edge(target, node.lineno)
                if alias.asname:
                    bound[alias.asname] = target
                else:
                    bound[top] = root
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            if base.split(".")[0] != root:
                module.external.setdefault(base.split(".")[0], []).append(node.lineno)
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in ours:
                    edge(submodule, node.lineno)
                    bound[alias.asname or alias.name] = submodule
                    continue
                edge(base, node.lineno)
                if _is_private(alias.name) and base != name:
                    module.private.append(f"line {node.lineno}: from {base} import {alias.name}")
    for node in ast.walk(tree):  # `x._name` on a module of ours
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
            continue
        chain = []
        value = node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in bound:
            continue
        target = bound[value.id]
        for attr in reversed(chain):
            if f"{target}.{attr}" not in ours:
                break
            target = f"{target}.{attr}"
        else:
            if target != name:
                module.private.append(f"line {node.lineno}: {ast.unparse(node)} ({target})")
    return module


def build_graph(package: Path = PACKAGE) -> dict[str, Module]:
    ours = module_names(package)
    return {name: read_module(name, path, ours) for name, path in ours.items()}


@functools.cache
def package_graph() -> dict[str, Module]:
    """vrypt_worker's graph, read once for all the tests here."""
    return build_graph()


def circle_groups(graph: dict[str, Module]) -> list[list[str]]:
    """The groups of modules that each reach all the others (strongly connected, Tarjan's
    algorithm), for every group of two or more: each one an import circle or several."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node].imports):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(groups)


def shortest_circle(graph: dict[str, Module], group: list[str]) -> list[str]:
    """The shortest way from the group's first module back to itself, inside the group."""
    start = group[0]
    members = set(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node].imports):
                if target not in members:
                    continue
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no circle in {group}")


def _lines(lines: list[int]) -> str:
    return ",".join(map(str, sorted(set(lines))))


def describe_circle(graph: dict[str, Module], circle: list[str]) -> str:
    steps = [
        f"{here} -(line {_lines(graph[here].imports[there])})-> "
        for here, there in itertools.pairwise(circle)
    ]
    return "".join(steps) + circle[-1]


def describe_group(graph: dict[str, Module], group: list[str]) -> str:
    """A circle of the group, then every import between its modules: the ones to cut."""
    members = set(group)
    edges = [
        f"    {name} -> {target} (line {_lines(lines)})"
        for name in group
        for target, lines in sorted(graph[name].imports.items())
        if target in members
    ]
    example = describe_circle(graph, shortest_circle(graph, group))
    return "\n".join([f"  {', '.join(group)}", f"    e.g. {example}", *edges])


def io_paths(graph: dict[str, Module], core: str) -> list[str]:
    """Each way `core` reaches I/O: a chain of our modules ending in an I/O import."""
    found = []
    previous: dict[str, str | None] = {core: None}
    frontier = [core]
    while frontier:
        following = []
        for node in frontier:
            for top in sorted(graph[node].external):
                if top in IO_MODULES:
                    chain = [node]
                    while (step := previous[chain[-1]]) is not None:
                        chain.append(step)
                    lines = _lines(graph[node].external[top])
                    found.append(" -> ".join(reversed(chain)) + f" imports {top} (line {lines})")
            for target in sorted(graph[node].imports):
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    return found


# --- the rules -----------------------------------------------------------------------------------


def test_no_import_circles() -> None:
    graph = package_graph()
    groups = circle_groups(graph)
    assert not groups, (
        "import circles in vrypt_worker/ (modules that all reach each other, then every import "
        "between them):\n" + "\n".join(describe_group(graph, group) for group in groups)
    )


def test_no_private_names_from_other_modules() -> None:
    found = [
        f"{module.name}, {what}" for module in package_graph().values() for what in module.private
    ]
    assert not found, "names starting with _ taken from another module:\n" + "\n".join(found)


@pytest.mark.parametrize("core", CORES)
def test_io_free_cores_reach_no_io(core: str) -> None:
    graph = package_graph()
    assert core in graph, f"{core} is gone: update CORES"
    found = io_paths(graph, core)
    assert not found, f"{core} reaches I/O:\n" + "\n".join(found)


# --- the reader itself, on a package made for it -------------------------------------------------


def test_the_reader_sees_what_the_rules_forbid(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.leaf import VALUE\n")
    (package / "sub" / "leaf.py").write_text("VALUE = 1\n_HIDDEN = 2\n")
    (package / "a.py").write_text(
        "import socket\nfrom pkg import b\n\ndef later():\n    from pkg import c\n"
    )
    (package / "b.py").write_text("from pkg.sub import leaf as lf\nX = lf._HIDDEN\n")
    (package / "c.py").write_text(
        "from pkg.sub.leaf import _HIDDEN\n\n\ndef f():\n    import pkg.a\n    return pkg.a._y\n"
    )
    (package / "d.py").write_text("from . import a\nfrom .sub import VALUE\n")
    graph = build_graph(package)
    assert set(graph["pkg.a"].imports) == {"pkg.b", "pkg.c"}  # the one in a function too
    assert set(graph["pkg.d"].imports) == {"pkg.a", "pkg.sub"}  # relative imports
    assert circle_groups(graph) == [["pkg.a", "pkg.c"]]
    assert describe_circle(graph, shortest_circle(graph, ["pkg.a", "pkg.c"])) == (
        "pkg.a -(line 5)-> pkg.c -(line 5)-> pkg.a"
    )
    assert graph["pkg.b"].private == ["line 2: lf._HIDDEN (pkg.sub.leaf)"]
    assert graph["pkg.c"].private == [
        "line 1: from pkg.sub.leaf import _HIDDEN",
        "line 6: pkg.a._y (pkg.a)",
    ]
    assert io_paths(graph, "pkg.d") == ["pkg.d -> pkg.a imports socket (line 1)"]
    assert io_paths(graph, "pkg.b") == []


def main() -> None:
    for name, module in sorted(build_graph().items()):
        print(f"{name} -> {', '.join(sorted(module.imports)) or '(nothing of ours)'}")


if __name__ == "__main__":
    main()
