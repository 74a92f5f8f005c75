"""Hundreds of environments of a few samples each: every penalty, in both forms, on every closed-form
backend, equals float64 autograd (`backend="reference"`, 1e-9), shuffled ids and size lists alike; and the
native CPU plans beyond their per-environment state limit (over pairs of samples, or in runs of
environments) equal the torch backend's feature form. Time and memory at the PACS and DomainNet heads:
benchmarks/many_envs.py."""
import random

import pytest
import torch

import hgkernels as hk
from hgkernels import backends
from hgkernels._dispatch import NATIVE_MAX_SAMPLES_PER_ENV, plan_backend
from hgkernels._inputs import prepare
from hgkernels.penalties import fishr as fishr_module
from _helpers import assert_close

E, C, D = 256, 3, 4
RTOL = 1e-9
CLOSED_FORM_BACKENDS = [name for name in ("torch", "native", "triton") if backends.unavailable_reason(name) is None]


def _case():
    """E environments of 2 to 8 samples, ids shuffled; and the same samples grouped with a size list."""
    gen = torch.Generator().manual_seed(11)
    sizes = torch.randint(2, 9, (E,), generator=gen).tolist()
    n = sum(sizes)
    ids = torch.repeat_interleave(torch.arange(E), torch.tensor(sizes))[torch.randperm(n, generator=gen)]
    logits = 1.5 * torch.randn(n, C, generator=gen, dtype=torch.float64)
    features = torch.randn(n, D, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, C, (n,), generator=gen)
    return logits, features, labels, ids, sizes


PENALTIES = {
    "hutchinson": (hk.hutchinson_penalty, ("feature", "sample")),
    "hgp": (hk.hgp_penalty, ("feature", "sample")),
    "hgp, undetached mean reference": (lambda *a, **k: hk.hgp_penalty(*a, reference="mean", detach_reference=False,
                                                                      **k), ("feature", "sample")),
    "full_hessian": (hk.full_hessian_penalty, (None,)),
    "fishr": (lambda *a, **k: (hk.fishr_penalty(*a, **k),), (None,)),
}
CASES = [(name, form) for name, (_, forms) in PENALTIES.items() for form in forms]

_REFERENCE = {}


def _run(name, form, backend, as_sizes, dtype=torch.float64):
    """Terms and gradients; with `as_sizes` on the samples grouped by environment, gradients put back
    in the shuffled order."""
    fn = PENALTIES[name][0]
    logits, features, labels, ids, sizes = _case()
    order = torch.argsort(ids, stable=True) if as_sizes else torch.arange(len(ids))
    logits, features = (t[order].to(dtype).requires_grad_(True) for t in (logits, features))
    envs = sizes if as_sizes else ids
    options = {} if form is None or backend == "reference" else dict(form=form)
    terms = fn(logits, features, labels[order], envs, backend=backend, **options)
    total = sum(w * t for w, t in zip((0.7, 1.3), terms))
    d_logits, d_features = (torch.empty_like(g).index_copy_(0, order, g)
                            for g in torch.autograd.grad(total, (logits, features)))
    return [t.detach() for t in terms] + [d_logits, d_features]


# (backend, as_sizes): every closed-form backend on shuffled ids and a size list; the Triton interpreter
# (25-80 s a case, slow-marked) on the ids layout only
LAYOUTS = [pytest.param(b, as_sizes, id=f"{b}-{'size list' if as_sizes else 'shuffled ids'}",
                        marks=[pytest.mark.slow] if b == "triton" else [])
           for b in CLOSED_FORM_BACKENDS for as_sizes in (False, True) if not (b == "triton" and as_sizes)]


def _reference(name):
    if name not in _REFERENCE:
        _REFERENCE[name] = _run(name, None, "reference", False)
    return _REFERENCE[name]


@pytest.mark.parametrize("backend,as_sizes", LAYOUTS)
@pytest.mark.parametrize("name,form", CASES, ids=[f"{n}-{f or 'only form'}" for n, f in CASES])
def test_256_environments_of_2_to_8_samples_equal_the_reference(name, form, backend, as_sizes):
    """float64 to 1e-9; the Triton kernels (float32 only) to 1e-5, on the ids layout."""
    dtype, rtol = (torch.float32, 1e-5) if backend == "triton" else (torch.float64, RTOL)
    got = _run(name, form, backend, as_sizes, dtype)
    names = (["penalty"] if len(got) == 3 else ["hessian term", "gradient term"]) + ["d logits", "d features"]
    for what, a, b in zip(names, got, _reference(name)):
        assert_close(a, b, rtol, f"{name} {form} {backend}: {what}")


