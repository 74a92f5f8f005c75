"""Every bad-input class raises the documented error, naming the argument."""
import pytest
import torch

import hgkernels as hk


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
