"""Fishr in closed form against per-sample gradients from torch.func (float64), on every backend."""
import io

import pytest
import torch

import hgkernels as hk
from hgkernels.penalties.fishr import variance_distance
from _helpers import assert_close, make_case

LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")
BACKENDS = ("torch", "native", "triton")


def _per_sample_variances(case):
    """Each environment's biased variance of the per-sample head gradients, by torch.func (independent
    of the library): (E, C·Dh), weight entries then bias."""
    import torch.nn.functional as F
    n, c = case.logits.shape
    d = case.features.shape[1]
    ids = case.envs if torch.is_tensor(case.envs) else torch.repeat_interleave(
        torch.arange(len(case.envs)), torch.tensor(case.envs))

    def sample_loss(w, b, logit, feature, target):
        out = logit + w @ feature + (b if case.bias else 0)
        if case.loss == "cross_entropy":
            return F.cross_entropy(out[None], target[None])
        if case.loss == "binary_cross_entropy":
            return F.binary_cross_entropy_with_logits(out, target)
        return F.mse_loss(out, target)

    grads = torch.func.vmap(torch.func.grad(sample_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0))
    zero_w, zero_b = torch.zeros(c, d, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    out = []
    for e in range(int(ids.max()) + 1):
        idx = (ids == e).nonzero().squeeze(1)
        gw, gb = grads(zero_w, zero_b, case.logits[idx], case.features[idx], case.labels[idx])
        flat = torch.cat([gw.flatten(1)] + ([gb] if case.bias else []), 1)
        out.append(flat.var(0, unbiased=False))
    return torch.stack(out)


def _upstream_penalty(variances):
    """Upstream DomainBed's distance: (1/E) sum_e mean over coordinates of (v_e - mean_f v_f)^2."""
    mean = variances.mean(0)
    return sum((v - mean).pow(2).mean() for v in variances) / variances.shape[0]


def _backend_dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["ids", "sizes"])
def test_variance_and_penalty_match_per_sample_gradients(backend, loss, bias, layout):
    case = make_case(1, loss=loss, bias=bias, sizes=[6, 9, 4], num_classes=3, num_features=5,
                     as_sizes=layout == "sizes")
    dtype = _backend_dtype(backend)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    logits, feats = case.leaves(dtype)
    labels = case.labels if loss == "cross_entropy" else case.labels.to(dtype)
    v = hk.head_gradient_variance(logits, feats, labels, case.envs, loss=loss, bias=bias, backend=backend)
    flat = torch.cat([v.weight.flatten(1)] + ([v.bias] if bias else []), 1)
    want = _per_sample_variances(case)
    assert_close(flat, want, tol, "per-environment gradient variance")
    pen = hk.fishr_penalty(logits, feats, labels, case.envs, loss=loss, bias=bias, backend=backend)
    assert_close(pen, _upstream_penalty(want), tol, "penalty")
    # gradients against the reference path (per-sample gradients by torch.func, differentiated by autograd)
    got = torch.autograd.grad(pen, (logits, feats))
    ref_logits, ref_feats = case.leaves()
    ref = hk.fishr_penalty(ref_logits, ref_feats, case.labels, case.envs, loss=loss, bias=bias, backend="reference")
    for g, r, what in zip(got, torch.autograd.grad(ref, (ref_logits, ref_feats)), ("d logits", "d features")):
        assert_close(g, r, tol, what)


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck(loss):
    case = make_case(2, loss=loss, bias=True, sizes=[3, 4], num_classes=2, num_features=3)
    logits, feats = case.leaves()
    for backend in ("torch", "native"):
        assert torch.autograd.gradcheck(
            lambda lg, ft: hk.fishr_penalty(lg, ft, case.labels, case.envs, loss=loss, backend=backend),
            (logits, feats))


def test_properties_order_one_environment_nonnegative():
    case = make_case(3, loss="cross_entropy", bias=True, sizes=[5, 7, 6], num_classes=4, num_features=3)
    base = hk.fishr_penalty(case.logits, case.features, case.labels, case.envs)
    perm = torch.randperm(18, generator=torch.Generator().manual_seed(0))
    permuted = hk.fishr_penalty(case.logits[perm], case.features[perm], case.labels[perm], case.envs[perm])
    assert_close(permuted, base, 1e-12, "order invariance")
    assert base > 0
    one = hk.fishr_penalty(case.logits, case.features, case.labels, [18])
    assert one == 0


