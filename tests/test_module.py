"""HessianAlignmentLoss and env_mean_loss in real training code: a featurizer, a linear head."""
import pytest
import torch
import torch.nn.functional as F

import hgkernels as hk
from _helpers import assert_close, make_case

FUNCTIONAL_LOSS = {
    "cross_entropy": F.cross_entropy,
    "binary_cross_entropy": F.binary_cross_entropy_with_logits,
    "mse": F.mse_loss,
}


@pytest.mark.parametrize("loss", sorted(FUNCTIONAL_LOSS))
def test_env_mean_loss_is_torchs_loss_per_environment(loss):
    case = make_case(3, loss=loss, bias=True, sizes=[4, 1, 7], num_classes=3, num_features=2)
    got = hk.env_mean_loss(case.logits, case.labels, case.envs, loss=loss)
    expected = torch.stack([FUNCTIONAL_LOSS[loss](case.logits[case.envs == e], case.labels[case.envs == e])
                            for e in range(3)])
    assert_close(got, expected, 1e-14, "env losses")


def _model(seed, d_in=5, d_feat=4, c=3):
    torch.manual_seed(seed)
    featurizer = torch.nn.Sequential(torch.nn.Linear(d_in, d_feat), torch.nn.Tanh()).double()
    head = torch.nn.Linear(d_feat, c).double()
    return featurizer, head


@pytest.mark.parametrize("method,kwargs", [("hutchinson", {}), ("hgp", {"reference": "pooled"}),
                                           ("hgp", {"reference": "mean", "env_reduction": "sum",
                                                    "detach_reference": False})])
def test_training_loss_gradients_match_the_reference_path(method, kwargs):
    """Through a featurizer and nn.Linear head, W, b and the featurizer get the reference path's gradients."""
    x = torch.randn(19, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (19,), generator=torch.Generator().manual_seed(1))
    envs = torch.randint(0, 3, (19,), generator=torch.Generator().manual_seed(2))
    envs[:3] = torch.tensor([0, 1, 2])
    results = {}
    for backend in ("torch", "reference"):
        featurizer, head = _model(0)
        criterion = hk.HessianAlignmentLoss(method, alpha=0.3, beta=2.0, backend=backend, **kwargs)
        z = featurizer(x)
        parts = criterion(head(z), z, y, envs)
        parts.total.backward()
        results[backend] = (parts, [p.grad for p in (*featurizer.parameters(), *head.parameters())])
    (ours, our_grads), (ref, ref_grads) = results["torch"], results["reference"]
    for name in ("total", "erm", "hessian", "gradient"):
        assert_close(getattr(ours, name).detach(), getattr(ref, name).detach(), 1e-10, name)
    for i, (a, b) in enumerate(zip(our_grads, ref_grads)):
        assert_close(a, b, 1e-10, f"parameter {i} gradient")
    assert ours.hessian > 0 and ours.gradient > 0


def test_total_is_erm_plus_weighted_terms_and_weights_can_change():
    case = make_case(5, loss="binary_cross_entropy", bias=True, sizes=[6, 9], num_classes=2, num_features=3,
                     as_sizes=True)
    criterion = hk.HessianAlignmentLoss("hutchinson", alpha=1.0, beta=0.0, loss="binary_cross_entropy")
    first = criterion(case.logits, case.features, case.labels, case.envs)
    criterion.alpha, criterion.beta = 10.0, 0.5  # e.g. a warm-up schedule
    second = criterion(case.logits, case.features, case.labels, case.envs)
    pen = hk.hutchinson_penalty(case.logits, case.features, case.labels, case.envs, loss="binary_cross_entropy")
    erm = hk.env_mean_loss(case.logits, case.labels, case.envs, loss="binary_cross_entropy").mean()
    assert_close(first.total, erm + pen.hessian, 1e-14, "total, alpha=1 beta=0")
    assert_close(second.total, erm + 10.0 * pen.hessian + 0.5 * pen.gradient, 1e-14, "total, alpha=10 beta=0.5")
    assert "alpha=10.0" in repr(criterion)


def test_unknown_method_is_rejected_by_name():
    with pytest.raises(ValueError, match="method"):
        hk.HessianAlignmentLoss("fishr")
