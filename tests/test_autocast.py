"""Inside torch.autocast every public function takes what autocast makes (half logits beside float32
features, or the reverse), computes in float32 and returns each gradient in its input's dtype.

The expected values are the float32 computation, outside autocast, on the same values up-cast to
float32: equal to RTOL (float32 rounding: the same arithmetic but for summation order; had autocast
down-cast one of our own matmuls to bfloat16 or float16 the error would be about 1e-3 to 1e-2). A
gradient returned in a half dtype is the float32 one rounded to it: within that dtype's unit
roundoff of the largest entry. Each is also checked against float64 autograd (`backend="reference"`)
on the rounded inputs, to float32's accuracy (RTOL_FLOAT64).
"""
import pytest
import torch
import torch.nn.functional as F

import hgkernels as hk
from hgkernels import backends
from _helpers import assert_close, make_case

RTOL = 1e-6
RTOL_FLOAT64 = 1e-4
HALF_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
CLOSED_FORM_BACKENDS = [name for name in ("torch", "native", "triton") if backends.unavailable_reason(name) is None]

SIZES, C, D = [9, 13, 7], 4, 6


def _backends_and_dtypes(backends_to_run):
    """(backend, autocast dtype) pairs; the Triton interpreter's float16 runs are slow-marked."""
    return [pytest.param(b, d, id=f"{b}-{d}".replace("torch.", ""),
                         marks=[pytest.mark.slow] if (b, d) == ("triton", torch.float16) else [])
            for b in backends_to_run for d in AUTOCAST_DTYPES]


def _case(seed=3, loss="cross_entropy"):
    case = make_case(seed, loss=loss, bias=True, sizes=SIZES, num_classes=C, num_features=D)
    labels = case.labels if loss == "cross_entropy" else case.labels.float()
    return case.logits.float(), case.features.float(), labels, case.envs


def _penalty_outputs(pen):
    return list(pen) if isinstance(pen, tuple) else [pen]


def _stat_outputs(stat):
    return [stat.weight, stat.bias]


# name -> (call(logits, features, labels, envs, **options) -> list of outputs, options for each run)
FUNCTIONS = {
    "hutchinson": (lambda *a, **k: _penalty_outputs(hk.hutchinson_penalty(*a, **k)), dict(form="feature")),
    "hutchinson, sample form": (lambda *a, **k: _penalty_outputs(hk.hutchinson_penalty(*a, **k)), dict(form="sample")),
    "hgp": (lambda *a, **k: _penalty_outputs(hk.hgp_penalty(*a, detach_reference=False, **k)), dict(form="feature")),
    "hgp, sample form": (lambda *a, **k: _penalty_outputs(hk.hgp_penalty(*a, detach_reference=False, **k)),
                         dict(form="sample")),
    "full_hessian": (lambda *a, **k: _penalty_outputs(hk.full_hessian_penalty(*a, **k)), {}),
    "fishr": (lambda *a, **k: _penalty_outputs(hk.fishr_penalty(*a, **k)), {}),
    "head_gradient": (lambda *a, **k: _stat_outputs(hk.head_gradient(*a, **k)), {}),
    "head_hessian_diag": (lambda *a, **k: _stat_outputs(hk.head_hessian_diag(*a, **k)), {}),
    "head_gradient_variance": (lambda *a, **k: _stat_outputs(hk.head_gradient_variance(*a, **k)), {}),
    "head_hvp": (lambda lg, ft, y, e, **k: _stat_outputs(hk.head_hvp(
        lg, ft, y, e, (torch.linspace(-1, 1, C * D).reshape(C, D), torch.linspace(0.5, -0.5, C)), **k)), {}),
    "FishrLoss": (lambda *a, **k: [hk.FishrLoss(len(SIZES), C, D, **k)(*a)], {}),
    "hessian_distance": (lambda *a, backend, **k: [hk.hessian_distance(*a, **k)], {}),
    "HessianAlignmentLoss logits path": (lambda *a, **k: _penalty_outputs(
        hk.HessianAlignmentLoss("hgp", alpha=0.7, beta=1.3, **k)(*a)), {}),
}


def _outputs(name, logits, features, labels, envs, backend):
    call, options = FUNCTIONS[name]
    return call(logits, features, labels, envs, backend=backend, **options)


def _grads(outputs, logits, features):
    """The gradients of a weighted sum of the outputs in (logits, features)."""
    gen = torch.Generator().manual_seed(0)  # random weights: a plain sum of G_e cancels over classes
    total = sum((out.float() * torch.randn(out.shape, generator=gen)).sum() for out in outputs)
    return torch.autograd.grad(total, (logits, features))


