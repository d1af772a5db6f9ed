"""Results and docs hold no absolute paths of the machine that made them (repository-relative or `~`)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

ABSOLUTE = re.compile(r"(?<![\w.~])/(?:root|home|work|Users)/[\w.-]+")


def test_results_and_docs_name_no_absolute_paths():
    files = [p for p in (ROOT / "benchmarks" / "results").rglob("*") if p.suffix in (".json", ".md", ".txt", ".log")]
    files += [ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "docs" / "architecture.md"]
    offenders = {str(p.relative_to(ROOT)): ABSOLUTE.findall(p.read_text(errors="replace"))[:3] for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_portable_makes_the_repository_relative_and_home_tilde():
    home = str(Path.home())
    text = f"{report.REPO_ROOT}/.venv/bin/python run {home}/.cache/ember/models/x"
    assert report.portable(text) == ".venv/bin/python run ~/.cache/ember/models/x"
