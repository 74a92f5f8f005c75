"""The benchmark suite and report still run: tiny shapes, in subprocesses, so CI notices rot."""
from __future__ import annotations

import importlib.util
import os
import re
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


def test_pytest_benchmark_suite_runs_in_smoke_mode():
    result = _run(["-m", "pytest", "benchmarks/", "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
                  HGK_BENCH_SMOKE="1")
    summary = result.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, summary
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    # per smoke shape at least: both penalties on torch, the three generic baselines, the diagonal forward
    assert passed >= 6 * 3, summary


def test_report_writes_table_and_plot(tmp_path):
    out, plot = tmp_path / "RESULTS.md", tmp_path / "plot.png"
    _run(["benchmarks/report.py", "--smoke", "--out", str(out), "--plot", str(plot)])
    text = out.read_text()
    assert "## Machine" in text and torch.__version__ in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in row] for row in rows]
    for backend in _available_backends():
        for label in ("exact Hutchinson", "HGP", "exact diagonal, forward"):
            timed = [row for row in rows if row[0] == label and row[1] == backend]
            assert len(timed) == 3, f"{label} [{backend}]: {len(timed)} rows"
            assert all(float(row[2]) > 0 for row in timed), timed
    for label in ("generic Hutchinson, 1 probe", "generic Hutchinson, 3 probes", "generic HGP double backward"):
        timed = [row for row in rows if row[0] == label and row[1] == "reference"]
        assert len(timed) == 3 and all(float(row[2]) > 0 for row in timed), timed
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional, the table is not
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_check_dry_run(tmp_path):
    """The one-command GPU check (benchmarks/device_check.py) runs its every step on the CPU."""
    result = _run(["benchmarks/device_check.py", "--dry-run", "--out-dir", str(tmp_path)])
    report = (tmp_path / "RESULTS-GPU-dry-run.md").read_text()
    assert "Correctness against `reference`" in report and "| triton |" not in report.splitlines()[0]
    assert "triton" in report and "native" in report, report
    assert (tmp_path / "results-gpu-dry-run.json").exists()
    assert "done in" in result.stdout


def test_full_hessian_cost_smoke():
    result = _run(["benchmarks/full_hessian_cost.py", "--smoke"])
    assert "| tiny (N=24" in result.stdout and "ms" in result.stdout


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
    if importlib.util.find_spec("hgkernels._native_cpu") is None:
        pytest.skip("the native CPU module is not built")
    result = _run(["benchmarks/native_ab.py", "--smoke"])
    assert "| smoke-ce | exact Hutchinson | forward |" in result.stdout and "| HGP | backward |" in result.stdout
