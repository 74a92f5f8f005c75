"""The Triton backend against the torch backend (float32) and float64 results.

Without a GPU the kernels run on the CPU under TRITON_INTERPRET=1 (set by conftest.py),
so shapes stay small; 16-wide tiles and a forced row split make the small cases cross
several class tiles (online softmax), Dh tiles, row blocks and split partials. Every
output buffer is filled with NaN before each launch, so an element a kernel never
writes fails the comparison. On a CUDA machine the same tests run on the GPU.
"""
import os
import subprocess
import sys

import pytest
import torch

import hgkernels as hk
from hgkernels import backends
from hgkernels._inputs import prepare
from _helpers import assert_close, make_case, penalty_and_grads

pytest.importorskip("triton")
from hgkernels.backends import triton_backend  # noqa: E402  (after the importorskip)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")
RTOL_FP32 = 1e-5  # docs/design.md §4.8, against float32 torch and against float64 alike
RTOL_HALF = 1e-2
OUTPUT_NAMES = ("hessian term", "gradient term", "d logits", "d features")


@pytest.fixture(autouse=True)
def small_tiles_and_poison(monkeypatch):
    monkeypatch.setattr(triton_backend, "TILES", triton_backend.TileConfig(
        rows=16, classes=16, features=16, min_programs=64))
    monkeypatch.setattr(triton_backend, "POISON_OUTPUTS", True)


def _case(seed, loss, bias, sizes, c, d, dtype=torch.float32, **kwargs):
    case = make_case(seed, loss=loss, bias=bias, sizes=sizes, num_classes=c, num_features=d, **kwargs)
    move = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t
    case.logits, case.features = move(case.logits).to(dtype), move(case.features).to(dtype)
    case.labels, case.envs = move(case.labels), move(case.envs)
    if loss != "cross_entropy":
        case.labels = case.labels.to(dtype)
    return case


def _problem(case):
    return prepare(case.logits, case.features, case.labels, case.envs, loss=case.loss, bias=case.bias)


def _upstream(problem, num_dirs, seed):
    gen = torch.Generator().manual_seed(seed)
    e, c, dh = problem.segments.num_envs, problem.num_classes, problem.head_width
    draw = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)
    return dict(grad_up=draw(e, c, dh), diag_up=draw(e, c, dh),
                hvp_dirs=draw(e, num_dirs, c, dh), hvp_up=draw(e, num_dirs, c, dh))


def _check_primitives(case, num_dirs=2, seed=0):
    problem = _problem(case)
    ours, theirs = backends.load("triton"), backends.load("torch")
    up = _upstream(problem, num_dirs, seed)
    stats = ours.head_stats(problem, gradient=True, hess_diag=True, hvp_dirs=up["hvp_dirs"])
    expected = theirs.head_stats(problem, gradient=True, hess_diag=True, hvp_dirs=up["hvp_dirs"])
    for name, a, b in zip(("G", "Dg", "H V"), stats, expected):
        assert_close(a, b, RTOL_FP32, name)
    for kept in (("grad_up",), ("diag_up",), ("hvp_dirs", "hvp_up"), tuple(up)):
        ups = {key: up[key] for key in kept}
        got = ours.per_sample_backward(problem, **ups)
        want = theirs.per_sample_backward(problem, **ups)
        for name, a, b in zip(("d logits", "d features"), got, want):
            assert_close(a, b, RTOL_FP32, f"{name} from {'+'.join(kept)}")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bias", [True, False])
def test_primitives_match_torch_small(loss, bias):
    """Unequal environments including a single sample, shuffled ids; one tile everywhere."""
    _check_primitives(_case(1, loss, bias, [5, 1, 9], 3, 4))


@pytest.mark.parametrize("loss", LOSSES)
def test_primitives_match_torch_across_tiles(loss):
    """C = 20 and Dh = 19 span two 16-wide tiles; 35 rows span three row blocks split over programs."""
    _check_primitives(_case(2, loss, True, [35, 1, 4], 20, 18), num_dirs=1, seed=3)


@pytest.mark.parametrize("loss", LOSSES[:2])
def test_primitives_with_large_logits(loss):
    """Logits of size ~50 across two class tiles: the online log-sum-exp must not overflow."""
    _check_primitives(_case(16, loss, True, [7, 3], 20, 3, scale=50.0), num_dirs=1)


def test_primitives_with_size_list_and_one_class():
    _check_primitives(_case(4, "binary_cross_entropy", True, [2, 7], 1, 3, as_sizes=True), num_dirs=3)


def test_strided_inputs():
    """Kernels read logits and features through their strides (column slices, a transposed view)."""
    case = _case(3, "binary_cross_entropy", True, [6, 3], 3, 5)
    wide = torch.randn(case.logits.shape[0], 2 * case.logits.shape[1], device=DEVICE)
    wide[:, ::2] = case.logits
    case.logits = wide[:, ::2]
    case.features = case.features.T.contiguous().T
    assert not case.logits.is_contiguous() and not case.features.is_contiguous()
    _check_primitives(case)


