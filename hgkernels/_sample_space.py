"""The penalties in sample space: N × N Gram matrices instead of C × Dh statistics.

Every statistic is a sum over samples X_e = sum_{i in e} x_i phi_i^T (x_i a C-vector,
phi_i = zh_i, or zh_i ⊙ zh_i for the Hessian diagonal), so every squared norm the
penalties need is a quadratic form in the Gram matrix K_ij = phi_i . phi_j (docs/design.md
§3.1). With E environments and the mean reference,

    sum_e ||X_e - mean_f X_f||^2 = <x, (K ⊙ same) x> - <x, K x> / E,

`same` the same-environment mask and <x, K y> = sum_ij K_ij x_i . y_j. HGP's H_e G_e
also stays in sample space: G_e zh_i = sum_{j in e} K_ij r_j / N_e. The cost is one
N² Dh GEMM each way (forward Gram, backward dPsi/dK times the features) plus N² C
terms, against about 6–13 N C Dh for the C × Dh form: the cheaper choice when the
batch is small against the number of classes (DomainNet's 345-class head).

Rounding: a quadratic form does not cancel the way a difference of statistics does, so
with nearly identical environments the terms come out as rounding × ||X_e||^2 rather
than rounding^2; they are clamped at zero, which they are mathematically bounded by.

This module holds what the sample-form plans share (`Gram`, `SamplePlan`, the cost model); each plan,
forward and written-out backward (chain rule through the N × N and N × C algebra), lives in its
penalty's module (`SampleExactDiagPlan` in penalties/hutchinson.py, `SampleHGPPlan` in penalties/hgp.py).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import losses
from ._inputs import HeadProblem
from ._penalty import env_weight
from .penalties.base import Plan, StateHolder
from .backends.base import HeadTerm, add_head_term

# Cost model for form="auto", fitted to fwd+bwd times of both forms on the 2-core CPU
# (N 24–1536, C 7–1000, D 128–4096; benchmarks/RESULTS.md): the C × Dh form costs FEATURE_COST
# N·C·Dh multiply-adds but runs them at about half the Gram GEMMs' rate and pays about
# FEATURE_OVERHEAD multiply-adds' worth of extra small ops; the sample form costs SAMPLE_GRAM_COST
# N²·Dh (Gram GEMMs) plus SAMPLE_QUAD_COST N²·C (quadratic forms and masks). The model is
# conservative at sub-millisecond heads: PACS's exact penalty keeps the C × Dh form, which the
# torch backend runs about 30% slower than the sample form there but the native kernels
# (what auto uses on CPU) run about 40% faster. The compiled kernels' rate is better than the torch
# backend's since their small-batch paths (one-row backward up to 32 matrix rows, `reduce_few`):
# PACS's HGP took 1.2 ms in their C × Dh form against 1.3–1.6 ms in the sample form (2 threads),
# where the torch backend's C × Dh form took 3.0 ms; so the slowdown is 2 for the torch backend and
# 1.5 for the others (native, triton). Below TINY_HEAD = N·C·Dh the arithmetic is
# negligible and the host path decides: the sample form's many small N × N and N × C ops took
# 660 µs against 315 µs for the native C × Dh form at N 12, C 3, D 5, so tiny heads keep the latter.
# The C × Dh form also forms and walks the E per-environment statistics (the torch and Triton plans hold a
# few (E, C, Dh) matrices; the native CPU plans in runs hold none but form them twice, and over pairs form
# none: `Backend.forms_env_statistics`, and the caller then passes num_envs 1), which the sample form's cost
# does not depend on:
# negligible while they are small, FEATURE_ENV_COST per entry beyond SMALL_STATS entries (1 MB in
# float32). Fitted to benchmarks/many_envs.py (its table is in docs/performance.md): DomainNet's head
# with 256 environments takes the sample form, PACS's keeps the C × Dh form, still the faster there.
FEATURE_COST = {"hutchinson": 6, "hgp": 13}
FEATURE_ENV_COST = 512
SMALL_STATS = 1 << 18
FEATURE_SLOWDOWN = {"torch": 2.0, "compiled": 1.5}
FEATURE_OVERHEAD = 10_000_000
TINY_HEAD = 1 << 16
SAMPLE_GRAM_COST = {"hutchinson": 4, "hgp": 2}
SAMPLE_QUAD_COST = {"hutchinson": 6, "hgp": 14}


def tiny_head(n: int, c: int, dh: int) -> bool:
    """Heads so small that the C × Dh form is taken whatever the backend (see TINY_HEAD)."""
    return n * c * dh < TINY_HEAD


def prefers_sample_space(method: str, n: int, c: int, dh: int, backend: str = "torch", num_envs: int = 1) -> bool:
    """True when the sample form should be faster for `method` ("hutchinson", "hgp") on N samples,
    C classes, head width Dh and `num_envs` environments, the C × Dh form running on `backend` (the
    cost model above)."""
    if tiny_head(n, c, dh):
        return False
    slowdown = FEATURE_SLOWDOWN["torch" if backend == "torch" else "compiled"]
    feature = (slowdown * FEATURE_COST[method] * n * c * dh + FEATURE_OVERHEAD
               + FEATURE_ENV_COST * max(0, num_envs * c * dh - SMALL_STATS))
    sample = SAMPLE_GRAM_COST[method] * n * n * dh + SAMPLE_QUAD_COST[method] * n * n * c
    return sample < feature


def sample_space_possible(method: str, n: int, c: int, dh: int, num_envs: int = 1) -> bool:
    """Whether the sample form could be faster on some backend: against the slowest C × Dh form."""
    slowest = max(FEATURE_SLOWDOWN, key=FEATURE_SLOWDOWN.get)
    return prefers_sample_space(method, n, c, dh, slowest, num_envs)


def _power_of_two_above(x: torch.Tensor) -> torch.Tensor:
    """A power of two >= max |x| (1 for x = 0): dividing by it is exact and brings x to [-1, 1]."""
    _, exponent = torch.frexp(x.detach().abs().amax())
    return torch.ldexp(torch.ones_like(x.detach().abs().amax()), exponent)


def scaled_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum(x * y) with x and y scaled by powers of two, so that products of large entries (float32
    MSE logits near 1e30) overflow to ±inf in the total, as in the feature form, rather than
    producing inf - inf = NaN inside the sum."""
    sx, sy = _power_of_two_above(x), _power_of_two_above(y)
    return ((x / sx) * (y / sy)).sum() * sx * sy


