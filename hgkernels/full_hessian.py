"""The old import path of `hgkernels.penalties.full_hessian`, kept for the example and tests that use it."""
from .penalties.full_hessian import FullHessianPlan, full_hessian_penalty, hessian_distance

__all__ = ["FullHessianPlan", "full_hessian_penalty", "hessian_distance"]
