"""Trust: a right answer or a clear error, whatever the autograd mode, transform, layout or process.

One test (or parametrized group) per way a call used to go silently wrong, crash or contradict
the README; each failed on the code before its fix. CPU only.
"""
import io
import multiprocessing
import weakref

import pytest
import torch

import hgkernels as hk
from _helpers import assert_close, make_case

CLOSED_FORM = ["torch", "native"]
FORMS = ["feature", "sample"]
PENALTIES = {"hutchinson": hk.hutchinson_penalty, "hgp": hk.hgp_penalty}


def _case(seed=0, loss="cross_entropy", sizes=(5, 7, 4), c=3, d=4, **kw):
    return make_case(seed, loss=loss, bias=True, sizes=list(sizes), num_classes=c, num_features=d, **kw)


def _head_inputs(case, dtype=torch.float64):
    """A head W (leaf) producing the case's logits shape from its features: (W, logits fn)."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(case.logits.shape[1], case.features.shape[1], generator=gen, dtype=dtype, requires_grad=True)
    feats = case.features.to(dtype).requires_grad_(True)
    return w, feats


# 1. No memory handed to the user is ever reused -------------------------------------------------

def _consumer(queue, cloned, done, result):
    grad = queue.get()
    kept = grad.clone()
    cloned.set()
    done.wait(60)  # the producer has run another step meanwhile
    result.put(bool(torch.equal(grad, kept)))


def test_shared_gradient_is_not_overwritten_by_the_next_step():
    """A gradient sent to another process (shared memory) keeps its values after the producer drops it."""
    ctx = multiprocessing.get_context("spawn")
    import torch.multiprocessing  # registers the tensor reductions for the queue  # noqa: F401
    queue, cloned, done, result = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_consumer, args=(queue, cloned, done, result))
    proc.start()
    try:
        d = 700  # d_features of 8.4 MB (3000 rows): the size the removed output pool used to recycle
        case = _case(1, sizes=(1500, 1500), c=2, d=d, dtype=torch.float32)
        for step in range(2):
            feats = case.features.clone().requires_grad_(True)
            pen = hk.hutchinson_penalty(case.logits * (step + 1), feats, case.labels, case.envs, backend="native",
                                        form="feature")
            (pen.hessian + pen.gradient).backward()
            if step == 0:
                queue.put(feats.grad)
                del feats, pen  # the producer keeps no reference
                assert cloned.wait(120), "the consumer did not start"
        done.set()
        assert result.get(timeout=120), "the consumer's gradient changed under it"
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()


@pytest.mark.parametrize("backend", CLOSED_FORM)
def test_saved_gradient_holds_only_its_own_bytes(backend):
    """torch.save of a gradient writes its own bytes, not a larger recycled block with an older step's values."""
    for rows in (3000, 2000):  # a larger call first, then a smaller one
        case = _case(2, sizes=(rows // 2, rows - rows // 2), c=2, d=700, dtype=torch.float32)
        feats = case.features.clone().requires_grad_(True)
        pen = hk.hutchinson_penalty(case.logits, feats, case.labels, case.envs, backend=backend, form="feature")
        (pen.hessian + pen.gradient).backward()
        grad = feats.grad
        assert grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()
        buffer = io.BytesIO()
        torch.save(grad, buffer)
        assert buffer.tell() < grad.numel() * grad.element_size() + 4096
        del feats, pen, grad


# 2. Double backward: right, or differentiated by autograd -----------------------------------------

@pytest.mark.parametrize("backend", CLOSED_FORM)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", sorted(PENALTIES))
@pytest.mark.parametrize("detach", [True, False])
def test_double_backward_matches_reference(backend, form, method, detach):
    """d/dW of (dPsi/dW . v) equals the generic autograd path's (create_graph=True)."""
    case = _case(3)
    fn = PENALTIES[method]
    v = torch.randn(case.logits.shape[1], case.features.shape[1], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    results = []
    for impl in (backend, "reference"):
        w, feats = _head_inputs(case)
        pen = fn(feats @ w.T, feats, case.labels, case.envs, backend=impl, form=form, detach_reference=detach)
        g, g_feats = torch.autograd.grad(pen.hessian + pen.gradient, (w, feats), create_graph=True)
        hvp, hvp_feats = torch.autograd.grad((g * v).sum(), (w, feats))
        results.append((g.detach(), hvp, g_feats.detach(), hvp_feats))
    for at, what in enumerate(("first derivative", "second derivative", "first derivative (features)",
                               "second derivative (features)")):
        assert_close(results[0][at], results[1][at], 1e-9, what)
    assert results[1][1].abs().max() > 1e-6  # the check is not trivial


def test_double_backward_of_head_statistics_matches_reference():
    case = _case(4)
    v = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = []
    for impl in ("native", "reference"):
        w, feats = _head_inputs(case)
        stat = hk.head_hessian_diag(feats @ w.T, feats, case.labels, case.envs, backend=impl)
        (g,) = torch.autograd.grad(stat.weight.square().sum(), w, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), w)
        out.append(h)
    assert_close(out[0], out[1], 1e-9, "second derivative of a head statistic")
    assert out[1].abs().max() > 1e-6


# 3. Labels or env ids changed in place between forward and backward ------------------------------

@pytest.mark.parametrize("backend", CLOSED_FORM)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("what", ["labels", "envs"])
def test_inplace_change_before_backward_raises(backend, form, what):
    case = _case(5)
    logits, feats = case.leaves()
    labels, envs = case.labels.clone(), case.envs.clone()
    pen = hk.hgp_penalty(logits, feats, labels, envs, backend=backend, form=form)
    if what == "labels":
        labels[0] = (labels[0] + 1) % case.logits.shape[1]
    else:
        envs[[0, 1]] = envs[[1, 0]]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (pen.hessian + pen.gradient).backward()


# 4. Targets that require grad ----------------------------------------------------------------

@pytest.mark.parametrize("backend", CLOSED_FORM)
@pytest.mark.parametrize("loss", ["binary_cross_entropy", "mse"])
def test_targets_requiring_grad_raise_on_closed_forms(backend, loss):
    case = _case(6, loss=loss)
    targets = case.labels.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="labels requires grad"):
        hk.hutchinson_penalty(case.logits, case.features, targets, case.envs, loss=loss, backend=backend)
    # the reference path differentiates through them, and no_grad needs no target gradient
    pen = hk.hutchinson_penalty(case.logits, case.features, targets, case.envs, loss=loss, backend="reference")
    assert pen.gradient.requires_grad
    with torch.no_grad():
        hk.hutchinson_penalty(case.logits, case.features, targets, case.envs, loss=loss, backend=backend)


# 5. Large environment ids ---------------------------------------------------------------------

@pytest.mark.parametrize("big", [2_000_000, 10**9, 2**62])
def test_large_environment_id_is_a_short_error(big):
    case = _case(7)
    envs = case.envs.clone()
    envs[0] = big
    with pytest.raises(ValueError, match="envs") as err:
        hk.hutchinson_penalty(case.logits, case.features, case.labels, envs)
    assert len(str(err.value)) < 300


def test_many_missing_ids_are_listed_briefly():
    case = _case(8, sizes=(30, 30))
    envs = case.envs * 2  # ids 0 and 2: id 1 is empty
    with pytest.raises(ValueError, match=r"environment\(s\) \[1\] of 3 have no samples"):
        hk.hutchinson_penalty(case.logits, case.features, case.labels, envs)
    envs = case.envs * 25  # ids 0 and 25: 24 empty environments, listed briefly
    with pytest.raises(ValueError, match=r"\(24 in all\)"):
        hk.hutchinson_penalty(case.logits, case.features, case.labels, envs, num_envs=26)


@pytest.mark.parametrize("name", PENALTIES)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e10), (torch.float64, 1e80)])
def test_one_term_alone_is_right_where_the_other_term_overflows(name, dtype, scale):
    """Backpropagating one term gives the other a zero upstream. The C++ plans apply the upstream factors to
    dots rather than to matrices, so they leave a zero-factor term's blocks out instead of multiplying its
    products, which overflowed here with the term (its value is inf), by zero: NaN in every gradient.
    The gradient term alone, 0 * hessian + gradient, both at zero, and the fused head with alpha=0 equal
    the reference on the same inputs."""
    gen = torch.Generator().manual_seed(3)
    n, c, d = 24, 3, 8
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64).to(dtype)
    features = (torch.randn(n, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels, envs = torch.randint(0, c, (n,), generator=gen), torch.arange(n) % 3
    rtol = 1e-4 if dtype == torch.float32 else 1e-9

    def grads(backend, weights):
        lg, ft = logits.clone().requires_grad_(True), features.clone().requires_grad_(True)
        pen = PENALTIES[name](lg, ft, labels, envs, backend=backend)
        total = sum(w * term for w, term in zip(weights, (pen.hessian, pen.gradient)) if w is not None)
        return pen.hessian, torch.autograd.grad(total, (lg, ft))

    for weights in ((None, 1.0), (0.0, 1.0), (0.0, 0.0)):
        hessian, ours = grads("native", weights)
        assert torch.isinf(hessian)  # the case this test is about
        _, want = grads("reference", weights)
        for what, a, b in zip(("d logits", "d features"), ours, want):
            assert_close(a, b, rtol, f"{name}, upstream weights {weights}: {what}")
    head = torch.nn.Linear(d, c).to(dtype)
    fused = hk.HessianAlignmentLoss(name, alpha=0.0, backend="native")
    unfused = hk.HessianAlignmentLoss(name, alpha=0.0, backend="reference")
    for loss_fn, store in ((fused, []), (unfused, [])):
        head.zero_grad()
        ft = features.clone().requires_grad_(True)
        out = loss_fn(head, ft, labels, envs) if loss_fn is fused else loss_fn(head(ft), ft, labels, envs)
        (out.erm + out.gradient).backward()
        store += [ft.grad, head.weight.grad.clone(), head.bias.grad.clone()]
        loss_fn.grads = store
    for what, a, b in zip(("d features", "d weight", "d bias"), fused.grads, unfused.grads):
        assert_close(a, b, rtol, f"{name}, fused head with alpha=0: {what}")


# 6. validate=False: one documented behaviour on every backend ---------------------------------------

ALL_PATHS = [("torch", "feature"), ("native", "feature"), ("torch", "sample"), ("reference", "feature"),
             ("triton", "feature")]


@pytest.mark.parametrize("backend,form", ALL_PATHS)
@pytest.mark.parametrize("bad_label", [-1, 3, 1000])
def test_out_of_range_label_without_validation_gives_nan(backend, form, bad_label):
    case = _case(9, dtype=torch.float32)
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
    case = _case(10, dtype=torch.float32)
    for envs, num_envs, match in ((case.envs, 4, "have no samples"), (case.envs + 1, None, r"\[0\] of 4"),
                                  (case.envs, 2, "num_envs=2"), (case.envs - 1, None, "negative")):
        with pytest.raises(ValueError, match=match):
            hk.hgp_penalty(case.logits, case.features, case.labels, envs, num_envs=num_envs, backend=backend,
                           form=form, validate=False)


# 7. torch.compile(fullgraph=True) on the public API ------------------------------------------------

@pytest.mark.parametrize("backend", CLOSED_FORM)
@pytest.mark.parametrize("method", sorted(PENALTIES))
def test_compiled_training_step_fullgraph(backend, method):
    """The documented configuration: sizes as a list or ids with num_envs, validate=False."""
    torch._dynamo.reset()
    case = _case(11, sizes=(6, 6, 6), shuffle=True)
    ids, sizes = case.envs, [6, 6, 6]
    order = torch.argsort(ids, stable=True)
    for envs, perm in ((sizes, order), (ids, torch.arange(18))):
        feats = case.features[perm]
        labels = case.labels[perm]

        def step(w, b):
            logits = feats @ w.T + b
            loss_fn = hk.HessianAlignmentLoss(method, alpha=0.5, beta=2.0, backend=backend, validate=False,
                                              num_envs=3)
            out = loss_fn(logits, feats, labels, envs)
            return out.total

        w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        eager = step(w, b)
        eager_grads = torch.autograd.grad(eager, (w, b))
        compiled = torch.compile(step, fullgraph=True)(w, b)
        compiled_grads = torch.autograd.grad(compiled, (w, b))
        assert_close(compiled, eager, 1e-12, "compiled value")
        for got, want in zip(compiled_grads, eager_grads):
            assert_close(got, want, 1e-10, "compiled gradient")


# 8. torch.func transforms ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", CLOSED_FORM)
@pytest.mark.parametrize("method", sorted(PENALTIES))
def test_torch_func_grad_and_jacrev_match_eager(backend, method):
    case = _case(12)
    fn = PENALTIES[method]
    feats = case.features

    def objective(w):
        pen = fn(feats @ w.T, feats, case.labels, case.envs, backend=backend)
        return pen.hessian + 0.5 * pen.gradient

    w, _ = _head_inputs(case)
    (eager,) = torch.autograd.grad(objective(w), w)
    assert_close(torch.func.grad(objective)(w.detach()), eager, 1e-10, "torch.func.grad")
    assert_close(torch.func.jacrev(objective)(w.detach()), eager, 1e-10, "torch.func.jacrev")


def test_vmap_is_refused_with_our_error():
    case = _case(13)
    batch = torch.stack([case.logits, 2 * case.logits])
    with pytest.raises(ValueError, match="vmap"):
        torch.func.vmap(lambda lg: hk.hgp_penalty(lg, case.features, case.labels, case.envs).hessian)(batch)


# 9. Meta tensors --------------------------------------------------------------------------------

def test_meta_tensors_are_a_clear_error():
    with pytest.raises(ValueError, match="meta device"):
        hk.hgp_penalty(torch.randn(6, 3, device="meta"), torch.randn(6, 4, device="meta"),
                       torch.zeros(6, dtype=torch.int64, device="meta"), [3, 3])


# 10. Determinism: what is bitwise stable (README "Determinism") ------------------------------------

@pytest.mark.parametrize("method", sorted(PENALTIES))
def test_readme_determinism_native_feature_form_bitwise_across_threads(method):
    case = _case(14, sizes=(3000, 2500), c=4, d=40, dtype=torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            logits, feats = case.leaves()
            pen = PENALTIES[method](logits, feats, case.labels, case.envs, backend="native", form="feature")
            grads = torch.autograd.grad(pen.hessian + pen.gradient, (logits, feats))
            runs.append((pen.hessian, pen.gradient, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_concurrent_calls_from_python_threads_equal_serial_calls():
    """The native calls release the GIL (csrc/bind.cpp), so Python threads run them at once: each
    thread's values and gradients, logits path and fused head, equal the same calls made one at a time."""
    import threading

    methods = {"hutchinson": hk.hutchinson_penalty, "hgp": hk.hgp_penalty}
    jobs = [(seed, method, fused) for seed in range(3) for method in sorted(methods) for fused in (False, True)]

    def run(seed, method, fused):
        case = _case(40 + seed, sizes=(300 + 50 * seed, 200), c=5, d=64, dtype=torch.float32)
        logits, feats = case.leaves()
        if fused:
            weight = torch.randn(5, 64, generator=torch.Generator().manual_seed(seed), requires_grad=True)
            out = hk.linear_head_alignment(feats, weight, None, case.labels, case.envs, method=method,
                                           backend="native", form="feature")
            return (out.total.detach(), *torch.autograd.grad(out.total, (feats, weight)))
        pen = methods[method](logits, feats, case.labels, case.envs, backend="native", form="feature")
        return (pen.hessian.detach(), pen.gradient.detach(),
                *torch.autograd.grad(pen.hessian + pen.gradient, (logits, feats)))

    serial = [run(*job) for job in jobs]
    results, errors = [None] * len(jobs), []

    def worker(k):
        try:
            for _ in range(5):  # several rounds, so calls overlap
                results[k] = run(*jobs[k])
        except BaseException as err:  # reported below, not lost in the thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    for job, want, got in zip(jobs, serial, results):
        assert all(torch.equal(a, b) for a, b in zip(want, got)), job


# 11. Memory after backward ------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_backward_frees_what_it_needed(form):
    """The N x N Gram matrices (sample form) and the statistics are autograd saved tensors: freed by
    backward while the output lives on (e.g. kept for logging)."""
    case = _case(15, sizes=(40, 50))
    logits, feats = case.leaves()
    pen = hk.hgp_penalty(logits, feats, case.labels, case.envs, backend="torch", form=form)
    node = pen.hessian.grad_fn
    saved = node.saved_tensors
    refs = [weakref.ref(t) for t in saved if t.numel() >= 90 * 90 or t.dim() == 3]
    assert refs, "expected per-environment statistics or Gram matrices among the saved tensors"
    del saved
    (pen.hessian + pen.gradient).backward()
    assert all(r() is None for r in refs)
    with pytest.raises(RuntimeError, match="freed"):
        node.saved_tensors
    # retain_graph keeps them for a second backward, which gives the same gradients
    logits2, feats2 = case.leaves()
    pen2 = hk.hgp_penalty(logits2, feats2, case.labels, case.envs, backend="torch", form=form)
    first = torch.autograd.grad(pen2.hessian + pen2.gradient, (logits2, feats2), retain_graph=True)
    second = torch.autograd.grad(pen2.hessian + pen2.gradient, (logits2, feats2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# 12. Smaller items ---------------------------------------------------------------------------------

def test_readme_one_environment_exact_zeros_and_the_stochastic_exception():
    case = _case(16, sizes=(9,))
    for fn, kw in ((hk.hutchinson_penalty, {}), (hk.hgp_penalty, {})):
        pen = fn(case.logits, case.features, case.labels, case.envs, **kw)
        assert pen.hessian == 0 and pen.gradient == 0
    est = hk.hutchinson_penalty(case.logits, case.features, case.labels, case.envs, estimator="hutchinson",
                                num_probes=4, generator=torch.Generator().manual_seed(0))
    assert est.gradient == 0
    assert est.hessian > 0  # independent probes for the pooled reference: a nonzero estimate of zero


def test_module_options_are_checked_at_construction():
    with pytest.raises(TypeError, match="estimator"):
        hk.HessianAlignmentLoss("hgp", estimator="hutchinson")
    with pytest.raises(ValueError, match="form"):
        hk.HessianAlignmentLoss("hutchinson", form="gram")
    with pytest.raises(TypeError, match="unexpected option 'alpha_weight'"):
        hk.HessianAlignmentLoss("hutchinson", alpha_weight=1.0)


@pytest.mark.parametrize("method", sorted(PENALTIES))
def test_huge_float32_mse_logits_overflow_alike_in_both_forms(method):
    case = _case(17, loss="mse", sizes=(6, 5), c=1, dtype=torch.float32)
    logits = case.logits * 1e30
    values = [PENALTIES[method](logits, case.features, case.labels, case.envs, loss="mse", form=form,
                                backend="torch", validate=False) for form in FORMS]
    for term in ("hessian", "gradient"):
        got = [getattr(v, term) for v in values]
        assert not any(torch.isnan(g) for g in got), f"{term}: {got}"
        assert torch.equal(torch.isinf(got[0]), torch.isinf(got[1])), f"{term}: {got}"


@pytest.mark.parametrize("backend,form", ALL_PATHS[:4])
def test_masked_classes_with_minus_inf_logits(backend, form):
    case = _case(18, c=4)
    logits = case.logits.clone()
    logits[::3, 1] = float("-inf")
    labels = torch.where(case.labels == 1, 0, case.labels)
    want = hk.hgp_penalty(logits, case.features, labels, case.envs, backend="reference")
    got = hk.hgp_penalty(logits, case.features, labels, case.envs, backend=backend, form=form)
    assert_close(got.hessian, want.hessian, 1e-10, "hessian")
    assert_close(got.gradient, want.gradient, 1e-10, "gradient")
    for bad, match in ((float("nan"), "NaN"), (float("inf"), r"\+Inf")):
        worse = logits.clone()
        worse[0, 2] = bad
        with pytest.raises(ValueError, match=match):
            hk.hgp_penalty(worse, case.features, labels, case.envs, backend=backend, form=form)
    masked_row = logits.clone()
    masked_row[2] = float("-inf")
    with pytest.raises(ValueError, match="every entry is -inf"):
        hk.hgp_penalty(masked_row, case.features, labels, case.envs, backend=backend, form=form)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_reference_works_under_no_grad_and_inference_mode(mode):
    case = _case(19)
    want = hk.hgp_penalty(case.logits, case.features, case.labels, case.envs, backend="torch")
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        logits, feats = case.logits.clone(), case.features.clone()
        for backend in ("reference", "torch", "native"):
            got = hk.hgp_penalty(logits, feats, case.labels, case.envs, backend=backend)
            assert not got.hessian.requires_grad
            assert_close(got.hessian, want.hessian, 1e-10, f"{backend} hessian under {mode}")
            assert_close(got.gradient, want.gradient, 1e-10, f"{backend} gradient under {mode}")



def test_size_list_calls_after_inference_mode_still_train():
    """Size-list environments are kept across calls (_inputs._SIZED_SEGMENTS); one first seen under
    inference_mode must not hand a later training call an inference tensor autograd cannot save."""
    case = make_case(31, loss="cross_entropy", bias=True, sizes=[5, 8, 6], num_classes=3, num_features=4,
                     as_sizes=True)
    sizes = [5, 8, 6]
    with torch.inference_mode():
        hk.hutchinson_penalty(case.logits.clone(), case.features.clone(), case.labels, sizes)
    for backend in ("torch", "native"):
        logits, feats = case.leaves()
        pen = hk.hutchinson_penalty(logits, feats, case.labels, sizes, backend=backend)
        d_logits, d_feats = torch.autograd.grad(pen.hessian + pen.gradient, (logits, feats))
        ref_logits, ref_feats = case.leaves()
        ref = hk.hutchinson_penalty(ref_logits, ref_feats, case.labels, sizes, backend="reference")
        want = torch.autograd.grad(ref.hessian + ref.gradient, (ref_logits, ref_feats))
        assert_close(d_feats, want[1], 1e-9, f"{backend} features gradient")
        assert_close(d_logits, want[0], 1e-9, f"{backend} logits gradient")


def test_compile_with_ids_needs_num_envs():
    """README: under torch.compile, ids without num_envs raise (E is in the data), with fullgraph or not."""
    torch._dynamo.reset()
    case = _case(20)
    w, feats = _head_inputs(case)

    def step(weight):
        pen = hk.hgp_penalty(feats @ weight.T, feats, case.labels, case.envs, validate=False)
        return pen.hessian + pen.gradient

    # our ValueError naming num_envs, or dynamo's report of it, depending on where tracing stops
    for fullgraph in (True, False):
        torch._dynamo.reset()
        with pytest.raises((ValueError, torch._dynamo.exc.Unsupported)):
            torch.compile(step, fullgraph=fullgraph)(w)
