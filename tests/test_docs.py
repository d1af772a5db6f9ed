"""docs/architecture.md describes this repository: the files it names exist, and it lists every shard flag."""

from __future__ import annotations

import re
from pathlib import Path

from ember import settings

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()
FOLDERS = ("common", "proto", "shard", "router", "launcher", "tests", "benchmarks", "docs", ".")
FILE = re.compile(r"^[\w./-]+\.(py|c|h|md|proto|toml|sh)$")


def _named_files() -> set[str]:
    # (`ember.proto` and the like are modules, not files)
    return {t for t in re.findall(r"`([^`\s]+)`", DOC) if FILE.match(t) and not t.startswith("ember.")}


def _exists(name: str) -> bool:
    """A path from the repository root, or from one of its folders, or a file anywhere in the tree."""
    if any((ROOT / folder / name).exists() for folder in FOLDERS):
        return True
    return any(ROOT.glob(f"*/**/{name}"))


def test_every_file_the_architecture_names_exists():
    named = _named_files()
    assert len(named) > 30  # the doc does name the code
    missing = sorted(n for n in named if not _exists(n))
    assert not missing, f"docs/architecture.md names files the repository does not have: {missing}"


def test_the_architecture_lists_every_shard_flag():
    missing = [s.flag for s in settings.read_by(settings.SHARD) if s.flag not in DOC]
    assert not missing, f"docs/architecture.md does not list these shard flags: {missing}"


def test_the_architecture_names_nothing_outside_the_repository():
    assert "../" not in DOC and "DESIGN.md" not in DOC
