"""Triton backend: each primitive call is one fused kernel launch over all environments.

The kernels live in `_triton_kernels` and are imported on first use, so importing
this module (which ``backend="auto"`` does) never imports triton. On CPU tensors
the kernels run only under ``TRITON_INTERPRET=1`` and only when the caller names
``backend="triton"``.

Determinism: no float atomics. `head_stats` may split a segment's row blocks over
several programs to fill the GPU; each writes its own partial tile and a torch
``.sum`` over the splits finishes in a fixed order (one extra launch per
statistic, only when it splits). Two runs give bitwise-equal results.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .._inputs import LOSSES, HeadProblem
from .base import Backend, HeadStats, HeadTerm, add_head_term


@dataclass
class TileConfig:
    """Block sizes (rounded to powers of two, at least 16 — the smallest tl.dot operand),
    warps per program, and the number of programs head_stats aims for before it splits
    segments' rows. The defaults keep every kernel within sm_90's 255 registers per
    thread (ptxas reports at most 48 bytes of spill); they are not tuned on hardware."""

    rows: int = 16
    classes: int = 32
    features: int = 32
    num_warps: int = 8
    # None: four programs per streaming multiprocessor on CUDA, one elsewhere (no split)
    min_programs: Optional[int] = None


TILES = TileConfig()
# Tests set this to fill every output with NaN before a launch, so an element a kernel
# forgets to write cannot pass unnoticed.
POISON_OUTPUTS = False
# Largest partial-statistics buffer (elements) that row splitting may allocate.
PARTIAL_BUDGET = 1 << 26


def _new_output(shape, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _block(tile: int, size: int) -> int:
    return max(16, min(_next_power_of_2(tile), _next_power_of_2(size)))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _target_programs(device: torch.device) -> int:
    if TILES.min_programs is not None:
        return TILES.min_programs
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _num_splits(problem: HeadProblem, programs: int, stat_elems: int, block_n: int) -> int:
    """Row splits per segment: enough programs to fill the device, within PARTIAL_BUDGET."""
    wanted = _cdiv(_target_programs(problem.logits.device), programs)
    return max(1, min(wanted, _cdiv(problem.segments.max_count, block_n), PARTIAL_BUDGET // stat_elems, 65535))


def _finish(part: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Sum partial statistics over the splits (dim 1) in a fixed order: deterministic, no atomics."""
    if part is None:
        return None
    return part[:, 0] if part.shape[1] == 1 else part.sum(1)


def _kernels():
    from . import _triton_kernels
    return _triton_kernels


def _rows_args(problem: HeadProblem):
    """Pointer/stride arguments of logits, features, targets, then the segments' order and offsets."""
    logits, features, targets = problem.logits, problem.features, problem.targets
    t_sc = targets.stride(1) if targets.dim() == 2 else 0
    return (logits, logits.stride(0), logits.stride(1), features, features.stride(0), features.stride(1),
            targets, targets.stride(0), t_sc, problem.segments.order, problem.segments.offsets)


def _matrix_args(mat: Optional[torch.Tensor], like: torch.Tensor):
    """(E, C, Dh) matrix and its strides; `like` stands in (never read) when absent."""
    if mat is None:
        return like, 0, 0, 0
    return mat, mat.stride(0), mat.stride(1), mat.stride(2)


