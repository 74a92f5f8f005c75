"""The one table of the alignment penalties: method name -> what `HessianAlignmentLoss`,
`linear_head_alignment` and the fused head need of it. A new penalty adds its module and one row here.

(Fishr is not a row: it returns one term, not Penalty(hessian, gradient), and its moving average lives
in `FishrLoss`.)"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, NamedTuple, Optional

from ..backends.base import PlanSpec
from . import fishr, full_hessian, hgp, hutchinson
from .base import WholePlan


class PenaltyEntry(NamedTuple):
    """``function``: the public penalty function, returning Penalty(hessian, gradient). ``options``: its
    keyword options and their defaults (its signature's). ``choices``: the enumerated ones and their
    values. ``setup``: ``setup(logits, features, labels, envs, **options) -> (problem, plan, reference
    call)``, for the fused head (`fused_head.HeadFunction`); None where it does not serve the penalty."""

    function: Callable
    options: Mapping[str, object]
    choices: Mapping[str, tuple]
    setup: Optional[Callable] = None


PENALTIES: Dict[str, PenaltyEntry] = {
    "hutchinson": PenaltyEntry(hutchinson.hutchinson_penalty, hutchinson.OPTIONS, hutchinson.CHOICES,
                               hutchinson.setup),
    "hgp": PenaltyEntry(hgp.hgp_penalty, hgp.OPTIONS, hgp.CHOICES, hgp.setup),
    # the Gram form has no fused head path: it takes the logits-based one
    "full_hessian": PenaltyEntry(full_hessian.full_hessian_penalty, full_hessian.OPTIONS, full_hessian.CHOICES),
}

# The plans a backend may run whole (`WholePlan`), by their PlanSpec method.
WHOLE_PLANS = {plan.method: plan for plan in (hutchinson.ExactDiagPlan, hgp.HGPPlan, fishr.FishrPlan)}


def whole_plan(spec: PlanSpec) -> WholePlan:
    return WHOLE_PLANS[spec.method].from_spec(spec)
