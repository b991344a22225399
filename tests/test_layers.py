"""The package's layering, read from its imports (docs/architecture.md).

Four rooms, each named for the process its code runs in, and the report's, which runs after::

    mplog (__init__, __main__, dask, _demo)      the public face
      └─ _supervisor   the main process's side: LogService, the supervisor, health, console
           ├─ _app       every process that logs: the handler, its ring writer, the captures
           ├─ _listener  the listener process: the loop, the files, the journal, exits, syslog
           └─ _common    what they all share: config, counters, spool layout, wire format
      └─ _report       ``python -m mplog report``: reads the listener's files (_listener, _common)

An import may only go down this picture, never up, and never sideways between ``_app`` and
``_listener`` (the worker must not pay for the listener's code, nor the listener depend on the
worker's). Every import counts, also one made inside a function or under ``TYPE_CHECKING``.
"""

import ast
import os
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mplog")

# A room may import the rooms listed for it (and itself).
ALLOWED = {
    "mplog": {"mplog", "_supervisor", "_app", "_listener", "_common", "_report"},
    "_report": {"_report", "_listener", "_common"},
    "_supervisor": {"_supervisor", "_app", "_common"},
    "_app": {"_app", "_common"},
    "_listener": {"_listener", "_common"},
    "_common": {"_common"},
}


def modules() -> Dict[str, str]:
    """Dotted module name -> path, for every .py file of the package."""
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(PACKAGE))[:-3]
                name = rel.replace(os.sep, ".")
                if name.endswith(".__init__"):
                    name = name[: -len(".__init__")]
                out[name] = os.path.join(dirpath, f)
    return out


# The compiled module (mplog/_speedups.c) imports nothing; ``_common.compiled`` is its one door.
EXTENSIONS = {"mplog._speedups": "_common"}


def imports_of(name: str, path: str, known: Set[str]) -> List[str]:
    """The package's modules that ``name`` imports, resolved to names in ``known``."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from x import y`` names module x.y when there is one, else x itself
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("mplog") and t != name:
                found.append(t)
    return found


def room(module: str) -> str:
    if module in EXTENSIONS:
        return EXTENSIONS[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else "mplog"


def graph() -> Dict[str, Set[str]]:
    mods = modules()
    known = set(mods) | set(EXTENSIONS)
    return {name: set(imports_of(name, path, known)) for name, path in mods.items()}


def cycles(edges: Dict[str, Set[str]]) -> List[Tuple[str, ...]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[Tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(tuple(sorted(group)))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    """The reader sees the imports it must judge (so an empty graph cannot pass)."""
    edges = graph()
    assert "mplog._app.handler" in edges["mplog._supervisor.service"]
    assert "mplog._common.spool" in edges["mplog._listener.loop"]
    assert {"_common", "_app", "_listener", "_supervisor"} <= {room(m) for m in edges}


def test_no_import_cycle():
    """No module of mplog imports, directly or not, a module that imports it back."""
    assert cycles(graph()) == []


def test_the_cycle_check_finds_a_cycle():
    """The check itself: a made-up graph with a cycle is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]


def test_imports_go_down_the_layers_only():
    """No import from a lower room up to a higher one, nor between _app and _listener."""
    bad = sorted(f"{m} -> {t}" for m, targets in graph().items() for t in targets
                 if room(t) not in ALLOWED[room(m)])
    assert bad == []


@pytest.mark.parametrize("module", ["mplog._app.handler", "mplog._listener.loop"])
def test_a_room_does_not_reach_into_its_neighbour(module):
    """The worker side never loads the listener's code, nor the listener the worker's."""
    other = "_listener" if "._app." in module else "_app"
    reach: Set[str] = set()
    todo = [module]
    edges = graph()
    while todo:
        m = todo.pop()
        for t in edges.get(m, ()):
            if t not in reach:
                reach.add(t)
                todo.append(t)
    assert not {t for t in reach if room(t) == other}


MAX_CLASS_LINES = 250  # issue 31: one job per class; a class past this has more than one


def long_classes(name: str, source: str) -> List[Tuple[str, int]]:
    """(dotted class name, lines) of every class in ``source`` over its allowed length."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            dotted = f"{name}.{node.name}"
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_CLASS_LINES:
                out.append((dotted, lines))
    return out


def test_no_class_over_250_lines():
    """No class of mplog is over 250 lines (ast: end_lineno - lineno + 1)."""
    long = [f"{c} ({n} lines)" for name, path in sorted(modules().items())
            for c, n in long_classes(name, open(path).read())]
    assert long == []


def test_the_class_measure_finds_a_long_class():
    """The measure itself: a made-up class of 251 lines is found, one of 250 is not."""
    body = "".join(f"    x{i} = {i}\n" for i in range(250))
    assert long_classes("m", "class Long:\n" + body) == [("m.Long", 251)]
    assert long_classes("m", "class Fits:\n" + body[: body.rindex("    x249")]) == []
