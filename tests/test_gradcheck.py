"""torch.autograd.gradcheck on every autograd Function (float64, torch backend).

A detached pooled reference is, by design, not the true derivative (finite differences see
the reference move), so gradcheck runs with undetached references or with mean references,
where detaching changes nothing; detached cases are covered by parity with `reference`."""
import pytest
import torch

import hgkernels as hk
from _helpers import make_case

LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")


def _check(fn, case):
    def penalty(logits, features):
        return tuple(fn(logits, features, case.labels, case.envs))
    assert torch.autograd.gradcheck(penalty, case.leaves(), eps=1e-6, atol=1e-7, rtol=1e-5)


FORMS = ("feature", "sample")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bias", [True, False])
def test_exact_hutchinson(loss, bias, form):
    case = make_case(1, loss=loss, bias=bias, sizes=[4, 1, 3], num_classes=3, num_features=4)
    _check(lambda *a: hk.hutchinson_penalty(*a, loss=loss, bias=bias, backend="torch", form=form), case)


@pytest.mark.parametrize("loss", LOSSES)
def test_stochastic_hutchinson(loss):
    case = make_case(2, loss=loss, bias=True, sizes=[3, 5], num_classes=3, num_features=3)
    # the same probes at every evaluation: a fixed generator seed per call
    _check(lambda *a: hk.hutchinson_penalty(*a, loss=loss, estimator="hutchinson", num_probes=4,
                                            generator=torch.Generator().manual_seed(0),
                                            detach_reference=False, backend="torch"), case)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reference,detach", [("pooled", False), ("mean", True), ("mean", False)])
def test_hgp(loss, reference, detach, form):
    case = make_case(3, loss=loss, bias=True, sizes=[2, 4, 3], num_classes=3, num_features=3)
    _check(lambda *a: hk.hgp_penalty(*a, loss=loss, reference=reference, detach_reference=detach,
                                     env_reduction="sum", backend="torch", form=form), case)


@pytest.mark.parametrize("loss", LOSSES)
def test_head_statistics(loss):
    case = make_case(4, loss=loss, bias=True, sizes=[3, 2], num_classes=2, num_features=3)
    vec_w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    vec_b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    for stat in (hk.head_gradient, hk.head_hessian_diag):
        assert torch.autograd.gradcheck(lambda l, f: tuple(stat(l, f, case.labels, case.envs, loss=loss,
                                                                backend="torch")), case.leaves())
    assert torch.autograd.gradcheck(
        lambda l, f, w, b: tuple(hk.head_hvp(l, f, case.labels, case.envs, (w, b), loss=loss, backend="torch")),
        (*case.leaves(), vec_w, vec_b))
