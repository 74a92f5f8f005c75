"""torch.compile(fullgraph=True), torch.func transforms, vmap and meta tensors on the public API:
traced right, or refused with our error. CPU only."""
import pytest
import torch

import hgkernels as hk
from _helpers import CLOSED_FORM, PENALTIES, assert_close, head_inputs, small_case


@pytest.mark.parametrize("backend", CLOSED_FORM)
@pytest.mark.parametrize("method", sorted(PENALTIES))
def test_compiled_training_step_fullgraph(backend, method):
    """The documented configuration: sizes as a list or ids with num_envs, validate=False."""
    torch._dynamo.reset()
    case = small_case(11, sizes=(6, 6, 6), shuffle=True)
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


@pytest.mark.parametrize("backend", CLOSED_FORM)
@pytest.mark.parametrize("method", sorted(PENALTIES))
def test_torch_func_grad_and_jacrev_match_eager(backend, method):
    case = small_case(12)
    fn = PENALTIES[method]
    feats = case.features

    def objective(w):
        pen = fn(feats @ w.T, feats, case.labels, case.envs, backend=backend)
        return pen.hessian + 0.5 * pen.gradient

    w, _ = head_inputs(case)
    (eager,) = torch.autograd.grad(objective(w), w)
    assert_close(torch.func.grad(objective)(w.detach()), eager, 1e-10, "torch.func.grad")
    assert_close(torch.func.jacrev(objective)(w.detach()), eager, 1e-10, "torch.func.jacrev")


def test_vmap_is_refused_with_our_error():
    case = small_case(13)
    batch = torch.stack([case.logits, 2 * case.logits])
    with pytest.raises(ValueError, match="vmap"):
        torch.func.vmap(lambda lg: hk.hgp_penalty(lg, case.features, case.labels, case.envs).hessian)(batch)


def test_meta_tensors_are_a_clear_error():
    with pytest.raises(ValueError, match="meta device"):
        hk.hgp_penalty(torch.randn(6, 3, device="meta"), torch.randn(6, 4, device="meta"),
                       torch.zeros(6, dtype=torch.int64, device="meta"), [3, 3])


def test_compile_with_ids_needs_num_envs():
    """README: under torch.compile, ids without num_envs raise (E is in the data), with fullgraph or not."""
    torch._dynamo.reset()
    case = small_case(20)
    w, feats = head_inputs(case)

    def step(weight):
        pen = hk.hgp_penalty(feats @ weight.T, feats, case.labels, case.envs, validate=False)
        return pen.hessian + pen.gradient

    # our ValueError naming num_envs, or dynamo's report of it, depending on where tracing stops
    for fullgraph in (True, False):
        torch._dynamo.reset()
        with pytest.raises((ValueError, torch._dynamo.exc.Unsupported)):
            torch.compile(step, fullgraph=fullgraph)(w)
