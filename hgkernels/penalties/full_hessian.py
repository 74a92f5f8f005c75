"""Full head-Hessian alignment and distances between environments' head Hessians (docs/design.md §5.2).

The head Hessian of environment e is the (C·Dh) × (C·Dh) matrix

    H_e = (1/N_e) sum_{i in e} A_i ⊗ zh_i zh_i^T

(A_i the C × C logit Hessian of §1.2, zh_i the head input). It is never formed here: for signed
sample weights u, ||sum_i u_i A_i ⊗ zh_i zh_i^T||_F^2 = sum_{i,k} u_i u_k <A_i, A_k>_F (zh_i · zh_k)^2,
so every Frobenius quantity is a quadratic form in two N × N matrices:

    K_ik = zh_i · zh_k                      (features' Gram matrix, +1 with a bias)
    B_ik = <A_i, A_k>_F                     cross_entropy: (P P^T) - P (P⊙P)^T - (P⊙P) P^T + (P P^T)⊙(P P^T)
                                            binary_cross_entropy, mse: Q Q^T (A_i = diag(q_i))

With w_i = 1/N_{e(i)}, the pair weights W_ik = w_i w_k ([e(i) = e(k)] - 1/E) and R_e the reduction
(1/E for "mean", 1 for "sum"):

    hessian term  = R_e sum_e ||H_e - H_bar||_F^2 = R_e sum_{i,k} W_ik B_ik K_ik^2,   H_bar = mean_e H_e
    gradient term = R_e sum_e ||G_e - G_bar||^2   = R_e sum_{i,k} W_ik (r_i · r_k) K_ik

(the gradient term is the sample form's, docs/design.md §3.1, written with the same W).

Cost, in multiply-adds (a GEMM m × k × n counts m·k·n), N samples, C classes, D features:

    forward    N²·D (K)  +  3 N²·C cross_entropy (P P^T, P (P⊙P)^T, (W⊙K) r)
                          or 2 N²·C binary_cross_entropy / mse (Q Q^T, (W⊙K) r)     + about 10 N² elementwise
    backward   N²·D (dK zh)  +  4 N²·C cross_entropy (r r^T, Y [P, P⊙P], (Y⊙PP^T) P)
                              or 2 N²·C binary_cross_entropy (r r^T, Y Q), 1 N²·C mse (r r^T)
                                                                                  + about 10 N² elementwise
    total      2 N²·D + 7 N²·C (cross_entropy), memory: 4 N × N matrices kept for the backward.

Forming the Hessians instead costs about N·(C·Dh)² multiply-adds each way and E·(C·Dh)² memory. The
Gram form is therefore far cheaper whenever N ≲ (C·Dh)² / (D + 3.5 C): at a PACS head (C = 7,
Dh = 2049) that is any N below about 10^5, and each H_e alone would be 14343² entries (1.6 GB in
float64). It loses when C·Dh is small against N: a binary head on Colored MNIST (C = 1, Dh = 391,
N = 50,000) has a 391 × 391 Hessian, about 100 times cheaper to form than the N² Gram work, and
the N × N matrices (10 GB in float32) do not fit. No automatic switch to the explicit form exists.

`hessian_distance` uses the same identity for the Frobenius norm and, for the spectral norm,
Lanczos iterations on v -> (H_e - H_f) v with closed-form Hessian-vector products (the torch
backend's `head_stats(hvp_dirs=...)`): about 2 (E - 1) N·C·Dh multiply-adds per iteration for all
E (E - 1) / 2 pairs together (with a held-out batch of N_o samples, 2 E (N + N_o) C·Dh: every group gets
as many directions as the held-out batch).

Rounding: as in the sample form (docs/design.md §3.4) a quadratic form does not cancel like a
difference of matrices, so nearly identical environments give terms of size rounding × ||H_e||²;
they are clamped at zero. One environment gives exact zeros (W = 0 exactly).
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from .. import backends, distributed, losses
from .._dispatch import check_targets_grad, prepared
from .._inputs import EnvsArg, HeadProblem, autocast_off, check_choice, mixed_dtype, prepare
from .._penalty import deviation_penalty, env_weight, maybe_detach
from .._sample_space import same_env_mask, sample_weights, scaled_dot
from ..reference import autograd_enabled, autograd_usable, functional_loss
from ._common import SHARED_CHOICES, Penalty, check_shared_options, run_penalty
from .base import Plan

NORMS = ("fro", "spectral")
# The spectral norm's Lanczos starting vectors come from this fixed seed, so results are reproducible.
LANCZOS_SEED = 0
# The spectral tolerance is raised to this many machine epsilons of the compute dtype: residuals
# below it are rounding (about 1.9e-6 in float32, 3.6e-15 in float64).
LANCZOS_TOL_FLOOR_EPS = 16
# full_hessian_penalty's enumerated options (it has no sample/feature choice: it is the Gram form), and all
# its options with their defaults, as its signature states them (see penalties.hutchinson.OPTIONS)
CHOICES = {name: values for name, values in SHARED_CHOICES.items() if name != "form"}
OPTIONS = dict(loss="cross_entropy", bias=True, env_reduction="mean", detach_reference=True,
                            backend="auto", num_envs=None, validate=True, process_group=None, ddp_reduction="mean")


def _logit_hessian_inner(loss: str, p_left: torch.Tensor, p_right: torch.Tensor
                         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """B_ik = <A(p_left_i), A(p_right_k)>_F (N_left × N_right) and, for cross_entropy, P_left P_right^T
    (the backward needs it). Left and right are the same rows except for a detached side."""
    if loss == "cross_entropy":
        gm = p_left @ p_right.T
        half_cross = p_left @ (p_right * p_right).T
        # (P⊙P) P^T is the transpose of P (P⊙P)^T when both sides are the same rows: one GEMM, not two
        cross = half_cross + (half_cross.T if p_right is p_left else (p_left * p_left) @ p_right.T)
        return gm - cross + gm * gm, gm
    return losses.curvature(loss, p_left) @ losses.curvature(loss, p_right).T, None


def _head_gram(z_left: torch.Tensor, z_right: torch.Tensor, bias: bool) -> torch.Tensor:
    """K_ik = zh_i · zh_k: the features' Gram matrix, +1 for the bias column."""
    k = z_left @ z_right.T
    return k + 1 if bias else k


