"""Native backend: the fused C++ (OpenMP) and CUDA kernels of csrc/, as torch operators.

`hgkernels._native` (csrc/ops.cpp) registers them in torch's dispatcher: ``torch.ops.hgkernels.*``
is the one way in, the same call in eager mode, under torch.compile (the shape functions below) and
inside autograd (their autograd rules are in ops.cpp). This file lays a problem's tensors out as the
operators take them (`_operands`) and maps `base.Backend` onto them. float16/bfloat16 inputs are
upcast to float32 here, so every kernel reads and accumulates in float32 or float64. Results are
deterministic: the kernels sum in a fixed order for any thread count.
"""
import importlib
import sys
from typing import Optional, Tuple

import torch

from .._inputs import EnvSegments, HeadProblem, plain_eager
from .base import Backend, HeadStats, HeadTerm, PlanSpec, add_head_term

# backend="auto" sends CPU problems here only up to this head size (C x Dh): on CPU, torch's BLAS
# GEMMs are faster for larger heads (docs/performance.md).
AUTO_MAX_CPU_HEAD = 1 << 15
_NODE_DTYPES = (torch.float32, torch.float64)


def _import():
    """The compiled module, or the ImportError text saying why it is not there."""
    try:
        return importlib.import_module("hgkernels._native"), None
    except ImportError as err:
        return None, (f"hgkernels._native is not built ({err}); reinstall hgkernels with a C++ compiler and CMake "
                      "(and nvcc for CUDA) after installing torch")


_NATIVE, NATIVE_ERROR = _import()
_CUDA_ERROR = NATIVE_ERROR or (None if _NATIVE.HAS_CUDA else
                               "hgkernels._native was built without its CUDA kernels (nvcc was not found)")


def _stats_width(c: int, gradient: bool, hess_diag: bool, dirs: Optional[torch.Tensor]) -> int:
    """Output rows per environment: [G (gradient)][Dg (hess_diag)][H V_k (dirs)] (csrc StatsLayout)."""
    return c * (int(gradient) + int(hess_diag)) + (0 if dirs is None else dirs.shape[1])


if _NATIVE is not None:
    _OPS = torch.ops.hgkernels

    @torch.library.register_fake("hgkernels::head_stats")
    def _(logits, features, targets, order, offsets, env_ids, loss, bias, square_residual, gradient, hess_diag, dirs):
        width = _stats_width(logits.shape[1], gradient, hess_diag, dirs)
        return logits.new_empty(offsets.shape[0] - 1, width, features.shape[1] + int(bias))

    @torch.library.register_fake("hgkernels::per_sample_backward")
    def _(logits, features, targets, order, offsets, env_ids, loss, bias, square_residual, grad_up, dirs, ups,
          diag_up, head_weight, head_extra):
        if head_weight is not None:
            raise NotImplementedError("hgkernels: the fused head term runs in plain eager mode only")
        return logits.new_empty(logits.shape), features.new_empty(features.shape), logits.new_empty(0)

    @torch.library.impl("hgkernels::penalty_create_graph", "CompositeImplicitAutograd")
    def _penalty_create_graph(logits, features, targets, order, offsets, env_ids, loss, bias, method, weight, pooled,
                              detach_reference, alpha, beta):
        """The penalty node's create_graph=True backward: the plan's torch closed form, differentiated by
        autograd (a registered function, since the node holds no Python object)."""
        from .._penalty import create_graph_grads
        from ..penalties.registry import whole_plan  # (the penalties import the backends)
        problem = HeadProblem(logits, features, targets, loss, bias, EnvSegments.from_layout(env_ids, order, offsets))
        plan = whole_plan(PlanSpec(method, weight, pooled, detach_reference))
        return tuple(create_graph_grads(plan, problem, logits, features, alpha, beta))


def _matrix(mats: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Per-environment (E, rows, Dh) matrices as the kernels read them: compute dtype, contiguous."""
    return None if mats is None else mats.to(dtype).contiguous()


def _operands(problem: HeadProblem) -> tuple:
    """The problem's tensors and options as every operator takes them first: logits and features in the
    compute dtype with unit feature-column stride, targets, order, offsets and ids contiguous, loss, bias."""
    dtype = problem.compute_dtype
    logits, features = problem.logits, problem.features
    if logits.dtype != dtype:  # (a same-dtype .to is a no-op that still costs a dispatch)
        logits, features = logits.to(dtype), features.to(dtype)
    if features.stride(1) != 1:  # kernels read feature rows as contiguous runs
        features = features.contiguous()
    segments = problem.segments
    return (logits, features, problem.targets.contiguous(), segments.order, segments.offsets,
            segments.env_ids.contiguous(), problem.loss, problem.bias)


def _head_args(head: Optional[HeadTerm], dtype: torch.dtype, head_width: int) -> tuple:
    """A fused head's (weight, extra logit gradient) as the kernels read them: W as (C, Dh) rows like the
    plans' upstream matrices (a zero bias column, which the kernels never read), both contiguous."""
    if head is None:
        return None, None
    weight = head.weight.to(dtype)
    if weight.shape[1] < head_width:
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], head_width - weight.shape[1])], 1)
    return weight.contiguous(), _matrix(head.extra_logit_grad, dtype)


