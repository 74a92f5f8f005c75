"""The native operators (csrc/ops.cpp, `torch.ops.hgkernels`), the one way into the kernels: their schemas,
shape functions and autograd rules (opcheck, torch.compile fullgraph), the layouts they refuse, the module's
refusal of another torch, and the `penalty` operator's autograd node, whose backward runs without Python.
The node must change no value (bitwise the Python autograd Function over the same plans) and keep the
Function's autograd behaviour."""
import os
import weakref

import pytest
import torch

import hgkernels as hk
from hgkernels._inputs import prepare
from _helpers import assert_close, make_case, penalty_and_grads
from _helpers import PENALTIES, small_case as _case

OPS = torch.ops.hgkernels

def _node_required():
    """The module is built wherever torch is installed before hgkernels (CI: required)."""
    from hgkernels.backends import native
    if native.NATIVE_ERROR is not None:
        if os.environ.get("CI", "").lower() == "true":
            raise AssertionError(f"CI builds hgkernels._native, but {native.NATIVE_ERROR}")
        pytest.skip(native.NATIVE_ERROR)


def _function_path(monkeypatch):
    """Make the same calls run the Python PenaltyFunction (over the same C++ plans) instead of the node."""
    from hgkernels.backends import native
    monkeypatch.setattr(native.NativeBackend, "autograd_plan", lambda self, problem, spec: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", sorted(PENALTIES))
def test_autograd_node_serves_default_cpu_calls_and_equals_the_function(dtype, method, monkeypatch):
    """Default options on CPU run the node; its values and gradients equal the Python Function's bitwise,
    for the sum of both terms, one term alone (the other's upstream undefined) and features-only grads."""
    _node_required()
    case = _case(30, sizes=(6, 9, 5), c=4, d=7, dtype=dtype)
    fn = PENALTIES[method]

    def run(which):
        logits, feats = case.leaves()
        pen = fn(logits, feats, case.labels, case.envs)
        out = {"both": pen.hessian + pen.gradient, "hessian": pen.hessian, "gradient": pen.gradient}[which]
        return pen.hessian.grad_fn, (pen.hessian, pen.gradient, *torch.autograd.grad(out, (logits, feats)))

    results = {}
    for which in ("both", "hessian", "gradient"):
        node, results[which] = run(which)
        assert node.name() == "HessianAlignmentPenaltyBackward"
    logits, feats = case.leaves()
    pen = fn(logits.detach(), feats, case.labels, case.envs)
    features_only = torch.autograd.grad(pen.hessian + pen.gradient, feats)[0]
    _function_path(monkeypatch)
    for which, got in results.items():
        node, want = run(which)
        assert node.name() != "HessianAlignmentPenaltyBackward"
        assert all(torch.equal(a, b) for a, b in zip(got, want)), which
    assert torch.equal(features_only, results["both"][3])


def test_autograd_node_saved_tensors_retain_graph_and_inplace_changes():
    """As the Python Function: a second backward needs retain_graph (and then equals the first), and an
    in-place change to logits or features before backward raises."""
    _node_required()
    case = _case(31)
    logits, feats = case.leaves()
    pen = hk.hgp_penalty(logits * 1, feats * 1, case.labels, case.envs)
    first = torch.autograd.grad(pen.hessian + pen.gradient, (logits, feats), retain_graph=True)
    second = torch.autograd.grad(pen.hessian + pen.gradient, (logits, feats))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(RuntimeError, match="second time|freed"):
        torch.autograd.grad(pen.hessian + pen.gradient, (logits, feats))
    for which in (0, 1):
        inputs = [t.detach().clone().requires_grad_(True) for t in case.leaves()]
        used = [t * 1 for t in inputs]
        pen = hk.hutchinson_penalty(*used, case.labels, case.envs)
        with torch.no_grad():
            used[which].add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (pen.hessian + pen.gradient).backward()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_autograd_node_under_no_grad_and_inference_mode(mode):
    _node_required()
    case = _case(32)
    logits, feats = case.leaves()
    want = hk.hgp_penalty(logits, feats, case.labels, case.envs)
    with (torch.no_grad() if mode == "no_grad" else torch.inference_mode()):
        got = hk.hgp_penalty(logits, feats, case.labels, case.envs)
    assert not got.hessian.requires_grad and got.hessian.grad_fn is None
    assert torch.equal(got.hessian, want.hessian.detach()) and torch.equal(got.gradient, want.gradient.detach())


def test_autograd_node_refuses_forward_mode_ad():
    """A forward-mode tangent would be silently dropped: an error, as a Python Function without jvp gives."""
    _node_required()
    import torch.autograd.forward_ad as fwAD
    case = _case(33)
    with fwAD.dual_level():
        dual = fwAD.make_dual(case.logits.clone(), torch.randn_like(case.logits))
        with pytest.raises(NotImplementedError, match="forward-mode"):
            hk.hutchinson_penalty(dual, case.features, case.labels, case.envs)


def test_native_module_refuses_another_torch_and_the_torch_backend_serves():
    """The module is on the torch C++ ABI: against another torch version than its build's it refuses to
    load (ImportError at import), and the penalties run on the torch backend."""
    _node_required()
    import subprocess
    import sys
    script = (
        "import torch\n"
        "torch.__version__ = '0.0.0-not-the-build'\n"
        "import hgkernels as hk\n"
        "from hgkernels.backends import native\n"
        "assert 'built against torch' in native.NATIVE_ERROR, native.NATIVE_ERROR\n"
        "lg = torch.randn(9, 3, requires_grad=True); ft = torch.randn(9, 4)\n"
        "pen = hk.hgp_penalty(lg, ft, torch.randint(0, 3, (9,)), [4, 5])\n"
        "assert pen.hessian.grad_fn.name() != 'HessianAlignmentPenaltyBackward'\n"
        "pen.hessian.backward(); assert lg.grad is not None\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_autograd_node_applies_saved_tensor_hooks():
    """design.md §4.3: saved-tensor hooks apply to what the backward reads (e.g. save_on_cpu, checkpointing
    tools): the node's saved tensors go through them, and the gradients are unchanged."""
    _node_required()
    case = _case(34)
    logits, feats = case.leaves()
    want = torch.autograd.grad(sum(hk.hgp_penalty(logits, feats, case.labels, case.envs)), (logits, feats))
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    def unpack(t):
        unpacked.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        pen = hk.hgp_penalty(logits, feats, case.labels, case.envs)
    assert pen.hessian.grad_fn.name() == "HessianAlignmentPenaltyBackward"
    assert logits.shape in packed and feats.shape in packed
    got = torch.autograd.grad(pen.hessian + pen.gradient, (logits, feats))
    assert len(unpacked) == len(packed)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_autograd_node_reads_negated_and_zero_upstream_gradients():
    """The upstream gradient is read through item(): a lazily negated 0-dim gradient (conj().imag) and
    one of a single term give the Function's gradients (found by an adversarial pass: a raw read of the
    negated tensor's memory returned the opposite sign)."""
    _node_required()
    case = _case(35)
    negated = torch.tensor(1j, dtype=torch.complex128).conj().imag  # -1.0 with the negative bit set
    assert negated.is_neg()

    def grads():
        logits, feats = case.leaves()
        pen = hk.hgp_penalty(logits, feats, case.labels, case.envs)
        return pen.hessian.grad_fn.name(), torch.autograd.grad(pen.gradient, (logits, feats), grad_outputs=negated)

    name, got = grads()
    assert name == "HessianAlignmentPenaltyBackward"
    import hgkernels.backends.native as native
    original = native.NativeBackend.autograd_plan
    native.NativeBackend.autograd_plan = lambda self, problem, spec: None
    try:
        name, want = grads()
    finally:
        native.NativeBackend.autograd_plan = original
    assert name != "HessianAlignmentPenaltyBackward"
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("hooked", ["features transposed", "ids strided", "state strided", "labels int32"])
def test_autograd_node_saved_tensor_hooks_that_change_memory(hooked):
    """Unpack hooks may return other memory: other strides give the same gradients as without hooks,
    another dtype a clear error, never a misread (found by an adversarial pass: a column-major features
    copy gave wrong gradients and strided ids NaN)."""
    _node_required()
    case = _case(36)
    logits, feats = case.leaves()
    want = torch.autograd.grad(sum(hk.hutchinson_penalty(logits, feats, case.labels, case.envs)), (logits, feats))

    def unpack(t):
        if hooked == "features transposed" and t.shape == feats.shape and t.dtype.is_floating_point:
            return t.t().contiguous().t()
        if hooked == "ids strided" and t.dim() == 1 and not t.dtype.is_floating_point:
            return torch.stack([t, t], 1)[:, 0]
        if hooked == "state strided" and t.dim() == 1 and t.dtype.is_floating_point:
            return torch.stack([t, t], 1)[:, 0]
        if hooked == "labels int32" and t.shape == case.labels.shape and not t.dtype.is_floating_point:
            return t.to(torch.int32)
        return t

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
        pen = hk.hutchinson_penalty(logits, feats, case.labels, case.envs)
    assert pen.hessian.grad_fn.name() == "HessianAlignmentPenaltyBackward"
    if hooked == "labels int32":
        with pytest.raises(RuntimeError, match="saved-tensor hook changed"):
            torch.autograd.grad(pen.hessian + pen.gradient, (logits, feats))
        return
    got = torch.autograd.grad(pen.hessian + pen.gradient, (logits, feats))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_autograd_node_frees_the_inputs_after_backward():
    """After a backward without retain_graph the node holds no input, even while the outputs live on
    (found by an adversarial pass: its create_graph callback had held the call's problem)."""
    _node_required()
    case = _case(37)
    logits, feats = case.leaves()
    used = [logits * 1, feats * 1]
    refs = [weakref.ref(t) for t in used]
    pen = hk.hgp_penalty(*used, case.labels, case.envs)
    assert pen.hessian.grad_fn.name() == "HessianAlignmentPenaltyBackward"
    del used
    (pen.hessian + pen.gradient).backward()
    assert all(r() is None for r in refs)


def test_autograd_node_and_compiled_autograd():
    """A forward made while compiled autograd is on takes the Python Function, which it traces (same
    gradients); a node made before it was turned on raises a clear NotImplementedError in its backward."""
    _node_required()
    import torch._dynamo.compiled_autograd as compiled_autograd
    case = _case(38)
    logits, feats = case.leaves()
    want = torch.autograd.grad(sum(hk.hgp_penalty(logits, feats, case.labels, case.envs)), (logits, feats))
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        leaves = case.leaves()
        pen = hk.hgp_penalty(*leaves, case.labels, case.envs)
        assert pen.hessian.grad_fn.name() != "HessianAlignmentPenaltyBackward"
        (pen.hessian + pen.gradient).backward()
    assert_close(leaves[0].grad, want[0], 1e-12, "logits")
    assert_close(leaves[1].grad, want[1], 1e-12, "features")
    pen = hk.hgp_penalty(logits, feats, case.labels, case.envs)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        with pytest.raises(NotImplementedError, match="compiled autograd"):
            (pen.hessian + pen.gradient).backward()
    torch._dynamo.reset()


def test_operators_refuse_layouts_they_cannot_read():
    """The operators read raw memory: tensors outside their layout (which native.py never passes) raise
    instead of being misread, at every entry."""
    _node_required()
    case = _case(39)
    problem = prepare(case.logits, case.features, case.labels, case.envs, loss="cross_entropy", bias=True)
    seg = problem.segments
    good = [case.logits, case.features, problem.targets, seg.order, seg.offsets, seg.env_ids]
    bad = {1: case.features.t().contiguous().t(), 2: problem.targets.to(torch.int32), 3: seg.order.to(torch.int32),
           0: case.logits.to(torch.float16), 4: seg.offsets[:1], 5: seg.env_ids[:-1]}
    plan = ("cross_entropy", True, "hgp", 1 / 3, True, True)
    entries = {"penalty": lambda *a: OPS.penalty(*a, *plan),
               "plan_forward": lambda *a: OPS.plan_forward(*a, *plan),
               "head_stats": lambda *a: OPS.head_stats(*a, "cross_entropy", True, False, True, True, None),
               "per_sample_backward": lambda *a: OPS.per_sample_backward(*a, "cross_entropy", True, False, None,
                                                                         None, None, None, None, None)}
    for name, entry in entries.items():
        entry(*good)  # the good layout runs
        for k, tensor in bad.items():
            args = list(good)
            args[k] = tensor
            with pytest.raises(RuntimeError, match="layout the kernels read"):
                entry(*args)
    with pytest.raises(RuntimeError, match="loss must be"):
        OPS.head_stats(*good, "hinge", True, False, True, True, None)
    with pytest.raises(RuntimeError, match="plan method must be"):
        OPS.plan_forward(*good, "cross_entropy", True, "irm", 1.0, False, False)
    state = OPS.plan_forward(*good, *plan)[0]
    with pytest.raises(RuntimeError, match="not the one its plan_forward wrote"):
        OPS.plan_backward(*good, *plan, state[1:], 1.0, 1.0, None, None)


def _op_arguments():
    from hgkernels.backends.native import _operands
    case = make_case(3, loss="cross_entropy", bias=True, sizes=[4, 1, 6], num_classes=3, num_features=5)
    problem = prepare(case.logits, case.features, case.labels, case.envs, loss="cross_entropy", bias=True)
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(3, rows, 6, generator=gen, dtype=torch.float64) for rows in (3, 6, 6, 3)]
    return _operands(problem), mats


def test_primitive_operators_pass_opcheck():
    """Schema, shape function, autograd rule and dispatch of the two primitives' operators."""
    _node_required()
    operands, (lam, dirs, ups, gam) = _op_arguments()
    for flags in ((True, True, dirs), (True, False, None), (False, False, dirs)):
        for square_residual in (False, True):
            torch.library.opcheck(OPS.head_stats.default, (*operands, square_residual, *flags))
    for upstream in ((lam, dirs, ups, gam), (None, None, None, gam), (lam, None, None, None)):
        torch.library.opcheck(OPS.per_sample_backward.default, (*operands, False, *upstream, None, None))


def test_head_stats_operator_gradient_matches_the_torch_backend():
    """head_stats' C++ autograd rule (the per-sample backward, and H_e U for the directions) against
    autograd through the torch backend's statistics, float64."""
    _node_required()
    from hgkernels.backends import load
    operands, (_, dirs, _, _) = _op_arguments()
    logits, features = (t.detach().requires_grad_() for t in operands[:2])
    dirs = dirs.requires_grad_()
    out = OPS.head_stats(logits, features, *operands[2:], False, True, True, dirs)
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad(out, (logits, features, dirs), upstream)
    case = make_case(3, loss="cross_entropy", bias=True, sizes=[4, 1, 6], num_classes=3, num_features=5)
    lg, ft, dr = (t.detach().requires_grad_() for t in (case.logits, case.features, dirs))
    problem = prepare(lg, ft, case.labels, case.envs, loss="cross_entropy", bias=True)
    stats = load("torch").head_stats(problem, gradient=True, hess_diag=True, hvp_dirs=dr.view(3, 2, 3, 6))
    theirs_out = torch.cat([stats.grad, stats.hess_diag, stats.hvp.reshape(3, 6, 6)], 1)
    assert_close(out, theirs_out, 1e-12, "statistics")
    theirs = torch.autograd.grad(theirs_out, (lg, ft, dr), upstream)
    for name, a, b in zip(("logits", "features", "directions"), ours, theirs):
        assert_close(a, b, 1e-10, name)


def test_primitive_operator_compiles_fullgraph():
    _node_required()
    operands, (_, dirs, _, _) = _op_arguments()
    compiled = torch.compile(lambda *a: OPS.head_stats(*a), fullgraph=True, backend="aot_eager")
    args = (*operands, False, True, True, dirs)
    assert torch.equal(compiled(*args), OPS.head_stats(*args))


def test_penalty_under_torch_compile_takes_the_primitive_operators(monkeypatch):
    """In eager mode a default penalty is one `penalty` operator call; traced by torch.compile, the backend
    calls the head_stats operator, which autograd differentiates through its C++ rule (the per-sample
    backward), equal to the hand-written backward."""
    _node_required()
    from hgkernels.backends import native
    calls = []

    class Recording:
        def __getattr__(self, name):
            op = getattr(OPS, name)
            return lambda *a: calls.append(name) or op(*a)

    monkeypatch.setattr(native, "_OPS", Recording())
    case = make_case(21, loss="cross_entropy", bias=True, sizes=[5, 8], num_classes=3, num_features=4)
    eager = penalty_and_grads(hk.hutchinson_penalty, case, backend="native")
    assert calls == ["penalty"]
    calls.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = penalty_and_grads(hk.hutchinson_penalty, case, backend="native", num_envs=2)
    assert calls == ["head_stats"]
    for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), traced, eager):
        assert_close(a, b, 1e-12, f"operators differentiated by autograd vs the hand-written backward: {name}")


def test_operators_without_an_autograd_rule_raise_when_differentiated():
    """plan_forward, plan_backward and per_sample_backward run inside hand-written backwards; autograd
    through them raises rather than returning a zero gradient."""
    _node_required()
    from hgkernels.backends.native import _operands
    case = _case(41)
    logits = case.logits.clone().requires_grad_(True)
    problem = prepare(logits, case.features, case.labels, case.envs, loss="cross_entropy", bias=True)
    _, hessian, _ = OPS.plan_forward(*_operands(problem), "hgp", 1 / 3, True, True)
    with pytest.raises(RuntimeError, match="derivative for hgkernels::plan_forward is not implemented"):
        hessian.backward()
    d_logits, _, _ = OPS.per_sample_backward(*_operands(problem), False, None, None, None,
                                             torch.ones(3, 3, 5, dtype=logits.dtype), None, None)
    with pytest.raises(RuntimeError, match="derivative for hgkernels::per_sample_backward is not implemented"):
        d_logits.sum().backward()