class FullHessianPlan(Plan):
    """sum_e ||H_e - H_bar||_F^2 and sum_e ||G_e - G_bar||^2 over N × N Gram matrices (module docstring).

    The forward is torch ops whatever backend is named (like the sample-form plans); the backward is
    the chain rule through K (to the features) and through p (to the logits), written out."""

    def __init__(self, env_reduction: str, detach_reference: bool):
        self.env_reduction = env_reduction
        self.detach_reference = detach_reference

    def feature_form(self, generator_state=None) -> "FullHessianPlan":
        """A fresh plan: its forward is torch ops, so autograd can differentiate it (composed path)."""
        return FullHessianPlan(self.env_reduction, self.detach_reference)

    def forward(self, backend, problem: HeadProblem):
        dtype, loss = problem.compute_dtype, problem.loss
        num_envs = problem.segments.num_envs
        self.weight = env_weight(self.env_reduction, num_envs)
        # contiguous copies: the GEMMs then give the same bits whatever the callers' strides
        z = problem.features.to(dtype).contiguous()
        p = losses.link(loss, problem.logits.to(dtype).contiguous())
        r = losses.residual(loss, p, problem.targets)
        w = sample_weights(problem, dtype)
        same = same_env_mask(problem, dtype)
        # W_ik = w_i w_k ([e(i) = e(k)] - 1/E): exactly zero for one environment
        pair_weight = (w * w.T) * (same - 1.0 / num_envs)
        k = _head_gram(z, z, problem.bias)
        weighted_k_r = (pair_weight * k) @ r
        gradient = self.weight * scaled_dot(r, weighted_k_r)
        if self.detach_reference and num_envs > 1 and torch.is_grad_enabled():
            # Autograd will differentiate this forward (composed path): detach H_bar's contribution.
            # sum_e ||H_e - sg(H_bar)||^2 = sum_e ||H_e||^2 - 2 E <H_bar, sg(H_bar)> + E ||sg(H_bar)||^2;
            # the first-order gradient is the undetached one (the deviations sum to zero), the second is not.
            ww = w * w.T
            b_full, _ = _logit_hessian_inner(loss, p, p)
            b_half, _ = _logit_hessian_inner(loss, p, p.detach())
            k_half = _head_gram(z, z.detach(), problem.bias)
            hessian = self.weight * (scaled_dot(ww * same * b_full, k * k)
                                     - (2.0 / num_envs) * scaled_dot(ww * b_half, k_half * k_half)
                                     + (1.0 / num_envs) * scaled_dot((ww * b_full).detach(), (k * k).detach()))
            return hessian.clamp(min=0), gradient.clamp(min=0)
        b, gm = _logit_hessian_inner(loss, p, p)
        hessian = self.weight * scaled_dot(pair_weight * b, k * k)
        # state for the hand-written backward (autograd saved tensors, see StateHolder)
        self.z, self.p, self.r, self.pair_weight, self.k, self.b = z, p, r, pair_weight, k, b
        self.weighted_k_r = weighted_k_r
        if gm is not None:
            self.gm = gm
        return hessian.clamp(min=0), gradient.clamp(min=0)

    def backward(self, backend, problem: HeadProblem, alpha, beta):
        loss, p, k = problem.loss, self.p, self.k
        hess_scale, grad_scale = self.weight * alpha, self.weight * beta
        # dPsi/dK (symmetric): 2 K ⊙ W ⊙ B from K², and W ⊙ (r r^T) from the gradient term
        d_k = self.pair_weight * ((2 * hess_scale) * k * self.b + grad_scale * (self.r @ self.r.T))
        # K = zh zh^T (+1) depends on both rows: d zh = (dK + dK^T) zh = 2 dK zh; the bias column is dropped
        d_features = (2 * d_k) @ self.z
        # gradient term: dPsi/dr = 2 R beta (W ⊙ K) r, and r = slope (p - target)
        d_p = (2 * grad_scale * losses.residual_slope(loss, problem.num_classes)) * self.weighted_k_r
        upstream_b = hess_scale * self.pair_weight * (k * k)  # Y = dPsi/dB, symmetric
        if loss == "cross_entropy":
            # B = PP^T - P(P⊙P)^T - (P⊙P)P^T + (PP^T)⊙(PP^T):
            # dP = 2 Y P - 2 Y (P⊙P) - 4 P ⊙ (Y P) + 4 (Y ⊙ PP^T) P
            c = p.shape[1]
            y_p = upstream_b @ torch.cat([p, p * p], 1)
            y_p1, y_p2 = y_p[:, :c], y_p[:, c:]
            d_p = d_p + 2 * (y_p1 - y_p2) - 4 * p * y_p1 + 4 * ((upstream_b * self.gm) @ p)
        elif loss == "binary_cross_entropy":
            # B = Q Q^T: dQ = 2 Y Q, through q = p (1 - p) / C
            d_q = 2 * (upstream_b @ losses.curvature(loss, p))
            d_p = d_p + losses.curvature_slope(loss, p) * d_q
        # mse: q is constant, the Hessian term does not reach the logits
        return losses.link_vjp(loss, p, d_p), d_features


