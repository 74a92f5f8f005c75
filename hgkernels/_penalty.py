"""Penalty algebra on the small per-environment tensors (docs/design.md §1–2) and the autograd Function.

A *plan* (the contract: `penalties.base.Plan`) turns backend statistics into the two
penalty terms (forward) and turns the upstream weights (alpha, beta) into the upstream
matrices the backend's per-sample backward consumes (Gam, Lam, M). `PenaltyFunction`
is the only place that knows about autograd; backends only see tensors.

A plan's forward is also an ordinary differentiable function of the statistics: with
statistics that autograd can differentiate (the torch backend, or the native custom op
under torch.compile) it is the *composed* path, used where the hand-written backward
cannot serve — torch.compile, torch.func transforms and double backward.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from ._inputs import HeadProblem, check_deferred_values
from .backends import Backend
from .backends.base import HeadTerm, PlanSpec, add_head_term
from .penalties.base import Plan, WholePlan, put_state, take_state

# Probe batches are sized so that one batch of directions holds about this many elements.
PROBE_BATCH_ELEMENTS = 1 << 24


def env_weight(env_reduction: str, num_envs: int) -> float:
    """R_e: 'mean' over environments (DomainBed) or 'sum' (Colored MNIST scripts)."""
    return 1.0 / num_envs if env_reduction == "mean" else 1.0


def deviation_penalty(deviation: torch.Tensor, weight: float) -> torch.Tensor:
    """R_e ||S_e - S_ref||^2 from the deviations S_e - S_ref, summed over all C x Dh entries.

    Plans keep the deviations: the backward's upstream matrices are 2 R_e alpha (S_e - S_ref)."""
    return weight * deviation.square().sum()


