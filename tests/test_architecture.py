"""The package's import structure: no import cycles, and imports flow one way through the layers.

The graph is read from the source with :mod:`ast` (nothing is imported), and counts every import: at
module level, inside functions (a deferred import still runs, and still closes a cycle), and in
``try`` / ``if`` blocks. Only imports under ``if TYPE_CHECKING:`` are left out, since they never run.

An edge ``a -> b`` means module ``a`` imports module ``b``; ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``. Importing ``pkg.sub.mod`` from outside ``pkg.sub``
also runs ``pkg/sub/__init__.py`` first, so it is an edge to ``pkg.sub`` as well (that is how a
subpackage's re-exports close a cycle). The root ``earthmind_compat/__init__.py`` is the exception: it
is the public API, it runs before any submodule by design, and it is a node only where a module imports
it by name (``import earthmind_compat``, ``from earthmind_compat import BACKBONES``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

pytestmark = pytest.mark.registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "earthmind_compat"

#: The layers, lowest first. A module may import modules of its own layer or of lower layers only.
#: Keys are the first component under ``earthmind_compat`` (a module, or a subpackage and all it holds);
#: ``""`` is the package root (``earthmind_compat/__init__.py``: the public API, which registers the
#: backbones in TerraTorch). A module that is in no layer is reported as a violation: give it one here.
LAYERS: tuple[tuple[str, ...], ...] = (
    # exceptions, version detection, units, argument checks, the import's collector pause
    ("errors", "compat", "sizes", "arguments", "gc_pause"),
    ("bands", "weights", "synthetic"),  # bands, checkpoint files, synthetic data
    ("backbones", "necks"),  # the models
    ("optimize",),  # memory techniques applied to the models
    ("builders", "recipes", "registry"),  # registered constructors, TerraTorch model factories and registration
    ("",),  # the public API (importing it registers)
    ("check", "bench"),  # certification and measurement
    ("commands",),  # one module per subcommand
    ("cli",),  # the command line
)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package under ``root`` by dotted name (a package by the name of its ``__init__``)."""
    return {_module_name(path, root): path for path in sorted((root / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterable[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` (file ``path``) imports, by the rules in the docstring."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                targets.add(candidate if candidate in modules else source)
    found: set[str] = set()
    for target in targets:
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            continue
        while target not in modules and "." in target:  # `import earthmind_compat.x.y`, y an attribute
            target = target.rsplit(".", 1)[0]
        if target not in modules:
            continue
        found.add(target)
        # Importing pkg.sub.mod from outside pkg.sub runs pkg/sub/__init__.py first.
        parts = target.split(".")
        for depth in range(2, len(parts)):
            parent = ".".join(parts[:depth])
            if parent in modules and not (name == parent or name.startswith(parent + ".")):
                found.add(parent)
    found.discard(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over every module of the package under ``root``."""
    modules = package_modules(root)
    return {name: imported_names(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle through each module that is on one, as ``[a, b, ..., a]`` (each cycle once)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles: set[tuple[str, ...]] = set()
    for component in components:
        for start in component:
            cycle = _shortest_cycle(graph, component, start)
            turn = cycle.index(min(cycle[:-1]))  # the same cycle found from another member
            cycles.add((*cycle[turn:-1], *cycle[:turn], cycle[turn]))
    return sorted(map(list, cycles))


def _shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """Breadth-first search inside a strongly connected component for the shortest way back to ``start``."""
    previous: dict[str, str] = {}
    frontier = [start]
    while start not in previous:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ not in previous:
                    previous[succ] = node
                    following.append(succ)
        frontier = following
    cycle = [start, previous[start]]
    while cycle[-1] != start:
        cycle.append(previous[cycle[-1]])
    return cycle[::-1]


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of a package module, or ``None`` when it is in no layer."""
    key = module[len(PACKAGE) + 1 :].split(".")[0] if module != PACKAGE else ""
    return next((i for i, names in enumerate(LAYERS) if key in names), None)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer into a higher one, and modules in no layer."""
    problems = []
    for module in sorted(graph):
        own = layer_of(module)
        if own is None:
            problems.append(f"{module} is in no layer (add it to LAYERS in tests/test_architecture.py)")
            continue
        for target in sorted(graph[module]):
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                problems.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    return problems


def _short(module: str) -> str:
    return module.removeprefix(PACKAGE + ".") if module != PACKAGE else PACKAGE


def test_import_graph_has_no_cycle() -> None:
    cycles = find_cycles(import_graph())
    if cycles:
        shown = "\n".join("  " + " -> ".join(map(_short, cycle)) for cycle in cycles)
        pytest.fail(f"import cycles in {PACKAGE} (imports inside functions included):\n{shown}", pytrace=False)


def test_imports_flow_down_the_layers() -> None:
    problems = layer_violations(import_graph())
    if problems:
        order = " -> ".join("/".join(name or "__init__" for name in layer) for layer in LAYERS)
        shown = "\n".join(f"  {problem}" for problem in problems)
        pytest.fail(f"imports against the layer order ({order}):\n{shown}", pytrace=False)


# --------------------------------------------------------------------- the checker itself is checked


def test_graph_sees_imports_in_functions_and_subpackage_inits_but_not_type_checking(tmp_path: Path) -> None:
    files = {
        "__init__.py": "from earthmind_compat.a import A\n",
        "a.py": "import os\nfrom earthmind_compat import b\nA = 1\n",
        "b.py": "def f():\n    from .a import A  # deferred, still a cycle\n    return A\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from earthmind_compat.a import A\n",
        "sub/__init__.py": "from earthmind_compat.sub.leaf import X\n",
        "sub/leaf.py": "X = 1\n",
        "d.py": "import earthmind_compat.sub.leaf\nfrom earthmind_compat import A\n",
    }
    for name, text in files.items():
        (tmp_path / PACKAGE / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PACKAGE / name).write_text(text, encoding="utf-8")
    graph = {_short(k): {_short(t) for t in v} for k, v in import_graph(tmp_path).items()}
    assert graph == {
        PACKAGE: {"a"},
        "a": {"b"},
        "b": {"a"},
        "c": set(),
        "sub": {"sub.leaf"},
        "sub.leaf": set(),
        "d": {"sub.leaf", "sub", PACKAGE},
    }
    assert find_cycles(import_graph(tmp_path)) == [[f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.a"]]


def test_cycle_finder_lists_the_shortest_cycle_through_each_module() -> None:
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "a"], ["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_real_graph_counts_deferred_imports() -> None:
    graph = import_graph()
    assert set(package_modules()) == set(graph)
    # cli defers `import earthmind_compat` (registration) into the function that runs terratorch.
    assert PACKAGE in graph[f"{PACKAGE}.cli"]


def test_layer_rule_flags_an_upward_import() -> None:
    graph = {f"{PACKAGE}.errors": {f"{PACKAGE}.cli"}, f"{PACKAGE}.cli": {f"{PACKAGE}.errors"}}
    assert layer_violations(graph) == [f"{PACKAGE}.errors (layer 0) imports {PACKAGE}.cli (layer 8)"]
