"""Every bad-input class raises the documented error, naming the argument."""
import pytest
import torch

import hgkernels as hk
from _helpers import ALL_PATHS, CLOSED_FORM, assert_close, small_case


def good(n=6, c=3, d=4):
    torch.manual_seed(0)
    return dict(logits=torch.randn(n, c), features=torch.randn(n, d), labels=torch.randint(0, c, (n,)),
                envs=torch.tensor([0, 1, 0, 1, 1, 0]))


def call(fn=hk.hutchinson_penalty, **overrides):
    args = good()
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return fn(args["logits"], args["features"], args["labels"], args["envs"], **kwargs)


FNS = [hk.hutchinson_penalty, hk.hgp_penalty, hk.head_gradient, hk.head_hessian_diag]


@pytest.mark.parametrize("fn", FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("overrides,error,match", [
    (dict(features=torch.randn(5, 4)), ValueError, "features has 5 rows"),
    (dict(labels=torch.randint(0, 3, (5,))), ValueError, r"labels must have shape \(6,\)"),
    (dict(envs=torch.tensor([0, 1, 0])), ValueError, r"envs must have shape \(6,\)"),
    (dict(envs=[2, 3]), ValueError, "envs sizes sum to 5"),
    (dict(logits=torch.randn(6, 3, 1)), ValueError, "logits must have shape"),
    (dict(features=torch.randn(6)), ValueError, "features must have shape"),
    (dict(logits=torch.randint(0, 3, (6, 3))), TypeError, "logits must be a floating tensor"),
    (dict(features=torch.randn(6, 4, dtype=torch.float64)), TypeError, "features dtype"),
    (dict(logits=[[0.0] * 3] * 6), TypeError, "logits must be a torch.Tensor"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError, r"labels must lie in \[0, 3\)"),
    (dict(labels=torch.tensor([0, -1, 2, 1, 0, 1])), ValueError, r"labels must lie in \[0, 3\)"),
    (dict(labels=torch.rand(6)), TypeError, "labels for loss='cross_entropy' must be integer"),
    (dict(envs=torch.tensor([0, 2, 0, 2, 2, 0])), ValueError, r"environment\(s\) \[1\]"),
    (dict(envs=torch.tensor([0, 1, 0, 1, 3, 0]), num_envs=3), ValueError, "num_envs=3"),
    (dict(envs=torch.tensor([0, -1, 0, 1, 1, 0])), ValueError, "negative environment id"),
    (dict(envs=torch.tensor([0.0, 1, 0, 1, 1, 0])), TypeError, "envs must be an integer tensor"),
    (dict(envs=[3, 0, 3]), ValueError, "envs sizes must be positive"),
    (dict(envs="abc"), TypeError, "envs must be a 1-D integer tensor"),
    (dict(logits=torch.tensor([[float("nan"), 0, 0]] + [[0.0, 0, 0]] * 5)), ValueError, "logits contains NaN"),
    (dict(features=torch.full((6, 4), float("inf"))), ValueError, "features contains NaN or Inf"),
    (dict(loss="hinge"), ValueError, "loss must be one of"),
    (dict(bias=1), TypeError, "bias must be a bool"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(logits=torch.randn(0, 3), features=torch.randn(0, 4), labels=torch.zeros(0, dtype=torch.long),
          envs=torch.zeros(0, dtype=torch.long)), ValueError, "must be non-empty"),
])
def test_bad_input(fn, overrides, error, match):
    with pytest.raises(error, match=match):
        call(fn, **overrides)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(loss="binary_cross_entropy", labels=torch.randint(0, 2, (6, 3))), TypeError, "must be floating targets"),
    (dict(loss="binary_cross_entropy", labels=torch.rand(6)), ValueError, r"must have shape \(6, 3\)"),
    (dict(loss="binary_cross_entropy", labels=torch.rand(6, 3) + 1), ValueError, r"must lie in \[0, 1\]"),
    (dict(loss="mse", labels=torch.full((6, 3), float("nan"))), ValueError, "labels contains NaN"),
    (dict(estimator="probes"), ValueError, "estimator must be one of"),
    (dict(estimator="hutchinson", num_probes=0), ValueError, "num_probes must be a positive int"),
    (dict(estimator="hutchinson", num_probes=2.5), ValueError, "num_probes must be a positive int"),
    (dict(estimator="hutchinson", generator=123), TypeError, "generator must be a torch.Generator"),
    (dict(env_reduction="max"), ValueError, "env_reduction must be one of"),
    (dict(detach_reference="yes"), TypeError, "detach_reference must be a bool"),
    (dict(num_envs=0), ValueError, "num_envs must be a positive int"),
    (dict(form="gram"), ValueError, "form must be one of"),
    (dict(estimator="hutchinson", form="sample"), ValueError, "form='sample' needs estimator='exact'"),
])
def test_bad_hutchinson_options(overrides, error, match):
    with pytest.raises(error, match=match):
        call(hk.hutchinson_penalty, **overrides)


