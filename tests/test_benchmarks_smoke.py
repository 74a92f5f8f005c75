"""The benchmark suite and report still run: tiny shapes, in subprocesses, so CI notices rot."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(args, **env):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, f"{args} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _available_backends():
    sys.path.insert(0, BENCH)
    try:
        import hgk_bench
    finally:
        sys.path.remove(BENCH)
    shape = hgk_bench.SUBSETS["smoke"][0]
    available, _ = hgk_bench.closed_form_backends(shape, hgk_bench.make_inputs(shape, torch.device("cpu")))
    return available


@pytest.mark.slow
def test_pytest_benchmark_suite_runs_in_smoke_mode():
    # HGK_BENCH_BUDGET: no smoke case may be skipped as an estimated time-out on a slow or busy machine
    result = _run(["-m", "pytest", "benchmarks/", "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
                  HGK_BENCH_SMOKE="1", HGK_BENCH_BUDGET="3600")
    summary = result.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, summary
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    # per smoke shape at least: both penalties on torch, the three generic baselines, the diagonal forward
    assert passed >= 6 * 3, summary


def _cell_ms(cell: str) -> float:
    """A markdown time cell as a number, whatever its digit grouping ("1,096" or "1096")."""
    return float(cell.replace(",", "").replace("\u202f", ""))


def _report_tables(text: str) -> dict:
    """{case label: {(method, backend): row cells}} from a report's per-case sections."""
    tables, label = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            label = line[4:]
            tables[label] = {}
        elif label is not None and line.startswith("| ") and not line.startswith("| method "):
            cells = [cell.strip() for cell in line.split("|")[1:-1]]
            tables[label][(cells[0], cells[1])] = cells
    return tables


@pytest.mark.slow
def test_report_writes_data_table_and_plot(tmp_path):
    out, plot = tmp_path / "RESULTS.md", tmp_path / "plot.png"
    # a budget no machine reaches: which rows run must not depend on the machine's speed
    _run(["benchmarks/report.py", "--smoke", "--budget", "3600", "--out", str(out), "--plot", str(plot)])
    data = json.loads((tmp_path / "RESULTS.json").read_text())  # the raw data, beside the markdown by default
    text = out.read_text()
    assert "## Machine" in text and torch.__version__ in text and data["machine"]["torch"] == torch.__version__
    cases = {case["label"]: case["rows"] for case in data["cases"]}
    assert len(cases) == 3, list(cases)
    for label, rows in cases.items():
        by_method = {}
        for row in rows:
            by_method.setdefault(row["method"]["label"], []).append(row)
        for backend in _available_backends():
            for method in ("exact Hutchinson", "HGP", "exact diagonal, forward"):
                timed = [row for row in by_method.get(method, []) if row["method"]["backend"] == backend]
                assert len(timed) == 1, f"{label}: {method} [{backend}]: {timed}"
        for method in ("generic Hutchinson, 1 probe", "generic Hutchinson, 3 probes", "generic HGP double backward"):
            assert [row["method"]["backend"] for row in by_method.get(method, [])] == ["reference"], (label, method)
        for row in rows:
            assert row["status"] == "ok" and row["times"] and all(t > 0 for t in row["times"]), row

    # The tables are generated from the raw data: every row's median is the one the data gives ...
    tables = _report_tables(text)
    assert set(tables) == set(cases)
    for label, rows in cases.items():
        assert len(tables[label]) == len(rows)
        for row in rows:
            cells = tables[label][(row["method"]["label"], row["method"]["backend"])]
            median_ms = 1e3 * statistics.median(row["times"])
            assert _cell_ms(cells[2]) == pytest.approx(median_ms, rel=5e-3, abs=0.5), (cells, row["times"])
            assert int(cells[4]) == len(row["times"])
    # ... and the markdown renders again from the data alone, identically.
    again = tmp_path / "again"
    again.mkdir()
    (again / "RESULTS.json").write_text((tmp_path / "RESULTS.json").read_text())
    _run(["benchmarks/report.py", "--from-data", str(again / "RESULTS.json"), "--out", str(again / "RESULTS.md"),
          "--plot", str(again / "plot.png")])
    assert (again / "RESULTS.md").read_text() == text
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional, the table is not
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cell_parsing_is_independent_of_digit_grouping():
    assert _cell_ms("1,096") == _cell_ms("1096") == 1096.0 and _cell_ms("0.52") == 0.52


