"""pytest-benchmark suite: forward + backward of both penalties per backend, and the baselines.

    pytest benchmarks/ --benchmark-only                          # named shapes
    HGK_BENCH_SUBSET=named,sweep-n pytest benchmarks/ --benchmark-only
    HGK_BENCH_SMOKE=1 pytest benchmarks/ --benchmark-disable      # tiny shapes, each call once (CI)

Cases whose estimated time exceeds HGK_BENCH_BUDGET seconds (default 30), or whose
estimated memory exceeds half of what is free, are skipped with that estimate as the
reason: a time-out or out-of-memory is a result. Each benchmark's extra_info holds the
floor (ms), its ratio and the peak memory of one call (see hgk_bench.peak_memory).
"""
from __future__ import annotations

import os
from functools import lru_cache

import pytest
import torch

import hgk_bench as hb

SMOKE = os.environ.get("HGK_BENCH_SMOKE") == "1"
SHAPES = hb.shapes_for(["smoke"] if SMOKE else os.environ.get("HGK_BENCH_SUBSET", "named").split(","))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BUDGET = float(os.environ.get("HGK_BENCH_BUDGET", "30"))
CLOSED_FORM = ("torch", "native", "triton")

shape_param = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)


@lru_cache(maxsize=1)
def ceilings() -> hb.Ceilings:
    return hb.measure_ceilings(DEVICE, quick=SMOKE)


@lru_cache(maxsize=None)
def inputs_for(shape: hb.Shape) -> hb.Inputs:
    return hb.make_inputs(shape, DEVICE)


def closed_form_backend(shape: hb.Shape, backend: str) -> None:
    """Skip with the backend's own reason when it cannot run here."""
    _, skipped = hb.closed_form_backends(shape, inputs_for(shape))
    if backend in skipped:
        pytest.skip(f"{backend}: {skipped[backend]}")


def run_benchmark(benchmark, method: hb.Method, shape: hb.Shape, estimate: float = 0.0) -> None:
    """Benchmark one method; slow ones (one call over a fifth of the budget) get a single round."""
    need = hb.memory_estimate(method, shape)
    free = hb.available_memory_bytes(DEVICE)
    if need > free // 2:
        pytest.skip(f"out of memory (est. {need / 2**30:.1f} GiB > half the {free / 2**30:.1f} GiB free)")
    if estimate > BUDGET:
        pytest.skip(f"time-out (est. {estimate:.0f} s > {BUDGET:.0f} s budget)")
    step = hb.make_step(method, shape, inputs_for(shape))
    with hb.peak_memory(DEVICE) as mem:
        first = hb.timed(step, DEVICE)
    floor = hb.floor_seconds(method.penalty, shape, ceilings(), method.form)
    benchmark.extra_info.update(case=shape.label, method=method.label, backend=method.backend,
                                floor_ms=floor * 1e3, first_run_over_floor=first / floor,
                                peak_mem_mib=mem["bytes"] / 2**20)
    if first * 5 > BUDGET:
        benchmark.pedantic(step, rounds=1, iterations=1)
    else:
        benchmark(step)


@shape_param
@pytest.mark.parametrize("backend", CLOSED_FORM)
@pytest.mark.parametrize("penalty", ["hutchinson", "hgp"])
@pytest.mark.parametrize("kind", ["closed", "feature"], ids=["form-auto", "form-feature"])
def test_closed_form(benchmark, shape, penalty, backend, kind):
    """form="auto", and the C × Dh form where auto takes the sample form (the backend's own kernels)."""
    closed_form_backend(shape, backend)
    if kind == "feature" and not hb.auto_takes_sample_form(penalty, inputs_for(shape), shape, backend):
        pytest.skip("form='auto' already takes the C × Dh form here")
    benchmark.group = f"{shape.name} fwd+bwd"
    label = "exact Hutchinson" if penalty == "hutchinson" else "HGP"
    run_benchmark(benchmark, hb.Method(penalty, backend, kind, label if kind == "closed" else f"{label}, C × Dh form"),
                  shape)


@shape_param
def test_generic_one_probe(benchmark, shape):
    benchmark.group = f"{shape.name} fwd+bwd"
    run_benchmark(benchmark, hb.Method("hutchinson", "reference", "unit", "generic Hutchinson, 1 probe", probes=1),
                  shape)


@shape_param
@pytest.mark.parametrize("penalty", ["hutchinson", "hgp"])
def test_generic_official(benchmark, shape, penalty):
    """Official probe count (Hutchinson) or HGP double backward, estimated from a one-probe call first."""
    benchmark.group = f"{shape.name} fwd+bwd"
    unit = hb.Method("hutchinson", "reference", "unit", "generic Hutchinson, 1 probe", probes=1)
    if penalty == "hutchinson":
        method = hb.Method("hutchinson", "reference", "official",
                           f"generic Hutchinson, {shape.official_probes} probes", probes=shape.official_probes)
    else:
        method = hb.Method("hgp", "reference", "official", "generic HGP double backward")
    if hb.memory_estimate(unit, shape) > hb.available_memory_bytes(DEVICE) // 2:
        pytest.skip("out of memory (est.): the one-probe call does not fit")
    unit_step = hb.make_step(unit, shape, inputs_for(shape))
    unit_time = min(hb.timed(unit_step, DEVICE) for _ in range(2))  # the first call also warms up
    run_benchmark(benchmark, method, shape,
                  estimate=hb.official_estimate(method, shape, inputs_for(shape), DEVICE, unit_time))


@shape_param
@pytest.mark.parametrize("backend", CLOSED_FORM)
def test_exact_diag_forward(benchmark, shape, backend):
    closed_form_backend(shape, backend)
    benchmark.group = f"{shape.name} diagonal forward"
    run_benchmark(benchmark, hb.Method("diag", backend, "closed", "exact diagonal, forward"),
                  shape)


@shape_param
def test_backpack_diag_forward(benchmark, shape):
    reason = hb.backpack_reason()
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{shape.name} diagonal forward"
    run_benchmark(benchmark, hb.Method("diag", "backpack", "peer", "BackPACK DiagHessian, forward"), shape)
