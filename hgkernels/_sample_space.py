"""The penalties in sample space: N × N Gram matrices instead of C × Dh statistics.

Every statistic is a sum over samples X_e = sum_{i in e} x_i phi_i^T (x_i a C-vector,
phi_i = zh_i, or zh_i ⊙ zh_i for the Hessian diagonal), so every squared norm the
penalties need is a quadratic form in the Gram matrix K_ij = phi_i . phi_j (DESIGN.md
§1, last paragraph). With E environments and the mean reference,

    sum_e ||X_e - mean_f X_f||^2 = <x, (K ⊙ same) x> - <x, K x> / E,

`same` the same-environment mask and <x, K y> = sum_ij K_ij x_i . y_j. HGP's H_e G_e
also stays in sample space: G_e zh_i = sum_{j in e} K_ij r_j / N_e. The cost is one
N² Dh GEMM each way (forward Gram, backward dPsi/dK times the features) plus N² C
terms, against about 6–13 N C Dh for the C × Dh form: the cheaper choice when the
batch is small against the number of classes (DomainNet's 345-class head).

Rounding: a quadratic form does not cancel the way a difference of statistics does, so
with nearly identical environments the terms come out as rounding × ||X_e||^2 rather
than rounding^2; they are clamped at zero, which they are mathematically bounded by.
The backward is written out below (chain rule through the N × N and N × C algebra).
"""
from __future__ import annotations

import torch

from . import losses
from ._inputs import HeadProblem
from ._penalty import env_weight

# Cost model for form="auto", fitted to fwd+bwd times of both forms on the 2-core CPU
# (N 24–1536, C 7–1000, D 128–4096; benchmarks/RESULTS.md): the C × Dh form costs FEATURE_COST
# N·C·Dh multiply-adds but runs them at about half the Gram GEMMs' rate and pays about
# FEATURE_OVERHEAD multiply-adds' worth of extra small ops; the sample form costs SAMPLE_GRAM_COST
# N²·Dh (Gram GEMMs) plus SAMPLE_QUAD_COST N²·C (quadratic forms and masks).
FEATURE_COST = {"hutchinson": 6, "hgp": 13}
FEATURE_SLOWDOWN = 2
FEATURE_OVERHEAD = 10_000_000
SAMPLE_GRAM_COST = {"hutchinson": 4, "hgp": 2}
SAMPLE_QUAD_COST = {"hutchinson": 6, "hgp": 14}


def prefers_sample_space(method: str, n: int, c: int, dh: int) -> bool:
    """True when the sample form should be faster for `method` ("hutchinson", "hgp") on N samples,
    C classes and head width Dh (the cost model above)."""
    feature = FEATURE_SLOWDOWN * FEATURE_COST[method] * n * c * dh + FEATURE_OVERHEAD
    sample = SAMPLE_GRAM_COST[method] * n * n * dh + SAMPLE_QUAD_COST[method] * n * n * c
    return sample < feature


def _rows(loss: str, fn, p: torch.Tensor, *vectors: torch.Tensor) -> torch.Tensor:
    """A losses.* direction function on one direction per sample: (N, C) vectors against p (N, C)."""
    out = fn(loss, p, *(v.unsqueeze(1) for v in vectors))
    return out.squeeze(1) if out.dim() == 3 else out


class _Gram:
    """K = phi phi^T (+ 1 with a bias column) over all samples, its same-environment part, and the
    gradient dPsi/dK accumulated as the backward goes: ``dk`` for entries K_ij live in both phi_i
    and phi_j, ``dk_rows`` for entries whose phi_j side belongs to a detached reference."""

    def __init__(self, phi: torch.Tensor, bias: bool, same: torch.Tensor, num_envs: int):
        self.phi = phi
        self.k = phi @ phi.T
        if bias:
            self.k += 1
        self.same = same
        self.kb = self.k * same
        self.num_envs = num_envs

    def begin_backward(self) -> None:
        """Fresh dPsi/dK accumulators (a graph may be backpropagated through more than once)."""
        self.dk = torch.zeros_like(self.k)
        self.dk_rows = torch.zeros_like(self.k)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """sum_e ||X_e - mean_f X_f||^2."""
        return (x * (self.kb @ x)).sum() - (x * (self.k @ x)).sum() / self.num_envs

    def spread_backward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """dPsi/dx for Psi = scale * spread(x); adds its dPsi/dK."""
        self.dk += scale * (self.same - 1.0 / self.num_envs) * (x @ x.T)
        return (2 * scale) * (self.kb @ x - (self.k @ x) / self.num_envs)

    def d_phi(self) -> torch.Tensor:
        """dPsi/dphi from the accumulated dPsi/dK (K_ij depends on phi_i and phi_j)."""
        return (self.dk + self.dk.T + self.dk_rows) @ self.phi


def _same_env(problem: HeadProblem, dtype: torch.dtype) -> torch.Tensor:
    env = problem.segments.env_ids
    return (env.unsqueeze(1) == env.unsqueeze(0)).to(dtype)


def _sample_weight(problem: HeadProblem, dtype: torch.dtype) -> torch.Tensor:
    """(N, 1): 1/N_e of each sample's environment."""
    inv_count = 1.0 / problem.segments.counts_tensor.to(dtype)
    return inv_count[problem.segments.env_ids].unsqueeze(1)