def _head_gradient(weight_grad: torch.Tensor) -> Optional[torch.Tensor]:
    """The operators' third output: the fused head's gradient, or empty where the kernels did not form it."""
    return weight_grad if weight_grad.numel() else None


class NativeBackend(Backend):
    """Compiled kernels (torch.ops.hgkernels): CPU tensors, and CUDA tensors when built with nvcc."""

    name = "native"

    def __init__(self):
        if _NATIVE is None:
            raise ImportError(NATIVE_ERROR)

    def unsupported_reason(self, problem: HeadProblem, auto: bool = False) -> Optional[str]:
        device = problem.logits.device
        if device.type == "cuda":
            return _CUDA_ERROR
        if device.type == "cpu":
            if NATIVE_ERROR is None and auto and problem.num_classes * problem.head_width > AUTO_MAX_CPU_HEAD:
                return (f"the head has C x Dh = {problem.num_classes * problem.head_width} > {AUTO_MAX_CPU_HEAD} "
                        "entries, where the torch backend's BLAS GEMMs are faster on CPU")
            return NATIVE_ERROR
        return f"native kernels run on CPU and CUDA tensors, not {device.type}"

    def head_stats(self, problem: HeadProblem, *, gradient: bool = False, hess_diag: bool = False,
                   hvp_dirs: Optional[torch.Tensor] = None, diag_weight: str = "curvature") -> HeadStats:
        e, c, dh = problem.segments.num_envs, problem.num_classes, problem.head_width
        k = 0 if hvp_dirs is None else hvp_dirs.shape[1]
        dirs = _matrix(hvp_dirs.reshape(e, k * c, dh), problem.compute_dtype) if k else None
        out = _OPS.head_stats(*_operands(problem), diag_weight == "residual_squared", gradient, hess_diag, dirs)
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
        # the fused head term is the CPU kernels' (in plain eager mode); elsewhere torch ops add it
        fused = head is not None and problem.logits.device.type == "cpu" and plain_eager()
        d_logits, d_features, weight_grad = _OPS.per_sample_backward(
            *_operands(problem), diag_weight == "residual_squared", _matrix(grad_up, dtype), dirs, ups,
            _matrix(diag_up, dtype), *_head_args(head if fused else None, dtype, dh))
        if fused:
            return d_logits, d_features, _head_gradient(weight_grad)
        return add_head_term(d_logits, d_features, head)

    def runs_plans_whole(self, problem: HeadProblem) -> bool:
        """The CPU plans (csrc/hgk_plans.h) run in plain eager mode (traced calls take the composed path, and a
        dispatch mode's tensors are no memory to write)."""
        return problem.logits.device.type == "cpu" and plain_eager()

    def plan_forward(self, problem: HeadProblem, spec: PlanSpec):
        if not self.runs_plans_whole(problem):
            return None
        return _OPS.plan_forward(*_operands(problem), *spec)

    def autograd_plan(self, problem: HeadProblem, spec: PlanSpec):
        """The `penalty` operator, whose autograd node runs the backward in C++, for CPU float32/float64
        problems in plain eager mode whose tensors the kernels read as they are (unit feature-column stride,
        contiguous targets and ids): the node saves the caller's own tensors, so in-place changes before
        backward raise. Others: None."""
        logits, features, targets, segments = problem.logits, problem.features, problem.targets, problem.segments
        if (_NATIVE is None or logits.device.type != "cpu" or logits.dtype not in _NODE_DTYPES
                or features.stride(1) != 1 or not targets.is_contiguous() or not segments.env_ids.is_contiguous()
                or not plain_eager() or _compiled_autograd_on()):
            return None
        return _OPS.penalty(*_operands(problem), *spec)

    def forms_env_statistics(self, problem: HeadProblem) -> bool:
        """False where this call's CPU plans take pairs of samples within each environment (plain eager CPU;
        csrc/hgk_plans.h `plans_over_pairs` decides)."""
        if not self.runs_plans_whole(problem):
            return True
        return not _NATIVE.plans_over_pairs(problem.segments.offsets, problem.logits.shape[0],
                                            problem.num_classes, problem.head_width)

    def plan_backward(self, problem: HeadProblem, spec: PlanSpec, state: torch.Tensor, alpha: torch.Tensor,
                      beta: torch.Tensor, head: Optional[HeadTerm] = None):
        dtype = problem.compute_dtype
        state = state.contiguous()  # (a saved-tensor hook may hand back other strides)
        d_logits, d_features, weight_grad = _OPS.plan_backward(
            *_operands(problem), *spec, state, float(alpha), float(beta),
            *_head_args(head, dtype, problem.head_width))
        if head is None:
            return d_logits, d_features
        return d_logits, d_features, _head_gradient(weight_grad)


def _compiled_autograd_on() -> bool:
    """Compiled autograd is on (it traces Python autograd.Functions but not the C++ node's kernel call).
    Read from the modules only when already imported: importing torch._dynamo costs about a second."""
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    config = sys.modules.get("torch._dynamo.config")
    return bool((module is not None and module.compiled_autograd_enabled)
                or (config is not None and config.compiled_autograd))
