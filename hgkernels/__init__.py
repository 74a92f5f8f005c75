"""hgkernels: closed-form head-curvature alignment penalties (HGP, Hutchinson, full Hessian, Fishr) for linear heads.

    from hgkernels import hutchinson_penalty
    pen = hutchinson_penalty(logits, features, labels, envs)
    loss = erm + alpha * pen.hessian + beta * pen.gradient
"""
from .penalties._common import Penalty
from .penalties.hutchinson import hutchinson_penalty
from .penalties.hgp import hgp_penalty
from .penalties.full_hessian import full_hessian_penalty, hessian_distance
from .penalties.fishr import FishrLoss, fishr_penalty
from .head_statistics import HeadParams, head_gradient, head_gradient_variance, head_hessian_diag, head_hvp
from .module import AlignmentLoss, HessianAlignmentLoss, env_mean_loss, linear_head_alignment
from .fused_head import HeadAlignment
from .accumulation import accumulated_backward, exact_accumulation_step

__version__ = "0.1.0"

__all__ = ["hutchinson_penalty", "hgp_penalty", "full_hessian_penalty", "fishr_penalty", "FishrLoss",
           "hessian_distance", "head_gradient", "head_gradient_variance", "head_hessian_diag", "head_hvp", "Penalty", "HeadParams", "HessianAlignmentLoss", "AlignmentLoss", "HeadAlignment", "linear_head_alignment",
           "env_mean_loss", "exact_accumulation_step", "accumulated_backward"]
