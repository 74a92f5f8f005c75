"""The fused head (hgkernels.linear_head_alignment, HessianAlignmentLoss given the nn.Linear head):
logits, ERM and penalty from one autograd Function must equal the logits-based path on the generic
autograd reference, in float64, for every backend, form, loss and layout it serves."""
import copy
import itertools

import pytest
import torch

import hgkernels as hk
from hgkernels import _inputs
from _helpers import assert_close

NATIVE = pytest.importorskip("hgkernels.backends.native").NATIVE_ERROR is None
BACKENDS = ["auto", "torch"] + (["native"] if NATIVE else [])


def _problem(seed, loss, c, n=31, d_in=5, d=6, envs_as="ids", bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    featurizer = torch.nn.Sequential(torch.nn.Linear(d_in, d), torch.nn.Tanh()).double()
    head = torch.nn.Linear(d, c, bias=bias).double()
    if loss == "cross_entropy":
        y = torch.randint(0, c, (n,), generator=gen)
    elif loss == "binary_cross_entropy":
        y = torch.rand(n, c, generator=gen, dtype=torch.float64).round()
    else:
        y = torch.randn(n, c, generator=gen, dtype=torch.float64)
    sizes = [9, 15, 7]
    if envs_as == "sizes":
        envs = sizes
    else:  # unequal environments, ids shuffled
        envs = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))[torch.randperm(n, generator=gen)]
    return x, featurizer, head, y, envs


def _run(x, featurizer, head, y, envs, method, fused, logit_weight=0.1, **options):
    """(outputs, parameter gradients) of total + logit_weight * sum(logits^2), so the returned logits'
    own gradient path is exercised too."""
    featurizer.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    z = featurizer(x)
    if fused:
        out = hk.HessianAlignmentLoss(method, alpha=0.7, beta=1.3, **options)(head, z, y, envs)
        logits = out.logits
    else:
        logits = head(z)
        out = hk.HessianAlignmentLoss(method, alpha=0.7, beta=1.3, bias=head.bias is not None, **options)(
            logits, z, y, envs)
    (out.total + logit_weight * logits.square().sum()).backward()
    grads = [p.grad.clone() for p in (*featurizer.parameters(), *head.parameters())]
    return (out.total, out.erm, out.hessian, out.gradient, logits), grads


def _assert_same(fused, reference, rtol, what):
    (values, grads), (ref_values, ref_grads) = fused, reference
    for name, a, b in zip(("total", "erm", "hessian", "gradient", "logits"), values, ref_values):
        assert_close(a.detach(), b.detach(), rtol, f"{what}: {name}")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_close(a, b, rtol, f"{what}: parameter {i} gradient")


CASES = [(loss, c) for loss, c in itertools.product(("cross_entropy", "binary_cross_entropy", "mse"), (1, 3, 20))
         if not (loss == "cross_entropy" and c == 1)]


@pytest.mark.parametrize("loss,c", CASES)
@pytest.mark.parametrize("method", ["hutchinson", "hgp"])
def test_fused_head_matches_the_reference_logits_path(loss, c, method):
    """Every backend and form, ids shuffled or sizes, bias or not (C = 20 takes the native kernels'
    blocked path, C <= 3 the one-row path): values and every parameter gradient within 1e-9."""
    for seed, (backend, form, envs_as, bias) in enumerate(itertools.product(
            BACKENDS, ("feature", "sample"), ("ids", "sizes"), (True, False))):
        problem = _problem(seed, loss, c, envs_as=envs_as, bias=bias)
        reference = _run(*problem, method, fused=False, loss=loss, backend="reference")
        fused = _run(*problem, method, fused=True, loss=loss, backend=backend, form=form)
        _assert_same(fused, reference, 1e-9, f"{backend}/{form}/{envs_as}/bias={bias}")


