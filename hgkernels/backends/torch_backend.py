"""Closed form in plain torch ops (docs/design.md §1–2), all environments at once.

Samples are laid out as (E, Nmax, ...) — one row of slots per environment, padded
to the largest one — so every per-environment reduction is one batched GEMM and
there is no Python loop over environments. The slots are walked in chunks of
about `CHUNK_ELEMENTS`: each chunk's temporaries (squared features, directions
applied to features, ...) stay in cache instead of being N × D allocations, and
shuffled environments are gathered one chunk at a time. When the environments
arrive grouped and equally sized (DomainBed's concatenated minibatches) a chunk
is a view, not a copy. Padded slots carry zero weight, so they never reach a sum.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch

from .. import losses
from .._inputs import EnvSegments, HeadProblem
from .base import Backend, HeadStats, HeadTerm, add_head_term

# Elements of the widest per-chunk temporary (E × rows × max(D, K·C)): about 2 MB in float32.
CHUNK_ELEMENTS = 1 << 19


class _PaddedLayout:
    def __init__(self, segments: EnvSegments):
        self.num_envs = segments.num_envs
        self.max_count = segments.max_count
        self.num_samples = segments.env_ids.numel()
        self.is_view = segments.grouped and segments.counts is not None and len(set(segments.counts)) == 1
        counts = segments.counts_tensor.to(torch.float64)
        # an environment absent from a rank's shard (hgkernels.distributed) has no samples and weight 0
        self.inv_count = torch.where(counts > 0, 1.0 / counts.clamp(min=1), 0.0)
        if not self.is_view:
            slot = torch.arange(self.max_count, device=segments.device)
            # (E, Nmax): which padded slots hold a real sample, and the sample index of each slot
            # (padded slots repeat a real sample: any finite row will do)
            self.slot_is_sample = slot < segments.counts_tensor.unsqueeze(1)
            position = (segments.offsets[:-1].unsqueeze(1) + slot).clamp(max=self.num_samples - 1)
            self.sample_index = segments.order[position]

    def gather(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """(E, rows, ...) of x's samples in slots `rows`."""
        if self.is_view:
            return x.view(self.num_envs, self.max_count, *x.shape[1:])[:, rows]
        return x[self.sample_index[:, rows]]

    def scatter_into(self, out: torch.Tensor, values: torch.Tensor, rows: slice) -> None:
        """Write the real slots of `values` (E, rows, ...) into their samples' rows of `out`."""
        if self.is_view:
            out.view(self.num_envs, self.max_count, *out.shape[1:])[:, rows] = values
        else:
            real = self.slot_is_sample[:, rows]
            out[self.sample_index[:, rows][real]] = values[real]

    def row_weight(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """(E, rows, 1): 1/N_e on real samples, 0 on padding."""
        inv_count = self.inv_count.to(dtype)
        if self.is_view:
            return inv_count.view(-1, 1, 1).expand(-1, rows.stop - rows.start, 1)
        return (self.slot_is_sample[:, rows].to(dtype) * inv_count.unsqueeze(1)).unsqueeze(-1)


class _OuterSum:
    """Accumulates sum_i coef_i zh_i^T per environment over chunks: weight (E, C', D) and bias (E, C')
    parts kept apart (contiguous GEMM output), joined into (E, C', Dh) once at the end."""

    def __init__(self, bias: bool):
        self.bias = bias
        self.weight: Optional[torch.Tensor] = None
        self.bias_part: Optional[torch.Tensor] = None

    def add(self, coef: torch.Tensor, z: torch.Tensor) -> None:
        coef_t = coef.transpose(1, 2)
        if self.weight is None:
            self.weight = coef_t @ z
            self.bias_part = coef.sum(1) if self.bias else None
        else:
            self.weight.baddbmm_(coef_t, z)
            if self.bias:
                self.bias_part += coef.sum(1)

    def result(self) -> torch.Tensor:
        return torch.cat([self.weight, self.bias_part.unsqueeze(-1)], -1) if self.bias else self.weight


def _apply(mat: torch.Tensor, z: torch.Tensor, bias: bool) -> torch.Tensor:
    """mat_e zh_i per sample: (E, C', Dh) x (E, n, D) -> (E, n, C')."""
    d = z.shape[-1]
    out = z @ mat[..., :d].transpose(1, 2)
    return out + mat[..., d].unsqueeze(1) if bias else out


class _Chunk:
    """One chunk of slots of a problem, upcast to the compute dtype."""

    def __init__(self, problem: HeadProblem, pad: _PaddedLayout, rows: slice):
        dtype = problem.compute_dtype
        self.rows = rows
        self.bias = problem.bias
        self.loss = problem.loss
        self.z = pad.gather(problem.features, rows).to(dtype)
        self.p = losses.link(problem.loss, pad.gather(problem.logits, rows).to(dtype))
        self.targets = pad.gather(problem.targets, rows)
        self.weight = pad.row_weight(rows, dtype)


def _chunks(problem: HeadProblem, pad: _PaddedLayout, width: int) -> Iterator[_Chunk]:
    """Walk the slots in chunks whose widest temporary (E × rows × width) holds about CHUNK_ELEMENTS."""
    rows = max(1, CHUNK_ELEMENTS // (pad.num_envs * max(width, problem.num_features)))
    for start in range(0, pad.max_count, rows):
        yield _Chunk(problem, pad, slice(start, min(start + rows, pad.max_count)))


def _diag_weight(diag_weight: str, ch: "_Chunk") -> torch.Tensor:
    """The row weights of the hess_diag slot: q (the exact Hessian diagonal) or r ⊙ r (the second
    moment of the per-sample gradients, Fishr)."""
    if diag_weight == "residual_squared":
        return losses.residual(ch.loss, ch.p, ch.targets).square()
    return losses.curvature(ch.loss, ch.p)


def _direction_width(hvp_dirs: Optional[torch.Tensor]) -> int:
    return 0 if hvp_dirs is None else hvp_dirs.shape[1] * hvp_dirs.shape[2]


class TorchBackend(Backend):
    name = "torch"

    def head_stats(self, problem: HeadProblem, *, gradient: bool = False, hess_diag: bool = False,
                   hvp_dirs: Optional[torch.Tensor] = None, diag_weight: str = "curvature") -> HeadStats:
        pad = _PaddedLayout(problem.segments)
        e, c, dh = pad.num_envs, problem.num_classes, problem.head_width
        grad, diag, hvp = _OuterSum(problem.bias), _OuterSum(problem.bias), _OuterSum(problem.bias)
        if hvp_dirs is not None:
            k = hvp_dirs.shape[1]
            dirs = hvp_dirs.reshape(e, k * c, dh)
        for ch in _chunks(problem, pad, _direction_width(hvp_dirs)):
            if gradient:
                grad.add(losses.residual(ch.loss, ch.p, ch.targets) * ch.weight, ch.z)
            if hess_diag:
                diag.add(_diag_weight(diag_weight, ch) * ch.weight, ch.z * ch.z)
            if hvp_dirs is not None:
                s = _apply(dirs, ch.z, ch.bias).unflatten(-1, (k, c))
                t = losses.hess_apply(ch.loss, ch.p, s) * ch.weight.unsqueeze(-1)
                hvp.add(t.flatten(-2), ch.z)
        return HeadStats(grad.result() if gradient else None, diag.result() if hess_diag else None,
                         hvp.result().view(e, k, c, dh) if hvp_dirs is not None else None)

    def per_sample_backward(self, problem: HeadProblem, *, grad_up: Optional[torch.Tensor] = None,
                            diag_up: Optional[torch.Tensor] = None, hvp_dirs: Optional[torch.Tensor] = None,
                            hvp_up: Optional[torch.Tensor] = None, diag_weight: str = "curvature",
                            head: Optional[HeadTerm] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        pad = _PaddedLayout(problem.segments)
        d, dtype = problem.num_features, problem.compute_dtype
        d_logits = problem.logits.new_empty(problem.logits.shape, dtype=dtype)
        d_features = problem.features.new_empty(problem.features.shape, dtype=dtype)
        if hvp_dirs is not None:
            e, k, c, dh = hvp_dirs.shape
            dirs, ups = hvp_dirs.reshape(e, k * c, dh), hvp_up.reshape(e, k * c, dh)
        # d features = sum over (coef, mat) pairs of coef_i @ mat_e[:, :D] (mats read in place, not concatenated)
        mats: List[torch.Tensor] = ([grad_up[..., :d]] if grad_up is not None else []) + (
            [ups[..., :d], dirs[..., :d]] if hvp_dirs is not None else [])
        for ch in _chunks(problem, pad, 2 * _direction_width(hvp_dirs)):
            dp = torch.zeros_like(ch.p)
            coefs: List[torch.Tensor] = []
            if grad_up is not None:
                dr = _apply(grad_up, ch.z, ch.bias) * ch.weight
                dp += losses.residual_slope(ch.loss, problem.num_classes) * dr
                coefs.append(losses.residual(ch.loss, ch.p, ch.targets) * ch.weight)
            if hvp_dirs is not None:
                s = _apply(dirs, ch.z, ch.bias).unflatten(-1, (k, c))
                tau = _apply(ups, ch.z, ch.bias).unflatten(-1, (k, c)) * ch.weight.unsqueeze(-1)
                t = losses.hess_apply(ch.loss, ch.p, s) * ch.weight.unsqueeze(-1)
                sig = losses.hess_apply(ch.loss, ch.p, tau)
                dp += losses.hess_apply_grad_p(ch.loss, ch.p, s, tau)
                coefs += [t.flatten(-2), sig.flatten(-2)]
            dz = coefs[0] @ mats[0] if coefs else torch.zeros_like(ch.z)
            for coef, mat in zip(coefs[1:], mats[1:]):
                dz.baddbmm_(coef, mat)
            if diag_up is not None:
                z_sq = ch.z * ch.z
                dq = _apply(diag_up, z_sq, ch.bias) * ch.weight
                if diag_weight == "residual_squared":  # q = r ⊙ r, and dr/dp is the constant residual slope
                    r = losses.residual(ch.loss, ch.p, ch.targets)
                    q = r.square()
                    dp += (2 * losses.residual_slope(ch.loss, problem.num_classes)) * r * dq
                else:
                    q = losses.curvature(ch.loss, ch.p)
                    dp += losses.curvature_slope(ch.loss, ch.p) * dq
                # 2 zh ⊙ (Gam^T q / N_e), reusing the squared-feature buffer
                torch.matmul(q * (2 * ch.weight), diag_up[..., :d], out=z_sq)
                dz.addcmul_(ch.z, z_sq)
            pad.scatter_into(d_logits, losses.link_vjp(ch.loss, ch.p, dp), ch.rows)
            pad.scatter_into(d_features, dz, ch.rows)
        return add_head_term(d_logits, d_features, head)
