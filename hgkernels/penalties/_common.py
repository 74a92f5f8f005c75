"""What the penalties share beyond the plan contract: the result type, the options every penalty
takes, the choice between the feature and the sample form, and the call that runs a plan."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import backends
from .._dispatch import dispatch
from .._inputs import ENV_REDUCTIONS, LOSSES, HeadProblem, check_choice
from .._penalty import penalty_function
from .._sample_space import prefers_sample_space, sample_space_possible
from .base import WholePlan


class Penalty(NamedTuple):
    """The two alignment terms, 0-dim tensors (float32 for half-precision inputs)."""

    hessian: torch.Tensor
    gradient: torch.Tensor


FORMS = ("auto", "feature", "sample")
# The enumerated options every penalty takes (each penalty module adds its own: CHOICES), checked by the
# penalty functions and by HessianAlignmentLoss.
SHARED_CHOICES = {"loss": LOSSES, "env_reduction": ENV_REDUCTIONS, "backend": backends.BACKEND_NAMES, "form": FORMS}


def check_shared_options(env_reduction: str, detach_reference: bool, backend: str, form: str) -> None:
    check_choice("env_reduction", env_reduction, ENV_REDUCTIONS)
    check_choice("form", form, FORMS)
    if not isinstance(detach_reference, bool):
        raise TypeError(f"detach_reference must be a bool; got {type(detach_reference).__name__}")
    check_choice("backend", backend, backends.BACKEND_NAMES)


def takes_sample_form(form: str, problem: HeadProblem, method: str, backend: str = "auto") -> bool:
    """Whether the plan works in sample space (N × N Gram matrices) rather than on C × Dh statistics;
    "auto" weighs the C × Dh form on the backend `backend` resolves to. One environment always takes
    the C × Dh form, whose deviations are then exact zeros."""
    if problem.segments.num_envs < 2 or form == "feature":
        return False
    if form == "sample":
        return True
    shape = (method, problem.logits.shape[0], problem.num_classes, problem.head_width)
    num_envs = problem.segments.num_envs
    if not sample_space_possible(*shape, num_envs):
        return False  # (before resolving the backend, which costs a few checks)
    impl = None if backend == "reference" else backends.select(backend, problem)
    if impl is not None and not impl.forms_env_statistics(problem):
        num_envs = 1  # its C × Dh form then forms the pooled statistics only
    return prefers_sample_space(*shape, "torch" if impl is None else impl.name, num_envs)


def run_penalty(problem: HeadProblem, backend: str, plan, reference_call, process_group=None,
                ddp_reduction: str = "mean") -> Penalty:
    """The penalty of `plan` on `problem` by `_dispatch.dispatch`; the composed path runs its feature form."""
    return Penalty(*dispatch(
        problem, backend, process_group, ddp_reduction, reference=reference_call,
        composed=lambda impl: plan.feature_form().forward(impl, problem),
        function=lambda impl: penalty_function(problem, impl, plan),
        method=plan.method if isinstance(plan, WholePlan) else None))
