"""Layers of the code, read from the source: kernels read layouts and buffers, never store classes; settings are
values, never module state.

A kernel (kernels/) sees a store only through `layout()` and `buffers()` (mixkvq/kv/layout.py), so no module under
kernels/ imports a store class, a store module or a private name of mixkvq, and kernels and the stores load
without each other.

A setting (a kernel's tuning, who packs the stores' writes) is passed as a value (a config option, a dataclass, an
argument), so no code assigns an attribute of a project module: not `decode.NUM_WARPS = 4`, not
`setattr(decode, name, value)`, and in tests not `monkeypatch.setattr(storage, "PACK_KERNELS", "on")` for a
module's data global. Tests may still replace a function with a double (a download, a fault injected into
`dequantize`): that is a stand-in, not a setting.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORE_MODULES = ("mixkvq/kv/storage.py", "mixkvq/kv/paged.py", "mixkvq/kv/tiered.py", *sorted(
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
    forbidden_modules = {"mixkvq.kv.storage"} | {module_name(rel) for rel in STORE_MODULES if rel.startswith("baselines")}
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
    kernels = sorted(m for m in loaded_after("import mixkvq.kv.storage") if m.split(".")[0] == "kernels")
    assert not kernels, f"importing mixkvq.kv.storage loads {kernels}"
    assert "mixkvq.kv.storage" not in loaded_after("import kernels"), "importing kernels loads mixkvq.kv.storage"


# ---- settings are values ---------------------------------------------------------------------------------------

PACKAGES = ("kernels", "mixkvq", "baselines")
CHECKED = ("scripts", "tests", "mixkvq", "baselines", "kernels")


def checked_files() -> list[Path]:
    return [REPO / "run.py", *sorted(p for d in CHECKED for p in (REPO / d).rglob("*.py"))]


def module_file(name: str) -> Path | None:
    """The source of a project module (`mixkvq.kv.storage`), or None when `name` is no project module."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> project module it is bound to by an import (`import mixkvq.kv.storage as s`, `from kernels import
    decode`, `import kernels.pack` binding `kernels`)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
                else:
                    out[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return {k: v for k, v in out.items() if module_file(v) is not None}


def module_of(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """The project module an expression names (`decode`, `kernels.decode`), or None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        parent = module_of(node.value, aliases)
        if parent is not None and module_file(f"{parent}.{node.attr}") is not None:
            return f"{parent}.{node.attr}"
    return None


def stand_ins(module: str) -> set[str]:
    """Names a test may replace with a double: the functions, classes and imported names a module binds at its top
    level (anything else it binds is data: a setting or a table)."""
    names = set()
    for node in parse(module_file(module)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def patched(call: ast.Call, aliases: dict[str, str]) -> tuple[str, str | None] | None:
    """(module, name) a `monkeypatch.setattr/delattr` call patches in a project module, else None."""
    if not call.args:
        return None
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):  # monkeypatch.setattr("pkg.mod.NAME", v)
        module, _, name = first.value.rpartition(".")
        return (module, name) if module_file(module) is not None else None
    module = module_of(first, aliases)
    if module is None:
        return None
    name = call.args[1] if len(call.args) > 1 else None
    return module, name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else None


def unpacked(target: ast.expr):
    """The single targets of an assignment target (`a.x, b.y = ...` assigns two)."""
    if isinstance(target, (ast.Tuple, ast.List)):
        for t in target.elts:
            yield from unpacked(t)
    elif isinstance(target, ast.Starred):
        yield from unpacked(target.value)
    else:
        yield target


def module_assignments(path: Path) -> list[str]:
    """Where a file sets an attribute of a project module, in line order."""
    tree = parse(path)
    aliases = module_aliases(tree)
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    where = lambda node: f"{shown}:{node.lineno}"  # noqa: E731
    bad = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in (t for target in targets for t in unpacked(target)):
            if isinstance(t, ast.Attribute) and module_of(t.value, aliases) is not None:
                bad.append(f"{where(node)} assigns {module_of(t.value, aliases)}.{t.attr}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("setattr", "delattr") and node.args \
                and module_of(node.args[0], aliases) is not None:
            bad.append(f"{where(node)} {func.id}s an attribute of {module_of(node.args[0], aliases)}")
        if isinstance(func, ast.Attribute) and func.attr in ("setattr", "delattr") \
                and isinstance(func.value, ast.Name) and func.value.id == "monkeypatch":
            hit = patched(node, aliases)
            if hit is not None and hit[1] not in stand_ins(hit[0]):
                bad.append(f"{where(node)} monkeypatches the setting {hit[0]}.{hit[1] or '<computed name>'}")
    return sorted(bad, key=lambda line: int(line.split(" ")[0].rsplit(":", 1)[1]))


def test_no_code_assigns_a_setting_of_a_project_module():
    bad = [line for path in checked_files() for line in module_assignments(path)]
    assert not bad, "pass settings as values (config, dataclass, argument):\n" + "\n".join(bad)


def test_the_assignment_check_sees_every_form(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import kernels.decode\nimport mixkvq.kv.storage as storage\nfrom kernels import pack\n"
        "from mixkvq import models\n"
        "kernels.decode.NUM_WARPS = 8\nstorage.PACK_KERNELS = 'on'\npack._MAX_TILE += 1\n"
        "setattr(kernels.decode, 'X', 1)\n"
        "def test_x(monkeypatch):\n"
        "    monkeypatch.setattr(storage, 'PACK_KERNELS', 'on')\n"
        "    monkeypatch.setattr('kernels.pack._MAX_TILE', 256)\n"
        "    monkeypatch.setattr(models, '_pip_download', None)\n")  # a function: a test double, allowed
    assert [line.split(" ", 1)[1] for line in module_assignments(sample)] == [
        "assigns kernels.decode.NUM_WARPS", "assigns mixkvq.kv.storage.PACK_KERNELS", "assigns kernels.pack._MAX_TILE",
        "setattrs an attribute of kernels.decode", "monkeypatches the setting mixkvq.kv.storage.PACK_KERNELS",
        "monkeypatches the setting kernels.pack._MAX_TILE"]