def rowwise(loss: str, fn, p: torch.Tensor, *vectors: torch.Tensor) -> torch.Tensor:
    """A losses.* direction function on one direction per sample: (N, C) vectors against p (N, C)."""
    out = fn(loss, p, *(v.unsqueeze(1) for v in vectors))
    return out.squeeze(1) if out.dim() == 3 else out


class Gram(StateHolder):
    """K = phi phi^T (+ 1 with a bias column) over all samples and its same-environment part
    Kb = K ⊙ same, stacked so one GEMM gives both (Kb x, K x).

    The backward collects dPsi/dK as outer-product terms dPsi/dK_ij += l_i . r_j in three groups,
    each summed by one GEMM at the end: ``masked`` (entries of Kb) and ``full`` (entries of K),
    live in phi_i and phi_j; ``rows``, live in phi_i only (the phi_j side is a detached reference)."""

    def __init__(self, phi: torch.Tensor, bias: bool, same: torch.Tensor, num_envs: int):
        self.phi = phi
        k = phi @ phi.T
        if bias:
            k += 1
        self.same = same
        self.num_envs = num_envs
        self.n = phi.shape[0]
        self.stacked = torch.cat([k * same, k])  # (2N, N)

    @property
    def k(self) -> torch.Tensor:
        return self.stacked[self.n:]

    @property
    def kb(self) -> torch.Tensor:
        return self.stacked[:self.n]

    def apply(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(Kb x, K x)."""
        both = self.stacked @ x
        return both[:self.n], both[self.n:]

    def spread(self, x: torch.Tensor, kx: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """sum_e ||X_e - mean_f X_f||^2, with kx = apply(x)."""
        return scaled_dot(x, kx[0] - kx[1] / self.num_envs)

    def begin_backward(self) -> None:
        """Fresh dPsi/dK terms (a graph may be backpropagated through more than once)."""
        self.masked: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.full: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.rows: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def spread_backward(self, x: torch.Tensor, kx: Tuple[torch.Tensor, torch.Tensor],
                        scale: torch.Tensor) -> torch.Tensor:
        """dPsi/dx for Psi = scale * spread(x); adds its dPsi/dK."""
        self.masked.append((scale * x, x))
        self.full.append((-scale / self.num_envs * x, x))
        return (2 * scale) * (kx[0] - kx[1] / self.num_envs)

    def d_phi(self, add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
        """dPsi/dphi from the collected dPsi/dK terms (K_ij depends on phi_i and phi_j), added in
        place to `add_to` when given (one GEMM, no N × D temporary)."""
        def outer(terms):
            return torch.cat([l for l, _ in terms], 1) @ torch.cat([r for _, r in terms], 1).T
        both_sides = self.same * outer(self.masked)  # every plan has the gradient term's spread here
        if self.full:
            both_sides += outer(self.full)
        d_k = both_sides + both_sides.T
        if self.rows:
            d_k += outer(self.rows)
        self.masked = self.full = self.rows = None  # this backward's terms; a retained graph starts afresh
        if add_to is None:
            return d_k @ self.phi
        return add_to.addmm_(d_k, self.phi)


def same_env_mask(problem: HeadProblem, dtype: torch.dtype) -> torch.Tensor:
    env = problem.segments.env_ids
    return (env.unsqueeze(1) == env.unsqueeze(0)).to(dtype)


def sample_weights(problem: HeadProblem, dtype: torch.dtype) -> torch.Tensor:
    """(N, 1): 1/N_e of each sample's environment."""
    inv_count = 1.0 / problem.segments.counts_tensor.to(dtype)
    return inv_count[problem.segments.env_ids].unsqueeze(1)


class SamplePlan(Plan):
    """Shared set-up: p, r, per-sample weights and the feature Gram matrix."""

    def __init__(self, env_reduction: str, detach_reference: bool):
        self.env_reduction = env_reduction
        self.detach_reference = detach_reference

    def _setup(self, problem: HeadProblem) -> None:
        dtype = problem.compute_dtype
        self.num_envs = problem.segments.num_envs
        self.weight = env_weight(self.env_reduction, self.num_envs)
        # contiguous copies: the GEMMs then give the same bits whatever the callers' strides
        self.z = problem.features.to(dtype).contiguous()
        self.p = losses.link(problem.loss, problem.logits.to(dtype).contiguous())
        self.w = sample_weights(problem, dtype)
        self.same = same_env_mask(problem, dtype)
        self.gram = Gram(self.z, problem.bias, self.same, self.num_envs)
        self.wr = self.w * losses.residual(problem.loss, self.p, problem.targets)  # G_e = sum_{i in e} wr_i zh_i^T

    def _finish(self, problem: HeadProblem, d_p: torch.Tensor, d_wr: torch.Tensor, d_z: Optional[torch.Tensor],
                head: Optional[HeadTerm]):
        """dPsi/dlogits, dPsi/dfeatures from dPsi/dp (residual path excluded), dPsi/dwr and the
        features' gradient through other Gram matrices (None when there are none); plus a fused head."""
        d_p = d_p + losses.residual_slope(problem.loss, problem.num_classes) * (self.w * d_wr)
        return add_head_term(losses.link_vjp(problem.loss, self.p, d_p), self.gram.d_phi(add_to=d_z), head)