def test_fused_head_on_triton():
    """The Triton backend (interpreted on CPU) adds the head term with torch ops (backends.base.add_head_term)."""
    pytest.importorskip("triton")
    x, featurizer, head, y, envs = _problem(12, "cross_entropy", 3, n=13)
    as_float32 = (x.float(), copy.deepcopy(featurizer).float(), copy.deepcopy(head).float(), y, envs)
    for method in ("hutchinson", "hgp"):
        reference = _run(x, featurizer, head, y, envs, method, fused=False, backend="reference")
        fused = _run(*as_float32, method, fused=True, backend="triton", form="feature")
        _assert_same(fused, reference, 2e-4, f"triton {method} (float32 against float64)")


@pytest.mark.parametrize("options", [dict(env_reduction="sum", detach_reference=False),
                                     dict(reference="mean"), dict(validate=False)])
def test_fused_head_conventions(options):
    problem = _problem(3, "cross_entropy", 4)
    reference = _run(*problem, "hgp", fused=False, backend="reference", **options)
    _assert_same(_run(*problem, "hgp", fused=True, **options), reference, 1e-9, str(options))


def test_fused_head_stochastic_estimator_uses_the_same_probes():
    problem = _problem(4, "cross_entropy", 3)
    runs = []
    for fused in (True, False):
        opts = dict(estimator="hutchinson", num_probes=5, generator=torch.Generator().manual_seed(11))
        if not fused:
            opts["backend"] = "reference"
        runs.append(_run(*problem, "hutchinson", fused=fused, **opts))
    _assert_same(runs[0], runs[1], 1e-9, "stochastic")


@pytest.mark.parametrize("method", ["hutchinson", "hgp"])
def test_fused_head_double_backward_matches_reference(method):
    """create_graph=True: the gradient with respect to the head's weight is differentiable again."""
    x, featurizer, head, y, envs = _problem(5, "cross_entropy", 3)
    second = []
    for fused in (True, False):
        z = featurizer(x).detach().requires_grad_()
        if fused:
            out = hk.HessianAlignmentLoss(method, alpha=0.7, beta=1.3)(head, z, y, envs)
        else:
            out = hk.HessianAlignmentLoss(method, alpha=0.7, beta=1.3, backend="reference")(head(z), z, y, envs)
        d_w, d_z = torch.autograd.grad(out.total, (head.weight, z), create_graph=True)
        second.append((d_w, d_z, *torch.autograd.grad(d_w.square().sum() + d_z.sum(), (head.weight, head.bias, z))))
    for name, a, b in zip(("d_weight", "d_features", "dd_weight", "dd_bias", "dd_features"), *second):
        assert_close(a.detach(), b.detach(), 1e-9, name)


def test_fused_head_frozen_parts():
    """A frozen head (features still get their gradient) and a frozen featurizer (the head still learns)."""
    x, featurizer, head, y, envs = _problem(6, "cross_entropy", 3)
    reference = _run(x, featurizer, head, y, envs, "hgp", fused=False, backend="reference")
    head.requires_grad_(False)
    z = featurizer(x)
    out = hk.HessianAlignmentLoss("hgp")(head, z, y, envs)
    (d_z,) = torch.autograd.grad(out.total, (z,))
    z_leaf = featurizer(x).detach().requires_grad_()
    ref_out = hk.HessianAlignmentLoss("hgp", backend="reference")(head(z_leaf), z_leaf, y, envs)
    (ref_d_z,) = torch.autograd.grad(ref_out.total, (z_leaf,))
    assert_close(d_z, ref_d_z, 1e-9, "features gradient with a frozen head")
    head.requires_grad_(True)
    head.zero_grad(set_to_none=True)
    out = hk.HessianAlignmentLoss("hgp", alpha=0.7, beta=1.3)(head, featurizer(x).detach(), y, envs)
    (out.total + 0.1 * out.logits.square().sum()).backward()
    assert_close(head.weight.grad, reference[1][-2], 1e-9, "head weight gradient with a frozen featurizer")


