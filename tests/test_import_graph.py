"""The package's import graph, read with `ast` (imports inside functions included), has no cycle, and a
function-level import of a package module is not needed anywhere in the IO layer."""

import ast
import os

import stackwise_hf

PACKAGE = os.path.dirname(stackwise_hf.__file__)


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


def _imported(module: str, path: str, node, modules) -> set[str]:
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        targets = {base} | {f"{base}.{a.name}" for a in node.names}
    else:
        targets = {a.name for a in node.names}
    # A module importing its own package (`from . import x` names the package too) is not an edge.
    return {t for t in targets if t in modules and t != module and not module.startswith(t + ".")}


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int]]]:
    """{module: modules it imports} and the (module, line) of every function-level package import."""
    modules, edges, local = _modules(), {}, []
    for module, path in modules.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _imported(module, path, node, modules)
                edges.setdefault(module, set()).update(targets)
                if targets and id(node) in inside:
                    local.append((module, node.lineno))
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_import_graph_has_no_cycle():
    edges, _ = import_graph()
    assert cycles(edges) == []


IO_LAYER = ("layout", "errors", "stacks", "serialization", "resolver", "quantization", "adapters", "adapter_files",
            "growth", "rack_files", "model_card", "hub", "rack", "modeling_stackwise", "configuration_stackwise")


def test_the_io_layer_imports_package_modules_only_at_the_top():
    _, local = import_graph()
    assert [(m, line) for m, line in local if m.removeprefix("stackwise_hf.") in IO_LAYER] == []