def _directions_args(dirs: Optional[torch.Tensor], like: torch.Tensor):
    """(E, K, C, Dh) directions and strides; `like` stands in (never read) when absent."""
    if dirs is None:
        return like, 0, 0, 0, 0
    return (dirs, *dirs.stride())


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        if importlib.util.find_spec("triton") is None:
            raise ImportError("triton is not installed (pip install triton)")

    def unsupported_reason(self, problem: HeadProblem, auto: bool = False) -> Optional[str]:
        device = problem.logits.device
        if problem.logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"triton kernels take float32, float16 or bfloat16 inputs; got {problem.logits.dtype}"
        if device.type == "cuda":
            return None
        if device.type != "cpu":
            return f"triton kernels need CUDA tensors; got device {device}"
        if auto:
            return "backend='auto' sends CPU tensors to a CPU backend; triton on CPU is the slow interpreter"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is "
                    "imported, or pass CUDA tensors")
        return None

    def _blocks(self, problem: HeadProblem) -> Tuple[int, int, int]:
        return (_block(TILES.rows, problem.segments.max_count), _block(TILES.classes, problem.num_classes),
                _block(TILES.features, problem.head_width))

    def head_stats(self, problem: HeadProblem, *, gradient: bool = False, hess_diag: bool = False,
                   hvp_dirs: Optional[torch.Tensor] = None, diag_weight: str = "curvature") -> HeadStats:
        """Per-environment G (E, C, Dh), Dg (E, C, Dh) and H_e V_ek (E, K, C, Dh) in float32.

        One launch for G and Dg together and one for the directions, each followed by a
        fixed-order sum over row splits when it splits."""
        grad = diag = hvp = None
        if gradient or hess_diag:
            grad, diag = self._gradient_and_diag(problem, gradient, hess_diag, diag_weight == "residual_squared")
        if hvp_dirs is not None:
            hvp = self._hvp(problem, hvp_dirs.to(torch.float32))
        return HeadStats(grad, diag, hvp)

    def _gradient_and_diag(self, problem: HeadProblem, gradient: bool, hess_diag: bool, square_residual: bool):
        seg = problem.segments
        e, c, d, dh = seg.num_envs, problem.num_classes, problem.num_features, problem.head_width
        block_n, block_c, block_d = self._blocks(problem)
        tiles = _cdiv(c, block_c) * _cdiv(dh, block_d)
        splits = _num_splits(problem, tiles * e, e * c * dh * (int(gradient) + int(hess_diag)), block_n)
        grad_part = _new_output((e, splits, c, dh), problem.logits.device) if gradient else None
        diag_part = _new_output((e, splits, c, dh), problem.logits.device) if hess_diag else None
        # a statistic not asked for gets the other's buffer as a placeholder the kernel never touches
        _kernels().head_stats_kernel[(tiles, e, splits)](
            *_rows_args(problem), grad_part if gradient else diag_part, diag_part if hess_diag else grad_part,
            c, d, splits, LOSS=LOSSES.index(problem.loss), HAS_BIAS=problem.bias, GRAD=gradient, DIAG=hess_diag,
            SQUARE_RESIDUAL=square_residual, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=TILES.num_warps)
        return _finish(grad_part), _finish(diag_part)

    def _hvp(self, problem: HeadProblem, hvp_dirs: torch.Tensor) -> torch.Tensor:
        seg = problem.segments
        e, c, d, dh = seg.num_envs, problem.num_classes, problem.num_features, problem.head_width
        k = hvp_dirs.shape[1]
        block_n, block_c, block_d = self._blocks(problem)
        tiles = _cdiv(c, block_c)
        splits = _num_splits(problem, tiles * e * k, e * k * c * dh, block_n)
        hvp_part = _new_output((e, splits, k, c, dh), problem.logits.device)
        logits, features = problem.logits, problem.features
        _kernels().head_hvp_kernel[(e * k, tiles, splits)](
            logits, logits.stride(0), logits.stride(1), features, features.stride(0), features.stride(1),
            seg.order, seg.offsets, hvp_dirs, *hvp_dirs.stride(), hvp_part, c, d, k, splits,
            LOSS=LOSSES.index(problem.loss), HAS_BIAS=problem.bias,
            BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=TILES.num_warps)
        return _finish(hvp_part)

    def per_sample_backward(self, problem: HeadProblem, *, grad_up: Optional[torch.Tensor] = None,
                            diag_up: Optional[torch.Tensor] = None, hvp_dirs: Optional[torch.Tensor] = None,
                            hvp_up: Optional[torch.Tensor] = None, diag_weight: str = "curvature",
                            head: Optional[HeadTerm] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """d logits (N, C) and d features (N, D) in float32, one launch (docs/design.md §2)."""
        seg = problem.segments
        n, c, d = problem.logits.shape[0], problem.num_classes, problem.num_features
        device = problem.logits.device
        block_n, block_c, block_d = self._blocks(problem)
        d_logits, d_features = _new_output((n, c), device), _new_output((n, d), device)
        as_f32 = lambda t: None if t is None else t.to(torch.float32)
        grad_up, diag_up, hvp_dirs, hvp_up = map(as_f32, (grad_up, diag_up, hvp_dirs, hvp_up))
        k = 0 if hvp_dirs is None else hvp_dirs.shape[1]
        _kernels().per_sample_backward_kernel[(_cdiv(seg.max_count, block_n), seg.num_envs)](
            *_rows_args(problem), *_matrix_args(grad_up, d_logits), *_matrix_args(diag_up, d_logits),
            *_directions_args(hvp_dirs, d_logits), *_directions_args(hvp_up, d_logits),
            d_logits, d_features, c, d, k,
            LOSS=LOSSES.index(problem.loss), HAS_BIAS=problem.bias, GRAD_UP=grad_up is not None,
            DIAG_UP=diag_up is not None, HVP_UP=hvp_dirs is not None,
            SQUARE_RESIDUAL=diag_weight == "residual_squared",
            BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=TILES.num_warps)
        return add_head_term(d_logits, d_features, head)