def _outputs_and_grads(name, logits, features, labels, envs, backend):
    outputs = _outputs(name, logits, features, labels, envs, backend)
    return outputs, _grads(outputs, logits, features)


def _half_side(which, dtype, logits, features):
    """Autocast's output: (logits, features) with `which` of them in the half dtype, as leaves."""
    half_logits = (logits.to(dtype) if which == "half logits" else logits).requires_grad_(True)
    half_features = (features.to(dtype) if which == "half features" else features).requires_grad_(True)
    return half_logits, half_features


def _compare(got_outputs, got_grads, inputs, expected_outputs, expected_grads, what):
    errors = []
    for i, (a, b) in enumerate(zip(got_outputs, expected_outputs)):
        assert a.dtype == torch.float32, f"{what}: output {i} is {a.dtype}, not float32"
        errors.append(assert_close(a, b, RTOL, f"{what}: output {i}"))
    for grad_name, g, x, g32 in zip(("d logits", "d features"), got_grads, inputs, expected_grads):
        assert g.dtype == x.dtype, f"{what}: {grad_name} is {g.dtype} but its input is {x.dtype}"
        tolerance = HALF_ROUNDOFF.get(x.dtype, RTOL)
        errors.append(assert_close(g, g32, tolerance, f"{what}: {grad_name}"))
    return max(errors)


def _takes(name, backend):
    """Whether function `name` runs on `backend`: the reference path has no forms, hessian_distance no
    backend option (it runs once, as "torch")."""
    return not ((backend == "reference" and "sample form" in name) or (backend != "torch" and name == "hessian_distance"))


@pytest.mark.parametrize("which", ["half logits", "half features"])
@pytest.mark.parametrize("name,backend,autocast_dtype", [
    pytest.param(name, *param.values, id=f"{name}-{param.id}", marks=param.marks)
    for name in FUNCTIONS for param in _backends_and_dtypes([*CLOSED_FORM_BACKENDS, "reference"])
    if _takes(name, param.values[0])])
def test_autocast_inputs_equal_float32_on_the_upcast_values(name, backend, which, autocast_dtype):
    autograd_backward = backend == "reference" or name == "hessian_distance"
    logits, features, labels, envs = _case()
    half_logits, half_features = _half_side(which, autocast_dtype, logits, features)
    with torch.autocast("cpu", dtype=autocast_dtype):
        got = _outputs(name, half_logits, half_features, labels, envs, backend)
        assert torch.is_autocast_enabled("cpu") and (features @ features.T).dtype == autocast_dtype  # left as it was
        if not autograd_backward:  # our hand-written backward, even inside autocast
            got_grads = _grads(got, half_logits, half_features)
    if autograd_backward:  # autograd's backward follows autocast's rules: outside it, as torch recommends
        got_grads = _grads(got, half_logits, half_features)
    up_logits, up_features = (t.detach().float().requires_grad_(True) for t in (half_logits, half_features))
    expected, expected_grads = _outputs_and_grads(name, up_logits, up_features, labels, envs, backend)
    what = f"{name}, {backend}, {which} ({autocast_dtype})"
    _compare(got, got_grads, (half_logits, half_features), expected, expected_grads, what)
    # and right: float64 autograd on the same rounded values
    ref_logits, ref_features = (t.detach().double().requires_grad_(True) for t in (half_logits, half_features))
    labels64 = labels if labels.dtype == torch.int64 else labels.double()
    ref, ref_grads = _outputs_and_grads(name, ref_logits, ref_features, labels64, envs, "reference")
    for i, (a, b) in enumerate(zip(expected, ref)):
        assert_close(a, b, RTOL_FLOAT64, f"{what}: output {i} against float64")
    for a, b in zip(expected_grads, ref_grads):
        assert_close(a, b, RTOL_FLOAT64, f"{what}: gradient against float64")


def _head(seed=5):
    torch.manual_seed(seed)
    return torch.nn.Linear(D, C)


def _fused_expected(method, head, features, labels, envs, autocast_dtype, **options):
    """The float32 computation of the fused head under autocast: logits with autocast's rounding (the
    values head(features) gives inside it), differentiated as the float32 linear map, everything else
    in float32 (straight-through: the rounding's own derivative is taken as one)."""
    with torch.autocast("cpu", dtype=autocast_dtype):
        rounded = head(features).detach().float()
    logits32 = F.linear(features.float(), head.weight, head.bias)
    logits = logits32 + (rounded - logits32).detach()
    out = hk.HessianAlignmentLoss(method, alpha=0.7, beta=1.3, **options)(logits, features.float(), labels, envs)
    return out, rounded