def test_row_split_partials_match_no_split(monkeypatch):
    """Splitting a segment's rows over programs only changes the summation grouping."""
    case = _case(5, "cross_entropy", True, [40, 3], 5, 6)
    problem, ours = _problem(case), backends.load("triton")
    split = ours.head_stats(problem, gradient=True, hess_diag=True)
    monkeypatch.setattr(triton_backend.TILES, "min_programs", 1)
    whole = ours.head_stats(problem, gradient=True, hess_diag=True)
    for name, a, b in zip(("G", "Dg"), split, whole):
        assert_close(a, b, RTOL_FP32, name)


PENALTIES = [
    ("exact hutchinson", hk.hutchinson_penalty, dict(env_reduction="mean")),
    ("hgp pooled, undetached", hk.hgp_penalty, dict(reference="pooled", detach_reference=False)),
    ("hgp mean, sum", hk.hgp_penalty, dict(reference="mean", env_reduction="sum")),
]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name,fn,kwargs", PENALTIES, ids=[p[0] for p in PENALTIES])
def test_penalties_match_torch_and_float64(loss, name, fn, kwargs):
    case = _case(6, loss, loss != "mse", [6, 1, 11], 4, 5)
    ours = penalty_and_grads(fn, case, backend="triton", **kwargs)
    same_precision = penalty_and_grads(fn, case, backend="torch", **kwargs)
    exact = penalty_and_grads(fn, case, torch.float64, backend="torch", **kwargs)
    for what, a, b, c in zip(OUTPUT_NAMES, ours, same_precision, exact):
        assert a.dtype == torch.float32
        assert_close(a, b, RTOL_FP32, f"{name}: {what} vs torch float32")
        assert_close(a, c, RTOL_FP32, f"{name}: {what} vs float64")


def test_penalty_matches_reference_path():
    case = _case(7, "cross_entropy", True, [4, 7], 3, 3)
    ours = penalty_and_grads(hk.hgp_penalty, case, backend="triton")
    exact = penalty_and_grads(hk.hgp_penalty, case, torch.float64, backend="reference")
    for what, a, b in zip(OUTPUT_NAMES, ours, exact):
        assert_close(a, b, RTOL_FP32, what)


