"""Native backend: the fused C++ (OpenMP) and CUDA kernels of csrc/, bound with pybind11.

The compiled modules take raw addresses, sizes and strides (no torch C++ ABI). This file
owns the tensors: two functions lay out the arguments, allocate outputs and work buffers
and call the two primitives of csrc/hgk_kernels.h; `NativeBackend` maps `base.Backend`
onto them. Under torch.compile they run as `torch.library.custom_op`s
(``hgkernels::native_head_stats`` and ``hgkernels::native_per_sample_backward``, with
shape-only fakes); in eager mode they are called directly (see `_op`). float16/bfloat16 inputs
are upcast to float32 here, so every kernel reads and accumulates in float32 or float64.
Results are deterministic: the kernels sum in a fixed order for any thread count.
"""
import importlib
import sys
from typing import Optional, Tuple

import torch

from .._inputs import HeadProblem, plain_eager
from .base import Backend, HeadStats, HeadTerm, PlanSpec, add_head_term

_LOSS_CODES = {"cross_entropy": 0, "binary_cross_entropy": 1, "mse": 2}
_PLAN_CODES = {"exact": 0, "hgp": 1}  # csrc/hgk_plans.h PlanMethod
# backend="auto" sends CPU problems here only up to this head size (C x Dh). Measured on 2 cores,
# one thread, fwd+bwd: native is faster at PACS (C x Dh = 14343), torch's MKL GEMMs win from
# OfficeHome (133185) up (README, Backends).
AUTO_MAX_CPU_HEAD = 1 << 15


def _import(name: str):
    """The compiled module, or the ImportError text saying why it is not there."""
    try:
        return importlib.import_module(f"hgkernels.{name}"), None
    except ImportError as err:
        return None, f"hgkernels.{name} is not built ({err}); reinstall with a C++ compiler (and nvcc for CUDA)"


_CPU, _CPU_ERROR = _import("_native_cpu")
_CUDA, _CUDA_ERROR = _import("_native_cuda")
# csrc/autograd.cpp, built against the installed torch (absent, or refusing another torch: the Python path)
_AUTOGRAD, AUTOGRAD_ERROR = _import("_native_autograd")
_NODE_DTYPES = (torch.float32, torch.float64)


