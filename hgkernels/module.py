"""`nn.Module` wrapper: ERM loss plus the alignment penalties, with the parts for logging."""
from __future__ import annotations

import inspect
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._inputs import EnvsArg, check_choice, prepare
from .api import OPTION_CHOICES, hgp_penalty, hutchinson_penalty
from .full_hessian import full_hessian_penalty


class AlignmentLoss(NamedTuple):
    """total = erm + alpha * hessian + beta * gradient; erm = mean over environments of L_e."""

    total: torch.Tensor
    erm: torch.Tensor
    hessian: torch.Tensor
    gradient: torch.Tensor


def env_mean_loss(logits, labels, envs, *, loss: str = "cross_entropy", num_envs: Optional[int] = None,
                  validate: bool = True) -> torch.Tensor:
    """(E,) per-environment losses L_e, each torch's functional loss with mean reduction."""
    return _env_losses(logits, labels, envs, loss, num_envs, validate, shard=False)


def _local_erm(logits, labels, envs, loss: str, num_envs: Optional[int]) -> torch.Tensor:
    """A rank's ERM under a process group: the mean of L_e over the environments present in its shard
    (zero, still in the graph, for an empty shard)."""
    if isinstance(envs, torch.Tensor) and num_envs is None:
        num_envs = int(envs.max()) + 1 if envs.numel() else 1
    env_losses = _env_losses(logits, labels, envs, loss, num_envs, False, shard=True)
    present = ~torch.isnan(env_losses)
    return env_losses[present].mean() if bool(present.any()) else logits.sum() * 0


def _env_losses(logits, labels, envs, loss: str, num_envs: Optional[int], validate: bool, shard: bool):
    """(E,) L_e; with ``shard``, NaN for an environment absent from this rank's shard."""
    dummy_features = logits.new_zeros(logits.shape[0], 1)
    problem = prepare(logits, dummy_features, labels, envs, loss=loss, bias=False, num_envs=num_envs,
                      validate=validate, shard=shard)
    logits = problem.logits.to(problem.compute_dtype)
    if loss == "cross_entropy":
        per_sample = F.cross_entropy(logits, problem.targets, reduction="none")
    elif loss == "binary_cross_entropy":
        per_sample = F.binary_cross_entropy_with_logits(logits, problem.targets, reduction="none").mean(1)
    else:
        per_sample = F.mse_loss(logits, problem.targets, reduction="none").mean(1)
    seg = problem.segments
    sums = per_sample.new_zeros(seg.num_envs).index_add(0, seg.env_ids, per_sample)
    return sums / seg.counts_tensor.to(sums.dtype)


PENALTY_FUNCTIONS = {"hutchinson": hutchinson_penalty, "hgp": hgp_penalty, "full_hessian": full_hessian_penalty}


class HessianAlignmentLoss(torch.nn.Module):
    """Training loss of the Hessian-alignment methods for a linear head.

    ``method``: ``"hutchinson"`` (Hessian diagonals), ``"full_hessian"`` (the whole head Hessian,
    `hgkernels.full_hessian_penalty`) or ``"hgp"`` (Hessian-gradient
    products); ``alpha`` and ``beta`` weight the Hessian and gradient terms and may be
    changed between steps (e.g. a warm-up schedule). Other keywords go to the penalty
    function (loss, bias, estimator, num_probes, generator, reference, env_reduction,
    detach_reference, backend, validate, form).

    ``forward(logits, features, labels, envs)`` returns AlignmentLoss(total, erm, hessian, gradient).
    """

    def __init__(self, method: str = "hutchinson", alpha: float = 1.0, beta: float = 1.0, **penalty_kwargs):
        super().__init__()
        check_choice("method", method, tuple(PENALTY_FUNCTIONS))
        self._penalty_fn = PENALTY_FUNCTIONS[method]
        # Options are checked here, not at the first forward.
        accepted = [name for name, p in inspect.signature(self._penalty_fn).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY]
        for name, value in penalty_kwargs.items():
            if name not in accepted:
                raise TypeError(f"HessianAlignmentLoss(method={method!r}) got an unexpected option {name!r}; "
                                f"it takes {', '.join(accepted)}")
            if name in OPTION_CHOICES:
                check_choice(name, value, OPTION_CHOICES[name])
        self.method = method
        self.alpha = alpha
        self.beta = beta
        self.penalty_kwargs = penalty_kwargs

    def forward(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                envs: EnvsArg) -> AlignmentLoss:
        pen = self._penalty_fn(logits, features, labels, envs, **self.penalty_kwargs)
        loss, num_envs = self.penalty_kwargs.get("loss", "cross_entropy"), self.penalty_kwargs.get("num_envs")
        if self.penalty_kwargs.get("process_group") is not None:
            erm = _local_erm(logits, labels, envs, loss, num_envs)
        else:
            erm = env_mean_loss(logits, labels, envs, loss=loss, num_envs=num_envs, validate=False).mean()
        return AlignmentLoss(erm + self.alpha * pen.hessian + self.beta * pen.gradient, erm,
                             pen.hessian, pen.gradient)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, alpha={self.alpha}, beta={self.beta}"
