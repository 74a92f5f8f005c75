"""The per-environment head statistics (G_e, Dg_e, H_e V, the per-sample gradients' variance) as public,
differentiable functions, with their autograd Function."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import backends, reference as reference_path
from ._dispatch import check_targets_grad, dispatch, prepared
from ._inputs import HeadProblem, autocast_off, check_choice, prepare
from ._penalty import differentiable_grads
from .backends.base import Backend


class HeadParams(NamedTuple):
    """A per-environment head quantity split like the head: weight (E, C, D), bias (E, C) or None."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]


def _statistic(backend: Backend, problem: HeadProblem, kind: str, vector: Optional[torch.Tensor]) -> torch.Tensor:
    return _statistic_and_gradient(backend, problem, kind, vector)[0]


def _statistic_and_gradient(backend: Backend, problem: HeadProblem, kind: str, vector: Optional[torch.Tensor]):
    """(the statistic, G_e when the statistic's backward needs it, else None)."""
    if kind == "gradient":
        return backend.head_stats(problem, gradient=True).grad, None
    if kind == "hess_diag":
        return backend.head_stats(problem, hess_diag=True).hess_diag, None
    if kind == "gradient_variance":
        # Fishr's v_e = (1/N_e) sum_i (r_i ⊙ r_i)(zh_i ⊙ zh_i)^T - G_e ⊙ G_e (docs/design.md §5.1)
        stats = backend.head_stats(problem, gradient=True, hess_diag=True, diag_weight="residual_squared")
        return stats.hess_diag - stats.grad.square(), stats.grad
    return backend.head_stats(problem, hvp_dirs=vector.unsqueeze(1)).hvp[:, 0], None


class _HeadStatistic(torch.autograd.Function):
    """One per-environment statistic (E, C, Dh), differentiable in logits, features and the HVP vector
    (saved tensors as in `PenaltyFunction`)."""

    @staticmethod
    def forward(ctx, logits, features, vector, problem: HeadProblem, backend: Backend, kind: str):
        problem = problem.with_tensors(logits, features)
        value, grad = _statistic_and_gradient(backend, problem, kind, vector)
        ctx.save_for_backward(logits, features, vector, problem.targets, problem.segments.env_ids, grad)
        ctx.problem, ctx.backend, ctx.kind = problem.with_tensors(None, None), backend, kind
        return value

    @staticmethod
    @autocast_off
    def backward(ctx, upstream):
        logits, features, vector, targets, _env_ids, grad = ctx.saved_tensors
        problem, backend = ctx.problem.with_tensors(logits, features, targets), ctx.backend
        if torch.is_grad_enabled():  # create_graph=True (_penalty.DOUBLE_BACKWARD_NOTE)
            if not backend.differentiable_again:
                raise RuntimeError("create_graph=True (double backward) through a statistic with a process_group is "
                                   "not supported: the collectives run inside the hand-written backward")
            torch_backend = backends.load("torch")
            def statistic(lg, ft, vec=None):
                return _statistic(torch_backend, problem.with_tensors(lg, ft), ctx.kind, vec)
            inputs = (logits, features) if vector is None else (logits, features, vector)
            grads = differentiable_grads(statistic, inputs, upstream)
            return (*grads, *([None] * (6 - len(grads))))
        upstream = upstream.contiguous()
        d_vector = None
        if ctx.kind == "gradient":
            d_logits, d_features = backend.per_sample_backward(problem, grad_up=upstream)
        elif ctx.kind == "hess_diag":
            d_logits, d_features = backend.per_sample_backward(problem, diag_up=upstream)
        elif ctx.kind == "gradient_variance":  # v = M - G ⊙ G: M's upstream is dv, G's is -2 dv ⊙ G
            d_logits, d_features = backend.per_sample_backward(problem, grad_up=-2 * upstream * grad, diag_up=upstream,
                                                               diag_weight="residual_squared")
        else:
            d_logits, d_features = backend.per_sample_backward(
                problem, hvp_dirs=vector.unsqueeze(1), hvp_up=upstream.unsqueeze(1))
            if ctx.needs_input_grad[2]:
                d_vector = backend.head_stats(problem, hvp_dirs=upstream.unsqueeze(1)).hvp[:, 0]
        return d_logits.to(logits.dtype), d_features.to(features.dtype), d_vector, None, None, None


@autocast_off
def head_statistic(kind: str, logits, features, labels, envs, *, loss: str, bias: bool, backend: str,
                    num_envs: Optional[int], validate: bool, vector=None, process_group=None,
                    ddp_reduction: str = "mean", agreed=(), check_agreed=None) -> HeadParams:
    """``agreed``: a caller's further (name, value) pairs for the ranks' spec (Fishr's reductions), and
    ``check_agreed`` their checks, run where a rank's error joins the agreement."""
    def build(num_envs, shard):
        if check_agreed is not None:
            check_agreed()
        check_choice("backend", backend, backends.BACKEND_NAMES)
        problem = prepare(logits, features, labels, envs, loss=loss, bias=bias, num_envs=num_envs,
                          validate=validate, shard=shard)
        check_targets_grad(labels, backend)
        return problem, None if vector is None else _head_vector(vector, problem)

    config = [("function", kind), *agreed, ("loss", loss), ("bias", bias), ("backend", backend)]
    problem, flat_vector = prepared(build, process_group=process_group, ddp_reduction=ddp_reduction, envs=envs,
                                    num_envs=num_envs, validate=validate, config=config, logits=logits,
                                    features=features)
    stats = dispatch(
        problem, backend, process_group, ddp_reduction,
        reference=lambda: reference_path.stats(problem, kind, flat_vector),
        composed=lambda impl: _statistic(impl, problem, kind, flat_vector),
        function=lambda impl: _HeadStatistic.apply(problem.logits, problem.features, flat_vector, problem, impl, kind))
    d = problem.num_features
    return HeadParams(stats[..., :d], stats[..., d] if bias else None)