def test_report_defaults_write_no_tracked_file():
    """Without --out, report.py writes under benchmarks/out/, which git ignores."""
    sys.path.insert(0, BENCH)
    try:
        import report
    finally:
        sys.path.remove(BENCH)
    args = report.parse_args(["--smoke"])
    for path in (args.out, args.data, args.plot):
        assert os.path.dirname(os.path.abspath(path)) == os.path.join(BENCH, "out"), path
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(BENCH, "out", "RESULTS.md")], cwd=ROOT)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, "benchmarks/out/ is not git-ignored"
    explicit = report.parse_args(["--out", os.path.join(BENCH, "RESULTS.md")])
    assert explicit.data == os.path.join(BENCH, "RESULTS.json")
    assert explicit.plot == os.path.join(BENCH, "time_vs_n.png")


@pytest.mark.slow
def test_device_check_dry_run(tmp_path):
    """The one-command GPU check (benchmarks/device_check.py) runs its every step on the CPU."""
    result = _run(["benchmarks/device_check.py", "--dry-run", "--out-dir", str(tmp_path)])
    report = (tmp_path / "RESULTS-GPU-dry-run.md").read_text()
    assert "Correctness against `reference`" in report and "| triton |" not in report.splitlines()[0]
    assert "triton" in report and "native" in report, report
    assert (tmp_path / "results-gpu-dry-run.json").exists()
    assert "done in" in result.stdout
    assert f"hgkernels imported from {os.path.realpath(os.path.join(ROOT, 'hgkernels'))} " in result.stdout


def test_device_check_refuses_a_package_from_elsewhere(tmp_path, monkeypatch):
    """The check must time this checkout: a tree whose hgkernels is not importable fails it."""
    saved = sys.path[:]
    try:
        sys.path.insert(0, BENCH)
        import device_check
    finally:
        sys.path[:] = saved  # importing it puts the root first on sys.path
    monkeypatch.setattr(device_check, "ROOT", str(tmp_path))
    with pytest.raises(SystemExit, match="not this checkout"):
        device_check.check_import()


def test_full_hessian_cost_smoke():
    result = _run(["benchmarks/full_hessian_cost.py", "--smoke"])
    assert "| tiny (N=24" in result.stdout and "ms" in result.stdout


def test_cma_cost_smoke(tmp_path):
    out = tmp_path / "cma_cost.md"
    result = _run(["benchmarks/cma_cost.py", "--smoke", "--out", str(out)])
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 6 |") or line.startswith("| 20 |")]
    assert len(rows) == 4 and all("| est." not in row and "(explicit)" in row for row in rows), result.stdout
    assert out.read_text().strip() == result.stdout.strip()


def test_imagenet_head_smoke(tmp_path):
    result = _run(["benchmarks/imagenet_head.py", "--smoke", "--out", str(tmp_path / "imagenet.md")])
    for name in ("HGP", "Hutchinson (exact)", "full Hessian", "Fishr"):
        assert f"| {name} |" in result.stdout, result.stdout
    sys.path.insert(0, BENCH)
    try:
        import hgk_bench
    finally:
        sys.path.remove(BENCH)
    assert hgk_bench.shape_named("imagenet") in hgk_bench.SUBSETS["named"]
    assert (hgk_bench.shape_named("imagenet").c, hgk_bench.shape_named("imagenet").d) == (1000, 2048)


