"""The package's import graph: no module imports a module that imports it back (two-module cycles make
the data flow unreadable and break lazy imports)."""
import ast
from pathlib import Path

KNOWN: set = set()  # none left


def _imports() -> dict:
    root = Path(__file__).resolve().parent.parent / "tensordiff"
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tensordiff"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("tensordiff")}
        mods[name] = deps
    return mods


def test_no_two_module_import_cycles():
    mods = _imports()
    assert len(mods) > 40
    cycles = {tuple(sorted((a, b))) for a, deps in mods.items() for b in deps if a != b and a in mods.get(b, ())}
    assert cycles <= KNOWN, cycles - KNOWN