class _SamplePlan:
    """Shared set-up: p, r, per-sample weights and the feature Gram matrix."""

    def __init__(self, env_reduction: str):
        self.env_reduction = env_reduction

    def _setup(self, problem: HeadProblem) -> None:
        dtype = problem.compute_dtype
        self.num_envs = problem.segments.num_envs
        self.weight = env_weight(self.env_reduction, self.num_envs)
        # contiguous copies: the GEMMs then give the same bits whatever the callers' strides
        self.z = problem.features.to(dtype).contiguous()
        self.p = losses.link(problem.loss, problem.logits.to(dtype).contiguous())
        self.w = _sample_weight(problem, dtype)
        self.same = _same_env(problem, dtype)
        self.gram = _Gram(self.z, problem.bias, self.same, self.num_envs)
        self.wr = self.w * losses.residual(problem.loss, self.p, problem.targets)  # G_e = sum_{i in e} wr_i zh_i^T

    def _finish(self, problem: HeadProblem, d_p: torch.Tensor, d_wr: torch.Tensor, d_z: torch.Tensor):
        """dPsi/dlogits, dPsi/dfeatures from dPsi/dp (residual path excluded), dPsi/dwr and the direct dz."""
        d_p = d_p + losses.residual_slope(problem.loss, problem.num_classes) * (self.w * d_wr)
        return losses.link_vjp(problem.loss, self.p, d_p), d_z + self.gram.d_phi()


class SampleExactDiagPlan(_SamplePlan):
    """Exact Hutchinson: Dg_e = sum_{i in e} (q_i / N_e) (zh_i ⊙ zh_i)^T, Gram of squared features."""

    def forward(self, backend, problem: HeadProblem):
        self._setup(problem)
        self.gram_sq = _Gram(self.z * self.z, problem.bias, self.same, self.num_envs)
        self.wq = self.w * losses.curvature(problem.loss, self.p)
        hessian = self.weight * self.gram_sq.spread(self.wq)
        gradient = self.weight * self.gram.spread(self.wr)
        return hessian.clamp(min=0), gradient.clamp(min=0)

    def backward(self, backend, problem: HeadProblem, alpha, beta):
        self.gram.begin_backward()
        self.gram_sq.begin_backward()
        d_wq = self.gram_sq.spread_backward(self.wq, self.weight * alpha)
        d_wr = self.gram.spread_backward(self.wr, self.weight * beta)
        d_p = losses.curvature_slope(problem.loss, self.p) * (self.w * d_wq)
        d_z = 2 * self.z * self.gram_sq.d_phi()
        return self._finish(problem, d_p, d_wr, d_z)


class SampleHGPPlan(_SamplePlan):
    """HGP: s_i = G_e zh_i = (Kb wr)_i, t_i = A_i s_i, H_e G_e = sum_{i in e} w_i t_i zh_i^T.

    The pooled reference H_bar G_bar = sum_j (w_j / E) u_j zh_j^T with u_j = A_j (K wr)_j / E."""

    def __init__(self, env_reduction: str, detach_reference: bool, reference: str):
        super().__init__(env_reduction)
        self.detach_reference = detach_reference
        self.pooled = reference == "pooled"

    def forward(self, backend, problem: HeadProblem):
        self._setup(problem)
        loss, p, e, gram = problem.loss, self.p, self.num_envs, self.gram
        self.s = gram.kb @ self.wr
        self.a = self.w * _rows(loss, losses.hess_apply, p, self.s)  # H_e G_e coefficients
        if self.pooled:
            self.s_ref = (gram.k @ self.wr) / e  # G_bar zh_i
            self.b = self.w * _rows(loss, losses.hess_apply, p, self.s_ref) / e  # reference coefficients
            # sum_e ||X_e - Y||^2 = <a, Kb a> - 2 <a, K b> + E <b, K b>
            self.k_b = gram.k @ self.b
            hessian = (self.a * (gram.kb @ self.a)).sum() - 2 * (self.a * self.k_b).sum() + e * (self.b * self.k_b).sum()
        else:
            hessian = gram.spread(self.a)
        gradient = gram.spread(self.wr)
        return (self.weight * hessian).clamp(min=0), (self.weight * gradient).clamp(min=0)

    def backward(self, backend, problem: HeadProblem, alpha, beta):
        loss, p, e, gram = problem.loss, self.p, self.num_envs, self.gram
        gram.begin_backward()
        scale = self.weight * alpha
        d_wr = gram.spread_backward(self.wr, self.weight * beta)
        if self.pooled:
            d_a = (2 * scale) * (gram.kb @ self.a - self.k_b)
            gram.dk += scale * self.same * (self.a @ self.a.T)
            cross = (-2 * scale) * (self.a @ self.b.T)  # <a, K b>: the b side is the reference
            if self.detach_reference:
                gram.dk_rows += cross
            else:
                gram.dk += cross
                d_b = (2 * scale) * (e * self.k_b - gram.k @ self.a)
                gram.dk += (scale * e) * (self.b @ self.b.T)
                d_u = self.w * d_b / e
                d_s_ref = _rows(loss, losses.hess_apply, p, d_u)
                d_p_ref = _rows(loss, losses.hess_apply_grad_p, p, self.s_ref, d_u)
                d_wr = d_wr + (gram.k @ d_s_ref) / e
                gram.dk += (d_s_ref @ self.wr.T) / e
        else:
            d_a = gram.spread_backward(self.a, scale)
        d_t = self.w * d_a
        d_s = _rows(loss, losses.hess_apply, p, d_t)  # A_i is symmetric
        d_p = _rows(loss, losses.hess_apply_grad_p, p, self.s, d_t)
        if self.pooled and not self.detach_reference:
            d_p = d_p + d_p_ref
        d_wr = d_wr + gram.kb @ d_s
        gram.dk += self.same * (d_s @ self.wr.T)
        return self._finish(problem, d_p, d_wr, torch.zeros_like(self.z))
