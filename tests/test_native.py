"""The native backend's kernels (csrc/, hgkernels._native) against the torch backend and
the generic-autograd reference: float64 to 1e-10 relative on the same randomized matrix as
test_parity.py, both primitives directly, float32/bfloat16 precision, determinism across runs
and thread counts, non-contiguous inputs, and backend="auto" choosing native on CPU.

Skipped with the import error when the extension is not built, except under CI=true, where
the build is part of the job and a missing module must fail.
"""
import os
import random

import pytest
import torch

import hgkernels as hk
from hgkernels import backends
from hgkernels._inputs import prepare
from hgkernels.backends import native as native_backend
from _helpers import PENALTIES, assert_close, make_case, penalty_and_grads, small_case
from test_parity import random_config

LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")
RTOL = 1e-10


if native_backend.NATIVE_ERROR is not None:
    if os.environ.get("CI", "").lower() == "true":
        raise ImportError(f"CI builds the native extension, but {native_backend.NATIVE_ERROR}")
    pytest.skip(native_backend.NATIVE_ERROR, allow_module_level=True)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not native_backend._NATIVE.HAS_CUDA or not torch.cuda.is_available(),
    reason="no CUDA device: the CUDA kernels compile here but cannot run"))]


def _grads(fn, case, backend, device="cpu", dtype=None, **kwargs):
    case = _on(case, device)
    return penalty_and_grads(fn, case, backend=backend, dtype=dtype, **kwargs)


def _on(case, device):
    if device == "cpu":
        return case
    envs = case.envs.to(device) if isinstance(case.envs, torch.Tensor) else case.envs
    return type(case)(case.logits.to(device), case.features.to(device), case.labels.to(device), envs, case.loss,
                      case.bias)


def _grads_at_thread_counts(fn, case, counts, **kwargs):
    """_grads on the native backend once per torch thread count in `counts` (restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        runs = []
        for count in counts:
            torch.set_num_threads(count)
            runs.append(_grads(fn, case, "native", **kwargs))
        return runs
    finally:
        torch.set_num_threads(threads)


def _compare(ours, theirs, rtol, what):
    for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), ours, theirs):
        assert_close(a.cpu(), b.cpu(), rtol, f"{what}: {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(16))
def test_hgp_matches_torch_and_reference(seed, device):
    case_kw, opts = random_config(seed, max_head_params=50 * 65)
    case = make_case(seed, **case_kw)
    opts["reference"] = random.Random(seed).choice(["pooled", "mean"])
    native = _grads(hk.hgp_penalty, case, "native", device, **opts)
    _compare(native, _grads(hk.hgp_penalty, case, "torch", **opts), RTOL, "vs torch")
    _compare(native, _grads(hk.hgp_penalty, case, "reference", **opts), RTOL, "vs reference")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(16))
def test_exact_hutchinson_matches_torch_and_reference(seed, device):
    case_kw, opts = random_config(1000 + seed, max_head_params=200)
    case = make_case(seed, **case_kw)
    native = _grads(hk.hutchinson_penalty, case, "native", device, **opts)
    _compare(native, _grads(hk.hutchinson_penalty, case, "torch", **opts), RTOL, "vs torch")
    _compare(native, _grads(hk.hutchinson_penalty, case, "reference", **opts), RTOL, "vs reference")


def _head_grads(method, case, alpha=0.7, beta=1.3, **opts):
    """The fused head (hk.linear_head_alignment) on the case's features: total, d features, d weight, d bias."""
    gen = torch.Generator().manual_seed(7)
    c, d = case.logits.shape[1], case.features.shape[1]
    features = case.features.detach().clone().requires_grad_(True)
    weight = torch.randn(c, d, generator=gen, dtype=features.dtype).requires_grad_(True)
    bias = torch.randn(c, generator=gen, dtype=features.dtype).requires_grad_(True) if case.bias else None
    out = hk.linear_head_alignment(features, weight, bias, case.labels, case.envs, method=method, alpha=alpha,
                                   beta=beta, loss=case.loss, backend="native", form="feature", **opts)
    leaves = [t for t in (features, weight, bias) if t is not None]
    return (out.total.detach(), *torch.autograd.grad(out.total, leaves))


