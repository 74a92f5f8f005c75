"""Penalty algebra on the small per-environment tensors (docs/design.md §1–2) and the autograd Function.

A *plan* (the contract: `penalties.base.Plan`) turns backend statistics into the two
penalty terms (forward) and turns the upstream weights (alpha, beta) into the upstream
matrices the backend's per-sample backward consumes (Gam, Lam, M). `PenaltyFunction`
is the only place that knows about autograd; backends only see tensors.

A plan's forward is also an ordinary differentiable function of the statistics: with
statistics that autograd can differentiate (the torch backend, or the native operators
under torch.compile) it is the *composed* path, used where the hand-written backward
cannot serve — torch.compile, torch.func transforms and double backward.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from ._inputs import HeadProblem, autocast_off, check_deferred_values
from .backends import Backend
from .penalties.base import WholePlan, put_state, take_state


def env_weight(env_reduction: str, num_envs: int) -> float:
    """R_e: 'mean' over environments (DomainBed) or 'sum' (Colored MNIST scripts)."""
    return 1.0 / num_envs if env_reduction == "mean" else 1.0


def deviation_penalty(deviation: torch.Tensor, weight: float) -> torch.Tensor:
    """R_e ||S_e - S_ref||^2 from the deviations S_e - S_ref, summed over all C x Dh entries.

    Plans keep the deviations: the backward's upstream matrices are 2 R_e alpha (S_e - S_ref)."""
    return weight * deviation.square().sum()


def maybe_detach(t: torch.Tensor, detach: bool) -> torch.Tensor:
    return t.detach() if detach else t


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
    @autocast_off
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
        node = backend.autograd_plan(problem, plan.plan_spec(problem))
        if node is not None:
            check_deferred_values(problem, node[1])
            return node
    return PenaltyFunction.apply(problem.logits, problem.features, problem, backend, plan)
