"""Full head-Hessian alignment and Hessian distances (hgkernels/penalties/full_hessian.py, docs/design.md §5.2).

The oracle here is independent of the library: each environment's (C·Dh) × (C·Dh) Hessian is built
explicitly with torch.autograd.functional.hessian of torch's functional loss in the flattened head.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from hgkernels import backends
from hgkernels._inputs import prepare
from hgkernels.penalties.full_hessian import FullHessianPlan, full_hessian_penalty, hessian_distance
from _helpers import assert_close, make_case

LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")
# (sizes, given as a size list): 1 to 5 environments, shuffled ids or contiguous size lists
LAYOUTS = [([7], False), ([5, 8], True), ([4, 6, 3], False), ([3, 5, 2, 6], True), ([2, 4, 3, 5, 4], False)]


def _case(seed, loss, bias, sizes=(4, 6, 3), as_sizes=False, num_classes=3, num_features=4):
    return make_case(seed, loss=loss, bias=bias, sizes=list(sizes), num_classes=num_classes,
                     num_features=num_features, as_sizes=as_sizes)


def _env_ids(case) -> torch.Tensor:
    if isinstance(case.envs, torch.Tensor):
        return case.envs
    return torch.repeat_interleave(torch.arange(len(case.envs)), torch.tensor(case.envs))


def _batch_loss(loss, logits, targets):
    if loss == "cross_entropy":
        return F.cross_entropy(logits, targets)
    if loss == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.mse_loss(logits, targets)


def _head_loss(loss, bias, logits, features, targets):
    """theta (C·Dh,) -> the batch's mean loss with the head perturbed by theta = (dW, db)."""
    c, d = logits.shape[1], features.shape[1]

    def fn(theta):
        head = theta.view(c, d + int(bias))
        out = logits + features @ head[:, :d].T
        return _batch_loss(loss, out + head[:, d] if bias else out, targets)
    return fn


def _explicit(case, logits=None, features=None, create_graph=False):
    """Per-environment Hessians (E, C·Dh, C·Dh) and gradients (E, C·Dh), explicitly by autograd."""
    logits = case.logits if logits is None else logits
    features = case.features if features is None else features
    env_ids = _env_ids(case)
    c, dh = logits.shape[1], features.shape[1] + int(case.bias)
    theta = torch.zeros(c * dh, dtype=logits.dtype)
    hessians, grads = [], []
    for e in range(int(env_ids.max()) + 1):
        idx = (env_ids == e).nonzero().squeeze(1)
        fn = _head_loss(case.loss, case.bias, logits[idx], features[idx], case.labels[idx])
        hessians.append(torch.autograd.functional.hessian(fn, theta, create_graph=create_graph))
        grads.append(torch.autograd.functional.jacobian(fn, theta, create_graph=create_graph))
    return torch.stack(hessians), torch.stack(grads)


def _grads(case, alpha=0.7, beta=1.3, create_graph=False, **kwargs):
    logits, features = case.leaves()
    pen = full_hessian_penalty(logits, features, case.labels, case.envs, loss=case.loss, bias=case.bias, **kwargs)
    grads = torch.autograd.grad(alpha * pen.hessian + beta * pen.gradient, (logits, features),
                                create_graph=create_graph)
    return pen, grads, (logits, features)


@pytest.mark.parametrize("sizes,as_sizes", LAYOUTS, ids=[f"E{len(s)}" for s, _ in LAYOUTS])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", LOSSES)
def test_penalty_matches_explicit_hessians(loss, bias, sizes, as_sizes):
    case = _case(len(sizes), loss, bias, sizes, as_sizes)
    hessians, grads = _explicit(case)
    for reduction, weight in (("mean", 1 / len(sizes)), ("sum", 1.0)):
        pen = full_hessian_penalty(case.logits, case.features, case.labels, case.envs, loss=loss, bias=bias,
                                   env_reduction=reduction, backend="torch")
        expected_h = weight * (hessians - hessians.mean(0)).square().sum()
        expected_g = weight * (grads - grads.mean(0)).square().sum()
        if len(sizes) == 1:
            assert pen.hessian.item() == 0.0 and pen.gradient.item() == 0.0
        else:
            assert_close(pen.hessian, expected_h, 1e-10, f"hessian term ({reduction})")
            assert_close(pen.gradient, expected_g, 1e-10, f"gradient term ({reduction})")


@pytest.mark.parametrize("sizes,as_sizes", LAYOUTS[1:], ids=[f"E{len(s)}" for s, _ in LAYOUTS[1:]])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", LOSSES)
def test_distances_match_explicit_hessians(loss, bias, sizes, as_sizes):
    case = _case(10 + len(sizes), loss, bias, sizes, as_sizes)
    hessians, _ = _explicit(case)
    diffs = hessians.unsqueeze(1) - hessians.unsqueeze(0)
    fro = hessian_distance(case.logits, case.features, case.labels, case.envs, loss=loss, bias=bias)
    assert_close(fro, torch.linalg.matrix_norm(diffs, "fro"), 1e-10, "Frobenius distances")
    spectral = hessian_distance(case.logits, case.features, case.labels, case.envs, loss=loss, bias=bias,
                                norm="spectral")
    assert_close(spectral, torch.linalg.matrix_norm(diffs, ord=2), 1e-6, "spectral distances")
    for d in (fro, spectral):
        assert torch.equal(d, d.T) and torch.equal(d.diagonal(), torch.zeros(len(sizes), dtype=d.dtype))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", LOSSES)