def test_coordinate_and_environment_reductions():
    case = make_case(4, loss="cross_entropy", bias=True, sizes=[5, 7], num_classes=3, num_features=3)
    want = _per_sample_variances(case)
    squared = (want - want.mean(0)).square()
    pen = {(er, cr): hk.fishr_penalty(case.logits, case.features, case.labels, case.envs, env_reduction=er,
                                      coordinate_reduction=cr) for er in ("mean", "sum") for cr in ("mean", "sum")}
    assert_close(pen["sum", "sum"], squared.sum(), 1e-10, "sum/sum")
    assert_close(pen["mean", "mean"], squared.mean(1).mean(), 1e-10, "mean/mean")
    with pytest.raises(ValueError, match="coordinate_reduction"):
        hk.fishr_penalty(case.logits, case.features, case.labels, case.envs, coordinate_reduction="max")


def test_double_backward_matches_reference():
    case = make_case(5, loss="cross_entropy", bias=True, sizes=[4, 5], num_classes=3, num_features=3)
    v = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = []
    for backend in ("native", "reference"):
        w = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
        feats = case.features.clone().requires_grad_(True)
        pen = hk.fishr_penalty(feats @ w.T, feats, case.labels, case.envs, backend=backend)
        (g,) = torch.autograd.grad(pen, w, create_graph=True)
        out.append(torch.autograd.grad((g * v).sum(), (w, feats)))
    for got, want in zip(*out):
        assert_close(got, want, 1e-9, "second derivative")


def test_fishr_loss_moving_average_and_state_dict():
    case = make_case(6, loss="cross_entropy", bias=True, sizes=[5, 6, 4], num_classes=3, num_features=4)
    module = hk.FishrLoss(3, 3, 4, ema=0.9).double()  # the buffer follows the module's dtype
    steps = [case.logits, 1.5 * case.logits]
    variances = []
    for logits in steps:
        out = module(logits, case.features, case.labels, case.envs)
        variances.append(torch.cat([torch.cat([v.weight.flatten(1), v.bias], 1) for v in [
            hk.head_gradient_variance(logits, case.features, case.labels, case.envs)]]))
    # upstream: ema_t = 0.9 ema_{t-1} + 0.1 v_t (ema_0 = 0), penalty on ema_t / (1 - 0.9)
    ema = 0.1 * variances[0]
    ema = 0.9 * ema + 0.1 * variances[1]
    assert_close(module.ema_variances, ema, 1e-12, "moving average")
    assert_close(out, variance_distance(ema / 0.1), 1e-12, "penalty on the corrected average")
    assert int(module.updates) == 2
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    restored = hk.FishrLoss(3, 3, 4, ema=0.9).double()
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.ema_variances, module.ema_variances) and int(restored.updates) == 2
    restored.eval()  # eval reads the average without updating it
    restored(case.logits, case.features, case.labels, case.envs)
    assert torch.equal(restored.ema_variances, module.ema_variances)
    # the gradient flows only through this step's variance
    logits = case.logits.clone().requires_grad_(True)
    module.train()
    pen = module(logits, case.features, case.labels, case.envs)
    (g,) = torch.autograd.grad(pen, logits)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    with pytest.raises(ValueError, match="FishrLoss was built for"):
        hk.FishrLoss(2, 3, 5)(case.logits, case.features, case.labels, [5, 10])