def test_bad_hgp_reference():
    with pytest.raises(ValueError, match="reference must be one of"):
        call(hk.hgp_penalty, reference="median")


def test_bad_hgp_form():
    with pytest.raises(ValueError, match="form must be one of"):
        call(hk.hgp_penalty, form="samples")


def test_bad_hvp_vector():
    args = good()
    with pytest.raises(ValueError, match=r"vector weight must have shape \(3, 4\)"):
        hk.head_hvp(*args.values(), (torch.randn(3, 5), torch.randn(3)))
    with pytest.raises(ValueError, match="vector bias must be given exactly when bias=True"):
        hk.head_hvp(*args.values(), (torch.randn(3, 4), None))
    with pytest.raises(ValueError, match="vector bias must be None when bias=False"):
        hk.head_hvp(*args.values(), (torch.randn(3, 4), torch.randn(3)), bias=False)


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    from hgkernels import backends
    monkeypatch.setitem(backends._INSTANCES, "native", "ImportError: hgkernels._native is not built")
    with pytest.raises(ValueError, match="backend='native' is not available"):
        call(backend="native")


def test_validate_false_skips_data_checks_but_not_shape_checks():
    # a NaN is not looked for ...
    out = call(logits=torch.tensor([[float("nan"), 0, 0]] + [[0.0, 0, 0]] * 5), validate=False)
    assert torch.isnan(out.hessian)
    # ... but shapes are still checked
    with pytest.raises(ValueError, match="features has 5 rows"):
        call(features=torch.randn(5, 4), validate=False)


def test_non_contiguous_inputs_match_contiguous():
    torch.manual_seed(1)
    logits = torch.randn(5, 8, dtype=torch.float64).T  # (8, 5) non-contiguous
    features = torch.randn(8, 12, dtype=torch.float64)[:, ::2]  # (8, 6) strided
    labels = torch.randint(0, 5, (16,))[::2]
    envs = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0] * 2)[::2]
    assert not logits.is_contiguous() and not features.is_contiguous()
    for fn in (hk.hutchinson_penalty, hk.hgp_penalty):
        a = fn(logits, features, labels, envs)
        b = fn(logits.contiguous(), features.contiguous(), labels.contiguous(), envs.contiguous())
        assert torch.equal(a.hessian, b.hessian) and torch.equal(a.gradient, b.gradient)


def test_a_python_list_of_ids_is_named_as_sizes_in_the_error():
    ids_as_list = [0, 1, 0, 1, 1, 0]  # per-sample ids given as a list: read as sizes, which cannot sum to 6
    with pytest.raises(ValueError, match=r"per-sample environment ids must be a tensor: torch.as_tensor\(envs\)"):
        call(envs=ids_as_list)
    with pytest.raises(ValueError, match=r"a list or tuple is read as per-environment sizes"):
        call(envs=[0, 3, 3])


@pytest.mark.parametrize("head", [torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(4, 3)),
                                  torch.nn.Bilinear(4, 4, 3)], ids=["Sequential", "Bilinear"])
def test_a_head_that_is_not_an_nn_linear_says_how_to_use_the_logits_path(head):
    args = good()
    criterion = hk.HessianAlignmentLoss("hgp", alpha=1.0, beta=1.0)
    with pytest.raises(TypeError, match=rf"only as an nn.Linear .*got {type(head).__name__}.*"
                                        r"criterion\(logits, features, labels, envs\)"):
        criterion(head, args["features"], args["labels"], args["envs"])


