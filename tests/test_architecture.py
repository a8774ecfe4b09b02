"""The package layering of docs/ARCHITECTURE.md, read from the code's own imports.

Every import of a slimtune module, wherever it sits in a file (module top or inside a function),
must point down the layers below, and no two modules may import each other, directly or round
a longer loop.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import slimtune

SRC = Path(slimtune.__file__).parent

# Bottom to top. A package may import packages of lower layers only; packages in one layer do
# not import each other.
LAYERS = [
    {"errors", "choices"},
    {"hardware", "runtime", "files", "cache", "devices", "buffers", "tokens", "targets"},
    {"quant"},
    {"models", "optim"},
    {"lora", "data", "dist"},
    {"infer"},
    {"train"},
    {"serve", "export", "memory"},
    {"ui"},
    {"cli"},
    {"__main__"},
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The slimtune modules `path` imports (`from slimtune.x import y` counts as slimtune.x)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("slimtune.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slimtune."):
            found.add(node.module)
    return found


def package(module: str) -> str:
    return module.split(".")[1]


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in SRC.iterdir()}
    packages = {p for p in packages if not p.startswith("_") or p == "__main__"} - {"py"}
    packages.discard("__pycache__")
    assert packages <= RANK.keys(), f"place these in LAYERS: {sorted(packages - RANK.keys())}"


def test_imports_point_down():
    wrong = []
    for path in SRC.rglob("*.py"):
        source = package(module_name(path)) if path.parent != SRC else path.stem
        for target in imports(path):
            dest = package(target)
            if dest != source and RANK[dest] >= RANK[source]:
                wrong.append(f"{module_name(path)} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_module_import_cycles():
    """Module-top imports only: an import inside a function runs after both modules loaded."""
    graph = defaultdict(set)
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    for name, path in modules.items():
        for target in imports(path, top_level_only=True):
            # `from slimtune.x import y` may name the submodule slimtune.x.y
            graph[name].add(target if target in modules else target.rsplit(".", 1)[0])
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in modules:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])
    # A package's __init__ importing its own submodules, which import names back from the
    # package, is how packages export: only cycles through two different files of one or
    # more packages that are not such __init__ re-exports count.
    real = [c for c in cycles if not _is_reexport(c)]
    assert not real, "import cycles:\n" + "\n".join(real)


def _is_reexport(cycle: str) -> bool:
    nodes = cycle.split(" -> ")
    inits = {n for n in nodes if (SRC.parent / Path(*n.split("."), "__init__.py")).exists()}
    return bool(inits) and all(n.startswith(tuple(inits)) for n in nodes)


def test_every_c_source_ships_in_the_wheel():
    """The C kernels compile from their sources at run time: each .c and .h file under the
    package must be matched by pyproject.toml's package data, or an installed slimtune lacks it."""
    import fnmatch
    import tomllib

    pyproject = SRC.parent.parent / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    sources = [p for p in SRC.rglob("*") if p.suffix in (".c", ".h")]
    assert sources
    for path in sources:
        package = module_name(path.parent / "__init__.py")
        patterns = data.get(package, [])
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns), (
            f"{path.relative_to(SRC.parent)} is not in [tool.setuptools.package-data] {package!r}"
        )