@pytest.mark.parametrize("features_dtype", [torch.float32, "autocast"], ids=["float32 features", "half features"])
@pytest.mark.parametrize("backend,autocast_dtype", _backends_and_dtypes(CLOSED_FORM_BACKENDS))
@pytest.mark.parametrize("method,form", [("hgp", "feature"), ("hutchinson", "feature"), ("hgp", "sample"),
                                         ("full_hessian", "auto")])
def test_fused_head_under_autocast(method, form, backend, features_dtype, autocast_dtype):
    """HessianAlignmentLoss(head, z, ...) inside autocast: the logits autocast gives (in its dtype), the
    float32 penalty and ERM on them, the parameters' gradients in float32, the features' in theirs."""
    _, features, labels, envs = _case(7)
    features = features.to(autocast_dtype if features_dtype == "autocast" else features_dtype).requires_grad_(True)
    head = _head()
    options = dict(backend=backend) if method == "full_hessian" else dict(backend=backend, form=form)
    with torch.autocast("cpu", dtype=autocast_dtype):
        out = hk.HessianAlignmentLoss(method, alpha=0.7, beta=1.3, **options)(head, features, labels, envs)
    assert out.logits.dtype == autocast_dtype
    got = torch.autograd.grad(out.total, (features, head.weight, head.bias))
    expected, rounded = _fused_expected(method, head, features.detach().requires_grad_(True), labels, envs,
                                        autocast_dtype, **options)
    assert torch.equal(out.logits.float(), rounded)
    what = f"fused {method} {form}, {backend}, {features.dtype} features ({autocast_dtype})"
    for name in ("total", "erm", "hessian", "gradient"):
        value = getattr(out, name)
        assert value.dtype == torch.float32, f"{what}: {name} is {value.dtype}"
        assert_close(value, getattr(expected, name), 1e-5, f"{what}: {name}")
    if method == "full_hessian":  # no fused Function: the logits path inside, autocast's linear map and its backward
        features_leaf = features.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=autocast_dtype):
            expected = hk.HessianAlignmentLoss(method, alpha=0.7, beta=1.3, **options)(
                head(features_leaf), features_leaf, labels, envs)
    else:  # the fused Function: its linear map's gradients in float32
        features_leaf = features.detach().float().requires_grad_(True)
        expected, _ = _fused_expected(method, head, features_leaf, labels, envs, autocast_dtype, **options)
    want = torch.autograd.grad(expected.total, (features_leaf, head.weight, head.bias))
    for grad_name, g, x, w in zip(("d features", "d weight", "d bias"), got, (features, head.weight, head.bias), want):
        assert g.dtype == x.dtype, f"{what}: {grad_name} is {g.dtype} but its input is {x.dtype}"
        assert_close(g, w, HALF_ROUNDOFF.get(x.dtype, 1e-5), f"{what}: {grad_name}")


def test_linear_head_alignment_mixes_half_and_float32_outside_autocast():
    """Without autocast a bfloat16 weight beside float32 features is computed in float32 too."""
    _, features, labels, envs = _case(8)
    head = _head()
    weight = head.weight.detach().to(torch.bfloat16).requires_grad_(True)
    out = hk.linear_head_alignment(features, weight, head.bias, labels, envs, method="hgp")
    d_weight, = torch.autograd.grad(out.total, (weight,))
    assert out.logits.dtype == torch.float32 and d_weight.dtype == torch.bfloat16
    weight32 = weight.detach().float().requires_grad_(True)
    ref = hk.linear_head_alignment(features, weight32, head.bias, labels, envs, method="hgp")
    assert_close(out.total, ref.total, RTOL, "total")
    assert_close(d_weight, torch.autograd.grad(ref.total, (weight32,))[0], HALF_ROUNDOFF[torch.bfloat16], "d weight")