def test_distances_to_a_held_out_batch(loss, bias):
    case = _case(20, loss, bias, (5, 3, 6))
    held = _case(21, loss, bias, (9,), as_sizes=True)
    hessians, _ = _explicit(case)
    held_hessian = _explicit(held)[0][0]
    diffs = hessians - held_hessian
    other = (held.logits, held.features, held.labels)
    for norm, expected, rtol in (("fro", torch.linalg.matrix_norm(diffs, "fro"), 1e-10),
                                 ("spectral", torch.linalg.matrix_norm(diffs, ord=2), 1e-6)):
        got = hessian_distance(case.logits, case.features, case.labels, case.envs, loss=loss, bias=bias, norm=norm,
                               other=other)
        assert got.shape == (3,)
        assert_close(got, expected, rtol, f"{norm} distances to the held-out batch")


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_full_hessian_penalty(loss):
    case = _case(30, loss, True, (2, 3, 2), num_classes=3, num_features=2)
    labels = case.labels

    def fn(logits, features):
        pen = full_hessian_penalty(logits, features, labels, case.envs, loss=loss, backend="torch")
        return torch.stack([pen.hessian, pen.gradient])
    assert torch.autograd.gradcheck(fn, case.leaves())


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_frobenius_distance(loss):
    case = _case(31, loss, False, (2, 3, 2), num_classes=2, num_features=2)
    held = _case(32, loss, False, (3,), as_sizes=True, num_classes=2, num_features=2)

    def pairwise(logits, features):
        return hessian_distance(logits, features, case.labels, case.envs, loss=loss, bias=False)

    def to_held_out(logits, features, held_logits):
        return hessian_distance(logits, features, case.labels, case.envs, loss=loss, bias=False,
                                other=(held_logits, held.features, held.labels))
    assert torch.autograd.gradcheck(pairwise, case.leaves())
    assert torch.autograd.gradcheck(to_held_out, (*case.leaves(), held.leaves()[0]))


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("loss", LOSSES)
def test_backward_matches_autograd_of_the_forward_and_the_reference(loss, detach):
    case = _case(40, loss, True, (4, 5, 3, 4))
    pen, grads, _ = _grads(case, backend="torch", detach_reference=detach, env_reduction="sum")
    # autograd through the plan's differentiable forward (the composed path)
    logits, features = case.leaves()
    problem = prepare(logits, features, case.labels, case.envs, loss=loss, bias=True)
    hessian, gradient = FullHessianPlan("sum", detach).feature_form().forward(backends.load("torch"), problem)
    composed = torch.autograd.grad(0.7 * hessian + 1.3 * gradient, (logits, features))
    ref_pen, ref_grads, _ = _grads(case, backend="reference", detach_reference=detach, env_reduction="sum")
    for name, got, composed_value, ref_value in zip(
            ("hessian term", "gradient term", "d logits", "d features"), (*pen, *grads),
            (hessian, gradient, *composed), (*ref_pen, *ref_grads)):
        assert_close(got, composed_value, 1e-10, f"{name} vs autograd of the forward")
        assert_close(got, ref_value, 1e-10, f"{name} vs backend='reference'")


def test_torch_func_grad_matches_eager():
    case = _case(50, "cross_entropy", True, (4, 5, 3))
    _, eager, _ = _grads(case, backend="torch")

    def objective(logits, features):
        pen = full_hessian_penalty(logits, features, case.labels, case.envs, backend="torch")
        return 0.7 * pen.hessian + 1.3 * pen.gradient
    transformed = torch.func.grad(objective, argnums=(0, 1))(case.logits, case.features)
    for name, a, b in zip(("d logits", "d features"), transformed, eager):
        assert_close(a, b, 1e-10, f"torch.func.grad {name}")


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("loss", LOSSES)
def test_double_backward_matches_reference(loss, detach):
    case = _case(60, loss, True, (3, 4, 3), num_features=3)
    gen = torch.Generator().manual_seed(1)
    probe_logits = torch.randn(case.logits.shape, generator=gen, dtype=torch.float64)
    probe_features = torch.randn(case.features.shape, generator=gen, dtype=torch.float64)
    second = []
    for backend in ("torch", "reference"):
        _, (d_logits, d_features), leaves = _grads(case, create_graph=True, backend=backend, detach_reference=detach)
        directional = (d_logits * probe_logits).sum() + (d_features * probe_features).sum()
        second.append(torch.autograd.grad(directional, leaves))
    for name, got, expected in zip(("d² logits", "d² features"), *second):
        assert_close(got, expected, 1e-9, f"double backward {name}")


