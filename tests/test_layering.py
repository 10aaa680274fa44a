"""Layers of the code, read from the source: kernels read layouts and buffers, never store classes.

A kernel (kernels/) sees a store only through `layout()` and `buffers()` (mixkvq/layout.py), so no module under
kernels/ imports a store class, a store module or a private name of mixkvq, and kernels and the stores load
without each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORE_MODULES = ("mixkvq/storage.py", "mixkvq/paged.py", *sorted(
    str(p.relative_to(REPO)) for p in (REPO / "baselines").glob("*.py")))


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def module_name(rel: str) -> str:
    return rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def store_classes() -> set[str]:
    """Every class defined in a module that holds stores (storage, paged pages, the baselines)."""
    return {node.name for rel in STORE_MODULES for node in ast.walk(parse(REPO / rel))
            if isinstance(node, ast.ClassDef)}


def kernel_files() -> list[Path]:
    return sorted((REPO / "kernels").rglob("*.py"))


def imports(tree: ast.Module):
    """(module, name or None, line) of every import, at any depth (a function's lazy import counts too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            for alias in node.names:
                yield node.module, alias.name, node.lineno


def test_kernels_import_no_store_class_no_store_module_and_no_private_name():
    classes = store_classes()
    assert {"ChannelGroupStore", "TokenGroupStore", "PagedKeyStore"} <= classes  # the walk finds the stores
    forbidden_modules = {"mixkvq.storage"} | {module_name(rel) for rel in STORE_MODULES if rel.startswith("baselines")}
    bad = []
    for path in kernel_files():
        for module, name, line in imports(parse(path)):
            where = f"{path.relative_to(REPO)}:{line}"
            ours = module.split(".")[0] in ("mixkvq", "baselines")
            if ours and name in classes:
                bad.append(f"{where} imports the store class {name} from {module}")
            elif ours and name is not None and name.startswith("_"):
                bad.append(f"{where} imports the private name {name} from {module}")
            elif module in forbidden_modules or f"{module}.{name}" in forbidden_modules:
                bad.append(f"{where} imports from the store module {module if name is None else f'{module}.{name}'}")
    assert not bad, "\n".join(bad)


def loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1", "PATH": ""}, timeout=300)
    return set(out.stdout.split())


def test_kernels_and_stores_load_without_each_other():
    # The stores reach kernels.pack only when they write through it; kernels reach the page stores only when the
    # CUDA kernel converts a layer. Neither side's import pulls in the other: no import circle.
    kernels = sorted(m for m in loaded_after("import mixkvq.storage") if m.split(".")[0] == "kernels")
    assert not kernels, f"importing mixkvq.storage loads {kernels}"
    assert "mixkvq.storage" not in loaded_after("import kernels"), "importing kernels loads mixkvq.storage"
