"""The README and docs/ say only what the repository backs: named tests exist, links resolve, the
README stays a five-minute read and its quickstart is the shipped example."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def _defined_tests() -> set:
    names = set()
    for path in [*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        names.update(re.findall(r"^\s*def (test_\w+)", path.read_text(), flags=re.M))
    return names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_test_a_doc_names_exists(doc):
    defined = _defined_tests()
    # a test named in prose is `test_name` or path.py::test_name; file names (test_x.py) are links, below
    cited = set(re.findall(r"(?<![-\w])(test_\w+)\b(?!\.(?:py|png|json))", doc.read_text()))  # not --test_envs
    assert cited - defined == set(), f"{doc.name} names tests that do not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_named_file_in_a_doc_exists(doc):
    text = doc.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    targets += re.findall(r"`((?:tests|benchmarks|examples|hgkernels|csrc|docs)/[\w./-]+\.(?:py|md|h|cpp|cu))", text)
    missing = []
    for target in targets:
        if re.match(r"\w+://", target):
            continue
        # links are relative to the doc; paths in backticks are relative to the repository root
        if not ((doc.parent / target).exists() or (ROOT / target).exists()):
            missing.append(target)
    assert missing == [], f"{doc.name} points at files that do not exist: {missing}"


def test_readme_is_a_five_minute_read():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; keep it at 150 or fewer and move detail to docs/"
