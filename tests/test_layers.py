"""The floors of the layout (pyproject.toml ``[tool.importlinter]``): the real tree keeps every contract, and every
contract breaks on a copy of the tree with one forbidden import added -- a check that cannot fail is a defect.

``lint-imports`` analyses files (grimp), not a running interpreter, so it runs in a subprocess whose working
directory holds the tree to check (the copy in ``tmp_path`` for the failing cases).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: import-linter itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONTRACTS = {c["id"]: c["name"] for c in PYPROJECT["tool"]["importlinter"]["contracts"]}

#: contract id -> (file added to the copy, its source): one forbidden import each
VIOLATIONS = {
    "floors": ("kvmerge_local/codec/_violation.py", "from ..kernels import f16\n"),  # codec is below kernels
    "numpy-floors": ("kvmerge_local/methods/_violation.py", "import llama_cpp\n"),
    "c-boundary": ("kvmerge_local/engine/_violation.py", "from ..bridge import _lib\n"),
    "ctypes": ("kvmerge_local/engine/_violation.py", "import ctypes\n"),
    "ui-leaf": ("kvmerge_local/engine/_violation.py", "import ui.render\n"),
    "ui-above-engine": ("ui/_violation.py", "from kvmerge_local import cli\n"),
    "no-tooling": ("kvmerge_local/engine/_violation.py", "import pytest\n"),
}


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        found = shutil.which("lint-imports")
        assert found, "lint-imports is missing: `pip install -e .[test]` (import-linter)"
        exe = Path(found)
    return subprocess.run([str(exe), "--no-cache", "--config", str(cwd / "pyproject.toml")], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "data", "*.gguf")
    for pkg in ("kvmerge_local", "ui"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")


def _status(out: str) -> dict[str, str]:
    """contract name -> KEPT/BROKEN from lint-imports' summary (names may wrap over lines)."""
    flat = re.sub(r"\s+", " ", out)
    return {name: m.group(1) for name in CONTRACTS.values()
            if (m := re.search(re.escape(name) + r" (KEPT|BROKEN)", flat))}


def test_the_tree_keeps_every_contract():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    status = _status(r.stdout)
    assert status == {name: "KEPT" for name in CONTRACTS.values()}, r.stdout


def test_every_contract_has_a_violation_case():
    assert set(VIOLATIONS) == set(CONTRACTS)


def test_make_test_runs_the_contracts_before_pytest():
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert "lint-imports" in recipe and recipe.index("lint-imports") < recipe.index("pytest"), recipe


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("layers")
    _copy_tree(dst)
    return dst


@pytest.mark.parametrize("contract", sorted(VIOLATIONS))
def test_a_forbidden_import_breaks_its_contract(tree_copy, contract):
    rel, src = VIOLATIONS[contract]
    bad = tree_copy / rel
    bad.write_text(src)
    try:
        r = lint_imports(tree_copy)
    finally:
        bad.unlink()
    assert r.returncode != 0, r.stdout + r.stderr
    status = _status(r.stdout)
    assert status.get(CONTRACTS[contract]) == "BROKEN", r.stdout + r.stderr
    module = rel.removesuffix(".py").replace("/", ".")
    assert module in r.stdout, r.stdout


def test_the_copy_alone_keeps_every_contract(tree_copy):
    """The failures above come from the added import, not from the copy."""
    r = lint_imports(tree_copy)
    assert r.returncode == 0, r.stdout + r.stderr
