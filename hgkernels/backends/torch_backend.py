"""Closed form in plain torch ops (DESIGN.md §1–2), all environments at once.

Samples are laid out as (E, Nmax, ...) — one row block per environment, padded
to the largest one — so every per-environment reduction is one batched GEMM and
there is no Python loop over environments. When the environments arrive
grouped and equally sized (DomainBed's concatenated minibatches) the layout is
a view, not a copy. Padded rows carry zero coefficients, so they never reach a sum.
"""
from __future__ import annotations

from functools import cached_property
from typing import List, Optional, Tuple

import torch

from .. import losses
from .._inputs import EnvSegments, HeadProblem
from .base import Backend, HeadStats


class _PaddedLayout:
    def __init__(self, segments: EnvSegments):
        self.num_envs = segments.num_envs
        self.max_count = segments.max_count
        self.num_samples = segments.env_ids.numel()
        self.is_view = segments.grouped and len(set(segments.counts)) == 1
        self.segments = segments

    @cached_property
    def slot_is_sample(self) -> torch.Tensor:
        """(E, Nmax) bool: which padded slots hold a real sample."""
        slot = torch.arange(self.max_count, device=self.segments.device)
        return slot < self.segments.counts_tensor.unsqueeze(1)

    @cached_property
    def sample_index(self) -> torch.Tensor:
        """(E, Nmax) sample index of each slot; padded slots repeat a real sample (any finite row will do)."""
        slot = torch.arange(self.max_count, device=self.segments.device)
        position = (self.segments.offsets[:-1].unsqueeze(1) + slot).clamp(max=self.num_samples - 1)
        return self.segments.order[position]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_view:
            return x.reshape(self.num_envs, self.max_count, *x.shape[1:])
        return x[self.sample_index]

    def scatter(self, xp: torch.Tensor) -> torch.Tensor:
        if self.is_view:
            return xp.reshape(self.num_samples, *xp.shape[2:])
        out = xp.new_empty(self.num_samples, *xp.shape[2:])
        out[self.sample_index[self.slot_is_sample]] = xp[self.slot_is_sample]
        return out

    def row_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(E, Nmax, 1): 1/N_e on real samples, 0 on padding."""
        inv_count = 1.0 / self.segments.counts_tensor.to(dtype)
        if self.is_view:
            return inv_count.view(-1, 1, 1).expand(-1, self.max_count, 1)
        return (self.slot_is_sample.to(dtype) * inv_count.unsqueeze(1)).unsqueeze(-1)


def _outer_sum(coef: torch.Tensor, z: torch.Tensor, bias: bool) -> torch.Tensor:
    """sum_i coef_i zh_i^T per environment: (E, Nmax, C') x (E, Nmax, D) -> (E, C', Dh)."""
    weight = coef.transpose(1, 2) @ z
    return torch.cat([weight, coef.sum(1).unsqueeze(-1)], -1) if bias else weight


def _apply(mat: torch.Tensor, z: torch.Tensor, bias: bool) -> torch.Tensor:
    """mat_e zh_i per sample: (E, C', Dh) x (E, Nmax, D) -> (E, Nmax, C')."""
    d = z.shape[-1]
    out = z @ mat[..., :d].transpose(1, 2)
    return out + mat[..., d].unsqueeze(1) if bias else out


class _Layout:
    """One problem's padded tensors, upcast to the compute dtype."""

    def __init__(self, problem: HeadProblem):
        dtype = problem.compute_dtype
        self.pad = _PaddedLayout(problem.segments)
        self.bias = problem.bias
        self.loss = problem.loss
        self.z = self.pad.gather(problem.features).to(dtype)
        self.p = losses.link(problem.loss, self.pad.gather(problem.logits).to(dtype))
        self.targets = self.pad.gather(problem.targets)
        self.weight = self.pad.row_weight(dtype)


class TorchBackend(Backend):
    name = "torch"

    def head_stats(self, problem: HeadProblem, *, gradient: bool = False, hess_diag: bool = False,
                   hvp_dirs: Optional[torch.Tensor] = None) -> HeadStats:
        lay = _Layout(problem)
        grad = diag = hvp = None
        if gradient:
            r = losses.residual(lay.loss, lay.p, lay.targets)
            grad = _outer_sum(r * lay.weight, lay.z, lay.bias)
        if hess_diag:
            q = losses.curvature(lay.loss, lay.p)
            diag = _outer_sum(q * lay.weight, lay.z * lay.z, lay.bias)
        if hvp_dirs is not None:
            e, k, c, dh = hvp_dirs.shape
            s = _apply(hvp_dirs.reshape(e, k * c, dh), lay.z, lay.bias).unflatten(-1, (k, c))
            t = losses.hess_apply(lay.loss, lay.p, s) * lay.weight.unsqueeze(-1)
            hvp = _outer_sum(t.flatten(-2), lay.z, lay.bias).view(e, k, c, dh)
        return HeadStats(grad, diag, hvp)

    def per_sample_backward(self, problem: HeadProblem, *, grad_up: Optional[torch.Tensor] = None,
                            diag_up: Optional[torch.Tensor] = None, hvp_dirs: Optional[torch.Tensor] = None,
                            hvp_up: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        lay = _Layout(problem)
        d = problem.num_features
        dp = torch.zeros_like(lay.p)
        # d features = sum of coef_i @ mat_e[:, :D] over these pairs, done as one batched GEMM
        coefs: List[torch.Tensor] = []
        mats: List[torch.Tensor] = []
        dz_diag = None
        if grad_up is not None:
            r = losses.residual(lay.loss, lay.p, lay.targets)
            dr = _apply(grad_up, lay.z, lay.bias) * lay.weight
            dp = dp + losses.residual_slope(lay.loss, problem.num_classes) * dr
            coefs.append(r * lay.weight)
            mats.append(grad_up)
        if diag_up is not None:
            q = losses.curvature(lay.loss, lay.p)
            dq = _apply(diag_up, lay.z * lay.z, lay.bias) * lay.weight
            dp = dp + losses.curvature_slope(lay.loss, lay.p) * dq
            dz_diag = 2 * lay.z * ((q * lay.weight) @ diag_up[..., :d])
        if hvp_dirs is not None:
            e, k, c, dh = hvp_dirs.shape
            dirs, ups = hvp_dirs.reshape(e, k * c, dh), hvp_up.reshape(e, k * c, dh)
            s = _apply(dirs, lay.z, lay.bias).unflatten(-1, (k, c))
            tau = _apply(ups, lay.z, lay.bias).unflatten(-1, (k, c)) * lay.weight.unsqueeze(-1)
            t = losses.hess_apply(lay.loss, lay.p, s) * lay.weight.unsqueeze(-1)
            sig = losses.hess_apply(lay.loss, lay.p, tau)
            dp = dp + losses.hess_apply_grad_p(lay.loss, lay.p, s, tau)
            coefs += [t.flatten(-2), sig.flatten(-2)]
            mats += [ups, dirs]
        dz = torch.cat(coefs, -1) @ torch.cat(mats, 1)[..., :d] if coefs else torch.zeros_like(lay.z)
        if dz_diag is not None:
            dz = dz + dz_diag
        d_logits = losses.link_vjp(lay.loss, lay.p, dp)
        return lay.pad.scatter(d_logits), lay.pad.scatter(dz)