def test_colored_mnist_script_convention():
    """The Colored MNIST script's Fishr (sum over environments and head entries of the squared
    deviation of the centred per-sample gradient variances, single-logit BCE) is
    fishr_penalty(env_reduction="sum", coordinate_reduction="sum"); examples/colored_mnist.py uses it."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 1, generator=g, dtype=torch.float64)
    z = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (30, 1), generator=g).double()
    sizes = [12, 18]
    variances = []
    for logit, feature, target in zip(a.split(sizes), z.split(sizes), y.split(sizes)):
        zh = torch.cat([feature, torch.ones_like(feature[:, :1])], 1)
        per_sample = (torch.sigmoid(logit) - target) * zh
        variances.append((per_sample - per_sample.mean(0)).pow(2).mean(0))
    v = torch.stack(variances)
    want = (v - v.mean(0)).pow(2).sum()
    got = hk.fishr_penalty(a, z, y, sizes, loss="binary_cross_entropy", env_reduction="sum",
                           coordinate_reduction="sum")
    assert_close(got, want, 1e-12, "Colored MNIST Fishr")


NATIVE_ERROR = hk.backends.unavailable_reason("native")


@pytest.mark.skipif(NATIVE_ERROR is not None, reason=f"native kernels: {NATIVE_ERROR}")
@pytest.mark.parametrize("loss", LOSSES)
def test_native_whole_plan_node_function_and_python_algebra_agree(loss, monkeypatch):
    """On the native CPU plans fishr_penalty is FishrPlan run whole: the compiled node (grad_fn
    HessianAlignmentPenaltyBackward), bitwise equal to the Python PenaltyFunction over the same C++ plan, and both
    equal to FishrPlan's own algebra on the native primitives and to per-sample gradients (float64, 1e-10)."""
    from hgkernels.backends import native as native_backend
    case = make_case(7, loss=loss, bias=True, sizes=[6, 1, 9, 4], num_classes=3, num_features=5)
    labels = case.labels if loss == "cross_entropy" else case.labels.double()
    ran = []
    whole_plan = native_backend.NativeBackend.plan_forward
    monkeypatch.setattr(native_backend.NativeBackend, "plan_forward",
                        lambda self, problem, spec: ran.append(spec.method) or whole_plan(self, problem, spec))

    def value_and_grads():
        logits, feats = case.leaves()
        pen = hk.fishr_penalty(logits, feats, labels, case.envs, loss=loss, backend="native")
        return pen.grad_fn.name(), [pen.detach(), *torch.autograd.grad(pen, (logits, feats))]

    node_name, node = value_and_grads()
    assert node_name == "HessianAlignmentPenaltyBackward" and ran == []  # the node calls the plan in C++
    monkeypatch.setattr(native_backend.NativeBackend, "autograd_plan", lambda self, problem, spec: None)
    function_name, function = value_and_grads()
    assert function_name != node_name and ran == ["fishr"]
    for what, a, b in zip(("value", "d logits", "d features"), node, function):
        assert torch.equal(a, b), f"node vs PenaltyFunction: {what}"
    monkeypatch.setattr(native_backend.NativeBackend, "plan_forward", lambda self, problem, spec: None)
    _, algebra = value_and_grads()
    ref_logits, ref_feats = case.leaves()
    ref = hk.fishr_penalty(ref_logits, ref_feats, labels, case.envs, loss=loss, backend="reference")
    expected = [ref.detach(), *torch.autograd.grad(ref, (ref_logits, ref_feats))]
    for what, a, b, c in zip(("value", "d logits", "d features"), node, algebra, expected):
        assert_close(a, b, 1e-10, f"C++ plan vs FishrPlan's algebra: {what}")
        assert_close(a, c, 1e-10, f"C++ plan vs the reference: {what}")


@pytest.mark.skipif(NATIVE_ERROR is not None, reason=f"native kernels: {NATIVE_ERROR}")
def test_native_whole_plan_layouts_half_inputs_and_in_place_changes():
    """Features with a column stride (the Python Function over a contiguous copy) equal the contiguous call;
    float16 inputs compute in float32 (equal to the float32 call on the same values, gradients in float16);
    changing an input in place before backward raises instead of reading the new values."""
    case = make_case(8, loss="cross_entropy", bias=True, sizes=[5, 8, 3], num_classes=4, num_features=6)
    logits, feats = case.leaves()
    pen = hk.fishr_penalty(logits, feats, case.labels, case.envs, backend="native")
    expected = [pen.detach(), *torch.autograd.grad(pen, (logits, feats))]
    strided_logits = case.logits.clone().requires_grad_(True)
    strided = case.features.t().contiguous().requires_grad_(True)  # (D, N): its transpose has column stride N
    pen = hk.fishr_penalty(strided_logits, strided.t(), case.labels, case.envs, backend="native")
    got = [pen.detach(), *torch.autograd.grad(pen, (strided_logits, strided))]
    got[2] = got[2].t()
    for what, a, b in zip(("value", "d logits", "d features"), got, expected):
        assert_close(a, b, 1e-12, f"strided features: {what}")
    half = [t.half().requires_grad_(True) for t in (case.logits, case.features)]
    single = [t.detach().float().requires_grad_(True) for t in half]
    results = []
    for lg, ft in (half, single):
        pen = hk.fishr_penalty(lg, ft, case.labels, case.envs, backend="native")
        results.append([pen.detach().float(), *torch.autograd.grad(pen, (lg, ft))])
    assert results[0][1].dtype == torch.float16 and results[0][2].dtype == torch.float16
    for what, a, b in zip(("value", "d logits", "d features"), *results):
        assert_close(a.float(), b.to(a.dtype).float(), 1e-6, f"float16 inputs: {what}")
    logits, feats = case.leaves()
    moved = logits * 1
    pen = hk.fishr_penalty(moved, feats, case.labels, case.envs, backend="native")
    moved.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        pen.backward()
