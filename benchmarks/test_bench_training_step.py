"""pytest-benchmark suite: whole training steps (see training_step.py), ERM vs ERM + penalty.

    pytest benchmarks/test_bench_training_step.py --benchmark-only                  # cmnist, pacs, domainnet
    HGK_BENCH_STEP_SHAPES=cmnist pytest benchmarks/test_bench_training_step.py --benchmark-only
    HGK_BENCH_SMOKE=1 pytest benchmarks/ --benchmark-disable                         # tiny shapes, each step once (CI)

Variants per shape: ``erm``; per method (exact Hutchinson, HGP): ``ours`` (hgkernels at default
options), ``ours-nv`` (validate=False) and ``official`` (generic autograd double backward on the
head's parameters, per environment; Hutchinson with one probe). Each benchmark is one step
(zero_grad, forward, backward, Adam). pytest-benchmark runs the cases one after the other, not
interleaved: on a noisy machine prefer `python benchmarks/training_step.py`, which interleaves
rounds and reports per-round ratios. `test_ours_matches_official` (not a benchmark) checks in
float64 that both compute the same objective and parameter gradients.
"""
from __future__ import annotations

import os

import pytest

import training_step as ts

SMOKE = os.environ.get("HGK_BENCH_SMOKE") == "1"
SHAPE_NAMES = list(ts.SMOKE_SHAPES) if SMOKE else os.environ.get(
    "HGK_BENCH_STEP_SHAPES", ",".join(ts.DEFAULT_SHAPES)).split(",")

shape_param = pytest.mark.parametrize("shape_name", SHAPE_NAMES)
method_param = pytest.mark.parametrize("method", ts.METHODS)


def _run(benchmark, shape_name: str, variant: str, method):
    shape = ts.ALL_SHAPES[shape_name]
    step = ts.make_step(shape, variant, method)
    step()  # warm-up: first-call costs (imports, allocator) are not a training step's
    benchmark.group = f"{shape_name} training step"
    benchmark.extra_info.update(case=shape.label, variant=variant, method=method or "-",
                                **{k: str(v) for k, v in shape.convention.items()})
    benchmark(step)


@shape_param
def test_step_erm(benchmark, shape_name):
    _run(benchmark, shape_name, "erm", None)


@shape_param
@method_param
@pytest.mark.parametrize("variant", ["ours", "ours-nv", "official"])
def test_step_penalty(benchmark, shape_name, method, variant):
    _run(benchmark, shape_name, variant, method)


@shape_param
@method_param
def test_ours_matches_official(shape_name, method):
    """Same objective: penalty terms and every parameter gradient, float64 (Hutchinson: one probe, same probes)."""
    diff = ts.agreement(ts.ALL_SHAPES[shape_name], method)
    assert diff["hessian"] < 1e-8 and diff["gradient"] < 1e-8 and diff["param_grads"] < 1e-8, diff
