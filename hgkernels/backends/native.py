"""Native backend: the fused C++ (OpenMP) and CUDA kernels of csrc/, bound with pybind11.

The compiled modules take raw addresses, sizes and strides (no torch C++ ABI); this file
owns the tensors: it lays out the arguments, allocates outputs and work buffers, and calls the
two primitives of csrc/hgk_kernels.h, which mirror `base.Backend`. float16/bfloat16 inputs are
upcast to float32 here, so every kernel reads and accumulates in float32 or float64.
Results are deterministic: the kernels sum in a fixed order for any thread count.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

from .._inputs import HeadProblem
from .base import Backend, HeadStats

_LOSS_CODES = {"cross_entropy": 0, "binary_cross_entropy": 1, "mse": 2}


def _import(name: str):
    """The compiled module, or the ImportError text saying why it is not there."""
    try:
        return importlib.import_module(f"hgkernels.{name}"), None
    except ImportError as err:
        return None, f"hgkernels.{name} is not built ({err}); reinstall with a C++ compiler (and nvcc for CUDA)"


def _address(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class _Call:
    """One problem laid out for the kernels: tensors in the compute dtype, and the argument tuples."""

    def __init__(self, module, problem: HeadProblem):
        dtype = problem.compute_dtype
        logits = problem.logits.detach().to(dtype)
        features = problem.features.detach().to(dtype)
        if features.stride(1) != 1:  # kernels read feature rows as contiguous runs
            features = features.contiguous()
        targets = problem.targets.contiguous()
        self.module = module
        self.device = logits.device
        self.dtype = dtype
        self.is_double = dtype == torch.float64
        self.n, self.c = logits.shape
        self.d = features.shape[1]
        self.head_width = problem.head_width
        self.features = features
        segments = problem.segments
        self.num_envs = segments.num_envs
        is_ce = problem.loss == "cross_entropy"
        # Keep every tensor whose address crosses the binding alive for the call's duration.
        self._alive = (logits, features, targets, segments.order, segments.offsets)
        self.head = (logits.data_ptr(), logits.stride(0), logits.stride(1), features.data_ptr(), features.stride(0),
                     targets.data_ptr() if is_ce else 0, 0 if is_ce else targets.data_ptr(),
                     _LOSS_CODES[problem.loss], self.c, self.d, problem.bias)
        self.segments = (segments.order.data_ptr(), segments.offsets.data_ptr(), self.n, self.num_envs)
        if self.device.type == "cuda":
            self.launch = (1, torch.cuda.current_stream(self.device).cuda_stream)
        else:
            self.launch = (torch.get_num_threads(), 0)

    def empty(self, *shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def matrix(self, mats: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-environment (E, rows, Dh) matrices as the kernels read them: compute dtype, contiguous."""
        return None if mats is None else mats.to(self.dtype).contiguous()


class NativeBackend(Backend):
    """Compiled kernels: CPU tensors through hgkernels._native_cpu, CUDA tensors through _native_cuda."""

    name = "native"

    def __init__(self):
        self._cpu, self._cpu_error = _import("_native_cpu")
        self._cuda, self._cuda_error = _import("_native_cuda")
        if self._cpu is None and self._cuda is None:
            raise ImportError(self._cpu_error)

    def _module(self, device: torch.device):
        return self._cuda if device.type == "cuda" else self._cpu

    def unsupported_reason(self, problem: HeadProblem, auto: bool = False) -> Optional[str]:
        device = problem.logits.device
        if device.type not in ("cpu", "cuda"):
            return f"native kernels run on CPU and CUDA tensors, not {device.type}"
        if self._module(device) is None:
            return self._cuda_error if device.type == "cuda" else self._cpu_error
        return None

    def head_stats(self, problem: HeadProblem, *, gradient: bool = False, hess_diag: bool = False,
                   hvp_dirs: Optional[torch.Tensor] = None) -> HeadStats:
        call = _Call(self._module(problem.logits.device), problem)
        e, c, dh = call.num_envs, call.c, call.head_width
        k = 0 if hvp_dirs is None else hvp_dirs.shape[1]
        dirs = call.matrix(hvp_dirs.reshape(e, k * c, dh)) if k else None
        layout = (c, k, gradient, hess_diag)
        work = call.empty(call.n * call.module.stats_work_per_sample(layout))
        # Output rows per environment: [G (gradient)][Dg (hess_diag)][H V_k (hvp)] (csrc StatsLayout).
        out = call.empty(e, c * (int(gradient) + int(hess_diag) + k), dh)
        call.module.head_stats(call.is_double, call.head, call.segments, layout, _address(dirs), work.data_ptr(),
                               out.data_ptr(), call.launch)
        diag_begin = c if gradient else 0
        diag_end = diag_begin + (c if hess_diag else 0)
        return HeadStats(out[:, :c] if gradient else None,
                         out[:, diag_begin:diag_end] if hess_diag else None,
                         out[:, diag_end:].view(e, k, c, dh) if k else None)

    def per_sample_backward(self, problem: HeadProblem, *, grad_up: Optional[torch.Tensor] = None,
                            diag_up: Optional[torch.Tensor] = None, hvp_dirs: Optional[torch.Tensor] = None,
                            hvp_up: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        call = _Call(self._module(problem.logits.device), problem)
        e, c, dh = call.num_envs, call.c, call.head_width
        k = 0 if hvp_dirs is None else hvp_dirs.shape[1]
        # Per-environment matrices [Lam][V_k][U_k] (csrc BackwardLayout), each passed as is when contiguous.
        lam, gam = call.matrix(grad_up), call.matrix(diag_up)
        dirs = call.matrix(hvp_dirs.reshape(e, k * c, dh)) if k else None
        ups = call.matrix(hvp_up.reshape(e, k * c, dh)) if k else None
        layout = (c, k, lam is not None, gam is not None)
        work = call.empty(call.n * call.module.backward_work_per_sample(layout))
        d_logits = call.empty(call.n, c)
        d_features = call.empty(call.n, call.d)
        call.module.per_sample_backward(call.is_double, call.head, call.segments, layout, _address(lam),
                                        _address(dirs), _address(ups), _address(gam), work.data_ptr(),
                                        d_logits.data_ptr(), d_features.data_ptr(), call.launch)
        return d_logits, d_features