@pytest.mark.parametrize("backend,as_sizes", [layout for layout in LAYOUTS if layout.values[0] != "native"])
def test_fishr_in_chunks_of_environments_equals_the_reference(monkeypatch, backend, as_sizes):
    """Beyond CHUNK_ENTRIES variance entries fishr_penalty walks the environments in chunks (here of
    4 environments, 60 entries), never holding the (E, C·Dh) variances (the backends without whole plans;
    the native CPU plans keep no per-environment state beyond their own limit: below)."""
    monkeypatch.setattr(fishr_module, "CHUNK_ENTRIES", 4 * C * (D + 1))
    logits, features, labels, ids, sizes = _case()
    assert fishr_module.envs_per_chunk(prepare(logits, features, labels, ids, loss="cross_entropy", bias=True)) == 4
    dtype, rtol = (torch.float32, 1e-5) if backend == "triton" else (torch.float64, RTOL)
    got = _run("fishr", None, backend, as_sizes, dtype)
    for what, a, b in zip(("penalty", "d logits", "d features"), got, _reference("fishr")):
        assert_close(a, b, rtol, f"chunked fishr {backend}: {what}")


def test_fishr_in_chunks_double_backward_matches_the_reference(monkeypatch):
    monkeypatch.setattr(fishr_module, "CHUNK_ENTRIES", 4 * C * (D + 1))
    logits, features, labels, ids, _ = _case()
    results = []
    for backend in ("torch", "reference"):
        lg, ft = logits.clone().requires_grad_(True), features.clone().requires_grad_(True)
        d_lg, d_ft = torch.autograd.grad(hk.fishr_penalty(lg, ft, labels, ids, backend=backend), (lg, ft),
                                         create_graph=True)
        results.append(torch.autograd.grad((d_lg.square().sum() + d_ft.square().sum()), (lg, ft)))
    for what, a, b in zip(("d logits", "d features"), *results):
        assert_close(a, b, RTOL, f"second order: {what}")


# --- The CPU plans beyond the native module's PLAN_STATE_ELEMENTS per-environment entries (E x C x Dh): they
# keep no per-environment statistics. Where sum_e n_e^2 <= N C (small environments) they take pairs of samples
# within each environment, else they walk the environments in runs.

NATIVE_ERROR = backends.unavailable_reason("native")
needs_native = pytest.mark.skipif(NATIVE_ERROR is not None, reason=f"native kernels: {NATIVE_ERROR}")
RUNS_E = 160
# (C, D, largest environment): the exact plan in runs (sum n_e^2 > N C) and in pairs (sum n_e^2 <= N C)
SHAPES = {"runs": (5, 511, 8), "pairs": (9, 255, 5)}
# with every environment of 4 samples: runs (16 > C) and pairs (16 <= 4 C)
EQUAL_SIZE_SHAPES = {"runs": (3, 1023), "pairs": (5, 511)}


def _fishr_terms(*args, form=None, **kwargs):
    """fishr_penalty in the others' two-term shape: its value, then 0 (it has one form)."""
    value = hk.fishr_penalty(*args, **kwargs)
    return value, torch.zeros_like(value)


RUNS_PENALTIES = {
    "fishr": (_fishr_terms, {}),
    "fishr, sums over environments and coordinates": (_fishr_terms, dict(env_reduction="sum",
                                                                         coordinate_reduction="sum")),
    "hutchinson": (hk.hutchinson_penalty, {}),
    "hutchinson, sum over environments": (hk.hutchinson_penalty, dict(env_reduction="sum")),
    "hgp": (hk.hgp_penalty, {}),
    "hgp, undetached pooled reference": (hk.hgp_penalty, dict(detach_reference=False)),
    "hgp, mean reference": (hk.hgp_penalty, dict(reference="mean")),
    "hgp, undetached mean reference": (hk.hgp_penalty, dict(reference="mean", detach_reference=False)),
}


