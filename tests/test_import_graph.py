"""The layering of docs/architecture.md, read statically off the sources (every import, also those
inside functions): no import circle among ssamba's modules, and no arrow from the lower layers up."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ssamba"

# layer -> what its modules may import of ours (besides their own layer)
ALLOWED = {
    "ssamba.constants": set(),
    "ssamba.errors": set(),
    "ssamba.ops": set(),
    "ssamba.metrics": {"ssamba.constants"},
    "ssamba.models": {"ssamba.constants", "ssamba.ops"},
    "ssamba.data": {"ssamba.constants", "ssamba.errors"},
    "ssamba.prepare": {"ssamba.data", "ssamba.constants", "ssamba.errors"},
    "ssamba.utils.launch": set(),  # train.py's process plumbing
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ssamba modules ``name`` imports, resolved to modules (``from pkg import submodule`` included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t == "ssamba" or t.startswith("ssamba."))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the modules importing it runs first: the imported ones and their packages, leaving
    out the root package and the importer's own packages (always initialised before it)."""
    found = modules()
    known = set(found)
    edges = {}
    for name, path in found.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        targets = set()
        for target in imports(name, path, known):
            parts = target.split(".")
            targets.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        edges[name] = {t for t in targets if t in known and t != name and t not in own}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(name: str) -> str | None:
    return next((layer for layer in ALLOWED if name == layer or name.startswith(layer + ".")), None)


def test_the_graph_reads_relative_and_submodule_imports():
    edges = graph()
    assert "ssamba.models.released" in edges["ssamba.models.ssamba"]  # from . import released
    assert "ssamba.ops.backend" in edges["ssamba.models.ssamba"]  # from ..ops.backend import ...
    assert "ssamba.api" in edges["ssamba.embed.__main__"]


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_import_nothing_above_them(layer):
    edges = graph()
    wrong = {(name, target) for name, targets in edges.items() if layer_of(name) == layer
             for target in targets if layer_of(target) != layer and layer_of(target) not in ALLOWED[layer]}
    assert not wrong, f"{layer} imports above its layer: {sorted(wrong)}"