@pytest.mark.parametrize("seed", range(12))
def test_cpu_plans_run_whole_and_match_the_python_plans(seed, monkeypatch):
    """The C++ plans (csrc/hgk_plans.h: statistics, deviations, penalty sums and the backward's algebra,
    one call per direction) serve CPU calls: the logits path as csrc/autograd.cpp's autograd node (where
    built), else behind the Python PenaltyFunction, and the fused head. The node equals the Function on
    the same plans bitwise, and both equal the Python plans' algebra (_penalty.py) on the same kernels:
    random shapes (one-row and blocked backward paths), E = 1, shuffled ids, both references,
    detach_reference, env_reduction, losses, bias."""
    case_kw, opts = random_config(2000 + seed, max_head_params=50 * 65)
    case = make_case(seed, **case_kw)
    method = ("hgp", "exact")[seed % 2]
    fn = hk.hgp_penalty if method == "hgp" else hk.hutchinson_penalty
    if method == "hgp":
        opts["reference"] = random.Random(seed).choice(["pooled", "mean"])
    ran = []
    node_plan, whole_plan = native_backend.NativeBackend.autograd_plan, native_backend.NativeBackend.plan_forward

    def spy_node(self, problem, spec):
        out = node_plan(self, problem, spec)
        if out is not None:
            ran.append(("node", spec.method))
        return out

    monkeypatch.setattr(native_backend.NativeBackend, "autograd_plan", spy_node)
    monkeypatch.setattr(native_backend.NativeBackend, "plan_forward",
                        lambda self, problem, spec: ran.append(("plan", spec.method)) or whole_plan(self, problem, spec))
    first = _grads(fn, case, "native", **opts)
    whole_head = _head_grads("hutchinson" if method == "exact" else method, case, **opts)
    assert ran == [("node", method), ("plan", method)]
    monkeypatch.setattr(native_backend.NativeBackend, "autograd_plan", lambda self, problem, spec: None)
    whole = _grads(fn, case, "native", **opts)
    assert ran[-1] == ("plan", method)
    for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), first, whole):
        assert torch.equal(a, b), f"autograd node vs PenaltyFunction on the C++ plans: {name}"
    monkeypatch.setattr(native_backend.NativeBackend, "plan_forward", lambda self, problem, spec: None)
    _compare(whole, _grads(fn, case, "native", **opts), RTOL, "C++ plan vs Python plan")
    for name, a, b in zip(("total", "d features", "d weight", "d bias"), whole_head,
                          _head_grads("hutchinson" if method == "exact" else method, case, **opts)):
        assert_close(a, b, RTOL, f"fused head, C++ plan vs Python plan: {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_few_column_statistics_with_an_empty_environment_and_long_ones(dtype):
    """reduce_few (W <= 16 coefficient columns whose partial sums outgrow L1, as at PACS) writes its
    register tiles straight to the output after an environment's last group of 32 rows: a rank's shard
    with an empty environment (zeros, not stale memory) and environments of several groups (here 40
    and 24 rows, shuffled ids) equal the torch backend."""
    _shard_statistics_match_torch([40, 0, 24], 2048, 7, dtype, seed=5)


def _shard_statistics_match_torch(sizes, d, c, dtype, seed):
    """A rank's shard with environments of `sizes` (one of them empty), ids shuffled: the native statistics
    (gradient and Hessian diagonal) equal the torch backend's, zeros for the empty environment."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    envs = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[torch.randperm(n, generator=gen)]
    logits = torch.randn(n, c, generator=gen, dtype=dtype)
    features = torch.randn(n, d, generator=gen, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=gen)
    problem = prepare(logits, features, labels, envs, loss="cross_entropy", bias=True, shard=True, num_envs=len(sizes))
    ours = backends.load("native").head_stats(problem, gradient=True, hess_diag=True)
    theirs = backends.load("torch").head_stats(problem, gradient=True, hess_diag=True)
    empty = sizes.index(0)
    for name, a, b in zip(("gradient", "Hessian diagonal"), ours, theirs):
        assert torch.equal(a[empty], torch.zeros_like(a[empty])), f"{name}: the empty environment"
        assert_close(a, b, 1e-5 if dtype == torch.float32 else 1e-12, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_statistics_per_environment_blocks_with_many_environments(dtype):
    """stats_direct (at most 16 coefficient columns and a small head) with partial sums too large to share
    (blocks per environment): each environment adds only its own blocks (in block order), one of them spanning
    three blocks of 2048 rows and an empty one, among 600 environments: equal to the torch backend."""
    sizes = [5000, 0] + torch.randint(1, 9, (598,), generator=torch.Generator().manual_seed(6)).tolist()
    _shard_statistics_match_torch(sizes, 15, 2, dtype, seed=6)


def test_plan_scratch_kept_between_calls_leaves_no_trace():
    """csrc/cpu_plans.cpp keeps each thread's plan scratch for its next call (ScratchArena, up to 16 MB):
    a result must not depend on the calls before it. Calls that fit the kept block, outgrow it, exceed the
    kept limit (about 25 MB of HGP scratch here) and fit again, run forward and reversed, give the same
    bits, float32 and float64."""
    shapes = [([5, 9, 7], 3, 40), ([40, 25], 7, 300), ([6, 9, 5, 8], 64, 4096), ([3, 4], 2, 9)]
    calls = [(k, method, dtype) for k in range(len(shapes)) for method in ("exact", "hgp")
             for dtype in (torch.float32, torch.float64)]
    cases = [make_case(70 + k, loss="cross_entropy", bias=True, sizes=sizes, num_classes=c, num_features=d)
             for k, (sizes, c, d) in enumerate(shapes)]

    def run(k, method, dtype):
        fn = hk.hgp_penalty if method == "hgp" else hk.hutchinson_penalty
        return _grads(fn, cases[k], "native", dtype=dtype)

    forward = [run(*call) for call in calls]
    backward = [run(*call) for call in reversed(calls)][::-1]
    for call, a, b in zip(calls, forward, backward):
        for name, x, y in zip(("hessian term", "gradient term", "d logits", "d features"), a, b):
            assert torch.equal(x, y), f"{call}: {name} depends on the calls before it"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(10))
def test_stochastic_hutchinson_matches_reference_at_same_probes(seed, device):
    case_kw, opts = random_config(2000 + seed, max_head_params=50 * 65)
    case = make_case(seed, **case_kw)

    def run(backend, dev):
        gen = torch.Generator(device=dev).manual_seed(seed)
        return _grads(hk.hutchinson_penalty, case, backend, dev, estimator="hutchinson", num_probes=3,
                      generator=gen, **opts)

    _compare(run("native", device), run("reference", device), RTOL, "vs reference")


def _stat_directions(problem, k, seed):
    gen = torch.Generator().manual_seed(seed)
    e, c, dh = problem.segments.num_envs, problem.num_classes, problem.head_width
    return torch.randn(e, k, c, dh, generator=gen, dtype=torch.float64).to(problem.logits.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_primitives_match_torch_backend(loss, bias, k, device):
    """head_stats (any subset) and per_sample_backward (any subset of upstreams) directly."""
    _check_primitives(loss, bias, k, device, sizes=[7, 1, 30, 3], num_classes=5, num_features=37)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("num_classes,k", [(1, 0), (1, 2), (3, 1)])
def test_primitives_few_classes_many_samples(loss, num_classes, k):
    """Few classes take the CPU kernels' one-pass paths (at most 16 matrix rows); environments of
    thousands of samples span several of their 2048-row blocks, whose partial sums are added in order."""
    _check_primitives(loss, True, k, "cpu", sizes=[2500, 1, 4100], num_classes=num_classes, num_features=19)


def _check_primitives(loss, bias, k, device, sizes, num_classes, num_features):
    case = _on(make_case(17 + k, loss=loss, bias=bias, sizes=sizes, num_classes=num_classes,
                         num_features=num_features), device)
    problem = prepare(case.logits, case.features, case.labels, case.envs, loss=loss, bias=bias)
    native, torch_backend = backends.load("native"), backends.load("torch")
    dirs = _stat_directions(problem, k, 1) if k else None
    ups = _stat_directions(problem, k, 2) if k else None
    grad_up = _stat_directions(problem, 1, 3)[:, 0]
    diag_up = _stat_directions(problem, 1, 4)[:, 0]
    for flags in ({"gradient": True, "hess_diag": True}, {"gradient": True}, {"hess_diag": True}, {}):
        if not flags and dirs is None:
            continue
        got = native.head_stats(problem, hvp_dirs=dirs, **flags)
        want = torch_backend.head_stats(problem, hvp_dirs=dirs, **flags)
        for name in ("grad", "hess_diag", "hvp"):
            assert (getattr(got, name) is None) == (getattr(want, name) is None), name
            if getattr(want, name) is not None:
                assert_close(getattr(got, name).cpu(), getattr(want, name).cpu(), RTOL, f"head_stats {name} {flags}")
    for upstream in ({"grad_up": grad_up, "diag_up": diag_up}, {"grad_up": grad_up}, {"diag_up": diag_up}, {}):
        if not upstream and dirs is None:
            continue
        extra = {"hvp_dirs": dirs, "hvp_up": ups} if dirs is not None else {}
        got = native.per_sample_backward(problem, **upstream, **extra)
        want = torch_backend.per_sample_backward(problem, **upstream, **extra)
        for name, a, b in zip(("d logits", "d features"), got, want):
            assert_close(a.cpu(), b.cpu(), RTOL, f"per_sample_backward {name} {sorted(upstream)} K={k}")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("method", ["hgp", "exact"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_against_float64(loss, method, dtype, rtol):
    """float32 reads and sums in float32; bfloat16 inputs are upcast and summed in float32."""
    case = make_case(5, loss=loss, bias=True, sizes=[40, 1, 23], num_classes=6, num_features=48, scale=1.0)
    fn = hk.hgp_penalty if method == "hgp" else hk.hutchinson_penalty
    exact = _grads(fn, case, "torch")
    if dtype == torch.bfloat16:  # compare against float64 on the same (rounded) inputs
        case = make_case(5, loss=loss, bias=True, sizes=[40, 1, 23], num_classes=6, num_features=48, scale=1.0)
        case.logits, case.features = case.logits.bfloat16().double(), case.features.bfloat16().double()
        if loss != "cross_entropy":
            case.labels = case.labels.bfloat16().double()
        exact = _grads(fn, case, "torch")
    low = _grads(fn, case, "native", dtype=dtype)
    assert low[2].dtype == dtype and low[3].dtype == dtype
    _compare(low, exact, rtol, str(dtype))


@pytest.mark.parametrize("method", ["hgp", "exact"])
@pytest.mark.parametrize("loss,sizes,num_classes", [("cross_entropy", [300, 1, 211], 9),
                                                    ("binary_cross_entropy", [3000, 1, 2211], 1)])
def test_deterministic_across_runs_and_thread_counts(method, loss, sizes, num_classes):
    """Tiled paths (C = 9) and the one-pass few-class paths over several row blocks (C = 1)."""
    case = make_case(9, loss=loss, bias=True, sizes=sizes, num_classes=num_classes, num_features=150,
                     dtype=torch.float32)
    fn = hk.hgp_penalty if method == "hgp" else hk.hutchinson_penalty
    first, second, single = _grads_at_thread_counts(fn, case, (2, 2, 1))
    for name, a, b, c in zip(("hessian", "gradient", "d logits", "d features"), first, second, single):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
        assert torch.equal(a, c), f"{name} differs between 2 threads and 1 thread"


@pytest.mark.parametrize("method,num_classes,sizes", [("hgp", 9, [13, 7, 21]), ("hgp", 4, [41, 3, 17]),
                                                     ("exact", 17, [13, 7, 21]), ("hgp", 17, [5, 6, 30])])
def test_tiled_dots_bitwise_across_thread_counts_with_small_environments(method, num_classes, sizes):
    """The tiled dot products (the statistics' direction dots, the blocked backward) take 4-sample tiles
    from blocks whose size and start follow the thread count at small batches with enough work to run
    in parallel (here blocks of 4 to 11 rows, D = 2048): a row's bits must not depend on where its block
    starts. 1 to 4 threads, bitwise."""
    case = make_case(3, loss="cross_entropy", bias=True, sizes=sizes, num_classes=num_classes, num_features=2048,
                     dtype=torch.float32)
    fn = hk.hgp_penalty if method == "hgp" else hk.hutchinson_penalty
    runs = _grads_at_thread_counts(fn, case, (1, 2, 3, 4))
    for count, run in zip((2, 3, 4), runs[1:]):
        for name, a, b in zip(("hessian", "gradient", "d logits", "d features"), runs[0], run):
            assert torch.equal(a, b), f"{name}: {count} threads differ from 1"


@pytest.mark.parametrize("method", ["hgp", "exact"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_row_backward_bitwise_across_thread_counts_with_grouped_ids(method, dtype):
    """The row blocks follow the thread count; the one-row backward's passes of up to 4 samples must not
    (the compiler contracts multiply-adds differently in each pass width, so a row computed in another
    pass width can differ in its last bit): grouped ids (long runs of one environment), D = 255 (every
    column tail), environments of 3 and 138 samples, threads 1, 2 and 3."""
    case = make_case(58, loss="binary_cross_entropy", bias=False, sizes=[3, 138], num_classes=7, num_features=255,
                     as_sizes=True, dtype=dtype)
    fn, opts = (hk.hgp_penalty, {"reference": "mean"}) if method == "hgp" else (hk.hutchinson_penalty, {})
    runs = _grads_at_thread_counts(fn, case, (1, 2, 3), env_reduction="sum", detach_reference=False, **opts)
    for other in runs[1:]:
        for name, a, b in zip(("hessian", "gradient", "d logits", "d features"), runs[0], other):
            assert torch.equal(a, b), f"{name} depends on the thread count"


@pytest.mark.parametrize("loss", LOSSES)
def test_non_contiguous_inputs(loss):
    """Column-sliced and transposed logits/features give the contiguous result."""
    case = make_case(13, loss=loss, bias=True, sizes=[6, 1, 9], num_classes=4, num_features=10)
    wide_logits = torch.randn(case.logits.shape[1], 3 * case.logits.shape[0], dtype=torch.float64)
    wide_logits[:, ::3] = case.logits.T
    logits = wide_logits[:, ::3].T  # strides (3, 3N): neither dimension contiguous
    wide_features = torch.randn(case.features.shape[0], case.features.shape[1] + 5, dtype=torch.float64)
    wide_features[:, 2:-3] = case.features
    features = wide_features[:, 2:-3]  # row stride D + 5
    assert not logits.is_contiguous() and not features.is_contiguous()
    for fn in (hk.hgp_penalty, hk.hutchinson_penalty):
        want = _grads(fn, case, "native")
        sliced = type(case)(logits, features, case.labels, case.envs, loss, True)
        got = penalty_and_grads(fn, sliced, backend="native")
        _compare(got, want, 1e-14, "non-contiguous")


def test_auto_picks_native_for_cpu_tensors():
    case = make_case(1, loss="cross_entropy", bias=True, sizes=[3, 4], num_classes=3, num_features=5)
    problem = prepare(case.logits, case.features, case.labels, case.envs, loss="cross_entropy", bias=True)
    assert backends.select("auto", problem).name == "native"


def test_auto_leaves_large_cpu_heads_to_torch_but_native_still_runs_them():
    from hgkernels.backends.native import AUTO_MAX_CPU_HEAD
    c = 64
    d = AUTO_MAX_CPU_HEAD // c  # C x (D + 1) just above the limit
    case = make_case(2, loss="cross_entropy", bias=True, sizes=[2, 3], num_classes=c, num_features=d,
                     dtype=torch.float32)
    problem = prepare(case.logits, case.features, case.labels, case.envs, loss="cross_entropy", bias=True)
    assert backends.select("auto", problem).name == "torch"
    assert backends.select("native", problem).name == "native"




def test_eager_calls_do_not_import_dynamo():
    """The custom ops' dispatch would import torch._dynamo (about 1 s, 150 MB) on the first call."""
    import subprocess
    import sys
    code = ("import sys, torch, hgkernels as hk\n"
            "l = torch.randn(6, 3, requires_grad=True); f = torch.randn(6, 4, requires_grad=True)\n"
            "p = hk.hutchinson_penalty(l, f, torch.tensor([0, 1, 2, 0, 1, 2]), [3, 3], backend='native')\n"
            "(p.hessian + p.gradient).backward()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


@pytest.mark.parametrize("method", sorted(PENALTIES))
def test_native_feature_form_bitwise_across_threads(method):
    case = small_case(14, sizes=(3000, 2500), c=4, d=40, dtype=torch.float32)
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