def _runs_case(shape="runs", jitter=None):
    """RUNS_E environments, ids shuffled, beyond the plans' state limit (two runs): of 1 to the shape's largest
    size, or with `jitter` of 4 samples each, every environment holding copies of the same samples plus
    jitter times noise (nearly equal statistics, whose deviations the expanded sums cannot resolve)."""
    from hgkernels.backends.native import _NATIVE
    gen = torch.Generator().manual_seed(3)
    if jitter is None:
        c, d, largest = SHAPES[shape]
        sizes = torch.randint(1, largest + 1, (RUNS_E,), generator=gen).tolist()
    else:
        (c, d), sizes = EQUAL_SIZE_SHAPES[shape], [4] * RUNS_E
    n = sum(sizes)
    ids = torch.repeat_interleave(torch.arange(RUNS_E), torch.tensor(sizes))[torch.randperm(n, generator=gen)]
    assert RUNS_E * c * (d + 1) > _NATIVE.PLAN_STATE_ELEMENTS
    assert (sum(s * s for s in sizes) <= n * c) == (shape == "pairs")
    if jitter is None:
        logits = 1.5 * torch.randn(n, c, generator=gen, dtype=torch.float64)
        features = torch.randn(n, d, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, c, (n,), generator=gen)
        return logits, features, labels, ids
    rank = torch.zeros(n, dtype=torch.long)  # each sample's place in its environment: the same sample everywhere
    for e in range(RUNS_E):
        members = (ids == e).nonzero().flatten()
        rank[members] = torch.arange(len(members))
    base_logits = 1.5 * torch.randn(4, c, generator=gen, dtype=torch.float64)
    base_features = torch.randn(4, d, generator=gen, dtype=torch.float64)
    base_labels = torch.randint(0, c, (4,), generator=gen)
    logits = base_logits[rank] + jitter * torch.randn(n, c, generator=gen, dtype=torch.float64)
    features = base_features[rank] + jitter * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return logits, features, base_labels[rank], ids


def _runs_terms_and_grads(name, case, backend, weights=(0.7, 1.3), dtype=torch.float64, **options):
    fn, kwargs = RUNS_PENALTIES[name]
    logits, features, labels, ids = case
    logits, features = (t.to(dtype).requires_grad_(True) for t in (logits, features))
    terms = fn(logits, features, labels, ids, backend=backend, **kwargs, **options)
    grads = torch.autograd.grad(weights[0] * terms[0] + weights[1] * terms[1], (logits, features))
    return [t.detach().double() for t in (*terms, *grads)]


# every penalty on both shapes
RUNS_CASES = [(name, shape) for shape in SHAPES for name in RUNS_PENALTIES]


@needs_native
@pytest.mark.parametrize("weights", [(0.7, 1.3), (0.0, 1.0), (1.0, 0.0)],
                         ids=["both terms", "gradient term", "hessian term"])
@pytest.mark.parametrize("name,shape", RUNS_CASES)
def test_native_plans_beyond_the_state_limit_equal_the_python_plans(name, shape, weights):
    """float64 to 1e-9 against the torch backend's feature form (which the tests above hold to the
    reference; the reference itself takes a minute at this head), each term alone and both (a term whose
    upstream is zero is left out)."""
    case = _runs_case(shape)
    got = _runs_terms_and_grads(name, case, "native", weights, form="feature")
    expected = _runs_terms_and_grads(name, case, "torch", weights, form="feature")
    for what, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), got, expected):
        assert_close(a, b, RTOL, f"{name} in {shape}: {what}")


@needs_native
@pytest.mark.parametrize("name,shape", [(name, shape) for shape in SHAPES
                                        for name in ("hutchinson", "hgp", "hgp, mean reference", "fishr")])
def test_native_plans_beyond_the_state_limit_resolve_nearly_equal_environments(name, shape):
    """Environments that agree to 1e-7: the terms are under 1e-6 where the statistics' squares are of order
    one, so the expanded sums would be rounding alone; the plans recompute them as squared deviations (float64,
    1e-6, against the torch backend's feature form, which forms the deviations themselves)."""
    case = _runs_case(shape, jitter=1e-7)
    got = _runs_terms_and_grads(name, case, "native", form="feature")
    expected = _runs_terms_and_grads(name, case, "torch", form="feature")
    assert all(0 < term < 1e-6 for term in expected[:1 if name == "fishr" else 2])
    for what, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), got, expected):
        assert_close(a, b, 1e-6, f"{name} in {shape}, nearly equal environments: {what}")