def _address(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _matrix(mats: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Per-environment (E, rows, Dh) matrices as the kernels read them: compute dtype, contiguous."""
    return None if mats is None else mats.to(dtype).contiguous()


class _Kernels:
    """One problem's argument tuples for the compiled module of its device.

    Expects logits/features in the compute dtype with unit feature-column stride, targets
    contiguous (int64 ids for cross_entropy, else (N, C) floats), order/offsets int64."""

    def __init__(self, logits, features, targets, order, offsets, env_ids, loss: int, bias: bool):
        self.module = _CUDA if logits.device.type == "cuda" else _CPU
        # the kernels get addresses only: hold the tensors (dtype-converted copies may have no other owner)
        self.operands = (logits, features, targets, order, offsets, env_ids)
        self.dtype, self.device = logits.dtype, logits.device
        self.is_double = logits.dtype == torch.float64
        self.n, self.c = logits.shape
        self.d = features.shape[1]
        self.head_width = self.d + int(bias)
        self.num_envs = offsets.shape[0] - 1
        is_ce = loss == _LOSS_CODES["cross_entropy"]
        self.head = (logits.data_ptr(), logits.stride(0), logits.stride(1), features.data_ptr(), features.stride(0),
                     targets.data_ptr() if is_ce else 0, 0 if is_ce else targets.data_ptr(), loss, self.c, self.d,
                     bias)
        self.segments = (order.data_ptr(), offsets.data_ptr(), self.n, self.num_envs, env_ids.data_ptr())
        if self.device.type == "cuda":
            self.launch = (1, torch.cuda.current_stream(self.device).cuda_stream)
        else:
            self.launch = (torch.get_num_threads(), 0)

    def empty(self, *shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def backward_outputs(self, head: Optional[HeadTerm]):
        """Fresh d_logits (N, C) and d_features (N, D), the fused head's addresses (weight, extra logit
        gradient, weight gradient; zeros without a head) and its weight-gradient buffer (C, Dh) or None."""
        d_logits, d_features = self.empty(self.n, self.c), self.empty(self.n, self.d)
        if head is None:
            return d_logits, d_features, (0, 0, 0), None
        weight_grad = self.empty(self.c, self.head_width)
        self.operands += (head.weight, head.extra_logit_grad)  # held, as the operands (converted copies)
        return d_logits, d_features, (head.weight.data_ptr(), head.extra_logit_grad.data_ptr(),
                                      weight_grad.data_ptr()), weight_grad


def _stats_width(c: int, gradient: bool, hess_diag: bool, dirs: Optional[torch.Tensor]) -> int:
    """Output rows per environment: [G (gradient)][Dg (hess_diag)][H V_k (dirs)] (csrc StatsLayout)."""
    return c * (int(gradient) + int(hess_diag)) + (0 if dirs is None else dirs.shape[1])


def _head_stats_impl(logits: torch.Tensor, features: torch.Tensor, targets: torch.Tensor, order: torch.Tensor,
                     offsets: torch.Tensor, env_ids: torch.Tensor, loss: int, bias: bool, square_residual: bool,
                     gradient: bool, hess_diag: bool, dirs: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-environment statistics (E, W, Dh), rows [G][Dg][H V_k] as requested; dirs (E, K*C, Dh).
    square_residual: the Dg rows weigh zh ⊙ zh by r ⊙ r instead of q (csrc StatsLayout)."""
    call = _Kernels(logits, features, targets, order, offsets, env_ids, loss, bias)
    k = 0 if dirs is None else dirs.shape[1] // call.c
    layout = (call.c, k, gradient, hess_diag, square_residual)
    work = call.empty(call.n * call.module.stats_work_per_sample(layout))
    out = call.empty(call.num_envs, _stats_width(call.c, gradient, hess_diag, dirs), call.head_width)
    call.module.head_stats(call.is_double, call.head, call.segments, layout, _address(dirs), work.data_ptr(),
                           out.data_ptr(), call.launch)
    return out


native_head_stats = torch.library.custom_op("hgkernels::native_head_stats", mutates_args=())(_head_stats_impl)


@native_head_stats.register_fake
def _(logits, features, targets, order, offsets, env_ids, loss, bias, square_residual, gradient, hess_diag, dirs):
    width = _stats_width(logits.shape[1], gradient, hess_diag, dirs)
    return logits.new_empty(offsets.shape[0] - 1, width, features.shape[1] + int(bias))


def _stats_setup_context(ctx, inputs, output):
    logits, features, targets, order, offsets, env_ids, loss, bias, square_residual, gradient, hess_diag, dirs = inputs
    ctx.save_for_backward(logits, features, targets, order, offsets, env_ids, dirs)
    ctx.loss, ctx.bias, ctx.square_residual = loss, bias, square_residual
    ctx.gradient, ctx.hess_diag = gradient, hess_diag


def _stats_backward(ctx, upstream):
    """The statistics' autograd formula (what torch.compile differentiates): the per-sample backward
    with the upstream rows [dG][dDg][d(H V_k)], and dV_k = H_e (upstream of H V_k) (H_e is symmetric)."""
    logits, features, targets, order, offsets, env_ids, dirs = ctx.saved_tensors
    c = logits.shape[1]
    grad_up = upstream[:, :c] if ctx.gradient else None
    diag_begin = c if ctx.gradient else 0
    diag_up = upstream[:, diag_begin:diag_begin + c] if ctx.hess_diag else None
    ups = upstream[:, diag_begin + (c if ctx.hess_diag else 0):] if dirs is not None else None
    operands = (logits, features, targets, order, offsets, env_ids, ctx.loss, ctx.bias, ctx.square_residual)
    contiguous = [None if t is None else t.contiguous() for t in (grad_up, ups, diag_up)]
    d_logits, d_features = native_per_sample_backward(*operands, contiguous[0], dirs, contiguous[1], contiguous[2])
    d_dirs = None
    if dirs is not None and ctx.needs_input_grad[11]:
        d_dirs = native_head_stats(*operands, False, False, contiguous[1])
    return d_logits, d_features, None, None, None, None, None, None, None, None, None, d_dirs


native_head_stats.register_autograd(_stats_backward, setup_context=_stats_setup_context)


def _per_sample_backward_impl(logits: torch.Tensor, features: torch.Tensor, targets: torch.Tensor,
                              order: torch.Tensor, offsets: torch.Tensor, env_ids: torch.Tensor, loss: int,
                              bias: bool, square_residual: bool, grad_up: Optional[torch.Tensor], dirs: Optional[torch.Tensor],
                              ups: Optional[torch.Tensor], diag_up: Optional[torch.Tensor]
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d_logits (N, C), d_features (N, D)) from upstream Lam (E, C, Dh), directions V and their
    upstream U (E, K*C, Dh each), and Gam (E, C, Dh); any of them may be None (V and U together)."""
    d_logits, d_features, _ = _per_sample_backward_call(logits, features, targets, order, offsets, env_ids, loss,
                                                        bias, square_residual, grad_up, dirs, ups, diag_up)
    return d_logits, d_features


def _per_sample_backward_call(logits, features, targets, order, offsets, env_ids, loss, bias, square_residual,
                              grad_up, dirs, ups, diag_up, head: Optional[HeadTerm] = None):
    """`_per_sample_backward_impl` with a fused head (CPU, plain eager; csrc HeadTerm): head.weight (C, Dh),
    head.extra_logit_grad (N, C). Returns (d_logits, d_features, the head's (C, Dh) gradient or None
    where the kernels' path does not form it)."""
    call = _Kernels(logits, features, targets, order, offsets, env_ids, loss, bias)
    k = 0 if dirs is None else dirs.shape[1] // call.c
    layout = (call.c, k, grad_up is not None, diag_up is not None, square_residual)
    work = call.empty(call.n * call.module.backward_work_per_sample(layout))
    d_logits, d_features, head_args, weight_grad = call.backward_outputs(head)
    written = call.module.per_sample_backward(
        call.is_double, call.head, call.segments, layout, _address(grad_up), _address(dirs), _address(ups),
        _address(diag_up), *head_args, work.data_ptr(), d_logits.data_ptr(), d_features.data_ptr(), call.launch)
    return d_logits, d_features, weight_grad if written else None


native_per_sample_backward = torch.library.custom_op("hgkernels::native_per_sample_backward",
                                                     mutates_args=())(_per_sample_backward_impl)


@native_per_sample_backward.register_fake
def _(logits, features, targets, order, offsets, env_ids, loss, bias, square_residual, grad_up, dirs, ups, diag_up):
    return logits.new_empty(logits.shape), features.new_empty(features.shape)


def _op(custom_op, impl):
    """The implementation itself in plain eager mode: the custom op's dispatch costs about 60 µs a call
    (a fifth of a PACS-sized step) and, on its first call, an import of torch._dynamo (about 1 s and
    150 MB). The custom op otherwise: torch.compile needs it and its fake, and under a FakeTensorMode the
    fake gives shapes where the implementation would hand the kernels the addresses of fake tensors."""
    return impl if plain_eager() else custom_op


def _operands(problem: HeadProblem, diag_weight: str):
    """The problem's tensors as the ops take them (see `_Kernels`), and the Dg rows' weight flag."""
    dtype = problem.compute_dtype
    logits, features = problem.logits, problem.features
    if logits.dtype != dtype:  # (a same-dtype .to is a no-op that still costs a dispatch)
        logits, features = logits.to(dtype), features.to(dtype)
    if features.stride(1) != 1:  # kernels read feature rows as contiguous runs
        features = features.contiguous()
    segments = problem.segments
    return (logits, features, problem.targets.contiguous(), segments.order, segments.offsets,
            segments.env_ids.contiguous(), _LOSS_CODES[problem.loss], problem.bias, diag_weight == "residual_squared")


class NativeBackend(Backend):
    """Compiled kernels: CPU tensors through hgkernels._native_cpu, CUDA tensors through _native_cuda."""

    name = "native"

    def __init__(self):
        if _CPU is None and _CUDA is None:
            raise ImportError(_CPU_ERROR)

    def unsupported_reason(self, problem: HeadProblem, auto: bool = False) -> Optional[str]:
        device = problem.logits.device
        if device.type == "cuda":
            return _CUDA_ERROR
        if device.type == "cpu":
            if _CPU_ERROR is None and auto and problem.num_classes * problem.head_width > AUTO_MAX_CPU_HEAD:
                return (f"the head has C x Dh = {problem.num_classes * problem.head_width} > {AUTO_MAX_CPU_HEAD} "
                        "entries, where the torch backend's BLAS GEMMs are faster on CPU")
            return _CPU_ERROR
        return f"native kernels run on CPU and CUDA tensors, not {device.type}"

    def head_stats(self, problem: HeadProblem, *, gradient: bool = False, hess_diag: bool = False,
                   hvp_dirs: Optional[torch.Tensor] = None, diag_weight: str = "curvature") -> HeadStats:
        e, c, dh = problem.segments.num_envs, problem.num_classes, problem.head_width
        k = 0 if hvp_dirs is None else hvp_dirs.shape[1]
        dirs = _matrix(hvp_dirs.reshape(e, k * c, dh), problem.compute_dtype) if k else None
        stats = _op(native_head_stats, _head_stats_impl)
        out = stats(*_operands(problem, diag_weight), gradient, hess_diag, dirs)
        diag_begin = c if gradient else 0
        diag_end = diag_begin + (c if hess_diag else 0)
        return HeadStats(out[:, :c] if gradient else None,
                         out[:, diag_begin:diag_end] if hess_diag else None,
                         out[:, diag_end:].view(e, k, c, dh) if k else None)

    def per_sample_backward(self, problem: HeadProblem, *, grad_up: Optional[torch.Tensor] = None,
                            diag_up: Optional[torch.Tensor] = None, hvp_dirs: Optional[torch.Tensor] = None,
                            hvp_up: Optional[torch.Tensor] = None, diag_weight: str = "curvature",
                            head: Optional[HeadTerm] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        e, c, dh = problem.segments.num_envs, problem.num_classes, problem.head_width
        k = 0 if hvp_dirs is None else hvp_dirs.shape[1]
        dtype = problem.compute_dtype
        dirs = _matrix(hvp_dirs.reshape(e, k * c, dh), dtype) if k else None
        ups = _matrix(hvp_up.reshape(e, k * c, dh), dtype) if k else None
        operands = (*_operands(problem, diag_weight), _matrix(grad_up, dtype), dirs, ups, _matrix(diag_up, dtype))
        if head is not None and problem.logits.device.type == "cpu" and plain_eager():
            return _per_sample_backward_call(*operands, head=_head_in(head, dtype, problem.head_width))
        d_logits, d_features = _op(native_per_sample_backward, _per_sample_backward_impl)(*operands)
        return add_head_term(d_logits, d_features, head)

    def plan_forward(self, problem: HeadProblem, spec: PlanSpec):
        """The CPU module's plans (csrc/hgk_plans.h), in plain eager mode (they are not custom ops: traced
        calls take the composed path anyway, and a dispatch mode's tensors are no memory to write)."""
        if problem.logits.device.type != "cpu" or not plain_eager():
            return None
        call = _plan_kernels(problem)
        plan = _plan_args(spec)
        state = call.empty(call.module.plan_state_size(plan, call.n, call.num_envs, call.c, call.head_width))
        hessian, gradient = call.empty(), call.empty()
        call.module.plan_forward(call.is_double, call.head, call.segments, plan, state.data_ptr(),
                                 hessian.data_ptr(), gradient.data_ptr(), call.launch)
        return state, hessian, gradient

    def autograd_plan(self, problem: HeadProblem, spec: PlanSpec, double_backward):
        """csrc/autograd.cpp's node for CPU float32/float64 problems in plain eager mode whose tensors the
        kernels read as they are (unit feature-column stride, contiguous targets and ids): the node saves
        the caller's own tensors, so in-place changes before backward raise. Others: None."""
        logits, features, targets, segments = problem.logits, problem.features, problem.targets, problem.segments
        env_ids = segments.env_ids
        if (_AUTOGRAD is None or logits.device.type != "cpu" or logits.dtype not in _NODE_DTYPES
                or features.stride(1) != 1 or not targets.is_contiguous() or not env_ids.is_contiguous()
                or not plain_eager() or _compiled_autograd_on()):
            return None
        return _AUTOGRAD.plan_penalty(logits, features, targets, segments.order, segments.offsets, env_ids,
                                      _LOSS_CODES[problem.loss], problem.bias, *_plan_args(spec), double_backward)

    def plan_backward(self, problem: HeadProblem, spec: PlanSpec, state: torch.Tensor, alpha: torch.Tensor,
                      beta: torch.Tensor, head: Optional[HeadTerm] = None):
        call = _plan_kernels(problem)
        d_logits, d_features, head_args, weight_grad = call.backward_outputs(
            _head_in(head, call.dtype, call.head_width))
        state = state.contiguous()  # (a saved-tensor hook may hand back other strides)
        written = call.module.plan_backward(call.is_double, call.head, call.segments, _plan_args(spec),
                                            state.data_ptr(), float(alpha), float(beta), *head_args,
                                            d_logits.data_ptr(), d_features.data_ptr(), call.launch)
        if head is None:
            return d_logits, d_features
        return d_logits, d_features, weight_grad if written else None


def _compiled_autograd_on() -> bool:
    """Compiled autograd is on (it traces Python autograd.Functions but not the C++ node's kernel call).
    Read from the modules only when already imported: importing torch._dynamo costs about a second."""
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    config = sys.modules.get("torch._dynamo.config")
    return bool((module is not None and module.compiled_autograd_enabled)
                or (config is not None and config.compiled_autograd))


def _head_in(head: Optional[HeadTerm], dtype: torch.dtype, head_width: int) -> Optional[HeadTerm]:
    """A fused head's matrices as the kernels read them: W as (C, Dh) rows like the plans' upstream
    matrices (a zero bias column, which the kernels never read), the extra logit gradient contiguous."""
    if head is None:
        return None
    weight = head.weight.to(dtype)
    if weight.shape[1] < head_width:
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], head_width - weight.shape[1])], 1)
    return HeadTerm(weight.contiguous(), _matrix(head.extra_logit_grad, dtype))


def _plan_kernels(problem: HeadProblem) -> _Kernels:
    """The problem's argument tuples for the plans (whose Dg rows always weigh the curvature)."""
    return _Kernels(*_operands(problem, "curvature")[:8])


def _plan_args(spec: PlanSpec) -> tuple:
    """csrc/bind.cpp's plan tuple."""
    return _PLAN_CODES[spec.method], spec.weight, spec.pooled, spec.detach_reference
