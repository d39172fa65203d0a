"""The repository's layout rules that packaging and imports rely on (no llama.cpp, no model: pure source checks).

- pyproject.toml lists every folder of runtime code as a package, and installs ``ui/`` as ``kvmerge_local.ui``;
- the runtime package (``kvmerge_local/`` and ``ui/``) never imports pytest, the test toolkit (``tests/support``,
  imported as ``support``) or the training code (``train/``), which are not installed;
- inside the runtime package only the CLI imports the UI;
- every document the code and the docs cite (``docs/ALGORITHMS.md``, ``docs/LLAMA_CPP.md``, ...) exists.
"""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ("kvmerge_local", "ui")
NOT_INSTALLED = ("pytest", "support", "train", "tests", "kvmerge_local.testing", "kvmerge_local.train")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    pkg = _module(path) if path.name == "__init__.py" else ".".join(_module(path).split(".")[:-1])
    return _imports_of(path.read_text(encoding="utf-8"), pkg)


def _imports_of(source: str, pkg: str) -> set[str]:
    """Absolute module names (and ``module.name`` for each name taken from a module) imported by ``source``, a
    module of package ``pkg``; imports inside functions count too."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "ui":
        parts = ["kvmerge_local", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_files() -> list[Path]:
    return sorted(p for top in RUNTIME for p in (ROOT / top).rglob("*.py"))


def test_pyproject_lists_every_runtime_folder_and_maps_ui():
    st = _setuptools()
    assert st["package-dir"] == {"kvmerge_local.ui": "ui"}
    folders = {_module(p.parent / "__init__.py") for p in _runtime_files()} | {"kvmerge_local.data"}
    assert set(st["packages"]) == folders, "pyproject.toml [tool.setuptools] packages must list every code folder"
    assert not (ROOT / "kvmerge_local" / "ui").exists(), "ui/ lives at the top of the repository"


def test_runtime_never_imports_test_or_training_code():
    bad = {}
    for path in _runtime_files():
        hits = sorted(m for m in _imports(path) if any(m == n or m.startswith(n + ".") for n in NOT_INSTALLED))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    assert not bad, f"the installed package imports code that is not installed: {bad}"


def test_only_the_cli_imports_the_ui():
    users = sorted(str(p.relative_to(ROOT)) for p in _runtime_files()
                   if p.parts[len(ROOT.parts)] != "ui"
                   and any(m == "kvmerge_local.ui" or m.startswith("kvmerge_local.ui.") for m in _imports(p)))
    assert users == ["kvmerge_local/cli.py"]


def test_the_import_scan_sees_forbidden_imports_in_every_form():
    src = ("import numpy as np\nfrom ..errors import KVMergeError\nfrom . import harness\n"
           "def f():\n    import pytest\n    from support.reference import forward\n    from train import data\n")
    found = _imports_of(src, "kvmerge_local.quality")
    assert {"numpy", "kvmerge_local.errors", "kvmerge_local.quality.harness", "pytest", "support.reference",
            "train.data"} <= found
    assert _module(ROOT / "ui" / "app.py") == "kvmerge_local.ui.app"


#: a cited document: an upper-case ``NAME.md``, optionally with a folder (``docs/ALGORITHMS.md``)
_CITED = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Z][A-Z0-9_]*\.md)\b")


def test_cited_documents_exist():
    files = [p for top in ("kvmerge_local", "ui", "train", "scripts", "benchmarks", "tests", "docs")
             for p in (ROOT / top).rglob("*") if p.suffix in (".py", ".md", ".sh") and p != Path(__file__)]
    files += [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    missing = set()
    for f in files:
        for name in _CITED.findall(f.read_text(encoding="utf-8")):
            if not ((ROOT / name).is_file() or (f.parent / name).is_file()):
                missing.add(f"{f.relative_to(ROOT)}: {name}")
    assert not missing, f"cited documents that are not in the repository: {sorted(missing)}"
    assert _CITED.findall("see ALGORITHMS.md and docs/LLAMA_CPP.md, not results.md") == ["ALGORITHMS.md",
                                                                                       "docs/LLAMA_CPP.md"]