@needs_native
@pytest.mark.parametrize("name,shape", [("hutchinson", "runs"), ("hutchinson", "pairs"), ("hgp", "pairs"),
                                        ("hgp, undetached pooled reference", "runs"), ("fishr", "runs")])
def test_native_plans_beyond_the_state_limit_float32_and_bitwise_across_thread_counts(name, shape):
    """float32 against float64 (1e-5); the same bits with 1 and 2 threads (neither runs nor pairs follow them)."""
    case, threads = _runs_case(shape), torch.get_num_threads()
    expected = _runs_terms_and_grads(name, case, "torch", form="feature")
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(_runs_terms_and_grads(name, case, "native", dtype=torch.float32, form="feature"))
    finally:
        torch.set_num_threads(threads)
    for what, a, b, c in zip(("hessian term", "gradient term", "d logits", "d features"), *results, expected):
        assert torch.equal(a, b), f"{name} in {shape}, 1 vs 2 threads: {what}"
        assert_close(a, c, 1e-5, f"{name} in {shape}, float32: {what}")


@needs_native
@pytest.mark.parametrize("method,shape", [(method, shape) for shape in SHAPES for method in ("exact", "hgp", "fishr")])
def test_native_plans_beyond_the_state_limit_keep_no_per_environment_state(method, shape):
    """What a forward leaves for its backward: the means (and per-sample or per-pair dots), not E x C x Dh
    (Fishr never takes pairs: its runs keep the two means)."""
    from hgkernels.backends.native import _OPS, _operands
    logits, features, labels, ids = _runs_case(shape)
    problem = prepare(logits, features, labels, ids, loss="cross_entropy", bias=True)
    state = _OPS.plan_forward(*_operands(problem), method, 1 / RUNS_E, True, True)[0]
    c, d, _ = SHAPES[shape]
    head = c * (d + 1)
    pair_dots = 2 * int((torch.bincount(ids) ** 2).sum())  # K and Q of each environment's pairs
    expected = {("exact", "runs"): 2 * head, ("exact", "pairs"): 2 * head + pair_dots, ("fishr", "runs"): 2 * head,
                ("fishr", "pairs"): 2 * head}
    assert state.numel() == expected.get((method, shape), 3 * head + 2 * len(ids) * c)
    assert state.numel() < RUNS_E * head / 4


@needs_native
@pytest.mark.parametrize("method,shape", [(method, shape) for shape in SHAPES for method in ("hutchinson", "hgp")])
def test_fused_head_beyond_the_state_limit_equals_the_python_plans(method, shape):
    """HessianAlignmentLoss on a linear head (runs leave the head's gradient to torch ops, pairs form it in the
    kernel): values and the featurizer output's and head's gradients, float64 to 1e-9."""
    logits, features, labels, ids = _runs_case(shape)
    c, d, _ = SHAPES[shape]
    head = torch.nn.Linear(d, c).double()
    results = []
    for backend in ("native", "torch"):
        head.zero_grad(set_to_none=True)
        z = features.clone().requires_grad_(True)
        loss_fn = hk.HessianAlignmentLoss(method, alpha=0.7, beta=1.3, backend=backend, form="feature")
        out = loss_fn(head, z, labels, ids)
        out.total.backward()
        results.append((out.total.detach(), z.grad, head.weight.grad, head.bias.grad))
    for what, a, b in zip(("total", "d features", "d weight", "d bias"), *results):
        assert_close(a, b, RTOL, f"fused head {method} in {shape}: {what}")


@needs_native
@pytest.mark.parametrize("loss", ["binary_cross_entropy", "mse"])
@pytest.mark.parametrize("name,shape", [(name, shape) for shape in SHAPES
                                        for name in ("hutchinson", "hgp", "hgp, mean reference", "fishr")])
