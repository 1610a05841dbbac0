"""The package's rooms: no import cycles, the runtime never reaches the tools, no private names across
modules. Read from the source (ast), so lazy imports inside functions count too."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# installed package name -> source folder (setup.cfg's package_dir)
PACKAGES = {"vkv_jax": ROOT / "vkv_jax", "vkv_jax.models": ROOT / "models",
            "vkv_jax.pallas_kernels": ROOT / "pallas_kernels", "vkv_jax.configs": ROOT / "configs"}
TOOLS = ("vkv_jax.cli", "vkv_jax.evaluation", "vkv_jax.bench", "vkv_jax.testbed", "vkv_jax.viz",
         "vkv_jax.generate", "vkv_jax.evaluate", "vkv_jax.bench_prefill")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import statement in module `name`."""
    tree = ast.parse(MODULES[name].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name if _is_package(name) else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            out += [(base, alias.name) for alias in node.names]
    return out


def _edges(name: str) -> set[str]:
    """The package modules that module `name` imports (`from pkg import sub` counts as pkg.sub)."""
    targets = set()
    for module, item in _imports(name):
        if item is not None and f"{module}.{item}" in MODULES:
            targets.add(f"{module}.{item}")
        elif module in MODULES:
            targets.add(module)
    targets.discard(name)
    return targets


GRAPH = {name: _edges(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_the_package():
    assert len(MODULES) > 40 and "vkv_jax.models.llama" in MODULES and "vkv_jax.methods.adakv" in MODULES
    # a submodule importing its own package's __init__ is how Python packages work, not a cycle we made:
    # leave out edges to an ancestor package of the importing module
    graph = {v: {w for w in ws if not (_is_package(w) and v.startswith(w + "."))} for v, ws in GRAPH.items()}
    assert _cycles(graph) == []


def _is_tool(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TOOLS)


@pytest.mark.parametrize("root", ["vkv_jax", "vkv_jax.api", "vkv_jax.pipeline", "vkv_jax.methods"])
def test_runtime_never_imports_the_tools(root):
    seen, todo = set(), [root]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        todo += GRAPH[v]
    assert len(seen) > 5  # the walk follows imports
    assert not [v for v in seen if _is_tool(v)], f"{root} reaches tool modules"


def test_no_private_names_across_modules():
    bad = []
    for name in MODULES:
        package = name if _is_package(name) else name.rpartition(".")[0]
        for module, item in _imports(name):
            if not module.startswith("vkv_jax"):
                continue
            private_module = [p for p in module.split(".") if p.startswith("_")]
            if private_module and not module.startswith(package + "."):
                bad.append(f"{name}: imports private module {module}")
            if item and item.startswith("_") and f"{module}.{item}" not in MODULES:
                bad.append(f"{name}: imports private name {module}.{item}")
            elif item and item.startswith("_") and not f"{module}.{item}".startswith(package + "."):
                bad.append(f"{name}: imports private module {module}.{item}")
    assert bad == []
