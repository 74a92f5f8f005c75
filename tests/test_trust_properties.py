"""Random valid calls, in every way a user may make them, equal the generic autograd path in float64.

Hypothesis draws the penalty, backend, form, dtype, loss, layout (shuffled ids, a size list,
strided features) and the autograd usage (plain backward, backward twice with retain_graph,
create_graph and a second derivative, no_grad, inference_mode, activation checkpointing, one
thread). Each call must equal `backend="reference"` on the float64 copy of the same inputs, or
raise one of the documented errors: never a silent mismatch.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

import hgkernels as hk
from _helpers import assert_close, make_case

USAGES = ("backward", "retain_graph", "create_graph", "no_grad", "inference_mode", "checkpoint", "one_thread")
PENALTIES = ("exact", "stochastic", "hgp_pooled", "hgp_mean")
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}


def _penalty(name, feats, w, b, case, dtype, opts):
    logits = feats @ w.T + b
    labels = case.labels if case.loss == "cross_entropy" else case.labels.to(dtype)
    common = dict(loss=case.loss, **opts)
    if name in ("exact", "stochastic"):
        extra = {} if name == "exact" else {"estimator": "hutchinson", "num_probes": 3,
                                            "generator": torch.Generator().manual_seed(5)}
        return hk.hutchinson_penalty(logits, feats, labels, case.envs, **common, **extra)
    return hk.hgp_penalty(logits, feats, labels, case.envs, reference=name[4:], **common)


def _run(name, case, dtype, usage, opts, strided):
    """(hessian, gradient, dW, dfeatures[, d2]) for one usage; reference runs with usage 'create_graph'
    or 'backward' and the same opts."""
    gen = torch.Generator().manual_seed(11)
    c, d = case.logits.shape[1], case.features.shape[1]
    w = torch.randn(c, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    base = case.features.to(dtype)
    if strided:  # a transposed, non-contiguous view of the same values
        base = base.T.contiguous().T
    feats = base.detach().requires_grad_(True)
    probe = torch.randn(c, d, generator=gen, dtype=torch.float64).to(dtype)

    def total():
        pen = _penalty(name, feats, w, b, case, dtype, opts)
        return pen, 0.7 * pen.hessian + 1.3 * pen.gradient

    if usage in ("no_grad", "inference_mode"):
        with torch.no_grad() if usage == "no_grad" else torch.inference_mode():
            pen, _ = total()
        assert not pen.hessian.requires_grad
        return pen.hessian.clone(), pen.gradient.clone()
    if usage == "checkpoint":
        out = checkpoint(lambda f, w_, b_: total()[1], feats, w, b, use_reentrant=False)
        pen = None
    else:
        if usage == "one_thread":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
        try:
            pen, out = total()
        finally:
            if usage == "one_thread":
                torch.set_num_threads(threads)
    create = usage == "create_graph"
    grads = torch.autograd.grad(out, (w, feats), create_graph=create, retain_graph=True if usage == "retain_graph" else None)
    if usage == "retain_graph":
        again = torch.autograd.grad(out, (w, feats))
        for first, second in zip(grads, again):
            assert torch.equal(first, second), "a second backward through the retained graph differs"
    values = (pen.hessian.detach(), pen.gradient.detach()) if pen is not None else (None, None)
    result = (*values, *(g.detach() for g in grads))
    if create:
        (second,) = torch.autograd.grad((grads[0] * probe).sum(), w)
        result = result + (second,)
    return result


@st.composite
def calls(draw):
    name = draw(st.sampled_from(PENALTIES))
    sizes = draw(st.lists(st.integers(1, 7), min_size=1, max_size=4))
    as_sizes = draw(st.booleans())
    case = make_case(draw(st.integers(0, 2**31 - 1)), loss=draw(st.sampled_from(["cross_entropy",
                                                                                  "binary_cross_entropy", "mse"])),
                     bias=True, sizes=sizes, num_classes=draw(st.integers(1, 4)), num_features=draw(st.integers(1, 5)),
                     as_sizes=as_sizes)
    opts = {"env_reduction": draw(st.sampled_from(["mean", "sum"])), "detach_reference": draw(st.booleans()),
            "backend": draw(st.sampled_from(["torch", "native", "auto"])), "validate": draw(st.booleans())}
    if name != "stochastic":
        opts["form"] = draw(st.sampled_from(["feature", "sample", "auto"]))
    return name, case, opts, draw(st.sampled_from(USAGES)), draw(st.sampled_from([torch.float64, torch.float32])), \
        draw(st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls())
def test_any_valid_call_equals_reference_in_float64(call):
    name, case, opts, usage, dtype, strided = call
    got = _run(name, case, dtype, usage, opts, strided)
    ref_opts = {**opts, "backend": "reference"}
    ref_opts.pop("form", None)
    want = _run(name, case, torch.float64, "create_graph" if usage == "create_graph" else "backward", ref_opts,
                False)
    labels = ("hessian", "gradient", "d W", "d features", "second derivative")
    # the sample form's rounding is relative to the statistics' size (README): compare against the scale
    # of the gradient term too
    for what, actual, expected in zip(labels, got, want):
        if actual is None:
            continue
        tol = TOLERANCE[dtype]
        if what in ("hessian", "gradient"):
            scale = max(float(want[0].abs()), float(want[1].abs()), 1e-30)
            err = float((actual.double() - expected).abs()) / scale
            assert err <= tol, f"{what}: {float(actual)} vs {float(expected)} ({usage}, {opts}, {dtype})"
        else:
            assert_close(actual, expected, tol * 10, f"{what} ({name}, {usage}, {opts}, {dtype})")


@pytest.mark.parametrize("usage", ["create_graph", "checkpoint", "inference_mode"])
def test_each_usage_runs_on_a_fixed_case(usage):
    """The usages above on one fixed case, so a failure shows without hypothesis' search."""
    case = make_case(3, loss="cross_entropy", bias=True, sizes=[4, 6, 5], num_classes=3, num_features=4)
    opts = {"env_reduction": "mean", "detach_reference": True, "backend": "native", "validate": True,
            "form": "feature"}
    got = _run("hgp_pooled", case, torch.float64, usage, opts, False)
    want = _run("hgp_pooled", case, torch.float64, "create_graph" if usage == "create_graph" else "backward",
                {**opts, "backend": "reference"}, False)
    for actual, expected in zip(got, want):
        if actual is not None:
            assert_close(actual, expected, 1e-9, usage)