def test_native_plans_beyond_the_state_limit_other_losses_and_no_bias(name, shape, loss):
    """The other losses (soft and hard float targets), and a head without bias: float64 to 1e-9."""
    logits, features, _, ids = _runs_case(shape)
    gen = torch.Generator().manual_seed(7)
    targets = (torch.rand(logits.shape, generator=gen, dtype=torch.float64) if loss == "binary_cross_entropy"
               else torch.randn(logits.shape, generator=gen, dtype=torch.float64))
    targets[::2] = targets[::2].round()
    case = (logits, features, targets, ids)
    for bias in (True, False):
        got = _runs_terms_and_grads(name, case, "native", form="feature", loss=loss, bias=bias)
        expected = _runs_terms_and_grads(name, case, "torch", form="feature", loss=loss, bias=bias)
        for what, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), got, expected):
            assert_close(a, b, RTOL, f"{name} in {shape}, {loss}, bias={bias}: {what}")


@needs_native
def test_fishr_beyond_the_state_limit_double_backward_and_retained_graph():
    """create_graph=True through the native node differentiates Fishr's torch algebra (float64, 1e-9 against
    the torch backend and against the hand-written backward); a retained graph's second backward gives the same
    gradients."""
    logits, features, labels, ids = _runs_case("runs")
    results = []
    for backend in ("native", "torch"):
        lg, ft = logits.clone().requires_grad_(True), features.clone().requires_grad_(True)
        value = hk.fishr_penalty(lg, ft, labels, ids, backend=backend)
        first = torch.autograd.grad(value, (lg, ft), retain_graph=True)
        second = torch.autograd.grad(value, (lg, ft), retain_graph=True)
        again = torch.autograd.grad(value, (lg, ft), create_graph=True)
        for a, b, c in zip(first, second, again):
            assert torch.equal(a, b), f"{backend}: the retained graph's second backward differs"
            assert_close(c, a, RTOL, f"{backend}: create_graph=True against the hand-written backward")
        results.append((value.detach(), *first, *torch.autograd.grad(sum(g.square().sum() for g in again), (lg, ft))))
    for what, a, b in zip(("value", "d logits", "d features", "second order d logits", "second order d features"),
                          *results):
        assert_close(a, b, RTOL, f"fishr beyond the state limit: {what}")


@needs_native
def test_fishr_plan_backward_with_a_fused_head_beyond_the_state_limit():
    """The strips' backward takes no fused head: plan_backward given one (the operator's contract; Fishr's Python
    calls pass none) runs the runs form on the same forward state, adding the head's terms exactly."""
    from hgkernels.backends.native import _OPS, _operands
    logits, features, labels, ids = _runs_case("runs")
    problem = prepare(logits, features, labels, ids, loss="cross_entropy", bias=True)
    ops, spec = _operands(problem), ("fishr", 1.0 / RUNS_E, False, False)
    state = _OPS.plan_forward(*ops, *spec)[0]
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(logits.shape[1], features.shape[1] + 1, generator=gen, dtype=torch.float64)
    extra = torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    d_logits, d_features, _ = _OPS.plan_backward(*ops, *spec, state, 0.7, 0.0, None, None)
    fused_logits, fused_features, _ = _OPS.plan_backward(*ops, *spec, state, 0.7, 0.0, weight, extra)
    assert_close(fused_logits, d_logits + extra, RTOL, "d logits with the head's upstream")
    assert_close(fused_features, d_features + (d_logits + extra) @ weight[:, :-1], RTOL, "d features with the head")