def _head_vector(vector, problem: HeadProblem) -> torch.Tensor:
    """(weight (C, D) or (E, C, D), bias (C,)/(E, C) or None) -> (E, C, Dh) in the compute dtype."""
    if isinstance(vector, torch.Tensor):
        vector = (vector, None)
    if not isinstance(vector, (tuple, list)) or len(vector) != 2:
        raise TypeError("vector must be a (weight, bias) pair (bias None for a head without bias) or a weight tensor")
    weight, bias = vector
    e, c, d = problem.segments.num_envs, problem.num_classes, problem.num_features
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise TypeError("vector weight must be a floating tensor")
    if weight.shape not in ((c, d), (e, c, d)):
        raise ValueError(f"vector weight must have shape ({c}, {d}) or ({e}, {c}, {d}); got {tuple(weight.shape)}")
    if (bias is None) == problem.bias:
        raise ValueError("vector bias must be given exactly when bias=True" if problem.bias
                         else "vector bias must be None when bias=False")
    pieces = [weight.expand(e, c, d)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape not in ((c,), (e, c)):
            raise ValueError(f"vector bias must have shape ({c},) or ({e}, {c})")
        pieces.append(bias.expand(e, c).unsqueeze(-1))
    for piece in pieces:
        if piece.device != problem.logits.device:
            raise ValueError(f"vector is on {piece.device} but logits are on {problem.logits.device}")
    return torch.cat(pieces, -1).to(problem.compute_dtype)


_STAT_DOC = """{what} of each environment's loss with respect to the head (W, b).

    Arguments as in `hutchinson_penalty` (labels, envs, loss, bias, num_envs, backend, validate).
    Returns HeadParams(weight (E, C, D), bias (E, C) or None), differentiable in logits and features.
    """


def head_gradient(logits, features, labels, envs, *, loss: str = "cross_entropy", bias: bool = True,
                  num_envs: Optional[int] = None, backend: str = "auto", validate: bool = True) -> HeadParams:
    return head_statistic("gradient", logits, features, labels, envs, loss=loss, bias=bias, backend=backend,
                           num_envs=num_envs, validate=validate)


def head_hessian_diag(logits, features, labels, envs, *, loss: str = "cross_entropy", bias: bool = True,
                      num_envs: Optional[int] = None, backend: str = "auto", validate: bool = True) -> HeadParams:
    return head_statistic("hess_diag", logits, features, labels, envs, loss=loss, bias=bias, backend=backend,
                           num_envs=num_envs, validate=validate)


def head_hvp(logits, features, labels, envs, vector: Union[torch.Tensor, Tuple, Sequence], *,
             loss: str = "cross_entropy", bias: bool = True, num_envs: Optional[int] = None,
             backend: str = "auto", validate: bool = True) -> HeadParams:
    return head_statistic("hvp", logits, features, labels, envs, loss=loss, bias=bias, backend=backend,
                           num_envs=num_envs, validate=validate, vector=vector)


def head_gradient_variance(logits, features, labels, envs, *, loss: str = "cross_entropy", bias: bool = True,
                           num_envs: Optional[int] = None, backend: str = "auto", validate: bool = True,
                           process_group=None, ddp_reduction: str = "mean") -> HeadParams:
    return head_statistic("gradient_variance", logits, features, labels, envs, loss=loss, bias=bias,
                           backend=backend, num_envs=num_envs, validate=validate, process_group=process_group,
                           ddp_reduction=ddp_reduction)


head_gradient.__doc__ = _STAT_DOC.format(what="Gradient G_e")
head_gradient_variance.__doc__ = _STAT_DOC.format(what="Variance of the per-sample gradients") + """
    v_e = mean_i (r_i zh_i^T)^2 - G_e^2 entrywise: the biased variance over environment e's samples of
    each sample's own head gradient (Fishr, docs/design.md §5.1). With ``process_group`` (and
    ``ddp_reduction``, as in `hutchinson_penalty`) the variance is over every rank's samples.
    """
head_hessian_diag.__doc__ = _STAT_DOC.format(what="Exact Hessian diagonal Dg_e")
head_hvp.__doc__ = _STAT_DOC.format(what="Hessian-vector product H_e V") + """
    ``vector`` is (weight (C, D) or (E, C, D), bias (C,) or (E, C), None without bias),
    one direction shared by all environments or one per environment.
    """
