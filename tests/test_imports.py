"""No import cycles in the package, counting function-local imports as well as module-level ones.

The graph is read from the source with `ast`: every `import` / `from ... import` anywhere in a
module (functions included) is an edge. `from pkg import sub` where `sub` is a submodule is an
edge to `pkg.sub`; `from pkg import name` otherwise an edge to `pkg` (its `__init__`, also when
that only re-exports). A dotted import names only its last module: `from mixtral_jax.x import y`
is no edge to `mixtral_jax/__init__`.
"""

import ast
import itertools
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mixtral_jax")


def modules(root: str = ROOT) -> dict[str, str]:
    """{dotted module name: file path} of every module under `root` (a package directory)."""
    base = os.path.dirname(root)
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, base)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from` import reads from (relative imports resolved)."""
    if not node.level:
        return node.module
    parts = module.split(".")
    parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join(parts + ([node.module] if node.module else []))


def edges(module: str, path: str, known: dict[str, str]) -> dict[str, int]:
    """{imported module of `known`: line of its first import} for every import in `path`."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out: dict[str, int] = {}
    is_package = path.endswith("__init__.py")
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, module, is_package)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.append(sub if sub in known else source)
        for target in targets:
            if target in known and target != module:
                out[target] = min(out.get(target, node.lineno), node.lineno)
    return out


def import_graph(root: str = ROOT) -> dict[str, dict[str, int]]:
    """{module: {imported module: line}} over the package at `root`."""
    known = modules(root)
    return {m: edges(m, p, known) for m, p in sorted(known.items())}


def tangles(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected parts of `graph` of more than one module (each holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    parts: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = {stack.pop()}
            while v not in part:
                part.add(stack.pop())
            if len(part) > 1:
                parts.append(part)

    for v in graph:
        if v not in index:
            visit(v)
    return parts


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle [a, b, ..., a] through each of `tangles(graph)`."""
    return [_shortest_cycle(graph, min(part), part) for part in tangles(graph)]


def _shortest_cycle(graph, start: str, part: set[str]) -> list[str]:
    """Breadth-first from `start` back to itself, inside `part`."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in part and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def _describe(graph, part: set[str]) -> str:
    cycle = _shortest_cycle(graph, min(part), part)
    text = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle))
    rest = sorted(part - set(cycle))
    return f"{text} -> {cycle[-1]}" + (f"; also tangled: {', '.join(rest)}" if rest else "")


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    # the reader sees the imports
    assert "mixtral_jax.parallel.sharding" in graph["mixtral_jax.model.transformer"]
    found = tangles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(graph, p) for p in found)


# The package's layers, lowest first (README's layout): a module imports only from its own layer
# or an earlier one. One layer is a top-level module or a subpackage.
LAYERS = [
    "config",
    "fileio",
    "hf",
    "parallel",
    "kernels",
    "moe",
    "model",
    "checkpoint",
    "convert",
    "tokenizer",
    "data",
    "train",
    "generate",
    "serve",
    "routing",
    "surgery",
    "upcycle",
    "quantize",
    "plan",
    "__init__",
]
# Command-line entry points that reach up a layer, each with its reason.
UPWARD = {
    ("tokenizer", "train"): "the train-tokenizer command reads documents through train/data.py",
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_each_layer_imports_only_from_itself_and_the_layers_below():
    graph = import_graph()
    assert {_layer(m) for m in graph} == set(LAYERS)  # every layer is placed
    upward = []
    for module, imported in graph.items():
        for target, line in imported.items():
            a, b = _layer(module), _layer(target)
            if LAYERS.index(b) > LAYERS.index(a) and (a, b) not in UPWARD:
                upward.append(f"{module} (line {line}) imports {target}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_reader_sees_local_imports_submodules_and_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import os\nfrom pkg import c\n")
    (pkg / "c.py").write_text("from pkg import f\nfrom . import a\n")
    graph = import_graph(str(pkg))
    assert graph == {
        "pkg": {"pkg.a": 1},
        "pkg.a": {"pkg.sub.b": 2},
        "pkg.sub": {},
        "pkg.sub.b": {"pkg.c": 2},
        "pkg.c": {"pkg": 1, "pkg.a": 2},
    }
    assert cycles(graph) == [["pkg", "pkg.a", "pkg.sub.b", "pkg.c", "pkg"]]
