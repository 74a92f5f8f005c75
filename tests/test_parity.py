"""Parity: every path equals the generic-autograd `reference` path in float64.

The torch backend against `reference` (≤ 1e-10 relative): the exact and HGP penalties run in both
forms, C × Dh statistics ("feature") and N × N Gram matrices ("sample"). Each seed draws a fresh
configuration: loss kind, bias, 1–6 environments of unequal sizes (size 1 included), shuffled ids or
a size list, C in 1–50, D in 1–64, both references, both reductions, detach on/off. Values and
gradients w.r.t. logits and features are compared.

Random valid calls, in every way a user may make them (hypothesis): the penalty, the entry point
(the logits-based function or the fused head `linear_head_alignment`), backend, form, dtype, loss,
layout (shuffled ids, a size list, strided features) and the autograd usage (plain backward,
backward twice with retain_graph, create_graph and a second derivative, no_grad, inference_mode,
activation checkpointing, one thread). Each call must equal `backend="reference"` on the float64
copy of the same inputs, or raise one of the documented errors: never a silent mismatch.

The native and Triton backends' parity is in test_native.py and test_triton.py.
"""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

import hgkernels as hk
from _helpers import assert_close, make_case, penalty_and_grads
from test_properties import cases, options, penalty_names, run as run_penalty

LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")
RTOL = 1e-10


def random_config(seed: int, max_head_params: int):
    rng = random.Random(seed)
    num_envs = rng.randint(1, 6)
    sizes = [rng.choice([1, rng.randint(2, 5), rng.randint(6, 25)]) for _ in range(num_envs)]
    c = rng.choice([1, rng.randint(2, 10), rng.randint(11, 50)])
    d = rng.choice([1, rng.randint(2, 16), rng.randint(17, 64)])
    while c * (d + 1) > max_head_params:  # the reference exact diagonal costs one HVP per parameter
        d = max(1, d // 2)
        if d == 1:
            c = max(1, c // 2)
    return dict(loss=LOSSES[seed % 3], bias=rng.random() < 0.7, sizes=sizes, num_classes=c, num_features=d,
                as_sizes=rng.random() < 0.25), dict(
        env_reduction=rng.choice(["mean", "sum"]), detach_reference=rng.random() < 0.5)


# The reference (generic autograd; the exact diagonal costs an HVP per head parameter) is the slow side:
# each case's is computed once and compared with both forms.
_REFERENCES = {}


def check_parity(fn, case, form="feature", *, case_key, **kwargs):
    ours = penalty_and_grads(fn, case, backend="torch", form=form, **kwargs)
    key = (fn.__name__, case_key, tuple(sorted(kwargs.items())))
    if key not in _REFERENCES:
        _REFERENCES[key] = penalty_and_grads(fn, case, backend="reference", **kwargs)
    ref = _REFERENCES[key]
    for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), ours, ref):
        assert_close(a, b, RTOL, name)


FORMS = ("feature", "sample")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seed", range(36))
def test_hgp_matches_reference(seed, form):
    case_kw, opts = random_config(seed, max_head_params=50 * 65)
    case = make_case(seed, **case_kw)
    check_parity(hk.hgp_penalty, case, form, case_key=seed, reference=random.Random(seed).choice(["pooled", "mean"]),
                 **opts)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seed", range(36))
def test_exact_hutchinson_matches_reference(seed, form):
    case_kw, opts = random_config(1000 + seed, max_head_params=200)
    check_parity(hk.hutchinson_penalty, make_case(seed, **case_kw), form, case_key=seed, **opts)


@pytest.mark.parametrize("seed", range(24))
def test_stochastic_hutchinson_matches_reference_at_same_probes(seed):
    case_kw, opts = random_config(2000 + seed, max_head_params=50 * 65)
    case = make_case(seed, **case_kw)
    ours = penalty_and_grads(hk.hutchinson_penalty, case, backend="torch", estimator="hutchinson", num_probes=3,
                             generator=torch.Generator().manual_seed(seed), **opts)
    ref = penalty_and_grads(hk.hutchinson_penalty, case, backend="reference", estimator="hutchinson", num_probes=3,
                            generator=torch.Generator().manual_seed(seed), **opts)
    for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), ours, ref):
        assert_close(a, b, RTOL, name)


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("loss", LOSSES)
def test_exact_hutchinson_largest_head(loss, form):
    """C = 50, D = 64: the top of the required range for the exact diagonal too."""
    case = make_case(7, loss=loss, bias=True, sizes=[9, 4], num_classes=50, num_features=64)
    check_parity(hk.hutchinson_penalty, case, form, case_key=("largest head", loss), env_reduction="sum",
                 detach_reference=False)