def rademacher_probe(generator: Optional[torch.Generator], num_envs: int, num_classes: int, head_width: int,
                     dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One probe index's draws, (E + 1, C, Dh) of ±1: one probe per environment, then the
    independent probe for the pooled reference. Every path draws probes in this order, so
    the same generator state gives the same probes in every backend, `reference` included."""
    bits = torch.randint(0, 2, (num_envs + 1, num_classes, head_width), generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def maybe_detach(t: torch.Tensor, detach: bool) -> torch.Tensor:
    return t.detach() if detach else t


def _generator_for(device: torch.device, generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is not None:
        return generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class ExactDiagPlan(WholePlan):
    """Hutchinson method with the exact head-Hessian diagonal: S_e = Dg_e, S_ref = mean_e Dg_e."""

    def __init__(self, env_reduction: str, detach_reference: bool):
        self.env_reduction = env_reduction
        self.detach_reference = detach_reference

    def feature_form(self, generator_state=None) -> "ExactDiagPlan":
        return ExactDiagPlan(self.env_reduction, self.detach_reference)

    def plan_spec(self, problem: HeadProblem) -> PlanSpec:
        self.weight = env_weight(self.env_reduction, problem.segments.num_envs)
        return PlanSpec("exact", self.weight, False, self.detach_reference)

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


class HGPPlan(WholePlan):
    """HGP: S_e = H_e G_e; S_ref = H_bar G_bar (pooled, official) or mean_e H_e G_e."""

    def __init__(self, env_reduction: str, detach_reference: bool, reference: str):
        self.env_reduction = env_reduction
        self.detach_reference = detach_reference
        self.reference = reference

    def feature_form(self, generator_state=None) -> "HGPPlan":
        return HGPPlan(self.env_reduction, self.detach_reference, self.reference)

    def plan_spec(self, problem: HeadProblem) -> PlanSpec:
        e = problem.segments.num_envs
        self.weight = env_weight(self.env_reduction, e)
        # With one environment the pooled and mean references coincide; the mean keeps the penalty exactly 0.
        self.pooled = self.reference == "pooled" and e > 1
        return PlanSpec("hgp", self.weight, self.pooled, self.detach_reference)

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


DOUBLE_BACKWARD_NOTE = ("the hand-written backward is not itself differentiable, so with create_graph=True "
                        "hgkernels differentiates the torch closed form by autograd instead")


def differentiable_grads(outputs_fn, inputs: Sequence[torch.Tensor], upstream):
    """The vector-Jacobian product <upstream, d outputs_fn(*inputs) / d inputs> as a differentiable graph,
    for a backward run with create_graph=True; outputs_fn recomputes the outputs with torch ops.

    torch.func.vjp treats the inputs as the variables (partial derivatives: logits and features are
    often functions of each other through the head, and that path is autograd's to add), while the
    result stays differentiable in them for the next order."""
    with torch.enable_grad():
        _, vjp = torch.func.vjp(outputs_fn, *inputs)
        grads = vjp(upstream)
    return [g if t.requires_grad else None for g, t in zip(grads, inputs)]


def create_graph_grads(feature_plan, problem: HeadProblem, logits, features, alpha, beta):
    """A create_graph=True backward (DOUBLE_BACKWARD_NOTE): the gradients of alpha * hessian + beta *
    gradient by autograd through `feature_plan`'s forward on the torch backend, as a differentiable graph."""
    return differentiable_grads(
        lambda lg, ft: feature_plan.forward(_torch_backend(), problem.with_tensors(lg, ft)), (logits, features),
        (alpha, beta))


def replayed_feature_form(plan, slots, state):
    """For a double backward: the plan's feature form, replaying the forward's probes from the generator
    state it saved (stochastic estimator); `slots`/`state` as `take_state` left them."""
    put_state(slots, state)
    generator_state = getattr(plan, "state", None)
    take_state(plan, slots)
    return plan.feature_form(generator_state)


def _torch_backend() -> Backend:
    from .backends import load
    return load("torch")


class PenaltyFunction(torch.autograd.Function):
    """(logits, features) -> (hessian term, gradient term), backward by the plan's closed form.

    Everything the backward reads is an autograd saved tensor: the inputs, the targets and
    environment ids (so changing them in place before backward raises, as torch's own losses
    do) and the plan's state (freed after backward unless retain_graph)."""

    @staticmethod
    def forward(ctx, logits, features, problem: HeadProblem, backend: Backend, plan):
        problem = problem.with_tensors(logits, features)
        hessian, gradient = plan.forward(backend, problem)
        check_deferred_values(problem, gradient)
        ctx.slots, state = take_state(plan)
        ctx.save_for_backward(logits, features, problem.targets, problem.segments.env_ids, *state)
        ctx.problem, ctx.backend, ctx.plan = problem.with_tensors(None, None), backend, plan
        return hessian, gradient

    @staticmethod
    def backward(ctx, alpha, beta):
        logits, features, targets, _env_ids, *state = ctx.saved_tensors
        problem = ctx.problem.with_tensors(logits, features, targets)
        if torch.is_grad_enabled():  # create_graph=True: see DOUBLE_BACKWARD_NOTE
            if not ctx.backend.differentiable_again:
                raise RuntimeError("create_graph=True (double backward) through a penalty with a process_group is "
                                   "not supported: the collectives run inside the hand-written backward")
            plan = replayed_feature_form(ctx.plan, ctx.slots, state)
            return (*create_graph_grads(plan, problem, logits, features, alpha, beta), None, None, None)
        put_state(ctx.slots, state)
        try:
            d_logits, d_features = ctx.plan.backward(ctx.backend, problem, alpha, beta)
        finally:
            take_state(ctx.plan, ctx.slots)
        return d_logits.to(logits.dtype), d_features.to(features.dtype), None, None, None


def penalty_function(problem: HeadProblem, backend: Backend, plan) -> Tuple[torch.Tensor, torch.Tensor]:
    """The penalty's (hessian, gradient) with autograd: the backend's compiled node for a whole plan where
    it has one (`Backend.autograd_plan`: no Python in the backward), else `PenaltyFunction`."""
    if isinstance(plan, WholePlan):
        template = problem.with_tensors(None, None)  # the node holds no reference to the inputs themselves

        def double_backward(logits, features, targets, alpha, beta):
            return create_graph_grads(plan.feature_form(), template.with_tensors(logits, features, targets),
                                      logits, features, alpha, beta)

        node = backend.autograd_plan(problem, plan.plan_spec(problem), double_backward)
        if node is not None:
            check_deferred_values(problem, node[1])
            return node
    return PenaltyFunction.apply(problem.logits, problem.features, problem, backend, plan)