@pytest.mark.parametrize("path", ["fused head", "logits path"])
def test_scaled_loss_scales_our_gradients_exactly(path):
    """GradScaler multiplies the loss by a power of two: every gradient we return is scaled exactly (our
    backward is linear in its upstream), float16 autocast. Exactly in float32; a float16 gradient (the
    logits' on the logits path) exactly where the unscaled one is a normal float16 number (below
    2^-14 the unscaled one loses bits to float16's subnormals, which is why GradScaler scales)."""
    _, features, labels, envs = _case(9)
    head = _head()
    grads = []
    for scale in (1.0, 2.0 ** 12):
        z = features.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.float16):
            criterion = hk.HessianAlignmentLoss("hgp", alpha=0.7, beta=1.3)
            if path == "fused head":
                out, inputs = criterion(head, z, labels, envs), (z, head.weight, head.bias)
            else:
                logits = head(z).detach().requires_grad_(True)
                out, inputs = criterion(logits, z, labels, envs), (logits, z)
        grads.append(torch.autograd.grad(scale * out.total, inputs))
    for unscaled, scaled in zip(*grads):
        assert torch.isfinite(unscaled).all() and unscaled.abs().max() > 0
        normal = unscaled.abs() >= 2.0 ** -14 if unscaled.dtype == torch.float16 else torch.ones_like(unscaled).bool()
        assert normal.float().mean() > 0.5
        assert torch.equal(scaled[normal], unscaled[normal] * 2.0 ** 12)


def _amp_step(init_scale, path):
    """One GradScaler step of a featurizer and head trained with the penalty under float16 autocast."""
    torch.manual_seed(0)
    featurizer, head = torch.nn.Linear(5, D), torch.nn.Linear(D, C)
    params = [*featurizer.parameters(), *head.parameters()]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    x = torch.randn(sum(SIZES), 5, generator=torch.Generator().manual_seed(1))
    _, _, labels, envs = _case(9)
    criterion = hk.HessianAlignmentLoss("hutchinson", alpha=0.7, beta=1.3)
    with torch.autocast("cpu", dtype=torch.float16):
        z = featurizer(x)
        assert z.dtype == torch.float16
        out = criterion(head, z, labels, envs) if path == "fused head" else criterion(head(z), z, labels, envs)
    scaler.scale(out.total).backward()
    grads = [p.grad.clone() for p in params]
    scaler.step(optimizer)
    scaler.update()
    return before, params, grads, scaler


@pytest.mark.parametrize("path", ["fused head", "logits path"])
def test_grad_scaler_skips_the_step_when_our_float16_gradient_overflows(path):
    # 2^40 times the features' gradient overflows float16: inf reaches the featurizer's gradients
    before, params, grads, scaler = _amp_step(2.0 ** 40, path)
    assert not all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, params)), "the step was not skipped"
    assert scaler.get_scale() == 2.0 ** 39
    # an ordinary scale: the step is taken, with the unscaled gradients of the float32 computation
    before, params, grads, scaler = _amp_step(2.0 ** 8, path)
    assert all(torch.isfinite(g).all() for g in grads)
    assert not all(torch.equal(b, p.detach()) for b, p in zip(before, params))
    assert scaler.get_scale() == 2.0 ** 8


def test_float64_mixed_with_another_dtype_is_an_error():
    logits, features, labels, envs = _case()
    with pytest.raises(TypeError, match="features dtype torch.float32 must match logits dtype torch.float64"):
        hk.hgp_penalty(logits.double(), features, labels, envs)
    with pytest.raises(TypeError, match="features dtype torch.float64 must match logits dtype torch.bfloat16"):
        hk.fishr_penalty(logits.bfloat16(), features.double(), labels, envs)
    head = _head()
    with pytest.raises(TypeError, match="weight dtype torch.float32 must match features dtype torch.float64"):
        hk.linear_head_alignment(features.double(), head.weight, head.bias, labels, envs)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone: still the user's mix
        with pytest.raises(TypeError, match="must match logits dtype torch.float64"):
            hk.hutchinson_penalty(logits.double(), features, labels, envs)


def test_env_mean_loss_and_spectral_distance_under_autocast():
    logits, features, labels, envs = _case()
    half = logits.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = hk.env_mean_loss(half, labels, envs)
        spectral = hk.hessian_distance(half, features, labels, envs, norm="spectral")
    d_half, = torch.autograd.grad(losses.sum(), (half,))
    up = half.detach().float().requires_grad_(True)
    expected = hk.env_mean_loss(up, labels, envs)
    assert losses.dtype == torch.float32 and d_half.dtype == torch.bfloat16
    assert_close(losses, expected, RTOL, "env_mean_loss")
    assert_close(d_half, torch.autograd.grad(expected.sum(), (up,))[0], HALF_ROUNDOFF[torch.bfloat16], "d logits")
    assert_close(spectral, hk.hessian_distance(up.detach(), features, labels, envs, norm="spectral"), 1e-5,
                 "spectral distances")