def test_order_invariance():
    case = _case(70, "cross_entropy", True, (4, 6, 5))
    perm = torch.randperm(case.logits.shape[0], generator=torch.Generator().manual_seed(3))
    pen, (d_logits, d_features), _ = _grads(case)
    shuffled = make_case(70, loss="cross_entropy", bias=True, sizes=[4, 6, 5], num_classes=3, num_features=4)
    shuffled.logits, shuffled.features = case.logits[perm], case.features[perm]
    shuffled.labels, shuffled.envs = case.labels[perm], case.envs[perm]
    pen_s, (d_logits_s, d_features_s), _ = _grads(shuffled)
    assert_close(pen_s.hessian, pen.hessian, 1e-12, "hessian term")
    assert_close(pen_s.gradient, pen.gradient, 1e-12, "gradient term")
    assert_close(d_logits_s, d_logits[perm], 1e-11, "d logits")
    assert_close(d_features_s, d_features[perm], 1e-11, "d features")
    for norm in ("fro", "spectral"):
        a = hessian_distance(case.logits, case.features, case.labels, case.envs, norm=norm)
        b = hessian_distance(shuffled.logits, shuffled.features, shuffled.labels, shuffled.envs, norm=norm)
        assert_close(b, a, 1e-9, f"{norm} distances")


@pytest.mark.parametrize("loss", LOSSES)
def test_one_environment_gives_exact_zeros(loss):
    case = _case(80, loss, True, (9,), as_sizes=True)
    pen, (d_logits, d_features), _ = _grads(case, backend="torch")
    assert pen.hessian.item() == 0.0 and pen.gradient.item() == 0.0
    assert not d_logits.any() and not d_features.any()
    for norm in ("fro", "spectral"):
        assert torch.equal(hessian_distance(case.logits, case.features, case.labels, case.envs, loss=loss, norm=norm),
                           torch.zeros(1, 1, dtype=torch.float64))


def test_nonnegative_even_for_identical_environments():
    base = _case(90, "cross_entropy", True, (6,), as_sizes=True)
    twice = (torch.cat([base.logits, base.logits]), torch.cat([base.features, base.features]),
             torch.cat([base.labels, base.labels]))
    pen = full_hessian_penalty(*twice, [6, 6])
    assert pen.hessian.item() >= 0 and pen.gradient.item() >= 0
    assert pen.hessian.item() <= 1e-12 and pen.gradient.item() <= 1e-12
    assert hessian_distance(*twice, [6, 6], norm="spectral").abs().max().item() <= 1e-12
    for seed in range(5):
        case = _case(100 + seed, LOSSES[seed % 3], bool(seed % 2), (3, 2, 4))
        pen = full_hessian_penalty(case.logits, case.features, case.labels, case.envs, loss=case.loss, bias=case.bias)
        assert pen.hessian.item() > 0 and pen.gradient.item() > 0


def test_float32_agrees_with_float64():
    case = _case(110, "cross_entropy", True, (5, 7, 4), num_features=6)
    pen64, grads64, _ = _grads(case)
    logits32, features32 = case.leaves(torch.float32)
    pen32 = full_hessian_penalty(logits32, features32, case.labels, case.envs)
    grads32 = torch.autograd.grad(0.7 * pen32.hessian + 1.3 * pen32.gradient, (logits32, features32))
    assert pen32.hessian.dtype == torch.float32
    for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), (*pen32, *grads32),
                          (*pen64, *grads64)):
        assert_close(a, b, 1e-5, f"float32 {name}")


def test_spectral_warns_when_max_iter_is_too_small():
    case = _case(120, "cross_entropy", True, (5, 6))
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        hessian_distance(case.logits, case.features, case.labels, case.envs, norm="spectral", max_iter=2)


def test_bad_options_raise():
    case = _case(130, "cross_entropy", True, (3, 4))
    args = (case.logits, case.features, case.labels, case.envs)
    with pytest.raises(ValueError, match="norm must be one of"):
        hessian_distance(*args, norm="nuclear")
    for tol in (0, -1e-6, 1.0, float("nan"), True, "1e-6"):
        with pytest.raises(ValueError, match="tol must be"):
            hessian_distance(*args, norm="spectral", tol=tol)
    for max_iter in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_iter must be"):
            hessian_distance(*args, norm="spectral", max_iter=max_iter)
    with pytest.raises(TypeError, match="other must be"):
        hessian_distance(*args, other=case.logits)
    with pytest.raises(ValueError, match="other"):
        hessian_distance(*args, other=(case.logits[:3], case.features[:3, :2], case.labels[:3]))
    with pytest.raises(ValueError, match="env_reduction"):
        full_hessian_penalty(*args, env_reduction="max")
    with pytest.raises(TypeError, match="detach_reference"):
        full_hessian_penalty(*args, detach_reference="yes")
    with pytest.raises(ValueError, match="backend"):
        full_hessian_penalty(*args, backend="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # good options run quietly
        hessian_distance(*args, norm="spectral", tol=1e-8, max_iter=50)