@pytest.mark.parametrize("backend", CLOSED_FORM)
@pytest.mark.parametrize("loss", ["binary_cross_entropy", "mse"])
def test_targets_requiring_grad_raise_on_closed_forms(backend, loss):
    case = small_case(6, loss=loss)
    targets = case.labels.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="labels requires grad"):
        hk.hutchinson_penalty(case.logits, case.features, targets, case.envs, loss=loss, backend=backend)
    # the reference path differentiates through them, and no_grad needs no target gradient
    pen = hk.hutchinson_penalty(case.logits, case.features, targets, case.envs, loss=loss, backend="reference")
    assert pen.gradient.requires_grad
    with torch.no_grad():
        hk.hutchinson_penalty(case.logits, case.features, targets, case.envs, loss=loss, backend=backend)


@pytest.mark.parametrize("big", [2_000_000, 10**9, 2**62])
def test_large_environment_id_is_a_short_error(big):
    case = small_case(7)
    envs = case.envs.clone()
    envs[0] = big
    with pytest.raises(ValueError, match="envs") as err:
        hk.hutchinson_penalty(case.logits, case.features, case.labels, envs)
    assert len(str(err.value)) < 300


def test_many_missing_ids_are_listed_briefly():
    case = small_case(8, sizes=(30, 30))
    envs = case.envs * 2  # ids 0 and 2: id 1 is empty
    with pytest.raises(ValueError, match=r"environment\(s\) \[1\] of 3 have no samples"):
        hk.hutchinson_penalty(case.logits, case.features, case.labels, envs)
    envs = case.envs * 25  # ids 0 and 25: 24 empty environments, listed briefly
    with pytest.raises(ValueError, match=r"\(24 in all\)"):
        hk.hutchinson_penalty(case.logits, case.features, case.labels, envs, num_envs=26)


@pytest.mark.parametrize("backend,form", ALL_PATHS)
@pytest.mark.parametrize("bad_label", [-1, 3, 1000])
def test_out_of_range_label_without_validation_gives_nan(backend, form, bad_label):
    case = small_case(9, dtype=torch.float32)
    labels = case.labels.clone()
    labels[4] = bad_label
    logits, feats = case.leaves()
    for fn in (hk.hutchinson_penalty, hk.hgp_penalty):
        pen = fn(logits, feats, labels, case.envs, backend=backend, form=form, validate=False)
        assert torch.isnan(pen.gradient)
        d_logits, d_feats = torch.autograd.grad(pen.hessian + pen.gradient, (logits, feats))
        assert torch.isnan(d_logits).all() and torch.isnan(d_feats).all()
    # the exact Hessian diagonal does not depend on labels: it stays right
    good = hk.hutchinson_penalty(case.logits, case.features, case.labels, case.envs, backend="torch")
    bad = hk.hutchinson_penalty(case.logits, case.features, labels, case.envs, backend=backend, form=form,
                                validate=False)
    assert_close(bad.hessian, good.hessian, 1e-5, "label-free Hessian term")
    with pytest.raises(ValueError, match="labels must lie in"):
        hk.hutchinson_penalty(case.logits, case.features, labels, case.envs, backend=backend, form=form)


@pytest.mark.parametrize("backend,form", ALL_PATHS)
def test_structural_env_errors_are_raised_even_without_validation(backend, form):
    case = small_case(10, dtype=torch.float32)
    for envs, num_envs, match in ((case.envs, 4, "have no samples"), (case.envs + 1, None, r"\[0\] of 4"),
                                  (case.envs, 2, "num_envs=2"), (case.envs - 1, None, "negative")):
        with pytest.raises(ValueError, match=match):
            hk.hgp_penalty(case.logits, case.features, case.labels, envs, num_envs=num_envs, backend=backend,
                           form=form, validate=False)


def test_module_options_are_checked_at_construction():
    with pytest.raises(TypeError, match="estimator"):
        hk.HessianAlignmentLoss("hgp", estimator="hutchinson")
    with pytest.raises(ValueError, match="form"):
        hk.HessianAlignmentLoss("hutchinson", form="gram")
    with pytest.raises(TypeError, match="unexpected option 'alpha_weight'"):
        hk.HessianAlignmentLoss("hutchinson", alpha_weight=1.0)