def test_fused_head_falls_back_where_it_does_not_serve():
    """full_hessian, backend='reference', a head with forward hooks and an nn.Linear subclass with its own
    forward take the logits path: same results, and the hook (the subclass's forward) sees the call."""
    problem = _problem(7, "cross_entropy", 3)
    for method in ("full_hessian", "hgp"):
        reference = _run(*problem, method, fused=False, backend="reference")
        _assert_same(_run(*problem, method, fused=True, backend="reference"), reference, 1e-12, method)
    calls = []
    handle = problem[2].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    try:
        _assert_same(_run(*problem, "hgp", fused=True), _run(*problem, "hgp", fused=False, backend="reference"),
                     1e-9, "hooked head")
    finally:
        handle.remove()
    assert len(calls) == 2  # the fused call and the logits-path call both ran the hooked head

    class ScaledHead(torch.nn.Linear):  # a subclass with its own forward is called, not bypassed
        def forward(self, z):
            return 2 * super().forward(z)

    x, featurizer, head, y, envs = problem
    scaled = ScaledHead(head.in_features, head.out_features).double()
    scaled.load_state_dict(head.state_dict())
    z = featurizer(x)
    ours = hk.HessianAlignmentLoss("hgp")(scaled, z, y, envs)
    expected = hk.HessianAlignmentLoss("hgp", backend="reference")(2 * head(z), z, y, envs)
    assert_close(ours.total.detach(), expected.total.detach(), 1e-9, "subclassed head")
    assert_close(ours.logits.detach(), 2 * head(z).detach(), 0, "subclassed head's logits")


