"""Hessian-diagonal alignment (the paper's Hutchinson method) for a linear head, all of it: the public
function and its options, the plans (the exact diagonal in the feature form, which a backend may run
whole, and in the sample form; the official Rademacher estimator) and the reference path's Hessian term.

    S_e = Dg_e (the exact diagonal of H_e) or (1/K) sum_k v_k ⊙ H_e v_k,   S_ref = the same on H_bar
    hessian term = R_e sum_e ||S_e - S_ref||^2                 (docs/design.md §1.4, §2.2, §2.4, §3.1)
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from .. import distributed, losses, reference as reference_path
from .._dispatch import check_targets_grad, defers_value_checks, prepared
from .._inputs import EnvsArg, HeadProblem, autocast_off, check_choice, prepare
from .._penalty import deviation_penalty, env_weight, maybe_detach
from .._sample_space import Gram, SamplePlan
from ..backends import Backend
from ..backends.base import HeadTerm, PlanSpec, add_head_term
from ._common import SHARED_CHOICES, Penalty, check_shared_options, run_penalty, takes_sample_form
from .base import Plan, WholePlan

ESTIMATORS = ("exact", "hutchinson")
# This penalty's enumerated options, checked by it and by HessianAlignmentLoss.
CHOICES = {**SHARED_CHOICES, "estimator": ESTIMATORS}
# Its options and their defaults, as its signature states them (tests/test_structure.py checks that they
# agree): what HessianAlignmentLoss accepts and what the fused head path fills in.
OPTIONS = dict(loss="cross_entropy", bias=True, estimator="exact", num_probes=300, generator=None,
               env_reduction="mean", detach_reference=True, backend="auto", num_envs=None, validate=True,
               form="auto", process_group=None, ddp_reduction="mean")
# Probe batches are sized so that one batch of directions holds about this many elements.
PROBE_BATCH_ELEMENTS = 1 << 24


@autocast_off
def hutchinson_penalty(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, envs: EnvsArg, *,
                       loss: str = "cross_entropy", bias: bool = True, estimator: str = "exact",
                       num_probes: int = 300, generator: Optional[torch.Generator] = None,
                       env_reduction: str = "mean", detach_reference: bool = True, backend: str = "auto",
                       num_envs: Optional[int] = None, validate: bool = True, form: str = "auto",
                       process_group=None, ddp_reduction: str = "mean") -> Penalty:
    """Hessian-diagonal alignment (the paper's Hutchinson method) for a linear head.

    Args:
        logits: (N, C) or (N,) head outputs ``features @ W.T + b``, any float dtype.
        features: (N, D) head inputs, same dtype and device as logits.
        labels: int class ids (N,) for ``loss="cross_entropy"``; float targets (N, C),
            or (N,) when C = 1, for ``"binary_cross_entropy"`` (with logits, in [0, 1]) and ``"mse"``.
        envs: (N,) integer environment ids in any order, or a list of per-environment
            sizes for samples grouped contiguously.
        loss: each environment's loss is torch's functional loss with mean reduction.
        bias: whether the head has a bias (its parameters join the statistics).
        estimator: ``"exact"`` (closed-form diagonal, the default) or ``"hutchinson"``
            (the official Rademacher estimator with ``num_probes`` probes per environment
            and as many for the pooled reference, drawn from ``generator``).
        env_reduction: ``"mean"`` (DomainBed) or ``"sum"`` (Colored MNIST scripts) over environments.
        detach_reference: detach the pooled reference (DomainBed) or not (Colored MNIST).
        backend: ``"auto"``, ``"torch"``, ``"reference"`` (generic autograd), or a compiled backend.
        num_envs: E when some environment ids may be absent from envs (absent ones raise).
        validate: run the scans that read every value (label range, NaN/Inf, BCE targets in [0, 1]);
            they synchronise a GPU, so ``False`` skips them in tight loops. The environment checks
            and, with a process group, the agreement across ranks run either way.
        form: how the closed form is organised (same values up to rounding): ``"feature"``
            builds the C × Dh statistics (cost ∝ N·C·Dh), ``"sample"`` works with N × N Gram
            matrices of the features (cost ∝ N²·Dh, cheaper when the batch is small against
            the classes, e.g. DomainNet's 345), ``"auto"`` picks by a cost model fitted
            to both forms' CPU times (hgkernels/_sample_space.py).
            Only the exact estimator has a sample form; ``backend="reference"`` ignores it,
            and one environment always takes the feature form (exact zeros).
        process_group: a ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD``): the
            statistics are those of the concatenation of every rank's batch, the penalty is the
            same on every rank (environments identified by id; ``num_envs`` or a size list, or it
            is agreed from every rank's ids), computed in the feature form. A rank may hold no sample
            of an environment, or none at all; it still joins. Every call first makes one agreement,
            whatever ``validate`` says (one all-gather of 40 bytes per rank, before the statistics'
            collectives): if any rank rejected its inputs or the ranks differ in an option, validate,
            num_envs, ddp_reduction, the probe generator's state, dtype, C or D, every rank raises the
            same ValueError naming the rank and its error or what differs. ``None``: this process's
            batch only.
        ddp_reduction: with a process group, how the ranks' gradients are combined afterwards:
            ``"mean"`` (DistributedDataParallel's averaging; each rank's backward returns its share
            times the world size, so the average is the global gradient) or ``"sum"`` (its share).

    Returns:
        Penalty(hessian, gradient): R_e ||Dg_e - mean Dg||^2 and R_e ||G_e - G_bar||^2.
    """
    problem, plan, reference_call = setup(
        logits, features, labels, envs, loss=loss, bias=bias, estimator=estimator, num_probes=num_probes,
        generator=generator, env_reduction=env_reduction, detach_reference=detach_reference, backend=backend,
        num_envs=num_envs, validate=validate, form=form, process_group=process_group, ddp_reduction=ddp_reduction)
    return run_penalty(problem, backend, plan, reference_call, process_group, ddp_reduction)


def setup(logits, features, labels, envs, *, loss, bias, estimator, num_probes, generator, env_reduction,
          detach_reference, backend, num_envs, validate, form, process_group, ddp_reduction):
    """`hutchinson_penalty`'s checks: (problem, plan, the reference path's call)."""
    def build(num_envs, shard):
        check_choice("estimator", estimator, ESTIMATORS)
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"num_probes must be a positive int; got {num_probes!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        check_shared_options(env_reduction, detach_reference, backend, form)
        if form == "sample" and estimator != "exact":
            raise ValueError("form='sample' needs estimator='exact': Rademacher probes live in C × Dh space")
        problem = prepare(logits, features, labels, envs, loss=loss, bias=bias, num_envs=num_envs,
                          validate=validate, shard=shard, defer_value_checks=defers_value_checks(backend, shard))
        check_targets_grad(labels, backend)
        if generator is not None and generator.device.type != problem.logits.device.type:
            raise ValueError(f"generator is on {generator.device} but logits are on {problem.logits.device}")
        if estimator == "exact" and not shard and takes_sample_form(form, problem, "hutchinson", backend):
            return problem, SampleExactDiagPlan(env_reduction, detach_reference)
        if estimator == "exact":
            return problem, ExactDiagPlan(env_reduction, detach_reference)
        return problem, StochasticDiagPlan(env_reduction, detach_reference, num_probes, generator)

    config = [("function", "hutchinson_penalty"), ("loss", loss), ("bias", bias), ("estimator", estimator),
              ("num_probes", num_probes), ("env_reduction", env_reduction), ("detach_reference", detach_reference),
              ("backend", backend), ("form", form)]
    if process_group is not None and estimator == "hutchinson":
        device = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
        config.append(("probe generator state", distributed.generator_fingerprint(generator, device)))
    problem, plan = prepared(build, process_group=process_group, ddp_reduction=ddp_reduction, envs=envs,
                             num_envs=num_envs, validate=validate, config=config, logits=logits, features=features)
    return problem, plan, lambda: reference_path.penalty(problem, env_reduction, reference_hessian_term(
        detach_reference, estimator, num_probes, generator))


def rademacher_probe(generator: Optional[torch.Generator], num_envs: int, num_classes: int, head_width: int,
                     dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One probe index's draws, (E + 1, C, Dh) of ±1: one probe per environment, then the
    independent probe for the pooled reference. Every path draws probes in this order, so
    the same generator state gives the same probes in every backend, `reference` included."""
    bits = torch.randint(0, 2, (num_envs + 1, num_classes, head_width), generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def _generator_for(device: torch.device, generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is not None:
        return generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class ExactDiagPlan(WholePlan):
    """Hutchinson method with the exact head-Hessian diagonal: S_e = Dg_e, S_ref = mean_e Dg_e."""

    method = "exact"

    def __init__(self, env_reduction: str, detach_reference: bool):
        self.env_reduction = env_reduction
        self.detach_reference = detach_reference

    @classmethod
    def from_spec(cls, spec: PlanSpec) -> "ExactDiagPlan":
        # R_e = 1 is 'sum', or 'mean' over one environment: the same penalty
        return cls("sum" if spec.weight == 1.0 else "mean", spec.detach_reference)

    def feature_form(self, generator_state=None) -> "ExactDiagPlan":
        return ExactDiagPlan(self.env_reduction, self.detach_reference)

    def plan_spec(self, problem: HeadProblem) -> PlanSpec:
        self.weight = env_weight(self.env_reduction, problem.segments.num_envs)
        return PlanSpec(self.method, self.weight, False, self.detach_reference)

    def forward(self, backend: Backend, problem: HeadProblem):
        whole = self.run_whole(backend, problem, self.plan_spec(problem))
        if whole is not None:
            return whole
        stats = backend.head_stats(problem, gradient=True, hess_diag=True)
        self.diag_dev = stats.hess_diag - maybe_detach(stats.hess_diag.mean(0), self.detach_reference)
        self.grad_dev = stats.grad - stats.grad.mean(0)
        return deviation_penalty(self.diag_dev, self.weight), deviation_penalty(self.grad_dev, self.weight)

    def backward(self, backend: Backend, problem: HeadProblem, alpha, beta, head: Optional[HeadTerm] = None):
        if self.backend_state is not None:
            return self.backward_whole(backend, problem, alpha, beta, head)
        # The reference is a mean, so deviations sum to zero and detaching it changes nothing here.
        gam = (2 * self.weight * alpha) * self.diag_dev
        lam = (2 * self.weight * beta) * self.grad_dev
        return backend.per_sample_backward(problem, grad_up=lam, diag_up=gam, head=head)


class StochasticDiagPlan(Plan):
    """The official estimator: S_e = (1/K) sum_k v_k ⊙ H_e v_k, S_ref the same on H_bar with its own probes."""

    def __init__(self, env_reduction: str, detach_reference: bool, num_probes: int,
                 generator: Optional[torch.Generator]):
        self.env_reduction = env_reduction
        self.detach_reference = detach_reference
        self.num_probes = num_probes
        self.generator = generator

    def feature_form(self, generator_state: Optional[torch.Tensor] = None) -> "StochasticDiagPlan":
        """A fresh plan; with `generator_state`, one that replays the probes drawn from that state."""
        generator = self.generator
        if generator_state is not None:
            generator = torch.Generator(device=self.device)
            generator.set_state(generator_state)
        return StochasticDiagPlan(self.env_reduction, self.detach_reference, self.num_probes, generator)

    def _probe_batches(self, problem: HeadProblem, gen: torch.Generator,
                       num_samples: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield (own (E, k, C, Dh), ref (k, C, Dh)) probe batches drawn from `gen`."""
        e, c, dh = problem.segments.num_envs, problem.num_classes, problem.head_width
        device = problem.logits.device
        per_probe = max((e + 1) * c * dh, num_samples * c)
        batch = max(1, min(self.num_probes, PROBE_BATCH_ELEMENTS // per_probe))
        for start in range(0, self.num_probes, batch):
            draws = torch.stack([rademacher_probe(gen, e, c, dh, problem.compute_dtype, device)
                                 for _ in range(min(batch, self.num_probes - start))])
            yield draws[:, :e].transpose(0, 1), draws[:, e]

    def forward(self, backend: Backend, problem: HeadProblem):
        e = problem.segments.num_envs
        self.weight = env_weight(self.env_reduction, e)
        self.device = problem.logits.device
        live = _generator_for(self.device, self.generator)
        self.state = live.get_state()  # backward replays the same probes from here
        grad = backend.head_stats(problem, gradient=True).grad
        own_sum = grad.new_zeros(grad.shape)
        ref_sum = grad.new_zeros(grad.shape[1:])
        for own, ref in self._probe_batches(problem, live, backend.num_samples(problem)):
            k = ref.shape[0]
            dirs = torch.cat([own, ref.expand(e, *ref.shape)], 1)
            # v ⊙ H v is linear in H: sum the shares and reduce once (one all-reduce across ranks)
            hv = backend.partial_head_stats(problem, hvp_dirs=dirs)
            own_sum = own_sum + (own * hv[:, :k]).sum(1)
            ref_sum = ref_sum + (ref * hv[:, k:].mean(0)).sum(0)  # H_bar v = mean_e H_e v
        sums = backend.reduce_partial(torch.cat([own_sum.flatten(), ref_sum.flatten()]))
        own_sum, ref_sum = sums[:own_sum.numel()].view_as(own_sum), sums[own_sum.numel():].view_as(ref_sum)
        self.diag, self.ref = own_sum / self.num_probes, ref_sum / self.num_probes
        self.diag_dev = self.diag - maybe_detach(self.ref, self.detach_reference)
        self.grad_dev = grad - grad.mean(0)
        return deviation_penalty(self.diag_dev, self.weight), deviation_penalty(self.grad_dev, self.weight)

    def backward(self, backend: Backend, problem: HeadProblem, alpha, beta, head: Optional[HeadTerm] = None):
        e = problem.segments.num_envs
        gam = (2 * self.weight * alpha) * self.diag_dev
        # An undetached reference receives -sum_e Gam_e, spread over H_bar = mean_e H_e.
        gam_ref = None if self.detach_reference else -gam.sum(0) / e
        lam = (2 * self.weight * beta) * self.grad_dev
        d_logits = d_features = None
        replay = torch.Generator(device=problem.logits.device)
        replay.set_state(self.state)
        grad_up = lam
        for own, ref in self._probe_batches(problem, replay, backend.num_samples(problem)):
            dirs, ups = own, gam.unsqueeze(1) * own / self.num_probes
            if gam_ref is not None:
                dirs = torch.cat([dirs, ref.expand(e, *ref.shape)], 1)
                ups = torch.cat([ups, (gam_ref * ref / self.num_probes).expand(e, *ref.shape)], 1)
            dl, df = backend.per_sample_backward(problem, grad_up=grad_up, hvp_dirs=dirs, hvp_up=ups)
            grad_up = None
            d_logits = dl if d_logits is None else d_logits + dl
            d_features = df if d_features is None else d_features + df
        # the head's term needs every probe batch's logit gradient: added once, after the last
        return add_head_term(d_logits, d_features, head)


class SampleExactDiagPlan(SamplePlan):
    """Exact Hutchinson: Dg_e = sum_{i in e} (q_i / N_e) (zh_i ⊙ zh_i)^T, Gram of squared features."""

    def feature_form(self, generator_state=None) -> ExactDiagPlan:
        return ExactDiagPlan(self.env_reduction, self.detach_reference)

    def forward(self, backend, problem: HeadProblem):
        self._setup(problem)
        self.gram_sq = Gram(self.z * self.z, problem.bias, self.same, self.num_envs)
        self.wq = self.w * losses.curvature(problem.loss, self.p)
        self.wq_k, self.wr_k = self.gram_sq.apply(self.wq), self.gram.apply(self.wr)
        hessian = self.weight * self.gram_sq.spread(self.wq, self.wq_k)
        gradient = self.weight * self.gram.spread(self.wr, self.wr_k)
        return hessian.clamp(min=0), gradient.clamp(min=0)

    def backward(self, backend, problem: HeadProblem, alpha, beta, head: Optional[HeadTerm] = None):
        self.gram.begin_backward()
        self.gram_sq.begin_backward()
        d_wq = self.gram_sq.spread_backward(self.wq, self.wq_k, self.weight * alpha)
        d_wr = self.gram.spread_backward(self.wr, self.wr_k, self.weight * beta)
        d_p = losses.curvature_slope(problem.loss, self.p) * (self.w * d_wq)
        d_z = self.gram_sq.d_phi().mul_(self.z).mul_(2)  # phi = zh ⊙ zh
        return self._finish(problem, d_p, d_wr, d_z, head)


def reference_hessian_term(detach_reference: bool, estimator: str, num_probes: int,
                           generator: Optional[torch.Generator]):
    """The Hessian term of the reference path (`reference.penalty`): each Hessian diagonal by one HVP per
    head parameter, or the official Rademacher estimator, as the official code computes them."""
    def hessian_term(start: reference_path.EnvGradients) -> torch.Tensor:
        head, env_grads, pooled_grad, grads, weight = start
        num_envs = len(env_grads)
        if estimator == "exact":
            diags = torch.stack([head.hess_diag(g) for g in env_grads])
            ref = head.hess_diag(pooled_grad)
            return deviation_penalty(diags - maybe_detach(ref, detach_reference), weight)

        c, dh = grads.shape[1], grads.shape[2]
        diags = [0.0] * num_envs
        ref = 0.0
        for _ in range(num_probes):
            probe = rademacher_probe(generator, num_envs, c, dh, grads.dtype, grads.device)
            for e, g in enumerate(env_grads):
                diags[e] = diags[e] + probe[e] * head.flat(head.hvp(g, head.split(probe[e])))
            ref = ref + probe[num_envs] * head.flat(head.hvp(pooled_grad, head.split(probe[num_envs])))
        diag_est = torch.stack(diags) / num_probes
        ref = ref / num_probes
        return deviation_penalty(diag_est - maybe_detach(ref, detach_reference), weight)

    return hessian_term