@autograd_enabled
def reference_full_hessian_penalty(problem: HeadProblem, *, env_reduction: str,
                                   detach_reference: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hessian term, gradient term) by generic autograd: each environment's (C·Dh) × (C·Dh) Hessian
    from torch.autograd.functional.hessian of its loss in the flattened head parameters, H_bar the
    Hessian of the pooled mean loss. Differentiable (create_graph); slow and memory hungry: the oracle."""
    dtype, c, d = problem.compute_dtype, problem.num_classes, problem.num_features
    dh = problem.head_width
    theta = torch.zeros(c * dh, dtype=dtype, device=problem.logits.device)
    logits, features, targets = (autograd_usable(t) for t in (problem.logits, problem.features, problem.targets))

    def env_loss(env: int):
        idx = (problem.segments.env_ids == env).nonzero().squeeze(1)
        logits_e, features_e, targets_e = logits[idx].to(dtype), features[idx].to(dtype), targets[idx]

        def loss_of(flat_head: torch.Tensor) -> torch.Tensor:
            head = flat_head.view(c, dh)
            out = logits_e + features_e @ head[:, :d].T
            if problem.bias:
                out = out + head[:, d]
            return functional_loss(problem.loss, out, targets_e)
        return loss_of

    env_losses = [env_loss(e) for e in range(problem.segments.num_envs)]

    def pooled_loss(flat_head: torch.Tensor) -> torch.Tensor:
        return sum(f(flat_head) for f in env_losses) / len(env_losses)

    def gradient_of(fn) -> torch.Tensor:
        head = theta.clone().requires_grad_(True)
        return torch.autograd.grad(fn(head), head, create_graph=True)[0]

    weight = env_weight(env_reduction, len(env_losses))
    hessians = torch.stack([torch.autograd.functional.hessian(f, theta, create_graph=True) for f in env_losses])
    pooled_hessian = torch.autograd.functional.hessian(pooled_loss, theta, create_graph=True)
    grads = torch.stack([gradient_of(f) for f in env_losses])
    hessian_term = deviation_penalty(hessians - maybe_detach(pooled_hessian, detach_reference), weight)
    gradient_term = deviation_penalty(grads - gradient_of(pooled_loss), weight)
    return hessian_term, gradient_term


@autocast_off
def full_hessian_penalty(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, envs: EnvsArg, *,
                         loss: str = "cross_entropy", bias: bool = True, env_reduction: str = "mean",
                         detach_reference: bool = True, backend: str = "auto", num_envs: Optional[int] = None,
                         validate: bool = True, process_group=None, ddp_reduction: str = "mean") -> Penalty:
    """Full head-Hessian alignment: R_e sum_e ||H_e - H_bar||_F^2 over all (C·Dh)² Hessian entries.

    H_e is environment e's Hessian of its mean loss in the head parameters (weight and bias), H_bar
    their mean (the Hessian of the pooled loss mean_e L_e). The Hessians are never formed: the value and
    its hand-written backward use N × N Gram matrices (cost in the module docstring).

    Args:
        logits: (N, C) or (N,) head outputs, any float dtype (float16/bfloat16 computed in float32).
        features: (N, D) head inputs, same dtype and device as logits.
        labels: int class ids (N,) for ``"cross_entropy"``; float targets (N, C), or (N,) when C = 1,
            for ``"binary_cross_entropy"`` and ``"mse"``.
        envs: (N,) integer environment ids in any order, or a list of per-environment sizes.
        loss, bias, env_reduction, num_envs, validate: as in `hgkernels.hutchinson_penalty`.
        detach_reference: stop the gradient through H_bar. The reference is a mean, so first-order
            gradients are the same either way; it changes second derivatives (create_graph).
        backend: checked and resolved as for the other penalties; the computation is torch ops
            whichever is named (like the sample form). ``"reference"`` builds each H_e explicitly by
            autograd (`reference_full_hessian_penalty`: the oracle, slow).
        process_group, ddp_reduction: as in `hgkernels.hutchinson_penalty`. The Gram form couples
            samples across ranks, so every rank gathers the whole batch (N·(C + D) numbers) and
            computes the penalty on it (`hgkernels.distributed.GatheredPlan`).

    Returns:
        Penalty(hessian, gradient): 0-dim tensors in the compute dtype, R_e sum_e ||H_e - H_bar||_F^2 and
        R_e sum_e ||G_e - G_bar||^2 (the gradient term of the other penalties). Differentiable in logits
        and features: backward (hand-written), create_graph, torch.func.grad and jacrev.
    """
    def build(num_envs, shard):
        check_shared_options(env_reduction, detach_reference, backend, "auto")
        problem = prepare(logits, features, labels, envs, loss=loss, bias=bias, num_envs=num_envs,
                          validate=validate, shard=shard)
        check_targets_grad(labels, backend)
        plan = FullHessianPlan(env_reduction, detach_reference)
        return problem, (plan if not shard else distributed.GatheredPlan(plan, process_group, ddp_reduction))

    config = [("function", "full_hessian_penalty"), ("loss", loss), ("bias", bias),
              ("env_reduction", env_reduction), ("detach_reference", detach_reference), ("backend", backend)]
    problem, plan = prepared(build, process_group=process_group, ddp_reduction=ddp_reduction, envs=envs,
                             num_envs=num_envs, validate=validate, config=config, logits=logits, features=features)
    return run_penalty(problem, backend, plan, lambda: reference_full_hessian_penalty(
        problem, env_reduction=env_reduction, detach_reference=detach_reference), process_group, ddp_reduction)


# ---------------------------------------------------------------------------------------------------
# Distances between Hessians


def _check_distance_options(norm, tol, max_iter) -> None:
    check_choice("norm", norm, NORMS)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or not 0 < tol < 1:
        raise ValueError(f"tol must be a float in (0, 1) (relative Lanczos residual); got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}")


def _with_other(problem: HeadProblem, other, loss: str, bias: bool, validate: bool) -> HeadProblem:
    """The problem with the held-out batch appended as one more environment (id E)."""
    if not isinstance(other, (tuple, list)) or len(other) != 3:
        raise TypeError("other must be a (logits, features, labels) tuple of a held-out batch, or None")
    other_logits, other_features, other_labels = other
    for name, t, mine in (("logits", other_logits, problem.logits), ("features", other_features, problem.features)):
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:  # mixed half/float32: float32 (concatenated)
            mixed_dtype({name: mine, f"other {name}": t})
        if isinstance(t, torch.Tensor) and t.device != mine.device:
            raise ValueError(f"other {name} is on {t.device} but {name} are on {mine.device}")
    n_other = other_logits.shape[0] if isinstance(other_logits, torch.Tensor) and other_logits.dim() > 0 else 0
    try:
        held_out = prepare(other_logits, other_features, other_labels, [n_other], loss=loss, bias=bias,
                           validate=validate)
    except (TypeError, ValueError) as err:
        raise type(err)(f"other (the held-out batch): {err}") from err
    if held_out.num_classes != problem.num_classes or held_out.num_features != problem.num_features:
        raise ValueError(f"other has C = {held_out.num_classes}, D = {held_out.num_features} but logits and "
                         f"features have C = {problem.num_classes}, D = {problem.num_features}")
    num_envs = problem.segments.num_envs
    env_ids = torch.cat([problem.segments.env_ids,
                         torch.full((n_other,), num_envs, dtype=torch.int64, device=problem.logits.device)])
    return prepare(torch.cat([problem.logits, held_out.logits]), torch.cat([problem.features, held_out.features]),
                   torch.cat([problem.targets, held_out.targets]), env_ids, loss=loss, bias=bias,
                   num_envs=num_envs + 1, validate=False)


def _frobenius_distances_squared(problem: HeadProblem) -> torch.Tensor:
    """(G, G) matrix of ||H_e - H_f||_F^2 over the problem's G environments, by the Gram identity
    ||H_e - H_f||^2 = <H_e, H_e> + <H_f, H_f> - 2 <H_e, H_f>, <H_e, H_f> = sum_{i in e, k in f} w_i w_k B_ik K_ik^2."""
    dtype = problem.compute_dtype
    z = problem.features.to(dtype)
    p = losses.link(problem.loss, problem.logits.to(dtype))
    k = _head_gram(z, z, problem.bias)
    b, _ = _logit_hessian_inner(problem.loss, p, p)
    num_groups = problem.segments.num_envs
    weighted_one_hot = torch.nn.functional.one_hot(problem.segments.env_ids, num_groups).to(dtype) \
        * sample_weights(problem, dtype)
    inner = weighted_one_hot.T @ ((b * k * k) @ weighted_one_hot)
    inner = (inner + inner.T) / 2  # exactly symmetric
    self_inner = inner.diagonal()
    # a + a - 2a is exactly 0, so the diagonal is exact zeros
    return (self_inner.unsqueeze(1) + self_inner.unsqueeze(0) - 2 * inner).clamp(min=0)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) gradient where x = 0: equal environments, the diagonal."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


class _PairHVP:
    """v_k -> (H_e - H_f) v_k for a list of environment pairs (e, f), all pairs in one `head_stats` call.

    Environment g receives the directions of the pairs it belongs to (padded with zeros to the
    largest count), so each pair costs two Hessian-vector products."""

    def __init__(self, problem: HeadProblem, pairs: Sequence[Tuple[int, int]]):
        self.problem = problem
        self.backend = backends.load("torch")
        num_groups, num_pairs = problem.segments.num_envs, len(pairs)
        slots: List[List[int]] = [[] for _ in range(num_groups)]
        first_slot, second_slot = [], []
        for pair_index, (e, f) in enumerate(pairs):
            first_slot.append(len(slots[e]))
            slots[e].append(pair_index)
            second_slot.append(len(slots[f]))
            slots[f].append(pair_index)
        width = max(len(s) for s in slots)
        index = [s + [num_pairs] * (width - len(s)) for s in slots]  # num_pairs: the zero padding row
        device = problem.logits.device
        self.index = torch.tensor(index, dtype=torch.int64, device=device)
        self.first = (torch.tensor([e for e, _ in pairs], device=device), torch.tensor(first_slot, device=device))
        self.second = (torch.tensor([f for _, f in pairs], device=device), torch.tensor(second_slot, device=device))

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([v, v.new_zeros(1, *v.shape[1:])])
        hvp = self.backend.head_stats(self.problem, hvp_dirs=padded[self.index]).hvp
        return hvp[self.first] - hvp[self.second]


def _lanczos_largest_abs_eigenvalue(matvec, num: int, shape: Tuple[int, int], dtype: torch.dtype,
                                    device: torch.device, tol: float, max_iter: int) -> torch.Tensor:
    """max |eigenvalue| of `num` symmetric operators at once (matvec: (num, *shape) -> (num, *shape)).

    Plain Lanczos (three-term recurrence, no stored basis: memory of three vectors per operator). After
    each step the tridiagonal T_m's eigenpairs give the Ritz value theta of largest magnitude and its
    residual bound beta_m |s_m| (last entry of its eigenvector); an operator stops when that bound is at
    most tol · |theta|, which places an eigenvalue within tol · |theta| of theta. Loss of orthogonality
    only adds duplicate Ritz values, never a larger one. An operator not converged after max_iter steps
    keeps its last estimate, and a RuntimeWarning says so."""
    tol = max(tol, LANCZOS_TOL_FLOOR_EPS * torch.finfo(dtype).eps)
    generator = torch.Generator(device=device).manual_seed(LANCZOS_SEED)
    v = torch.randn((num, *shape), generator=generator, dtype=dtype, device=device)
    v = v / _norms(v).view(-1, 1, 1)
    v_prev = torch.zeros_like(v)
    beta_prev = v.new_zeros(num)
    alphas: List[torch.Tensor] = []
    betas: List[torch.Tensor] = []
    estimate = v.new_zeros(num)
    active = torch.ones(num, dtype=torch.bool, device=device)
    residual = v.new_zeros(num)
    for _ in range(max_iter):
        w = matvec(v)
        alpha = (w * v).sum((1, 2))
        w = w - alpha.view(-1, 1, 1) * v - beta_prev.view(-1, 1, 1) * v_prev
        # one pass of local re-orthogonalisation against v, v_prev: keeps the recurrence stable for cheap
        w = w - (w * v).sum((1, 2)).view(-1, 1, 1) * v - (w * v_prev).sum((1, 2)).view(-1, 1, 1) * v_prev
        beta = _norms(w)
        alphas.append(alpha)
        betas.append(beta)
        steps = len(alphas)
        tridiagonal = torch.diag_embed(torch.stack(alphas, 1))
        if steps > 1:
            off = torch.stack(betas[:-1], 1)
            tridiagonal = tridiagonal + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        theta, vectors = torch.linalg.eigh(tridiagonal)
        largest = theta.abs().argmax(1, keepdim=True)
        top = theta.gather(1, largest).squeeze(1).abs()
        bound = beta * vectors[:, -1, :].gather(1, largest).squeeze(1).abs()
        estimate = torch.where(active, top, estimate)
        residual = torch.where(active, bound, residual)
        active = active & ~(bound <= tol * top)
        if not bool(active.any()):
            return estimate
        # breakdown (beta = 0, an invariant subspace) leaves a zero vector: the operator stays converged
        v_prev, v = v, torch.where(beta.view(-1, 1, 1) > 0, w / beta.clamp(min=torch.finfo(dtype).tiny).view(-1, 1, 1),
                                   torch.zeros_like(w))
        beta_prev = beta
    worst = (residual / estimate.clamp(min=torch.finfo(dtype).tiny))[active].max().item()
    warnings.warn(f"hessian_distance(norm='spectral'): Lanczos did not reach tol={tol:.1e} in max_iter={max_iter} "
                  f"steps (largest relative residual bound {worst:.1e}); returning the current estimates",
                  RuntimeWarning, stacklevel=4)
    return estimate


def _norms(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1)


def _spectral_distances(problem: HeadProblem, pairs: Sequence[Tuple[int, int]], tol: float,
                        max_iter: int) -> torch.Tensor:
    """(len(pairs),) ||H_e - H_f||_2 = max |eigenvalue| of the symmetric difference, by Lanczos."""
    shape = (problem.num_classes, problem.head_width)
    return _lanczos_largest_abs_eigenvalue(_PairHVP(problem, pairs), len(pairs), shape, problem.compute_dtype,
                                           problem.logits.device, tol, max_iter)


@autocast_off
def hessian_distance(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, envs: EnvsArg, *,
                     norm: str = "fro", loss: str = "cross_entropy", bias: bool = True,
                     num_envs: Optional[int] = None, validate: bool = True, other=None, tol: float = 1e-6,
                     max_iter: int = 100) -> torch.Tensor:
    """Distances ||H_e - H_f|| between the environments' full head Hessians (weights and bias).

    Args:
        logits, features, labels, envs, loss, bias, num_envs, validate: as in `full_hessian_penalty`
            (labels are validated but the Hessians do not depend on them).
        norm: ``"fro"`` (Frobenius, closed form by the Gram identity, differentiable by autograd in logits
            and features; zero distances get a zero gradient) or ``"spectral"`` (largest |eigenvalue| of
            H_e - H_f by Lanczos on closed-form Hessian-vector products; computed under no_grad, not
            differentiable).
        other: None, or ``(logits, features, labels)`` of a held-out batch (same C, D, dtype, device;
            its loss is the mean over the batch): then the distance of each environment's Hessian to that
            batch's Hessian is returned instead of the pairwise matrix.
        tol: spectral only, in (0, 1): Lanczos stops for a pair when the residual bound of its largest
            Ritz value is at most tol times that value, so an eigenvalue lies within tol (relative) of the
            result; raised to 16 machine epsilons of the compute dtype (about 1.9e-6 in float32).
        max_iter: spectral only, positive: Lanczos steps at most (each step costs two Hessian-vector
            products per pair); a pair not converged by then keeps its estimate and a RuntimeWarning is
            issued.

    Returns:
        (E, E) symmetric tensor with exact zeros on the diagonal, or (E,) with ``other``, in the compute
        dtype (float32 for half inputs).
    """
    _check_distance_options(norm, tol, max_iter)
    problem = prepare(logits, features, labels, envs, loss=loss, bias=bias, num_envs=num_envs, validate=validate)
    num_envs = problem.segments.num_envs
    if other is not None:
        problem = _with_other(problem, other, loss, bias, validate)
    if norm == "fro":
        squared = _frobenius_distances_squared(problem)
        return _safe_sqrt(squared[:num_envs, num_envs] if other is not None else squared)
    with torch.no_grad():
        problem = problem.with_tensors(problem.logits.detach(), problem.features.detach())
        if other is not None:
            return _spectral_distances(problem, [(e, num_envs) for e in range(num_envs)], tol, max_iter)
        pairs = [(e, f) for e in range(num_envs) for f in range(e + 1, num_envs)]
        distances = problem.logits.new_zeros((num_envs, num_envs), dtype=problem.compute_dtype)
        if pairs:
            values = _spectral_distances(problem, pairs, tol, max_iter)
            rows, cols = zip(*pairs)
            distances[list(rows), list(cols)] = values
            distances[list(cols), list(rows)] = values
        return distances
