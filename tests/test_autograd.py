"""The penalties under autograd: fresh memory for everything handed out, exact double backward, in-place
changes before backward raising, one term backpropagated alone, what backward needs freed by it, calls
from several Python threads, and the reference path under no_grad and inference_mode. CPU only."""
import io
import multiprocessing
import weakref

import pytest
import torch

import hgkernels as hk
from _helpers import CLOSED_FORM, FORMS, PENALTIES, assert_close, head_inputs, make_case, small_case


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
        case = small_case(1, sizes=(1500, 1500), c=2, d=d, dtype=torch.float32)
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
        case = small_case(2, sizes=(rows // 2, rows - rows // 2), c=2, d=700, dtype=torch.float32)
        feats = case.features.clone().requires_grad_(True)
        pen = hk.hutchinson_penalty(case.logits, feats, case.labels, case.envs, backend=backend, form="feature")
        (pen.hessian + pen.gradient).backward()
        grad = feats.grad
        assert grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()
        buffer = io.BytesIO()
        torch.save(grad, buffer)
        assert buffer.tell() < grad.numel() * grad.element_size() + 4096
        del feats, pen, grad


@pytest.mark.parametrize("backend", CLOSED_FORM)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", sorted(PENALTIES))
@pytest.mark.parametrize("detach", [True, False])
def test_double_backward_matches_reference(backend, form, method, detach):
    """d/dW of (dPsi/dW . v) equals the generic autograd path's (create_graph=True)."""
    case = small_case(3)
    fn = PENALTIES[method]
    v = torch.randn(case.logits.shape[1], case.features.shape[1], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    results = []
    for impl in (backend, "reference"):
        w, feats = head_inputs(case)
        pen = fn(feats @ w.T, feats, case.labels, case.envs, backend=impl, form=form, detach_reference=detach)
        g, g_feats = torch.autograd.grad(pen.hessian + pen.gradient, (w, feats), create_graph=True)
        hvp, hvp_feats = torch.autograd.grad((g * v).sum(), (w, feats))
        results.append((g.detach(), hvp, g_feats.detach(), hvp_feats))
    for at, what in enumerate(("first derivative", "second derivative", "first derivative (features)",
                               "second derivative (features)")):
        assert_close(results[0][at], results[1][at], 1e-9, what)
    assert results[1][1].abs().max() > 1e-6  # the check is not trivial


def test_double_backward_of_head_statistics_matches_reference():
    case = small_case(4)
    v = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = []
    for impl in ("native", "reference"):
        w, feats = head_inputs(case)
        stat = hk.head_hessian_diag(feats @ w.T, feats, case.labels, case.envs, backend=impl)
        (g,) = torch.autograd.grad(stat.weight.square().sum(), w, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), w)
        out.append(h)
    assert_close(out[0], out[1], 1e-9, "second derivative of a head statistic")
    assert out[1].abs().max() > 1e-6


@pytest.mark.parametrize("backend", CLOSED_FORM)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("what", ["labels", "envs"])
def test_inplace_change_before_backward_raises(backend, form, what):
    case = small_case(5)
    logits, feats = case.leaves()
    labels, envs = case.labels.clone(), case.envs.clone()
    pen = hk.hgp_penalty(logits, feats, labels, envs, backend=backend, form=form)
    if what == "labels":
        labels[0] = (labels[0] + 1) % case.logits.shape[1]
    else:
        envs[[0, 1]] = envs[[1, 0]]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (pen.hessian + pen.gradient).backward()


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


@pytest.mark.parametrize("form", FORMS)
def test_backward_frees_what_it_needed(form):
    """The N x N Gram matrices (sample form) and the statistics are autograd saved tensors: freed by
    backward while the output lives on (e.g. kept for logging)."""
    case = small_case(15, sizes=(40, 50))
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


def test_concurrent_calls_from_python_threads_equal_serial_calls():
    """The native calls release the GIL (csrc/bind.cpp), so Python threads run them at once: each
    thread's values and gradients, logits path and fused head, equal the same calls made one at a time."""
    import threading

    methods = {"hutchinson": hk.hutchinson_penalty, "hgp": hk.hgp_penalty}
    jobs = [(seed, method, fused) for seed in range(3) for method in sorted(methods) for fused in (False, True)]

    def run(seed, method, fused):
        case = small_case(40 + seed, sizes=(300 + 50 * seed, 200), c=5, d=64, dtype=torch.float32)
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


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_reference_works_under_no_grad_and_inference_mode(mode):
    case = small_case(19)
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
