"""Imports point one way: import-linter's contracts (pyproject.toml), and benchmarks/ standing alone."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# What benchmarks/ must not import: the tests and their helpers (benchmarks are scripts of their own).
# The modules that live in tests/ (and the folder itself): no benchmark may import one.
TEST_MODULES = {"tests"} | {p.stem for p in (ROOT / "tests").glob("*.py")}


def ember_tree(into: Path) -> Path:
    """An `ember/` folder of links laid out as the installed package (pyproject's package-dir):
    grimp, under import-linter, walks one directory per top-level package."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in sorted(mapping.items()):
        if name == "ember":
            (into / "ember").mkdir(parents=True, exist_ok=True)
            for entry in (ROOT / folder).iterdir():
                if entry.name != "__pycache__":
                    (into / "ember" / entry.name).symlink_to(entry)
        else:
            link = into.joinpath(*name.split("."))
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(ROOT / folder, target_is_directory=True)
    return into


def test_import_contracts_are_kept(tmp_path):
    assert LINT_IMPORTS.exists(), "import-linter is missing: pip install -e '.[test]'"
    tree = ember_tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 broken." in proc.stdout, proc.stdout


def test_router_imports_no_torch():
    """What import-linter cannot see: imports inside external packages (transformers imports torch)."""
    code = (
        "import pkgutil, sys, ember.router\n"
        "for m in pkgutil.walk_packages(ember.router.__path__, 'ember.router.'):\n"
        "    __import__(m.name)\n"
        "heavy = ('torch', 'transformers', 'ember.shard', 'ember.launcher')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def imported_roots(path: Path) -> set[str]:
    """The top-level names a script imports (relative imports would be within benchmarks/)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_benchmarks_do_not_import_the_tests():
    scripts = sorted((ROOT / "benchmarks").rglob("*.py"))
    assert scripts
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & TEST_MODULES) for p in scripts}
    # A script needing a helper from tests/ gets its own copy, or the helper moves out of tests/.
    assert {p: names for p, names in offenders.items() if names} == {}, "benchmarks/ import the tests' modules"