@pytest.mark.parametrize("kind", ["gradient", "hess_diag", "hvp"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bias", [True, False])
def test_head_statistics_match_reference(kind, loss, bias):
    case = make_case(11, loss=loss, bias=bias, sizes=[5, 1, 8], num_classes=4, num_features=6)
    gen = torch.Generator().manual_seed(5)
    vec_w = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    vec_b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    results = []
    for backend in ("torch", "reference"):
        logits, features = case.leaves()
        if kind == "gradient":
            out = hk.head_gradient(logits, features, case.labels, case.envs, loss=loss, bias=bias, backend=backend)
        elif kind == "hess_diag":
            out = hk.head_hessian_diag(logits, features, case.labels, case.envs, loss=loss, bias=bias,
                                       backend=backend)
        else:
            out = hk.head_hvp(logits, features, case.labels, case.envs, (vec_w, vec_b), loss=loss, bias=bias,
                              backend=backend)
        assert out.weight.shape == (3, 4, 6) and (out.bias is None) == (not bias)
        flat = torch.cat([out.weight.flatten()] + ([out.bias.flatten()] if bias else []))
        weights = torch.linspace(-1, 1, flat.numel(), dtype=torch.float64)
        inputs = [logits, features] + ([vec_w] + ([vec_b] if bias else []) if kind == "hvp" else [])
        results.append([flat.detach()] + list(torch.autograd.grad((flat * weights).sum(), inputs, materialize_grads=True)))
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, RTOL, f"{kind} output #{i}")


@pytest.mark.parametrize("as_sizes", [False, True])
@pytest.mark.parametrize("loss", LOSSES)
def test_torch_backend_chunking_matches_one_chunk(monkeypatch, loss, as_sizes):
    """Cases here fit one chunk; walking the slots a few rows at a time (shuffled ids, and grouped
    equal sizes where chunks are views) gives the same penalties and gradients."""
    from hgkernels.backends import torch_backend
    sizes = [7, 7, 7] if as_sizes else [5, 1, 9, 4]
    case = make_case(11, loss=loss, bias=True, sizes=sizes, num_classes=4, num_features=6, as_sizes=as_sizes)
    runs = [(hk.hutchinson_penalty, {}), (hk.hgp_penalty, {"detach_reference": False}),
            (hk.hutchinson_penalty, {"estimator": "hutchinson", "num_probes": 3, "detach_reference": False})]
    for fn, kwargs in runs:
        def run():
            extra = {"generator": torch.Generator().manual_seed(0)} if "estimator" in kwargs else {}
            return penalty_and_grads(fn, case, backend="torch", **kwargs, **extra)
        whole = run()
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 3 * 6 * 3)  # a few rows per chunk
        chunked = run()
        monkeypatch.undo()
        for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), chunked, whole):
            assert_close(a, b, 1e-12, f"{fn.__name__} {kwargs}: {name}")


@settings(max_examples=15, deadline=None)
@given(case=cases(max_envs=4), name=penalty_names, opts=options)
def test_agrees_with_reference_path(case, name, opts):
    """The torch backend and the generic double-backward path agree on hypothesis-drawn cases."""
    ours = run_penalty(name, case, backend="torch", **opts)
    ref = run_penalty(name, case, backend="reference", **opts)
    for what, a, b in zip(("hessian", "gradient", "d logits", "d features"), ours, ref):
        assert_close(a, b, 1e-10, what)


# Random valid calls in every usage ------------------------------------------------------------------

USAGES = ("backward", "retain_graph", "create_graph", "no_grad", "inference_mode", "checkpoint", "one_thread")
CALL_PENALTIES = ("exact", "stochastic", "hgp_pooled", "hgp_mean")
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}


def _penalty(name, feats, w, b, case, dtype, opts, via="logits"):
    """The penalty through the logits-based function, or (via="head") through the fused head
    `linear_head_alignment`, whose ERM and logits outputs are left unused here."""
    labels = case.labels if case.loss == "cross_entropy" else case.labels.to(dtype)
    common = dict(loss=case.loss, **opts)
    if name in ("exact", "stochastic"):
        method, extra = "hutchinson", ({} if name == "exact" else {
            "estimator": "hutchinson", "num_probes": 3, "generator": torch.Generator().manual_seed(5)})
    else:
        method, extra = "hgp", {"reference": name[4:]}
    if via == "head":
        out = hk.linear_head_alignment(feats, w, b, labels, case.envs, method=method, **common, **extra)
        return hk.Penalty(out.hessian, out.gradient)
    fn = hk.hutchinson_penalty if method == "hutchinson" else hk.hgp_penalty
    return fn(feats @ w.T + b, feats, labels, case.envs, **common, **extra)


