"""Hypothesis-driven properties of the penalties (float64, torch backend unless stated).

Shapes, environment layouts and label values are drawn by hypothesis; each property
is something the math guarantees independently of how the backend computes it.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hgkernels as hk
from hgkernels import losses
from _helpers import assert_close, make_case, penalty_and_grads, small_case

LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")
PENALTIES = {
    "exact": (hk.hutchinson_penalty, {}),
    "hgp_pooled": (hk.hgp_penalty, {"reference": "pooled"}),
    "hgp_mean": (hk.hgp_penalty, {"reference": "mean"}),
}
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw, min_envs=1, max_envs=5):
    sizes = draw(st.lists(st.integers(1, 8), min_size=min_envs, max_size=max_envs))
    return make_case(draw(st.integers(0, 2**31 - 1)), loss=draw(st.sampled_from(LOSSES)), bias=draw(st.booleans()),
                     sizes=sizes, num_classes=draw(st.integers(1, 6)), num_features=draw(st.integers(1, 6)),
                     scale=draw(st.sampled_from([0.1, 1.5, 6.0])))


options = st.fixed_dictionaries({"env_reduction": st.sampled_from(["mean", "sum"]),
                                 "detach_reference": st.booleans(),
                                 "form": st.sampled_from(["feature", "sample"])})
penalty_names = st.sampled_from(sorted(PENALTIES))


def run(name, case, **kwargs):
    fn, extra = PENALTIES[name]
    return penalty_and_grads(fn, case, **extra, **kwargs)


@PROPERTY_SETTINGS
@given(case=cases(), name=penalty_names, opts=options)
def test_penalties_are_nonnegative_and_finite(case, name, opts):
    hessian, gradient, d_logits, d_features = run(name, case, **opts)
    assert hessian >= 0 and gradient >= 0
    assert torch.isfinite(d_logits).all() and torch.isfinite(d_features).all()


@PROPERTY_SETTINGS
@given(case=cases(), name=penalty_names, opts=options, data=st.data())
def test_sample_order_does_not_matter(case, name, opts, data):
    """Permuting samples (with their env ids) permutes the gradients and keeps the values."""
    n = case.logits.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.long)
    envs = case.envs if torch.is_tensor(case.envs) else torch.repeat_interleave(
        torch.arange(len(case.envs)), torch.tensor(case.envs))
    permuted = make_like(case, perm, envs[perm])
    base = run(name, case, **opts)
    moved = run(name, permuted, **opts)
    for what, a, b in zip(("hessian", "gradient"), moved[:2], base[:2]):
        assert_close(a, b, 1e-12, what)
    assert_close(moved[2], base[2][perm], 1e-12, "d logits")
    assert_close(moved[3], base[3][perm], 1e-12, "d features")


@PROPERTY_SETTINGS
@given(case=cases(min_envs=2), name=penalty_names, opts=options, data=st.data())
def test_environment_labels_do_not_matter(case, name, opts, data):
    """Renaming environments (a permutation of the ids) changes nothing."""
    envs = case.envs if torch.is_tensor(case.envs) else torch.repeat_interleave(
        torch.arange(len(case.envs)), torch.tensor(case.envs))
    num_envs = int(envs.max()) + 1
    rename = torch.tensor(data.draw(st.permutations(range(num_envs))), dtype=torch.long)
    identity = torch.arange(case.logits.shape[0])
    base = run(name, case, **opts)
    renamed = run(name, make_like(case, identity, rename[envs]), **opts)
    for what, a, b in zip(("hessian", "gradient", "d logits", "d features"), renamed, base):
        assert_close(a, b, 1e-12, what)


@PROPERTY_SETTINGS
@given(case=cases(), name=penalty_names, opts=options)
def test_size_list_equals_grouped_ids(case, name, opts):
    """A list of sizes means the same as ids 0..E-1 in contiguous blocks."""
    sizes = torch.bincount(case.envs) if torch.is_tensor(case.envs) else torch.tensor(case.envs)
    sizes = sizes[sizes > 0]
    ids = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    order = torch.argsort(case.envs, stable=True) if torch.is_tensor(case.envs) else torch.arange(len(ids))
    grouped = make_like(case, order, ids)
    as_list = make_like(case, order, sizes.tolist())
    for what, a, b in zip(("hessian", "gradient", "d logits", "d features"),
                          run(name, as_list, **opts), run(name, grouped, **opts)):
        assert_close(a, b, 0.0, what)


@PROPERTY_SETTINGS
@given(case=cases(min_envs=1, max_envs=1), name=penalty_names, opts=options)
def test_one_environment_gives_exact_zeros(case, name, opts):
    hessian, gradient, d_logits, d_features = run(name, case, **opts)
    assert hessian.item() == 0.0 and gradient.item() == 0.0
    assert not d_logits.any() and not d_features.any()


@PROPERTY_SETTINGS
@given(case=cases(min_envs=1, max_envs=1), copies=st.integers(2, 4), name=penalty_names, opts=options)
def test_identical_environments_give_zero(case, copies, name, opts):
    """E copies of one environment align perfectly. The feature form computes each term as
    E·||S_e - S_ref||² with a deviation that is zero in exact arithmetic: at most rounding (1e-12
    relative) squared. The sample form sums a quadratic form whose terms cancel: at most rounding
    times the triangle bound T² of the statistic, T = sum_i ||x_i|| ||phi_i|| for S = sum_i x_i phi_i^T."""
    n = case.logits.shape[0]
    stacked = make_like(case, torch.arange(n).repeat(copies), [n] * copies)
    hessian, gradient, _, _ = run(name, stacked, **opts)
    kw = dict(loss=case.loss, bias=case.bias)
    grad = hk.head_gradient(case.logits, case.features, case.labels, [n], **kw)
    if name == "exact":
        stat = hk.head_hessian_diag(case.logits, case.features, case.labels, [n], **kw)
    else:
        stat = hk.head_hvp(case.logits, case.features, case.labels, [n], tuple(grad), **kw)

    def sq_norm(params):
        return sum(t.square().sum().item() for t in params if t is not None)

    if opts["form"] == "feature":
        assert gradient.item() <= copies * 1e-24 * sq_norm(grad)
        assert hessian.item() <= copies * 1e-24 * sq_norm(stat)
        return
    zh = torch.cat([case.features, torch.ones(n, 1, dtype=torch.float64)], 1) if case.bias else case.features
    p = losses.link(case.loss, case.logits)
    grad_bound = (losses.residual(case.loss, p, case.labels).norm(dim=1) * zh.norm(dim=1)).sum() / n
    if name == "exact":  # x_i = q_i / n, phi_i = zh_i ⊙ zh_i
        stat_bound = (losses.curvature(case.loss, p).norm(dim=1) * zh.square().norm(dim=1)).sum() / n
    else:  # x_i = A_i G zh_i / n with ||A_i|| <= 2, phi_i = zh_i
        stat_bound = 2 * sq_norm(grad) ** 0.5 * zh.square().sum() / n
    assert gradient.item() <= 1e-12 * (copies * grad_bound.item()) ** 2
    assert hessian.item() <= 1e-12 * (copies * stat_bound.item()) ** 2


@PROPERTY_SETTINGS
@given(num_classes=st.integers(2, 7), label=st.integers(0, 6), n=st.integers(2, 9))
def test_extreme_cross_entropy_labels(num_classes, label, n):
    """All samples in one class, incl. the last class index: still matches the reference path."""
    label = min(label, num_classes - 1)
    case = make_case(label + 31 * n, loss="cross_entropy", bias=True, sizes=[n, n + 1], num_classes=num_classes,
                     num_features=3)
    case.labels = torch.full_like(case.labels, label)
    ours = run("exact", case, backend="torch")
    ref = run("exact", case, backend="reference")
    for what, a, b in zip(("hessian", "gradient", "d logits", "d features"), ours, ref):
        assert_close(a, b, 1e-10, what)


def make_like(case, index, envs):
    """A case holding rows `index` of `case` with environment spec `envs`."""
    return type(case)(case.logits[index], case.features[index], case.labels[index], envs, case.loss, case.bias)


def test_one_environment_exact_zeros_and_the_stochastic_exception():
    case = small_case(16, sizes=(9,))
    for fn, kw in ((hk.hutchinson_penalty, {}), (hk.hgp_penalty, {})):
        pen = fn(case.logits, case.features, case.labels, case.envs, **kw)
        assert pen.hessian == 0 and pen.gradient == 0
    est = hk.hutchinson_penalty(case.logits, case.features, case.labels, case.envs, estimator="hutchinson",
                                num_probes=4, generator=torch.Generator().manual_seed(0))
    assert est.gradient == 0
    assert est.hessian > 0  # independent probes for the pooled reference: a nonzero estimate of zero
