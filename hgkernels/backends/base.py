"""The contract every closed-form backend implements: two primitives over environment segments.

Shapes (E environments, C classes, D features, Dh = D + bias, K directions):

* ``head_stats`` — per-environment statistics, in the problem's compute dtype:
  ``grad`` G_e (E, C, Dh), ``hess_diag`` Dg_e (E, C, Dh) and ``hvp`` (E, K, C, Dh)
  with ``hvp[e, k] = H_e @ hvp_dirs[e, k]``. Only the requested ones are computed.
  ``diag_weight="residual_squared"`` puts the second moment of the per-sample head
  gradients, (1/N_e) sum_i (r_i ⊙ r_i)(zh_i ⊙ zh_i)^T, in the ``hess_diag`` slot instead
  (Fishr, docs/design.md §5.1): the same reduction with other row weights; the
  per-sample backward takes the same flag for ``diag_up``.
* ``per_sample_backward`` — given upstream gradients dPsi/dG_e (``grad_up``),
  dPsi/dDg_e (``diag_up``) and dPsi/d(H_e V_ek) for fixed directions V
  (``hvp_up`` against ``hvp_dirs``), return dPsi/dlogits (N, C) and
  dPsi/dfeatures (N, D) in the compute dtype (docs/design.md §2). ``head`` (a `HeadTerm`) fuses a
  linear head's backward into those outputs (and adds a third, the head's gradient or None).

The gradient that flows into a direction V (HGP's V = G_e) is itself an
HVP, dPsi/dV_ek = H_e @ hvp_up[e, k] (H_e is symmetric), so it needs no third primitive.
The last column of every C × Dh matrix is the bias part when ``problem.bias``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .._inputs import HeadProblem


class HeadTerm(NamedTuple):
    """A linear head fused into `per_sample_backward` (hgkernels.fused_head): d_logits gains
    ``extra_logit_grad`` (N, C) and d_features gains the head's own term d_logits @ W, both written
    into the primitive's fresh outputs. ``weight`` is the head's W (C, D) in the compute dtype.
    Given a head, the primitive returns a third value: the head's gradient d_logitsᵀ zh (C, Dh) where
    its kernels formed it on the way (the native CPU one-row path), else None."""

    weight: torch.Tensor
    extra_logit_grad: torch.Tensor


def add_head_term(d_logits: torch.Tensor, d_features: torch.Tensor, head: Optional[HeadTerm]):
    """`HeadTerm` with torch ops, for backends that do not take it in their kernels. d_features is the
    primitive's fresh output (nobody else holds it), so the head's term is added in place. With a head
    the result is (d_logits, d_features, None): no head gradient formed here (see `HeadTerm`)."""
    if head is None:
        return d_logits, d_features
    d_logits = d_logits + head.extra_logit_grad
    return d_logits, d_features.addmm_(d_logits, head.weight), None


class PlanSpec(NamedTuple):
    """What a backend that runs a whole penalty plan needs (`Backend.plan_forward`), in the order the native
    operators take it: the plan's method (its class's ``method``: "exact" for ExactDiagPlan, "hgp" for
    HGPPlan, "fishr" for fishr.FishrPlan), R_e (Fishr: its whole scale), and HGP's reference options
    (``pooled``: H_bar G_bar with E > 1)."""

    method: str
    weight: float
    pooled: bool
    detach_reference: bool


class HeadStats(NamedTuple):
    grad: Optional[torch.Tensor] = None
    hess_diag: Optional[torch.Tensor] = None
    hvp: Optional[torch.Tensor] = None


class Backend:
    """Base class: subclasses set ``name`` and implement the two primitives."""

    name: str = ""
    # whether PenaltyFunction may recompute this backend's statistics with the torch backend's ops
    # for a double backward (not when they span ranks: hgkernels.distributed)
    differentiable_again: bool = True

    def unsupported_reason(self, problem: HeadProblem, auto: bool = False) -> Optional[str]:
        """None when this backend can run `problem`, else why not (device, dtype, build).

        ``auto`` is True when `backend="auto"` asks: a backend may accept inputs when
        named explicitly but decline them for auto (Triton on CPU under the interpreter)."""
        return None

    def num_samples(self, problem: HeadProblem) -> int:
        """The batch size the statistics are over (every rank's batch, for hgkernels.distributed); work
        that is split by size, such as probe batches, splits by it so every rank splits alike."""
        return problem.logits.shape[0]

    def head_stats(self, problem: HeadProblem, *, gradient: bool = False, hess_diag: bool = False,
                   hvp_dirs: Optional[torch.Tensor] = None, diag_weight: str = "curvature") -> HeadStats:
        raise NotImplementedError

    def partial_head_stats(self, problem: HeadProblem, *, hvp_dirs: torch.Tensor) -> torch.Tensor:
        """This process's share of ``head_stats(hvp_dirs=...).hvp``, for a plan that sums many of them
        linearly and calls `reduce_partial` once on the sum (hgkernels.distributed defers its all-reduce
        so); on one process it is the statistic itself."""
        return self.head_stats(problem, hvp_dirs=hvp_dirs).hvp

    def reduce_partial(self, partial_sum: torch.Tensor) -> torch.Tensor:
        """Finish a linear combination of `partial_head_stats` results (identity on one process)."""
        return partial_sum

    def per_sample_backward(self, problem: HeadProblem, *, grad_up: Optional[torch.Tensor] = None,
                            diag_up: Optional[torch.Tensor] = None, hvp_dirs: Optional[torch.Tensor] = None,
                            hvp_up: Optional[torch.Tensor] = None, diag_weight: str = "curvature",
                            head: Optional[HeadTerm] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def runs_plans_whole(self, problem: HeadProblem) -> bool:
        """Whether `plan_forward` runs this call's plans whole (False: None, the default)."""
        return False

    def plan_forward(self, problem: HeadProblem, spec: PlanSpec) -> Optional[Tuple[torch.Tensor, ...]]:
        """A whole plan's forward in one call: (state for `plan_backward`, hessian term, gradient term), or
        None where the plan's own algebra on the two primitives should run (where `runs_plans_whole` is False)."""
        return None

    def plan_backward(self, problem: HeadProblem, spec: PlanSpec, state: torch.Tensor, alpha: torch.Tensor,
                      beta: torch.Tensor, head: Optional[HeadTerm] = None):
        """The plan's backward from `plan_forward`'s state, returning what `per_sample_backward` returns."""
        raise NotImplementedError

    def forms_env_statistics(self, problem: HeadProblem) -> bool:
        """Whether the C × Dh form on this backend forms each environment's statistics for `problem` (what
        form="auto" weighs against the sample form); False where its whole plans never do."""
        return True

    def autograd_plan(self, problem: HeadProblem, spec: PlanSpec) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """A whole plan as one compiled autograd node: (hessian, gradient) whose backward runs without
        Python, or None where `_penalty.PenaltyFunction` should run (the default). For a create_graph=True
        backward the node differentiates the plan rebuilt from ``spec`` (`penalties.registry.whole_plan`)."""
        return None