def _run(name, case, dtype, usage, opts, strided, via="logits"):
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
        pen = _penalty(name, feats, w, b, case, dtype, opts, via)
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
    name = draw(st.sampled_from(CALL_PENALTIES))
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
        draw(st.booleans()), draw(st.sampled_from(["logits", "head"]))


def _uncancelled_scales(case):
    """Sizes of what the penalties cancel: u = sum ||G_e||^2 + ||Dg_e||^2 (no reference subtracted) and
    the largest entries of its first and second derivatives, in float64 at the same point as `_run`.

    A penalty that is nearly zero (one environment under the stochastic estimator, identical
    environments) is a difference of terms of this size, so rounding is relative to it, not to the
    result: these are the floors of the comparison's denominators."""
    gen = torch.Generator().manual_seed(11)
    c, d = case.logits.shape[1], case.features.shape[1]
    w = torch.randn(c, d, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_(True)
    feats = case.features.detach().clone().requires_grad_(True)
    probe = torch.randn(c, d, generator=gen, dtype=torch.float64)
    logits = feats @ w.T + b
    kw = dict(loss=case.loss, backend="torch")
    total = 0
    for stat in (hk.head_gradient(logits, feats, case.labels, case.envs, **kw),
                 hk.head_hessian_diag(logits, feats, case.labels, case.envs, **kw)):
        total = total + stat.weight.square().sum() + stat.bias.square().sum()
    d_w, d_f = torch.autograd.grad(total, (w, feats), create_graph=True)
    (second,) = torch.autograd.grad((d_w * probe).sum(), w)
    return [float(total), float(total), float(d_w.abs().max()), float(d_f.abs().max()), float(second.abs().max())]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls())
def test_any_valid_call_equals_reference_in_float64(call):
    name, case, opts, usage, dtype, strided, via = call
    got = _run(name, case, dtype, usage, opts, strided, via)
    ref_opts = {**opts, "backend": "reference"}
    ref_opts.pop("form", None)
    want = _run(name, case, torch.float64, "create_graph" if usage == "create_graph" else "backward", ref_opts,
                False)
    labels = ("hessian", "gradient", "d W", "d features", "second derivative")
    floors = _uncancelled_scales(case)
    for what, actual, expected, floor in zip(labels, got, want, floors):
        if actual is None:
            continue
        tol = TOLERANCE[dtype] * (1 if what in ("hessian", "gradient") else 10)
        # the values are compared against the larger term too (the sample form's rounding is relative to
        # the statistics' size, README); every quantity against what it cancels
        scale = max(float(want[0].abs()), float(want[1].abs())) if what in ("hessian", "gradient") else \
            float(expected.abs().max())
        err = float((actual.double() - expected).abs().max()) / max(scale, floor, 1e-300)
        assert err <= tol, (f"{what}: relative error {err:.2e} ({name}, {usage}, {opts}, {dtype}); "
                            f"got {actual.flatten()[:4].tolist()}, expected {expected.flatten()[:4].tolist()}")


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nearly_zero_penalty_is_compared_against_what_it_cancels(dtype):
    """Found by the property test: one environment under the stochastic estimator gives a Hessian term
    that is an estimate of zero (here about 1e-36 in float64), whose rounding is relative to the
    statistics it cancels, not to itself."""
    from _helpers import Case
    case = Case(torch.tensor([[-2.4079]], dtype=torch.float64), torch.tensor([[0.2325, 2.2399]], dtype=torch.float64),
                torch.tensor([[0.9486]], dtype=torch.float64), torch.tensor([0]), "binary_cross_entropy", True)
    opts = {"env_reduction": "mean", "detach_reference": False, "backend": "torch", "validate": False}
    got = _run("stochastic", case, dtype, "backward", opts, False)
    want = _run("stochastic", case, torch.float64, "backward", {**opts, "backend": "reference"}, False)
    floors = _uncancelled_scales(case)
    for actual, expected, floor in zip(got, want, floors):
        assert float((actual.double() - expected).abs().max()) <= TOLERANCE[dtype] * 10 * floor
