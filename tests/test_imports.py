"""No import cycle in clippy_ray: neither among module-level imports nor through the imports done
inside functions (a lazy import only hides a knot). An import of a package's name
(`from clippy_ray import storage`) is an edge to the module it names, not to the package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "clippy_ray"


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(mods: dict[str, Path], module_level_only: bool) -> dict[str, set[str]]:
    """{module: the clippy_ray modules it imports}."""
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in nodes:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                named = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = named or [base]  # `from pkg import module`: that module; else the module itself
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles_in_clippy_ray():
    mods = modules()
    assert len(mods) > 40
    for module_level_only in (True, False):
        knots = cycles(imports(mods, module_level_only))
        assert knots == [], "\n".join(" -> ".join(k) for k in knots)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
