"""The contract every penalty plan implements (beside `backends.base`, the backends' contract).

A *plan* is one penalty's algebra on top of the backend primitives: ``forward`` turns the backend's
per-environment statistics into the two penalty terms, ``backward`` turns their upstream weights
(alpha, beta) into the logits' and features' gradients, through the backend's per-sample backward
(docs/design.md §2). `_penalty.PenaltyFunction` (and `fused_head.HeadFunction`) are the only callers
that know about autograd; a plan sees tensors.

Two forms. A *feature-form* plan works on the C × Dh statistics (`Backend.head_stats`), so any backend
(and `hgkernels.distributed.GlobalStats`, which all-reduces them) runs it. A *sample-form* plan works on
N × N Gram matrices of the samples (docs/design.md §3) with torch ops, whatever backend is named; it
cannot span ranks. Every plan names its feature-form twin (`feature_form`): the *composed* path
(torch.compile, torch.func, double backward) differentiates that twin's forward by autograd.

State. Between forward and backward a plan keeps its intermediate tensors as attributes
(`StateHolder`); `PenaltyFunction` moves them into autograd's saved tensors after the forward and puts
them back for each backward, so autograd frees them (unless retain_graph) and catches in-place changes.
A plan object serves one forward and the backward(s) of that graph.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .._inputs import HeadProblem
from ..backends.base import Backend, HeadTerm, PlanSpec


class StateHolder:
    """An object whose tensor attributes (and tuples of them) are state a backward needs.

    `PenaltyFunction` moves that state into autograd's saved tensors after the forward, so
    autograd frees it after backward (unless retain_graph) and checks in-place changes;
    nested holders (a plan's Gram matrices) are walked too."""

    def state_slots(self) -> List[Tuple["StateHolder", str]]:
        slots = []
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) or (isinstance(value, tuple) and value
                                                   and all(isinstance(v, torch.Tensor) for v in value)):
                slots.append((self, name))
            elif isinstance(value, StateHolder):
                slots.extend(value.state_slots())
        return slots


def take_state(holder: StateHolder, slots: Optional[Sequence[Tuple[StateHolder, str]]] = None
               ) -> Tuple[List[Tuple[StateHolder, str]], List[torch.Tensor]]:
    """Remove the holder's state: (slots, flat tensors), tuples flattened with their length. `slots`,
    when known (a backward putting back what the forward took), saves walking the holder again."""
    slots = holder.state_slots() if slots is None else slots
    flat: List[torch.Tensor] = []
    for owner, name in slots:
        value = getattr(owner, name)
        flat.extend(value if isinstance(value, tuple) else (value,))
        setattr(owner, name, len(value) if isinstance(value, tuple) else None)
    return slots, flat


def put_state(slots: Sequence[Tuple[StateHolder, str]], flat: Sequence[torch.Tensor]) -> None:
    """Inverse of `take_state`, from the tensors autograd saved."""
    at = 0
    for owner, name in slots:
        length = getattr(owner, name)
        if length is None:
            setattr(owner, name, flat[at])
            at += 1
        else:
            setattr(owner, name, tuple(flat[at:at + length]))
            at += length


class Plan(StateHolder):
    """One penalty's forward and backward on the backend primitives (module docstring).

    A plan is built by its penalty's setup from the options alone (env_reduction, detach_reference and
    the penalty's own); the problem and backend arrive with each call."""

    def forward(self, backend: Backend, problem: HeadProblem) -> Tuple[torch.Tensor, torch.Tensor]:
        """(hessian term, gradient term), 0-dim tensors in the problem's compute dtype.

        Keeps what `backward` needs as tensor attributes (the state). Also an ordinary differentiable
        function of its inputs when the backend's statistics are (the torch backend): the composed path."""
        raise NotImplementedError

    def backward(self, backend: Backend, problem: HeadProblem, alpha: torch.Tensor, beta: torch.Tensor,
                 head: Optional[HeadTerm] = None):
        """The gradients of ``alpha * hessian + beta * gradient``: (dPsi/dlogits (N, C), dPsi/dfeatures (N, D))
        in the compute dtype, as `Backend.per_sample_backward` returns them; with a fused linear head
        (``head``, only for the penalties `fused_head` serves) a third value, the head's gradient or None.
        Reads the forward's state, which the caller has put back; may run more than once (retain_graph)."""
        raise NotImplementedError

    def feature_form(self, generator_state: Optional[torch.Tensor] = None) -> "Plan":
        """A fresh plan with the same options in the feature form (itself a new copy for feature-form
        plans): what the composed path differentiates. ``generator_state``, a stochastic plan's saved
        probe generator state, makes the copy replay the same probes."""
        raise NotImplementedError


class WholePlan(Plan):
    """A plan a backend may run whole: as one compiled autograd node (`Backend.autograd_plan`, see
    `penalty_function`) or one call per direction (`Backend.plan_forward`: the native CPU module's C++
    plans); otherwise its own algebra runs on the backend's two primitives."""

    method: str  # the plan's name in PlanSpec (and in the native operators)
    backend_state: Optional[torch.Tensor] = None  # plan_forward's state, when the backend ran the plan

    def plan_spec(self, problem: HeadProblem) -> PlanSpec:
        """What a backend needs to run this plan whole (also sets the plan's own options for `forward`)."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: PlanSpec) -> "WholePlan":
        """A plan with the penalty `spec` describes: what a backend's node differentiates for a
        create_graph=True backward, holding no plan object (`Backend.autograd_plan`)."""
        raise NotImplementedError

    def run_whole(self, backend: Backend, problem: HeadProblem, spec: PlanSpec):
        """(hessian, gradient) from the backend's plan_forward, or None."""
        whole = backend.plan_forward(problem, spec)
        if whole is None:
            return None
        self.spec, (self.backend_state, hessian, gradient) = spec, whole
        return hessian, gradient

    def backward_whole(self, backend: Backend, problem: HeadProblem, alpha, beta, head: Optional[HeadTerm]):
        return backend.plan_backward(problem, self.spec, self.backend_state, alpha, beta, head)
