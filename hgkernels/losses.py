"""Per-loss closed forms (docs/design.md §1 table and §2), the one Python home of this math.

Every loss is written through a "link" p = link(a) and

    r = slope * (p - target)       (N_e times dL_e/da, target one-hot for cross_entropy)
    q = curvature(p)               (N_e times the diagonal of the logit Hessian)
    A s = hess_apply(p, s)         (N_e times the logit Hessian applied to s)

with link = softmax / sigmoid / identity for cross_entropy / binary_cross_entropy
/ mse. Tensors are (..., C); direction batches are (..., K, C) against p (..., C).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_loss(loss: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) each sample's loss: torch's functional loss, averaged over the C outputs for the
    elementwise losses (so an environment's mean of these is torch's mean-reduced loss)."""
    if loss == "cross_entropy":
        return F.cross_entropy(logits, targets, reduction="none")
    if loss == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
    return F.mse_loss(logits, targets, reduction="none").mean(1)


def _one_hot_residual(p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # A label outside [0, C) (possible only with validate=False) gives a NaN row, as the
    # compiled kernels do, instead of an out-of-bounds index.
    num_classes = p.shape[-1]
    valid = ((targets >= 0) & (targets < num_classes)).unsqueeze(-1)
    r = p.clone()
    r.scatter_add_(-1, targets.clamp(0, num_classes - 1).unsqueeze(-1), torch.full_like(r[..., :1], -1.0))
    return torch.where(valid, r, float("nan"))


def link(loss: str, logits: torch.Tensor) -> torch.Tensor:
    if loss == "cross_entropy":
        return torch.softmax(logits, dim=-1)
    if loss == "binary_cross_entropy":
        return torch.sigmoid(logits)
    return logits


def residual(loss: str, p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """r_i = N_e dL_e/da_i; targets are class ids (cross_entropy) or (..., C) floats."""
    if loss == "cross_entropy":
        return _one_hot_residual(p, targets)
    return residual_slope(loss, p.shape[-1]) * (p - targets)


def residual_slope(loss: str, num_classes: int) -> float:
    """dr/dp, a constant: 1, 1/C, 2/C."""
    return {"cross_entropy": 1.0, "binary_cross_entropy": 1.0 / num_classes, "mse": 2.0 / num_classes}[loss]


def curvature(loss: str, p: torch.Tensor) -> torch.Tensor:
    """q_i: N_e times the diagonal of the logit Hessian."""
    c = p.shape[-1]
    if loss == "mse":
        return torch.full_like(p, 2.0 / c)
    q = p * (1 - p)
    return q if loss == "cross_entropy" else q / c


def curvature_slope(loss: str, p: torch.Tensor) -> torch.Tensor:
    """dq/dp elementwise (zero for mse, whose q is constant)."""
    if loss == "mse":
        return torch.zeros_like(p)
    slope = 1 - 2 * p
    return slope if loss == "cross_entropy" else slope / p.shape[-1]


def hess_apply(loss: str, p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A_i s for a batch of directions s (..., K, C) against p (..., C)."""
    pk = p.unsqueeze(-2)
    if loss == "cross_entropy":
        return pk * s - pk * (pk * s).sum(-1, keepdim=True)
    return curvature(loss, pk) * s


def hess_apply_grad_p(loss: str, p: torch.Tensor, s: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """d<tau, A(p) s>/dp summed over the K directions of s and tau (..., K, C)."""
    pk = p.unsqueeze(-2)
    if loss == "cross_entropy":
        grad = tau * s - (pk * s).sum(-1, keepdim=True) * tau - (tau * pk).sum(-1, keepdim=True) * s
    else:
        grad = tau * s * curvature_slope(loss, pk)
    return grad.sum(-2)


def link_vjp(loss: str, p: torch.Tensor, dp: torch.Tensor) -> torch.Tensor:
    """Pull dPsi/dp back through the link to dPsi/da."""
    if loss == "cross_entropy":
        return p * (dp - (p * dp).sum(-1, keepdim=True))
    if loss == "binary_cross_entropy":
        return dp * p * (1 - p)
    return dp
