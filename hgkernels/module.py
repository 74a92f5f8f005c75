"""`nn.Module` wrapper: ERM loss plus the alignment penalties, with the parts for logging."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from ._inputs import EnvsArg, autocast_off, check_choice, prepare
from ._dispatch import traced
from .fused_head import HeadAlignment, check_head_tensors, env_losses, fused_alignment, head_inputs
from .penalties.registry import PENALTIES


class AlignmentLoss(NamedTuple):
    """total = erm + alpha * hessian + beta * gradient; erm = mean over environments of L_e."""

    total: torch.Tensor
    erm: torch.Tensor
    hessian: torch.Tensor
    gradient: torch.Tensor


@autocast_off
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
    return env_losses(problem)


def _has_forward_hooks(module: torch.nn.Module) -> bool:
    hooks = torch.nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or hooks._global_forward_hooks
                or hooks._global_forward_pre_hooks)


class HessianAlignmentLoss(torch.nn.Module):
    """Training loss of the Hessian-alignment methods for a linear head.

    ``method``: ``"hutchinson"`` (Hessian diagonals), ``"full_hessian"`` (the whole head Hessian,
    `hgkernels.full_hessian_penalty`) or ``"hgp"`` (Hessian-gradient
    products); ``alpha`` and ``beta`` weight the Hessian and gradient terms and may be
    changed between steps (e.g. a warm-up schedule). Other keywords go to the penalty
    function (loss, bias, estimator, num_probes, generator, reference, env_reduction,
    detach_reference, backend, validate, form).

    ``forward(logits, features, labels, envs)`` returns AlignmentLoss(total, erm, hessian, gradient).
    ``forward(head, features, labels, envs)`` with the ``nn.Linear`` head itself computes the logits too,
    through one fused autograd Function (`hgkernels.linear_head_alignment`: the features' gradient is
    written once, the fastest training step), and returns HeadAlignment(total, erm, hessian, gradient,
    logits). The head's ``bias`` decides the ``bias`` option there.
    """

    def __init__(self, method: str = "hutchinson", alpha: float = 1.0, beta: float = 1.0, **penalty_kwargs):
        super().__init__()
        check_choice("method", method, tuple(PENALTIES))
        entry = PENALTIES[method]
        self._penalty_fn = entry.function
        # Options are checked here, not at the first forward.
        accepted = list(entry.options)
        for name, value in penalty_kwargs.items():
            if name not in accepted:
                raise TypeError(f"HessianAlignmentLoss(method={method!r}) got an unexpected option {name!r}; "
                                f"it takes {', '.join(accepted)}")
            if name in entry.choices:
                check_choice(name, value, entry.choices[name])
        self.method = method
        self.alpha = alpha
        self.beta = beta
        self.penalty_kwargs = penalty_kwargs

    def forward(self, logits: Union[torch.Tensor, torch.nn.Linear], features: torch.Tensor, labels: torch.Tensor,
                envs: EnvsArg) -> Union[AlignmentLoss, HeadAlignment]:
        if isinstance(logits, torch.nn.Module) and not isinstance(logits, torch.nn.Linear):
            raise TypeError(
                f"HessianAlignmentLoss takes the head itself only as an nn.Linear (the penalties are for a linear "
                f"head); got {type(logits).__name__}. For another head, pass its output and the features its last "
                "linear layer reads: criterion(logits, features, labels, envs)")
        if not isinstance(logits, torch.nn.Linear):
            return self._with_logits(logits, features, labels, envs, self.penalty_kwargs)
        head, options = logits, dict(self.penalty_kwargs)
        has_bias = head.bias is not None
        if options.pop("bias", has_bias) != has_bias:
            raise ValueError(f"HessianAlignmentLoss(bias={not has_bias}) but the head {'has' if has_bias else 'has no'} "
                             "bias; drop the option (a head decides it)")
        if _has_forward_hooks(head) or type(head).forward is not torch.nn.Linear.forward:
            # hooks (FSDP2's fully_shard(head) gathers the sharded weight in one), or a subclass's own
            # forward, must see the head's call: the logits-based path
            head_logits = head(features)
            return HeadAlignment(*self._with_logits(head_logits, features, labels, envs, dict(options, bias=has_bias)),
                                 head_logits)
        return linear_head_alignment(features, head.weight, head.bias, labels, envs, method=self.method,
                                     alpha=self.alpha, beta=self.beta, **options)

    @autocast_off
    def _with_logits(self, logits, features, labels, envs, options) -> AlignmentLoss:
        pen = self._penalty_fn(logits, features, labels, envs, **options)
        loss, num_envs = options.get("loss", "cross_entropy"), options.get("num_envs")
        if options.get("process_group") is not None:
            erm = _local_erm(logits, labels, envs, loss, num_envs)
        else:
            erm = env_mean_loss(logits, labels, envs, loss=loss, num_envs=num_envs, validate=False).mean()
        return AlignmentLoss(erm + self.alpha * pen.hessian + self.beta * pen.gradient, erm, pen.hessian, pen.gradient)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, alpha={self.alpha}, beta={self.beta}"


def linear_head_alignment(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          labels: torch.Tensor, envs: EnvsArg, *, method: str = "hutchinson", alpha: float = 1.0,
                          beta: float = 1.0, **options) -> HeadAlignment:
    """ERM plus an alignment penalty for the linear head ``logits = features @ weight.T + bias``.

    Equal to ``logits = F.linear(features, weight, bias)``, ``env_mean_loss(logits, ...).mean()`` and
    ``{method}_penalty(logits, features, ...)`` (same values and gradients up to rounding), but computed by
    one autograd Function whose backward writes the features' gradient once (`hgkernels.fused_head`):
    what a training step with the head in hand should call. ``method`` is ``"hutchinson"``,
    ``"hgp"`` or ``"full_hessian"``; ``options`` are the penalty function's keywords (``bias=`` follows
    whether ``bias`` is None). The logits are returned too (for accuracy), differentiable as usual.

    The fused Function serves the closed-form backends in eager mode; ``backend="reference"``, a
    ``process_group``, torch.compile / torch.func and ``method="full_hessian"`` take the logits-based path
    (so do hooked heads and Linear subclasses, in `HessianAlignmentLoss`).
    """
    check_choice("method", method, tuple(PENALTIES))
    check_head_tensors(features, weight, bias, options)
    features, weight, bias = head_inputs(features, weight, bias)
    options = dict(options, bias=bias is not None)
    fused = (PENALTIES[method].setup is not None and options.get("backend", "auto") != "reference"
             and options.get("process_group") is None and not traced())
    if fused:
        return fused_alignment(method, features, weight, bias, labels, envs, alpha, beta, options)
    # the logits-based path: ordinary autograd through F.linear, then HessianAlignmentLoss's logits path
    logits = F.linear(features, weight, bias)
    loss_fn = HessianAlignmentLoss(method, alpha, beta, **options)
    return HeadAlignment(*loss_fn(logits, features, labels, envs), logits)
