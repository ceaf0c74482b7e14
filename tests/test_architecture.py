"""The house rules of docs/architecture.md, checked on the source itself.

Layers and cycles are import-linter's contracts (pyproject.toml, [tool.importlinter]); the rest reads the
AST: module and function sizes, private names imported across modules, and imports hidden in functions.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "clue2geo_sdk"
SOURCES = (RUNTIME, ROOT / "exporters", ROOT / "training")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def _modules(*roots: Path) -> Iterator[Path]:
    for root in roots:
        yield from sorted(root.rglob("*.py"))


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_import_contracts_hold() -> None:
    """Layers along the data's path, no sibling cycles, no torch/exporters/training in the runtime."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def test_contracts_catch_a_forbidden_import(tmp_path: Path) -> None:
    """The contracts are live: a copy of the package whose results module imports the CLI is refused."""
    copy = tmp_path / "clue2geo_sdk"
    shutil.copytree(RUNTIME, copy, ignore=shutil.ignore_patterns("__pycache__"))
    results = copy / "results.py"
    results.write_text(results.read_text() + "\n\ndef _probe() -> None:\n    from .cli import main  # noqa: F401\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    lint = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "clue2geo_sdk.results -> clue2geo_sdk.cli" in done.stdout


def test_no_runtime_module_is_over_450_lines() -> None:
    big = {
        str(p.relative_to(ROOT)): n
        for p in _modules(RUNTIME)
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert big == {}


def test_no_function_over_60_lines_without_a_reason() -> None:
    """A longer function says why in its docstring (a line starting 'Why long:')."""
    long = []
    for p in _modules(*SOURCES):
        for fn in _functions(ast.parse(p.read_text(encoding="utf-8"))):
            size = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if size > MAX_FUNCTION_LINES and "Why long:" not in (ast.get_docstring(fn) or ""):
                long.append(f"{p.relative_to(ROOT)}:{fn.lineno} {fn.name} ({size} lines)")
    assert long == []


def test_private_names_are_not_imported_across_modules() -> None:
    """What two modules share is a public name of the lower one."""
    found = []
    for p in _modules(*SOURCES):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                found += [f"{p.relative_to(ROOT)}:{node.lineno} from {node.module} import {n}" for n in private]
    assert found == []


def test_imports_inside_functions_say_why() -> None:
    """The top of a runtime file says what it depends on; an import in a function (an optional extra, a
    native library loaded late) carries a one-line reason as a comment on it or on the line above."""
    bare = []
    for p in _modules(RUNTIME):
        lines = p.read_text(encoding="utf-8").splitlines()
        for fn in _functions(ast.parse("\n".join(lines))):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom) and node.col_offset > 0:
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    if "#" not in here and not above.startswith("#"):
                        bare.append(f"{p.relative_to(ROOT)}:{node.lineno} {here.strip()}")
    assert sorted(set(bare)) == []


@pytest.mark.parametrize("name", ["torch", "exporters", "training"])
def test_importing_the_sdk_loads_no_training_stack(name: str) -> None:
    """Beyond the static contract: a fresh process that imports the SDK and its CLI has not loaded them."""
    code = f"import sys, clue2geo_sdk, clue2geo_sdk.cli; print({name!r} in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