@needs_native
@pytest.mark.parametrize("jitter", [None, 1e-7], ids=["random", "nearly equal environments"])
def test_fishr_beyond_the_state_limit_with_environments_too_large_for_strips(jitter):
    """Beyond the state limit Fishr forms small environments' statistics in register strips (the cases above), and
    takes runs of environments where one has more than FISHR_STRIP_ROWS samples: float64 against the torch
    backend, 1e-9; environments that agree to 1e-7 (the runs' expanded sums cancel, recomputed as squared
    deviations) to 1e-6."""
    from hgkernels.backends.native import _NATIVE
    num_envs, per_env, c = 12, _NATIVE.FISHR_STRIP_ROWS + 8, 5
    d = _NATIVE.PLAN_STATE_ELEMENTS // (num_envs * c)
    assert num_envs * c * (d + 1) > _NATIVE.PLAN_STATE_ELEMENTS
    gen, n = torch.Generator().manual_seed(9), num_envs * per_env
    ids = torch.arange(n) % num_envs
    if jitter is None:
        logits = 1.5 * torch.randn(n, c, generator=gen, dtype=torch.float64)
        features = torch.randn(n, d, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, c, (n,), generator=gen)
    else:  # every environment the same samples, plus jitter
        rank = torch.arange(n) // num_envs
        logits = (1.5 * torch.randn(per_env, c, generator=gen, dtype=torch.float64))[rank]
        features = torch.randn(per_env, d, generator=gen, dtype=torch.float64)[rank]
        labels = torch.randint(0, c, (per_env,), generator=gen)[rank]
        logits = logits + jitter * torch.randn(n, c, generator=gen, dtype=torch.float64)
        features = features + jitter * torch.randn(n, d, generator=gen, dtype=torch.float64)
    got = _runs_terms_and_grads("fishr", (logits, features, labels, ids), "native")
    expected = _runs_terms_and_grads("fishr", (logits, features, labels, ids), "torch")
    if jitter is not None:
        assert 0 < expected[0] < 1e-6
    for what, a, b in zip(("value", "zero", "d logits", "d features"), got, expected):
        assert_close(a, b, RTOL if jitter is None else 1e-6, f"fishr in runs, jitter {jitter}: {what}")