@pytest.mark.parametrize("name,fn,kwargs", PENALTIES[:2], ids=[p[0] for p in PENALTIES[:2]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(name, fn, kwargs, dtype):
    case = _case(8, "cross_entropy", True, [9, 1, 5], 4, 5, dtype=dtype)
    ours = penalty_and_grads(fn, case, backend="triton", **kwargs)
    # float64 on the very same (rounded) inputs: what is left is the kernels' arithmetic
    exact = penalty_and_grads(fn, case, torch.float64, backend="torch", **kwargs)
    assert ours[2].dtype == dtype and ours[3].dtype == dtype
    for what, a, b in zip(OUTPUT_NAMES, ours, exact):
        assert_close(a, b, RTOL_HALF, f"{name}: {what}")


def test_stochastic_estimator_matches_torch_with_same_generator():
    case = _case(9, "cross_entropy", True, [5, 8, 1], 3, 4)
    runs = [penalty_and_grads(hk.hutchinson_penalty, case, backend=backend, estimator="hutchinson",
                              num_probes=4, detach_reference=False, generator=torch.Generator(DEVICE).manual_seed(3))
            for backend in ("triton", "torch")]
    for what, a, b in zip(OUTPUT_NAMES, *runs):
        assert_close(a, b, RTOL_FP32, what)


def test_two_runs_are_bitwise_equal():
    """Row splits and multi-tile reductions finish in a fixed order: same bits every run."""
    case = _case(10, "cross_entropy", True, [35, 2], 20, 6)
    first = penalty_and_grads(hk.hgp_penalty, case, backend="triton", detach_reference=False)
    second = penalty_and_grads(hk.hgp_penalty, case, backend="triton", detach_reference=False)
    for what, a, b in zip(OUTPUT_NAMES, first, second):
        assert torch.equal(a, b), what


def test_poisoned_outputs_are_nan_before_launch():
    """The poison the other tests rely on is live: unwritten elements would stay NaN."""
    assert torch.isnan(triton_backend._new_output((2, 3), DEVICE)).all()


def test_auto_never_sends_cpu_tensors_to_triton():
    case = _case(11, "mse", True, [3, 4], 2, 3)
    problem = prepare(case.logits.cpu(), case.features.cpu(), case.labels.cpu(), case.envs.cpu(),
                      loss="mse", bias=True)
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    assert backends.select("auto", problem).name != "triton"
    assert backends.load("triton").unsupported_reason(problem, auto=True) is not None


def test_cpu_without_interpreter_gives_a_clear_error(monkeypatch):
    case = _case(12, "cross_entropy", False, [3, 4], 2, 3)
    problem = prepare(case.logits.cpu(), case.features.cpu(), case.labels.cpu(), case.envs.cpu(),
                      loss="cross_entropy", bias=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = backends.load("triton").unsupported_reason(problem)
    assert reason is not None and "TRITON_INTERPRET=1" in reason and "CUDA" in reason
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        hk.hutchinson_penalty(problem.logits, problem.features, problem.targets, case.envs.cpu(),
                              bias=False, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.load("triton").unsupported_reason(problem) is None


def test_float64_is_declined_with_its_dtype():
    case = _case(13, "cross_entropy", True, [3, 4], 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        hk.hutchinson_penalty(case.logits, case.features, case.labels, case.envs, backend="triton")


def test_importing_and_auto_on_cpu_never_import_triton():
    # torch itself may import triton later (torch._dynamo does, e.g. behind the native backend's
    # custom ops); what hgkernels owes is that importing it does not, and that CPU calls never load
    # our kernels module (the only one of ours that imports triton).
    code = ("import sys, torch, hgkernels as hk\n"
            "assert 'triton' not in sys.modules, 'import hgkernels imported triton'\n"
            "x = torch.randn(6, 3); z = torch.randn(6, 2); y = torch.randint(0, 3, (6,))\n"
            "for backend in ('auto', 'torch'):\n"
            "    hk.hutchinson_penalty(x, z, y, [2, 4], backend=backend)\n"
            "    hk.hgp_penalty(x, z, y, [2, 4], backend=backend)\n"
            "assert 'hgkernels.backends._triton_kernels' not in sys.modules, 'triton kernels were loaded'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr


class _CountingKernels:
    """Stands in for the kernels module and records each launch by kernel name."""

    def __init__(self, module, log):
        self.module, self.log = module, log

    def __getattr__(self, name):
        kernel = getattr(self.module, name)
        log = self.log

        class Launcher:
            def __getitem__(self, grid):
                log.append(name)
                return kernel[grid]
        return Launcher()


@pytest.mark.parametrize("name,fn,kwargs,launches", [
    ("exact hutchinson", hk.hutchinson_penalty, {}, ["head_stats_kernel", "per_sample_backward_kernel"]),
    ("hgp pooled, undetached", hk.hgp_penalty, dict(detach_reference=False),
     ["head_stats_kernel", "head_hvp_kernel", "head_hvp_kernel", "per_sample_backward_kernel"]),
], ids=["exact hutchinson", "hgp"])
def test_launch_counts_per_penalty(monkeypatch, name, fn, kwargs, launches):
    """Forward + backward kernel launches (no row split here, so no finishing sums)."""
    log = []
    module = triton_backend._kernels()
    monkeypatch.setattr(triton_backend, "_kernels", lambda: _CountingKernels(module, log))
    monkeypatch.setattr(triton_backend.TILES, "min_programs", 1)
    penalty_and_grads(fn, _case(15, "cross_entropy", True, [4, 9, 1], 3, 4), backend="triton", **kwargs)
    assert log == launches


def test_kernels_compile_for_sm90():
    """The interpreter skips parts of Triton's compiler (it once let a non-constexpr global
    through), so compile every kernel for an H100 (sm_90) at the default tiles, no GPU needed."""
    code = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hgkernels.backends import _triton_kernels as kernels
from hgkernels.backends.triton_backend import TILES
blocks = dict(BLOCK_N=TILES.rows, BLOCK_C=TILES.classes, BLOCK_D=TILES.features)
pointers = {"logit_ptr": "*bf16", "feat_ptr": "*bf16", "order_ptr": "*i64", "offsets_ptr": "*i64",
            "target_ptr": "*i64"}
for kernel, flags in ((kernels.head_stats_kernel, dict(GRAD=True, DIAG=True)), (kernels.head_hvp_kernel, {}),
                      (kernels.per_sample_backward_kernel, dict(GRAD_UP=True, DIAG_UP=True, HVP_UP=True))):
    consts = dict(LOSS=0, HAS_BIAS=True, **flags, **blocks)
    signature = {n: "constexpr" if n in consts else pointers.get(n, "*fp32") if n.endswith("_ptr") else "i32"
                 for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=TILES.num_warps))
    assert len(compiled.asm["cubin"]) > 0, kernel.__name__
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="large heads need a GPU; the interpreter is too slow")
@pytest.mark.parametrize("c,d", [(32768, 16), (16, 8192)])
def test_large_heads_on_gpu(monkeypatch, c, d):
    monkeypatch.setattr(triton_backend, "TILES", triton_backend.TileConfig())
    _check_primitives(_case(14, "cross_entropy", True, [150, 37, 1], c, d), num_dirs=2)
