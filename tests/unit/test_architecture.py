"""The layers hold: imports go only downward and nothing imports in a cycle.

    preprocessing, videochat_client  (leaves: bytes -> pixels; the wire schema and the client)
    videochat.model  <-  videochat.runtime  <-  videochat.serving  <-  videochat.launch / videochat.tools / adapters

Every import counts, also one inside a function (a lazy import hides a cycle, it does not remove it).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support.paths import ROOT

SOURCES = {"preprocessing": ROOT / "preprocessing", "videochat": ROOT / "videochat",
           "videochat_client": ROOT / "client" / "videochat_client"}
ADAPTERS = sorted((ROOT / "model_repository").glob("*/1/model.py"))

# Higher rank may import lower or equal rank, never higher.
RANKS = {
    "preprocessing": 0, "videochat_client": 0,
    "videochat.errors": 0,      # the user-facing error type every CLI entry point reports the same way
    "videochat.model": 1, "videochat.runtime": 2, "videochat.serving": 3,
    "videochat.launch": 4, "videochat.tools": 4, "model_repository": 4, "videochat.__main__": 5,
}
# What each leaf may import from the project: nothing of the server.
FORBIDDEN = {"preprocessing": ("videochat", "videochat_client"), "videochat_client": ("videochat", "preprocessing")}


def _module_name(path: Path) -> str:
    if path in ADAPTERS:
        return f"model_repository.{path.parent.parent.name}"
    for top, base in SOURCES.items():
        if base in path.parents:
            parts = path.relative_to(base).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join((top, *parts))
    raise AssertionError(path)


def _imports(path: Path, name: str) -> set[tuple[str, str]]:
    """(module, name) pairs `path` imports; name "" for `import module`. Relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update((a.name, "") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update((base, a.name) for a in node.names)
    return {(m, n) for m, n in found if m.split(".")[0] in SOURCES}


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the project modules it imports; and the imports of project modules that do not exist."""
    files = [p for base in SOURCES.values() for p in base.rglob("*.py")] + ADAPTERS
    modules = {_module_name(p): p for p in files}
    graph, missing = {}, []
    for name, path in modules.items():
        # `from pkg import sub` depends on pkg.sub when that is a module, else on pkg itself
        targets = {f"{m}.{n}" if f"{m}.{n}" in modules else m for m, n in _imports(path, name)}
        missing += [f"{name} imports {t}" for t in targets if t not in modules]
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph, missing


def _rank(module: str) -> int:
    if module == "videochat":          # the bare package (empty __init__); each subpackage must be listed
        return 0
    best = max((k for k in RANKS if module == k or module.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{module} belongs to no layer: add it to RANKS"
    return RANKS[best]


GRAPH, MISSING = _graph()


def test_every_import_of_the_project_resolves():
    assert not MISSING


def test_every_module_belongs_to_a_layer():
    for module in GRAPH:
        _rank(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_go_down(module):
    for target in GRAPH[module]:
        assert _rank(target) <= _rank(module), f"{module} (layer {_rank(module)}) imports {target} (layer {_rank(target)})"
    for leaf, banned in FORBIDDEN.items():
        if module.split(".")[0] == leaf:
            assert not [t for t in GRAPH[module] if t.split(".")[0] in banned], f"{module} imports the server"


def test_no_import_cycles():
    state: dict[str, int] = {}   # 1 = on the stack, 2 = done

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
