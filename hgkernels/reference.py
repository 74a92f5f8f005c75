"""The generic path users have today: autograd double backward on a zero head perturbation.

This mirrors the official code (a Python loop over environments, torch's
functional losses, `torch.autograd.grad(..., create_graph=True)`, one
Hessian-vector product per probe) and shares none of the closed-form math,
so it is both the checking oracle and the benchmark baseline. Outputs carry an
autograd graph: `.backward()` through them is the double backward being replaced.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._inputs import HeadProblem
from ._penalty import deviation_penalty, env_weight

# Hessian rows per batched double-backward call when computing the exact diagonal.
DIAG_ROWS_PER_CALL = 1024


def functional_loss(loss: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if loss == "cross_entropy":
        num_classes = logits.shape[1]
        invalid = (targets < 0) | (targets >= num_classes)
        if not bool(invalid.any()):
            return F.cross_entropy(logits, targets)
        # validate=False let labels outside [0, C) through: the closed forms make those samples'
        # residuals NaN. A NaN-weighted term linear in the logits does the same here: it poisons
        # the gradient and everything built on it, and adds nothing to the Hessian.
        poison = torch.where(invalid, float("nan"), 0.0).to(logits.dtype).unsqueeze(1)
        linear = (poison * (logits - logits.detach())).sum() / logits.shape[0]
        return F.cross_entropy(logits, targets.clamp(0, num_classes - 1)) + linear
    if loss == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.mse_loss(logits, targets)


def autograd_usable(t: torch.Tensor) -> torch.Tensor:
    # inference-mode tensors cannot be saved for backward; a clone outside inference mode can
    return t.clone() if t.is_inference() else t


def autograd_enabled(fn):
    """Run `fn` with autograd on, as this path needs it whatever the caller's mode (no_grad,
    inference_mode); outside grad mode the results come back detached."""
    def run(*args, **kwargs):
        caller_grad = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.enable_grad():
            out = fn(*args, **kwargs)
        if caller_grad:
            return out
        return tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()
    run.__doc__, run.__name__ = fn.__doc__, fn.__name__
    return run


class PerturbedHead:
    """L_e(dW, db) = loss(logits_e + features_e dW^T + db) at dW = db = 0."""

    def __init__(self, problem: HeadProblem):
        dtype = problem.compute_dtype
        c, d = problem.num_classes, problem.num_features
        device = problem.logits.device
        self.params: List[torch.Tensor] = [torch.zeros(c, d, dtype=dtype, device=device, requires_grad=True)]
        if problem.bias:
            self.params.append(torch.zeros(c, dtype=dtype, device=device, requires_grad=True))
        self.env_losses = []
        for e in range(problem.segments.num_envs):
            idx = (problem.segments.env_ids == e).nonzero().squeeze(1)
            features = autograd_usable(problem.features)[idx].to(dtype)
            logits = autograd_usable(problem.logits)[idx].to(dtype) + features @ self.params[0].T
            if problem.bias:
                logits = logits + self.params[1]
            self.env_losses.append(functional_loss(problem.loss, logits, autograd_usable(problem.targets)[idx]))
        self.pooled_loss = sum(self.env_losses) / len(self.env_losses)

    def grad(self, loss: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return torch.autograd.grad(loss, self.params, create_graph=True)

    def hvp(self, grad: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        return torch.autograd.grad(grad, self.params, grad_outputs=vector, create_graph=True)

    def split(self, flat: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(..., C, Dh) -> parameter-shaped pieces."""
        d = self.params[0].shape[1]
        return (flat[..., :d],) + ((flat[..., d],) if len(self.params) == 2 else ())

    @staticmethod
    def flat(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parameter-shaped pieces -> (..., C, Dh), bias last."""
        return torch.cat([pieces[0]] + [p.unsqueeze(-1) for p in pieces[1:]], -1)

    def hess_diag(self, grad: Sequence[torch.Tensor]) -> torch.Tensor:
        """Exact diagonal: one Hessian-vector product per head parameter (batched over rows)."""
        c, dh = grad[0].shape[0], grad[0].shape[1] + len(self.params) - 1
        eye = torch.eye(c * dh, dtype=grad[0].dtype, device=grad[0].device)
        diag = []
        for start in range(0, c * dh, DIAG_ROWS_PER_CALL):
            rows = eye[start:start + DIAG_ROWS_PER_CALL]
            h_rows = torch.autograd.grad(grad, self.params, grad_outputs=self.split(rows.view(-1, c, dh)),
                                         create_graph=True, is_grads_batched=True)
            diag.append(self.flat(h_rows).view(rows.shape[0], -1).diagonal(offset=start))
        return torch.cat(diag).view(c, dh)


@autograd_enabled
def stats(problem: HeadProblem, kind: str, vector: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-environment G_e, Dg_e, H_e V_e or the per-sample gradients' variance by autograd, (E, C, Dh)."""
    if kind == "gradient_variance":
        return _per_sample_gradient_variance(problem)
    head = PerturbedHead(problem)
    out = []
    for e, env_loss in enumerate(head.env_losses):
        grad = head.grad(env_loss)
        if kind == "gradient":
            out.append(head.flat(grad))
        elif kind == "hess_diag":
            out.append(head.hess_diag(grad))
        else:
            out.append(head.flat(head.hvp(grad, head.split(vector[e]))))
    return torch.stack(out)


def _sample_loss(loss: str, logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One sample's own loss (torch's functional loss on a batch of one). A cross_entropy label outside
    [0, C) (validate=False) poisons it as `functional_loss` does, without a data-dependent branch."""
    if loss != "cross_entropy":
        return functional_loss(loss, logit.unsqueeze(0), target.unsqueeze(0))
    num_classes = logit.shape[0]
    invalid = (target < 0) | (target >= num_classes)
    poison = torch.where(invalid, float("nan"), 0.0).to(logit.dtype)
    return (F.cross_entropy(logit.unsqueeze(0), target.clamp(0, num_classes - 1).unsqueeze(0))
            + poison * (logit - logit.detach()).sum())


def _per_sample_gradient_variance(problem: HeadProblem) -> torch.Tensor:
    """Fishr's statistic the way BackPACK's BatchGrad users compute it: each sample's own head gradient
    (torch.func.grad of its loss at a zero head perturbation, vmapped over the samples), then the
    biased variance over the environment's samples of the centred gradients."""
    dtype, c, d = problem.compute_dtype, problem.num_classes, problem.num_features
    zero_w = torch.zeros(c, d, dtype=dtype, device=problem.logits.device)
    zero_b = torch.zeros(c, dtype=dtype, device=problem.logits.device)

    def sample_loss(dw, db, logit, feature, target):
        return _sample_loss(problem.loss, logit + dw @ feature + (db if problem.bias else 0), target)

    per_sample_grad = torch.func.vmap(torch.func.grad(sample_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0))
    logits, features = autograd_usable(problem.logits).to(dtype), autograd_usable(problem.features).to(dtype)
    targets = autograd_usable(problem.targets)
    out = []
    for e in range(problem.segments.num_envs):
        idx = (problem.segments.env_ids == e).nonzero().squeeze(1)
        grad_w, grad_b = per_sample_grad(zero_w, zero_b, logits[idx], features[idx], targets[idx])
        grads = PerturbedHead.flat((grad_w, grad_b) if problem.bias else (grad_w,))
        centred = grads - grads.mean(0, keepdim=True)
        out.append(centred.square().mean(0))
    return torch.stack(out)


class EnvGradients(NamedTuple):
    """What every reference Hessian term starts from: the perturbed head, each environment's gradient and the
    pooled loss's (create_graph), the environments' flattened gradients (E, C, Dh) and R_e."""

    head: PerturbedHead
    env_grads: List[Tuple[torch.Tensor, ...]]
    pooled_grad: Tuple[torch.Tensor, ...]
    grads: torch.Tensor
    weight: float


@autograd_enabled
def penalty(problem: HeadProblem, env_reduction: str, hessian_term) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hessian term, gradient term) as the official code computes them: the gradient term here, the
    Hessian term by ``hessian_term(EnvGradients)``, each penalty's own (hgkernels.penalties)."""
    head = PerturbedHead(problem)
    num_envs = len(head.env_losses)
    weight = env_weight(env_reduction, num_envs)
    env_grads = [head.grad(env_loss) for env_loss in head.env_losses]
    pooled_grad = head.grad(head.pooled_loss)
    grads = torch.stack([head.flat(g) for g in env_grads])
    gradient_term = deviation_penalty(grads - head.flat(pooled_grad), weight)
    return hessian_term(EnvGradients(head, env_grads, pooled_grad, grads, weight)), gradient_term