@needs_native
@pytest.mark.parametrize("name", ["hutchinson", "hgp"])
def test_native_pairs_in_float32_over_many_samples(name):
    """The pairs form's means over all samples (against which its expanded sums cancel) are reduced in blocks
    and added in double: float32 over 60,000 environments of 1 or 2 samples (mse) equals float64 to 1e-5 (one
    float32 sum over all rows was 1e-4 off here)."""
    from hgkernels.backends.native import _NATIVE
    gen = torch.Generator().manual_seed(12)
    sizes = torch.randint(1, 3, (60000,), generator=gen).tolist()
    n = sum(sizes)
    assert len(sizes) * 2 * 3 > _NATIVE.PLAN_STATE_ELEMENTS and _NATIVE.plans_over_pairs(
        torch.tensor([0] + sizes).cumsum(0), n, 2, 3)
    logits, features = (torch.randn(n, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    targets = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    fn = RUNS_PENALTIES[name][0]
    got, expected = (fn(logits.to(dtype), features.to(dtype), targets.to(dtype), sizes, loss="mse", form="feature",
                        backend="native") for dtype in (torch.float32, torch.float64))
    for what, a, b in zip(("hessian term", "gradient term"), got, expected):
        assert_close(a.double(), b, 1e-5, f"{name}, float32 over {n} samples: {what}")


AUTO_CASES = {  # (environments, samples each, the backend auto takes) at C 17 above AUTO_MAX_CPU_HEAD
    # Fishr: strips up to 32 samples per environment on average (runs for the larger ones among them)
    "fishr": ((40, NATIVE_MAX_SAMPLES_PER_ENV, "native"), (2, NATIVE_MAX_SAMPLES_PER_ENV + 1, "torch")),
    # exact and HGP: pairs, which need sum_e n_e^2 <= N C as well (32 samples each would form statistics in runs)
    "exact": ((40, 8, "native"), (40, NATIVE_MAX_SAMPLES_PER_ENV, "torch"),
              (2, NATIVE_MAX_SAMPLES_PER_ENV + 1, "torch")),
}
AUTO_CASES["hgp"] = AUTO_CASES["exact"]
AUTO_CALLS = {"fishr": lambda *a, **k: (hk.fishr_penalty(*a, **k),),
              "exact": lambda *a, **k: hk.hutchinson_penalty(*a, form="feature", **k),
              "hgp": lambda *a, **k: hk.hgp_penalty(*a, form="feature", **k)}


@needs_native
@pytest.mark.parametrize("method", sorted(AUTO_CASES))
def test_auto_takes_the_native_plans_for_many_small_environments_at_a_large_head(method, monkeypatch):
    """Above the head size where auto prefers torch's GEMMs, a whole plan over environments of at most
    NATIVE_MAX_SAMPLES_PER_ENV samples on average takes the native plans where they form no per-environment
    statistics (Fishr: strips or runs; exact and HGP: pairs), and equals the torch backend (float64, 1e-9); the
    others stay on torch. The native plans' operator is watched, so the route itself is checked."""
    from hgkernels.backends.native import AUTO_MAX_CPU_HEAD, NativeBackend
    native_calls = []
    original = NativeBackend.autograd_plan
    monkeypatch.setattr(NativeBackend, "autograd_plan",
                        lambda self, problem, spec: native_calls.append(spec.method) or original(self, problem, spec))
    c, d = 17, AUTO_MAX_CPU_HEAD // 17
    gen = torch.Generator().manual_seed(5)
    for num_envs, per_env, expected in AUTO_CASES[method]:
        n = num_envs * per_env
        ids = torch.arange(n) % num_envs
        logits = torch.randn(n, c, generator=gen, dtype=torch.float64)
        features = torch.randn(n, d, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, c, (n,), generator=gen)
        problem = prepare(logits, features, labels, ids, loss="cross_entropy", bias=True)
        assert backends.select("auto", problem).name == "torch"
        assert plan_backend("auto", problem, method).name == expected
        results = []
        for backend in ("auto", "torch"):
            native_calls.clear()
            lg, ft = logits.clone().requires_grad_(True), features.clone().requires_grad_(True)
            terms = AUTO_CALLS[method](lg, ft, labels, ids, backend=backend)
            results.append((*(t.detach() for t in terms), *torch.autograd.grad(sum(terms), (lg, ft))))
            assert native_calls == ([method] if backend == "auto" and expected == "native" else []), backend
        names = (("value",) if method == "fishr" else ("hessian term", "gradient term")) + ("d logits", "d features")
        for what, a, b in zip(names, *results):
            assert_close(a, b, RTOL, f"{method} auto with {num_envs} environments of {per_env}: {what}")


def _sweep_configs(count=16):
    """Seeded random calls beyond the state limit: head, environment sizes, loss, bias and penalty option set."""
    from hgkernels.backends.native import _NATIVE
    rng, configs = random.Random(1), []
    for seed in range(count):
        c, d = rng.choice([2, 3, 9, 17]), rng.choice([63, 255, 1023])
        num_envs = max(2, _NATIVE.PLAN_STATE_ELEMENTS // (c * (d + 1)) + rng.randint(1, 60))
        configs.append((seed, c, d, num_envs, rng.choice([1, 2, 4, 8, 16]),
                        rng.choice(["cross_entropy", "binary_cross_entropy", "mse"]), rng.random() < 0.7,
                        rng.choice(sorted(RUNS_PENALTIES))))
    return configs


@needs_native
@pytest.mark.parametrize("seed,c,d,num_envs,largest,loss,bias,name", _sweep_configs() if NATIVE_ERROR is None else [])
def test_native_plans_beyond_the_state_limit_random_calls(seed, c, d, num_envs, largest, loss, bias, name):
    """Random heads (C 2-17, D 63-1023), environments of 1 to 1-16 samples (pairs or runs as their sizes say),
    every loss, bias or not, every option set: float64 to 1e-9 against the torch backend's feature form."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, largest + 1, (num_envs,), generator=gen).tolist()
    n = sum(sizes)
    ids = torch.repeat_interleave(torch.arange(num_envs), torch.tensor(sizes))[torch.randperm(n, generator=gen)]
    logits = 2 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    features = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = (torch.randint(0, c, (n,), generator=gen) if loss == "cross_entropy"
              else torch.rand(n, c, generator=gen, dtype=torch.float64))
    case = (logits, features, labels, ids)
    got = _runs_terms_and_grads(name, case, "native", (0.3, 1.7), form="feature", loss=loss, bias=bias)
    expected = _runs_terms_and_grads(name, case, "torch", (0.3, 1.7), form="feature", loss=loss, bias=bias)
    label = f"seed {seed} ({name}, C {c}, D {d}, E {num_envs}, {loss}, bias={bias})"
    if name.startswith("fishr") and largest == 1:  # one sample each: no variance, 0 up to the statistics' rounding
        assert all(t.abs().max() < 1e-25 for t in got + expected), f"{label}: not 0 up to rounding"
        return
    for what, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), got, expected):
        assert_close(a, b, RTOL, f"{label}: {what}")
