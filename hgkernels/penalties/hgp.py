"""Hessian-gradient-product alignment (the paper's HGP method) for a linear head, all of it: the public
function and its options, the plans (feature form, which a backend may run whole, and sample form) and
the reference path's Hessian term.

    S_e = H_e G_e,   S_ref = H_bar G_bar (pooled, official) or mean_e H_e G_e
    hessian term = R_e sum_e ||S_e - S_ref||^2                 (docs/design.md §1.4, §2.3, §3.2)
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import losses, reference as reference_path
from .._dispatch import check_targets_grad, defers_value_checks, prepared
from .._inputs import EnvsArg, HeadProblem, autocast_off, check_choice, prepare
from .._penalty import deviation_penalty, env_weight, maybe_detach
from .._sample_space import SamplePlan, rowwise, scaled_dot
from ..backends import Backend
from ..backends.base import HeadTerm, PlanSpec
from ._common import SHARED_CHOICES, Penalty, check_shared_options, run_penalty, takes_sample_form
from .base import WholePlan

REFERENCES = ("pooled", "mean")
# This penalty's enumerated options, checked by it and by HessianAlignmentLoss.
CHOICES = {**SHARED_CHOICES, "reference": REFERENCES}
# Its options and their defaults, as its signature states them (see hutchinson.OPTIONS).
OPTIONS = dict(loss="cross_entropy", bias=True, reference="pooled", env_reduction="mean", detach_reference=True,
               backend="auto", num_envs=None, validate=True, form="auto", process_group=None, ddp_reduction="mean")


@autocast_off
def hgp_penalty(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, envs: EnvsArg, *,
                loss: str = "cross_entropy", bias: bool = True, reference: str = "pooled",
                env_reduction: str = "mean", detach_reference: bool = True, backend: str = "auto",
                num_envs: Optional[int] = None, validate: bool = True, form: str = "auto",
                process_group=None, ddp_reduction: str = "mean") -> Penalty:
    """Hessian-gradient-product alignment (the paper's HGP method) for a linear head.

    Arguments as in `hutchinson_penalty` (``form``, ``process_group`` and ``ddp_reduction`` included),
    plus ``reference``: ``"pooled"`` (official: H_bar G_bar, the pooled loss's Hessian times its
    gradient) or ``"mean"`` (mean_e H_e G_e).

    Returns:
        Penalty(hessian, gradient): R_e ||H_e G_e - ref||^2 and R_e ||G_e - G_bar||^2.
    """
    problem, plan, reference_call = setup(
        logits, features, labels, envs, loss=loss, bias=bias, reference=reference, env_reduction=env_reduction,
        detach_reference=detach_reference, backend=backend, num_envs=num_envs, validate=validate, form=form,
        process_group=process_group, ddp_reduction=ddp_reduction)
    return run_penalty(problem, backend, plan, reference_call, process_group, ddp_reduction)


def setup(logits, features, labels, envs, *, loss, bias, reference, env_reduction, detach_reference, backend,
          num_envs, validate, form, process_group, ddp_reduction):
    """`hgp_penalty`'s checks: (problem, plan, the reference path's call)."""
    def build(num_envs, shard):
        check_choice("reference", reference, REFERENCES)
        check_shared_options(env_reduction, detach_reference, backend, form)
        problem = prepare(logits, features, labels, envs, loss=loss, bias=bias, num_envs=num_envs,
                          validate=validate, shard=shard, defer_value_checks=defers_value_checks(backend, shard))
        check_targets_grad(labels, backend)
        if not shard and takes_sample_form(form, problem, "hgp", backend):
            return problem, SampleHGPPlan(env_reduction, detach_reference, reference)
        return problem, HGPPlan(env_reduction, detach_reference, reference)

    config = [("function", "hgp_penalty"), ("loss", loss), ("bias", bias), ("reference", reference),
              ("env_reduction", env_reduction), ("detach_reference", detach_reference), ("backend", backend),
              ("form", form)]
    problem, plan = prepared(build, process_group=process_group, ddp_reduction=ddp_reduction, envs=envs,
                             num_envs=num_envs, validate=validate, config=config, logits=logits, features=features)
    return problem, plan, lambda: reference_path.penalty(problem, env_reduction,
                                                         reference_hessian_term(detach_reference, reference))


class HGPPlan(WholePlan):
    """HGP: S_e = H_e G_e; S_ref = H_bar G_bar (pooled, official) or mean_e H_e G_e."""

    method = "hgp"

    def __init__(self, env_reduction: str, detach_reference: bool, reference: str):
        self.env_reduction = env_reduction
        self.detach_reference = detach_reference
        self.reference = reference

    @classmethod
    def from_spec(cls, spec: PlanSpec) -> "HGPPlan":
        # R_e = 1 is 'sum' (or 'mean' over one environment); not pooled is 'mean' (or one environment,
        # where the two references coincide): the same penalty either way
        return cls("sum" if spec.weight == 1.0 else "mean", spec.detach_reference,
                   "pooled" if spec.pooled else "mean")

    def feature_form(self, generator_state=None) -> "HGPPlan":
        return HGPPlan(self.env_reduction, self.detach_reference, self.reference)

    def plan_spec(self, problem: HeadProblem) -> PlanSpec:
        e = problem.segments.num_envs
        self.weight = env_weight(self.env_reduction, e)
        # With one environment the pooled and mean references coincide; the mean keeps the penalty exactly 0.
        self.pooled = self.reference == "pooled" and e > 1
        return PlanSpec(self.method, self.weight, self.pooled, self.detach_reference)

    def forward(self, backend: Backend, problem: HeadProblem):
        whole = self.run_whole(backend, problem, self.plan_spec(problem))
        if whole is not None:
            return whole
        self.grad = backend.head_stats(problem, gradient=True).grad
        self.grad_mean = grad_mean = self.grad.mean(0)
        dirs = [self.grad]
        if self.pooled:
            dirs.append(grad_mean.expand_as(self.grad))
        hv = backend.head_stats(problem, hvp_dirs=torch.stack(dirs, 1)).hvp
        hgp = hv[:, 0]
        ref = hv[:, 1].mean(0) if self.pooled else hgp.mean(0)
        self.hgp_dev = hgp - maybe_detach(ref, self.detach_reference)
        self.grad_dev = self.grad - grad_mean
        return deviation_penalty(self.hgp_dev, self.weight), deviation_penalty(self.grad_dev, self.weight)

    def backward(self, backend: Backend, problem: HeadProblem, alpha, beta, head: Optional[HeadTerm] = None):
        if self.backend_state is not None:
            return self.backward_whole(backend, problem, alpha, beta, head)
        e = problem.segments.num_envs
        gam = (2 * self.weight * alpha) * self.hgp_dev
        lam = (2 * self.weight * beta) * self.grad_dev
        dirs: List[torch.Tensor] = [self.grad]
        ups: List[torch.Tensor] = [gam]
        if self.pooled and not self.detach_reference:
            # S_ref = (1/E) sum_e H_e G_bar receives -sum_e Gam_e.
            dirs.append(self.grad_mean.expand_as(self.grad))
            ups.append((-gam.sum(0) / e).expand_as(gam))
        dirs_t, ups_t = torch.stack(dirs, 1), torch.stack(ups, 1)
        # dPsi/dV = H_e U: the gradient reaching the directions G_e (and G_bar, shared out by 1/E).
        dir_grads = backend.head_stats(problem, hvp_dirs=ups_t).hvp
        total_grad_up = lam + dir_grads[:, 0]
        if dir_grads.shape[1] == 2:
            total_grad_up = total_grad_up + dir_grads[:, 1].sum(0) / e
        return backend.per_sample_backward(problem, grad_up=total_grad_up, hvp_dirs=dirs_t, hvp_up=ups_t, head=head)


class SampleHGPPlan(SamplePlan):
    """HGP: s_i = G_e zh_i = (Kb wr)_i, t_i = A_i s_i, H_e G_e = sum_{i in e} w_i t_i zh_i^T.

    The pooled reference H_bar G_bar = sum_j (w_j / E) u_j zh_j^T with u_j = A_j (K wr)_j / E."""

    def __init__(self, env_reduction: str, detach_reference: bool, reference: str):
        super().__init__(env_reduction, detach_reference)
        self.reference = reference
        self.pooled = reference == "pooled"

    def feature_form(self, generator_state=None) -> HGPPlan:
        return HGPPlan(self.env_reduction, self.detach_reference, self.reference)

    def forward(self, backend, problem: HeadProblem):
        self._setup(problem)
        loss, p, e, gram = problem.loss, self.p, self.num_envs, self.gram
        self.wr_k = gram.apply(self.wr)
        self.s = self.wr_k[0]
        self.a = self.w * rowwise(loss, losses.hess_apply, p, self.s)  # H_e G_e coefficients
        self.a_k = gram.apply(self.a)
        if self.pooled:
            self.s_ref = self.wr_k[1] / e  # G_bar zh_i
            self.b = self.w * rowwise(loss, losses.hess_apply, p, self.s_ref) / e  # reference coefficients
            # sum_e ||X_e - Y||^2 = <a, Kb a> - 2 <a, K b> + E <b, K b>, as one dot (see scaled_dot)
            self.k_b = gram.k @ self.b
            hessian = scaled_dot(torch.cat([self.a, e * self.b]), torch.cat([self.a_k[0] - 2 * self.k_b, self.k_b]))
        else:
            hessian = gram.spread(self.a, self.a_k)
        gradient = gram.spread(self.wr, self.wr_k)
        return (self.weight * hessian).clamp(min=0), (self.weight * gradient).clamp(min=0)

    def backward(self, backend, problem: HeadProblem, alpha, beta, head: Optional[HeadTerm] = None):
        loss, p, e, gram = problem.loss, self.p, self.num_envs, self.gram
        gram.begin_backward()
        scale = self.weight * alpha
        d_wr = gram.spread_backward(self.wr, self.wr_k, self.weight * beta)
        undetached_pooled = self.pooled and not self.detach_reference
        if self.pooled:
            d_a = (2 * scale) * (self.a_k[0] - self.k_b)
            gram.masked.append((scale * self.a, self.a))
            cross = ((-2 * scale) * self.a, self.b)  # <a, K b>: the b side is the reference
            (gram.full if undetached_pooled else gram.rows).append(cross)
        else:
            d_a = gram.spread_backward(self.a, self.a_k, scale)
        d_t = self.w * d_a
        d_s = rowwise(loss, losses.hess_apply, p, d_t)  # A_i is symmetric
        d_p = rowwise(loss, losses.hess_apply_grad_p, p, self.s, d_t)
        gram.masked.append((d_s, self.wr))
        if undetached_pooled:
            d_b = (2 * scale) * (e * self.k_b - self.a_k[1])
            gram.full.append(((scale * e) * self.b, self.b))
            d_u = self.w * d_b / e
            d_s_ref = rowwise(loss, losses.hess_apply, p, d_u)
            d_p = d_p + rowwise(loss, losses.hess_apply_grad_p, p, self.s_ref, d_u)
            gram.full.append((d_s_ref / e, self.wr))
            c = d_s.shape[1]
            kb_d, k_d = gram.apply(torch.cat([d_s, d_s_ref], 1))
            d_wr = d_wr + kb_d[:, :c] + k_d[:, c:] / e
        else:
            d_wr = d_wr + gram.kb @ d_s
        return self._finish(problem, d_p, d_wr, None, head)


def reference_hessian_term(detach_reference: bool, reference: str):
    """The Hessian term of the reference path (`reference.penalty`): H_e G_e by autograd's double backward,
    as the official code computes it."""
    def hessian_term(start: reference_path.EnvGradients) -> torch.Tensor:
        head, env_grads, pooled_grad, _grads, weight = start
        hgps = torch.stack([head.flat(head.hvp(g, g)) for g in env_grads])
        if reference == "pooled":
            ref = head.flat(head.hvp(pooled_grad, pooled_grad))
        else:
            ref = hgps.mean(0)
        return deviation_penalty(hgps - maybe_detach(ref, detach_reference), weight)

    return hessian_term
