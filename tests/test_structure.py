"""One place per method: the framework (mixkvq/) imports no baseline; methods and calibrators are found by name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mixkvq.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def baseline_imports(path: Path) -> list[str]:
    """`line: statement` of every import of `baselines` in a file, at module level or inside functions, including
    `importlib.import_module("baselines...")` with a literal name. Registry strings ("baselines.kivi:Kivi") are not
    imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{node.lineno}: {name}" for name in names if name == "baselines" or name.startswith("baselines.")]
    return found


def test_the_framework_imports_no_baseline():
    files = sorted((REPO / "mixkvq").rglob("*.py"))
    assert files
    offending = {str(p.relative_to(REPO)): hits for p in files if (hits := baseline_imports(p))}
    assert not offending, f"mixkvq/ imports baselines (reach a method through the METHODS registry): {offending}"


def test_the_scan_sees_imports_at_module_level_and_inside_functions(tmp_path):
    code = ("import baselines.kivi\nfrom baselines import pmkvq\nMETHOD = 'baselines.kvmix:KVmix'\n"
            "def f():\n    from baselines.pmkvq_store import ProgressiveTokenStore\n"
            "    importlib.import_module('baselines.bf16')\n")
    (tmp_path / "m.py").write_text(code)
    assert [hit.split(": ")[1] for hit in baseline_imports(tmp_path / "m.py")] == [
        "baselines.kivi", "baselines", "baselines.pmkvq_store", "baselines.bf16"]


def test_methods_are_imported_on_first_use_only():
    code = ("import sys; from mixkvq.kv.methods import METHODS; names = METHODS.names(); "
            "before = sorted(m for m in sys.modules if m.startswith('baselines.')); METHODS.get('kivi'); "
            "after = sorted(m for m in sys.modules if m.startswith('baselines.')); print(names, before, after)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("['bf16', 'kivi', 'kvmix', 'mixkvq', 'pmkvq'] [] ['baselines.kivi']")


def test_a_method_registered_by_string_is_built_by_name():
    from mixkvq.registry import Registry

    code = ("from mixkvq.kv.methods import METHODS, method_config, register_method; "
            "register_method('bf16_again', 'baselines.bf16:Bf16'); "
            "assert METHODS.get('bf16_again') is METHODS.get('bf16'); "
            "print(method_config({'name': 'bf16_again', 'nominal_bits': '16'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Bf16Config(name='bf16_again', nominal_bits='16')"
    things = Registry("thing", {"a": "x:y", "b": "x:z"})
    with pytest.raises(KeyError, match="registered twice"):
        things.register("a", "x:w")
    with pytest.raises(ConfigError, match=r"unknown thing 'c'; valid choices: 'a', 'b'"):
        things.get("c")


def test_calibrators_are_found_through_their_method():
    from mixkvq.calib.calibration import calibrating_methods, calibrator

    assert calibrating_methods() == ["kvmix", "mixkvq", "pmkvq"]
    assert calibrator("kvmix").run.__module__ == "baselines.kvmix"
    with pytest.raises(ConfigError, match=r"'kivi' needs no calibration; calibrate one of \['kvmix', 'mixkvq', 'pmkvq'\]"):
        calibrator("kivi")
    with pytest.raises(ConfigError, match="unknown method 'kvquant'"):
        calibrator("kvquant")