def test_fused_head_option_errors():
    x, featurizer, head, y, envs = _problem(8, "cross_entropy", 3)
    z = featurizer(x)
    with pytest.raises(ValueError, match="bias"):
        hk.HessianAlignmentLoss("hgp", bias=False)(head, z, y, envs)
    with pytest.raises(TypeError, match="bias"):
        hk.linear_head_alignment(z, head.weight, head.bias, y, envs, bias=True)
    with pytest.raises(ValueError, match="weight"):
        hk.linear_head_alignment(z, head.weight[:, :-1], head.bias, y, envs)
    with pytest.raises(ValueError, match="method"):
        hk.linear_head_alignment(z, head.weight, head.bias, y, envs, method="fishr")
    with pytest.raises(ValueError, match="labels"):
        hk.linear_head_alignment(z, head.weight, head.bias, y + 3, envs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_features_nan_inf_still_raise_with_the_deferred_check(backend, bad):
    """validate=True scans the features only when the gradient term is non-finite (_inputs.check_deferred_values);
    a NaN/Inf feature must still raise, through the functions and the fused head, in both forms."""
    x, featurizer, head, y, envs = _problem(9, "cross_entropy", 3)
    z = featurizer(x).detach()
    logits = head(z).detach()  # finite: only the features are bad
    z[4, 2] = bad
    for form in ("feature", "sample"):
        for fn in (hk.hutchinson_penalty, hk.hgp_penalty):
            with pytest.raises(ValueError, match="features contains NaN or Inf"):
                fn(logits, z, y, envs, backend=backend, form=form)
        with pytest.raises(ValueError, match="features contains NaN or Inf"):
            hk.HessianAlignmentLoss("hgp", backend=backend, form=form)(head, z, y, envs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_and_labels_still_raise_with_the_deferred_check(backend, dtype, monkeypatch):
    """With cross_entropy, validate=True leaves the logits' and labels' scans to a non-finite gradient term too
    (_inputs.check_deferred_values): NaN or +inf logits, a row of -inf logits and a label outside [0, C) still
    raise their messages, through both penalties in both forms (float32 on the native backend takes the C++
    autograd node), a logits NaN before a bad label as up front; clean inputs are not scanned."""
    x, featurizer, head, y, envs = _problem(11, "cross_entropy", 3)
    z = featurizer(x).detach().to(dtype)
    logits = head.to(dtype)(z).detach()
    nan_logit, inf_logit, masked_row = logits.clone(), logits.clone(), logits.clone()
    nan_logit[3, 1], inf_logit[5, 0], masked_row[2] = float("nan"), float("inf"), float("-inf")
    bad_label = y.clone()
    bad_label[7] = 3
    cases = [(nan_logit, y, "logits contains NaN or \\+Inf"), (inf_logit, y, "logits contains NaN or \\+Inf"),
             (masked_row, y, "every entry is -inf"), (logits, bad_label, r"labels must lie in \[0, 3\)"),
             (nan_logit, bad_label, "logits contains NaN")]
    for form in ("feature", "sample"):
        for fn in (hk.hutchinson_penalty, hk.hgp_penalty):
            for bad_logits, labels, match in cases:
                with pytest.raises(ValueError, match=match):
                    fn(bad_logits, z, labels, envs, backend=backend, form=form)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):  # the fused head: before its ERM loss
        hk.linear_head_alignment(z, head.weight.detach(), head.bias.detach(), bad_label, envs, backend=backend)
    scanned = []
    monkeypatch.setattr(_inputs, "_check_finite", lambda name, *args, **kwargs: scanned.append(name))
    monkeypatch.setattr(_inputs, "_check_label_range", lambda *args: scanned.append("labels"))
    for fn in (hk.hutchinson_penalty, hk.hgp_penalty):
        fn(logits.requires_grad_(), z, y, envs, backend=backend)
    assert scanned == []


@pytest.mark.parametrize("where", ["features", "weight", "bias"])
def test_fused_head_names_the_non_finite_input(where):
    """The fused head computes the logits itself: a NaN in its inputs is reported by the input's name."""
    x, featurizer, head, y, envs = _problem(10, "cross_entropy", 3)
    z = featurizer(x).detach()
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    {"features": z, "weight": weight, "bias": bias}[where].view(-1)[1] = float("nan")
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        hk.linear_head_alignment(z, weight, bias, y, envs)


def test_deferred_check_lets_a_genuine_overflow_through():
    """Finite float32 features whose statistics overflow give an infinite term, not an error."""
    z = torch.full((8, 3), 1e30)
    labels = torch.tensor([1.0] * 3 + [0.0] * 5).unsqueeze(1)  # residuals -1/2 and +1/2: G_e = ∓5e29
    for backend in BACKENDS:
        pen = hk.hutchinson_penalty(torch.zeros(8, 1), z, labels, [3, 5], loss="binary_cross_entropy",
                                    backend=backend, form="feature")
        assert torch.isinf(pen.gradient), backend  # (±5e29)^2 overflows float32; the check ran and passed


def test_fused_head_stochastic_estimator_across_probe_batches(monkeypatch):
    """Probes split into several batches (penalties.hutchinson.PROBE_BATCH_ELEMENTS): the head's term must see every
    batch's logit gradient (it once saw only the first's: the features' gradient was 17% off)."""
    from hgkernels.penalties import hutchinson
    monkeypatch.setattr(hutchinson, "PROBE_BATCH_ELEMENTS", 200)  # a few probes per batch here
    problem = _problem(13, "cross_entropy", 4)
    for backend in BACKENDS:
        runs = []
        for fused in (True, False):
            opts = dict(estimator="hutchinson", num_probes=9, generator=torch.Generator().manual_seed(3),
                        backend=backend if fused else "reference")
            runs.append(_run(*problem, "hutchinson", fused=fused, **opts))
        _assert_same(runs[0], runs[1], 1e-9, f"{backend}, several probe batches")


def test_fused_head_half_precision_with_a_large_logit_sum():
    """float16 logits whose sum overflows while each is finite are not an error (the check looks closer)."""
    gen = torch.Generator().manual_seed(14)
    z = torch.randn(4096, 16, generator=gen).half()
    weight = (0.1 * torch.randn(100, 16, generator=gen)).half()
    bias = torch.full((100,), 0.3).half()
    y = torch.randint(0, 100, (4096,), generator=gen)
    assert not torch.isfinite(torch.nn.functional.linear(z, weight, bias).sum())
    out = hk.linear_head_alignment(z, weight, bias, y, [2048, 2048], method="hgp", backend="torch")
    ref = hk.HessianAlignmentLoss("hgp", backend="reference")(
        torch.nn.functional.linear(z.double(), weight.double(), bias.double()), z.double(), y, [2048, 2048])
    assert_close(out.total.double(), ref.total.detach(), 1e-2, "float16 total against float64")


def test_fused_head_checks_weight_and_bias_like_features():
    x, featurizer, head, y, envs = _problem(15, "cross_entropy", 3)
    z = featurizer(x).detach()
    with pytest.raises(TypeError, match="weight dtype torch.float32 must match features dtype torch.float64"):
        hk.linear_head_alignment(z, head.weight.float(), head.bias, y, envs)
    with pytest.raises(TypeError, match="bias dtype torch.float32 must match features dtype torch.float64"):
        hk.linear_head_alignment(z, head.weight, head.bias.float(), y, envs)
    with pytest.raises(TypeError, match="bias must be a floating tensor; got torch.int64"):
        hk.linear_head_alignment(z, head.weight, head.bias.long(), y, envs)
    with pytest.raises(ValueError, match="weight is on meta"):
        hk.linear_head_alignment(z, torch.empty_like(head.weight, device="meta"), None, y, envs)
    with pytest.raises(ValueError, match="features must have shape"):
        hk.linear_head_alignment(z.unsqueeze(0), head.weight, head.bias, y, envs)


def test_fake_tensor_mode_gets_shapes_not_a_crash():
    """Under a FakeTensorMode (outside torch.compile) the native kernels are not handed fake addresses:
    the custom ops' fakes answer (this was a segfault)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, featurizer, head, y, envs = _problem(16, "cross_entropy", 3, envs_as="sizes")
    z, weight = featurizer(x).detach(), head.weight.detach()
    with FakeTensorMode() as mode:
        fz, fw, fy = mode.from_tensor(z), mode.from_tensor(weight), mode.from_tensor(y)
        for backend in BACKENDS:
            pen = hk.hgp_penalty(torch.nn.functional.linear(fz, fw), fz, fy, envs, bias=False, validate=False,
                                 backend=backend, form="feature")
            assert pen.hessian.shape == () and pen.gradient.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: run by benchmarks/device_check.py on a GPU")
@pytest.mark.parametrize("backend,dtype", [("native", torch.float64), ("native", torch.float32),
                                           ("triton", torch.float32), ("auto", torch.float32)])
def test_fused_head_on_cuda(backend, dtype):
    """On a GPU the head term is added with torch ops (the CUDA kernels take none): values and gradients
    equal the float64 CPU reference."""
    if backend == "triton":
        pytest.importorskip("triton")
    x, featurizer, head, y, envs = _problem(17, "cross_entropy", 5)
    reference = _run(x, featurizer, head, y, envs, "hgp", fused=False, backend="reference")
    on_gpu = (x.cuda().to(dtype), copy.deepcopy(featurizer).cuda().to(dtype), copy.deepcopy(head).cuda().to(dtype),
              y.cuda(), envs.cuda())
    values, grads = _run(*on_gpu, "hgp", fused=True, backend=backend, form="feature")
    fused = ([v.detach().cpu().double() for v in values], [g.cpu().double() for g in grads])
    _assert_same(fused, reference, 1e-9 if dtype == torch.float64 else 2e-4, f"cuda {backend} {dtype}")


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
@pytest.mark.parametrize("c", [1, 3])
def test_fused_head_native_gradients_are_bitwise_equal_across_thread_counts(c):
    """The native one-row path forms the head's weight gradient while each row is in cache, summed per
    fixed 16-row groups: the same bits with one thread or two (README, determinism)."""
    gen = torch.Generator().manual_seed(18)
    n, d = 2000, 37
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(c, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    y = torch.rand(n, c, generator=gen, dtype=torch.float64).round()
    envs = torch.randint(0, 3, (n,), generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            leaves = [t.clone().requires_grad_() for t in (z, weight, bias)]
            out = hk.linear_head_alignment(*leaves, y, envs, method="hgp", loss="binary_cross_entropy",
                                           backend="native", form="feature")
            results.append(torch.autograd.grad(out.total, leaves))
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("features", "weight", "bias"), *results):
        assert torch.equal(a, b), f"{name} gradient differs between 1 and 2 threads"