def test_cma_cost_helpers_compute_cmas_objective():
    """The benchmark's re-implementations of CMA's two forms give full_hessian_penalty / C^2 (float64)."""
    sys.path.insert(0, BENCH)
    try:
        import cma_cost
    finally:
        sys.path.remove(BENCH)
    x, logits, labels, sizes = cma_cost._inputs(5, 4, 3, 6)
    x, logits = x.double(), logits.double() * 3
    sizes = [4, 6, 8]
    ours = cma_cost.ours(x, logits, labels, sizes)
    for form in ("explicit", "pairwise"):
        torch.testing.assert_close(cma_cost.cma(form)(x, logits, labels, sizes), ours, rtol=1e-10, atol=0)
    # the gradient term alone, against per-environment autograd gradients of the bias-free head / C
    w = torch.zeros(4, 6, dtype=torch.float64, requires_grad=True)
    grads = [torch.autograd.grad(torch.nn.functional.cross_entropy(lg + xe @ w.T, y), w)[0] / 4
             for xe, lg, y in zip(x.split(sizes), logits.split(sizes), labels.split(sizes))]
    mean = torch.stack(grads).mean(0)
    expected = sum((g - mean).pow(2).sum() for g in grads) / 3
    torch.testing.assert_close(cma_cost.cma_gradient_term(x, logits, labels, sizes), expected, rtol=1e-12, atol=0)
    assert cma_cost.explicit_bytes(2048, 65, 4, 32) > 4 * 2**30 > cma_cost.explicit_bytes(384, 7, 4, 32)


def test_shuffled_ids_smoke():
    result = _run(["benchmarks/shuffled_ids.py", "--smoke"])
    assert "| tiny (N=60" in result.stdout and "×" in result.stdout


def test_host_overhead_smoke():
    result = _run(["benchmarks/host_overhead.py", "--smoke"])
    assert "| F.cross_entropy |" in result.stdout and "| exact Hutchinson |" in result.stdout


def test_autograd_node_ab_smoke():
    result = _run(["benchmarks/autograd_node_ab.py", "--smoke"])
    built = "| tiny (N=12, D=5, C=3, E=3) | HGP |" in result.stdout
    assert built or ("no autograd node" in result.stdout and os.environ.get("CI", "").lower() != "true"), result.stdout


def test_host_breakdown_smoke():
    result = _run(["benchmarks/host_breakdown.py", "--smoke"])
    built = "| tiny (N=12, D=5, C=3, E=3) | HGP |" in result.stdout
    assert built or ("no autograd node" in result.stdout and os.environ.get("CI", "").lower() != "true"), result.stdout


def test_native_ab_smoke():
    if importlib.util.find_spec("hgkernels._native") is None:
        pytest.skip("the native CPU module is not built")
    result = _run(["benchmarks/native_ab.py", "--smoke"])
    assert "| smoke-ce | exact Hutchinson | forward |" in result.stdout and "| HGP | backward |" in result.stdout


@pytest.mark.slow
def test_training_step_smoke():
    """The README's speed command, on tiny shapes: it checks ours against the official formulation first."""
    result = _run(["benchmarks/training_step.py", "--smoke"])
    assert "| official/ERM |" in result.stdout and "| smoke-ce | HGP |" in result.stdout, result.stdout[-2000:]


@pytest.mark.slow  # four processes
def test_accumulation_benchmark_smoke(tmp_path):
    out = tmp_path / "accumulation.md"
    result = _run(["benchmarks/accumulation.py", "--smoke", "--threads", "1", "--out", str(out)])
    assert out.read_text() in result.stdout
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| way") and not line.startswith("| penalty")}
    assert {"full", "exact", "naive", "hgp", "hutchinson", "full_hessian", "fishr"} <= set(rows)
    for method in ("hgp", "hutchinson", "full_hessian", "fishr"):
        naive, exact = rows[method][2].split("/")  # gradient of the whole objective: naive / exact
        assert float(exact) < 1e-4 < float(naive), (method, rows[method])


def test_many_envs_smoke(tmp_path):
    out = tmp_path / "many_envs.md"
    result = _run(["benchmarks/many_envs.py", "--smoke", "--out", str(out)])
    assert "| tiny (N=64, D=5, C=3) | HGP, sample form |" in result.stdout and "E=16 ÷ E=2" in result.stdout
    assert out.read_text().strip() == result.stdout.strip()
