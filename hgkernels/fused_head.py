"""A linear head, its ERM loss and an alignment penalty as one autograd Function (docs/design.md §4.3).

With the logits-based functions a training step has two (N, D) gradients for the features: the
head's own, d_logits @ W, and the penalty's; autograd writes each into fresh memory and adds one
into the other. At Colored MNIST's size (24,000 × 390) those are 37 MB tensors whose page faults and
extra passes cost more than the penalty's arithmetic. `HeadFunction` takes the head's weight and
bias instead: its backward adds the ERM and upstream logit gradients to the penalty's, and writes
the head's term into the features-gradient the plan's per-sample backward writes (`backends.base.HeadTerm`:
inside the native CPU kernel, row by row while the row is in cache; elsewhere one in-place addmm into
the fresh buffer), so the features' gradient is written once, as in ERM alone.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._inputs import HeadProblem, all_finite, autocast_off, check_deferred_values, mixed_dtype
from ._penalty import differentiable_grads, replayed_feature_form
from .penalties.base import put_state, take_state
from .backends import Backend, load, select
from .backends.base import HeadTerm
from .losses import link, per_sample_loss, residual
from .penalties.registry import PENALTIES


class HeadAlignment(NamedTuple):
    """total = erm + alpha * hessian + beta * gradient, the parts, and the head's logits (N, C)."""

    total: torch.Tensor
    erm: torch.Tensor
    hessian: torch.Tensor
    gradient: torch.Tensor
    logits: torch.Tensor


def env_losses(problem: HeadProblem) -> torch.Tensor:
    """(E,) L_e, each torch's functional loss with mean reduction (NaN for an environment without samples)."""
    per_sample = per_sample_loss(problem.loss, problem.logits.to(problem.compute_dtype), problem.targets)
    seg = problem.segments
    sums = per_sample.new_zeros(seg.num_envs).index_add(0, seg.env_ids, per_sample)
    return sums / seg.counts_tensor.to(sums.dtype)


def erm_logit_grad(problem: HeadProblem) -> torch.Tensor:
    """(N, C) d(mean_e L_e)/d logits = r_i / (E N_e): the residual (losses.residual) over the sample's share."""
    seg = problem.segments
    r = residual(problem.loss, link(problem.loss, problem.logits.to(problem.compute_dtype)), problem.targets)
    share = (seg.counts_tensor.to(r.dtype) * seg.num_envs).reciprocal()[seg.env_ids]
    return r * share.unsqueeze(1)


def _with_defaults(function_name: str, defaults: dict, options: dict) -> dict:
    """The penalty function's options: its table's defaults, overridden by `options`."""
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"{function_name} got unexpected option(s) {', '.join(map(repr, sorted(unknown)))}")
    return {**defaults, **options}


class HeadFunction(torch.autograd.Function):
    """(features, weight, bias) -> (logits, erm, hessian term, gradient term); logits come from the
    caller (computed without a graph) through `problem`. Saved tensors as in `PenaltyFunction`."""

    @staticmethod
    def forward(ctx, features, weight, bias, problem: HeadProblem, backend: Backend, plan):
        hessian, gradient = plan.forward(backend, problem)
        check_deferred_values(problem, gradient)  # before the ERM loss, which indexes by the labels
        erm = env_losses(problem).mean()
        ctx.slots, state = take_state(plan)
        logits = problem.logits
        ctx.save_for_backward(features, weight, bias, logits, problem.targets, problem.segments.env_ids, *state)
        ctx.problem, ctx.backend, ctx.plan = problem.with_tensors(None, None), backend, plan
        return logits, erm, hessian, gradient

    @staticmethod
    @autocast_off
    def backward(ctx, d_logits, d_erm, alpha, beta):
        features, weight, bias, logits, targets, _env_ids, *state = ctx.saved_tensors
        problem = ctx.problem.with_tensors(logits, features, targets)
        if torch.is_grad_enabled():  # create_graph=True (_penalty.DOUBLE_BACKWARD_NOTE)
            plan, torch_backend = replayed_feature_form(ctx.plan, ctx.slots, state), load("torch")

            def outputs(ft, w, b=None):
                lg = F.linear(ft, w, b)
                p = problem.with_tensors(lg, ft)
                return (lg, env_losses(p).mean(), *plan.forward(torch_backend, p))
            inputs = (features, weight) if bias is None else (features, weight, bias)
            grads = differentiable_grads(outputs, inputs, (d_logits, d_erm, alpha, beta))
            return (*grads, *([None] * (6 - len(grads))))
        dtype = problem.compute_dtype
        extra = (d_erm * erm_logit_grad(problem) + d_logits).to(dtype)
        put_state(ctx.slots, state)
        try:
            d_logits_total, d_features, head_grad = ctx.plan.backward(
                ctx.backend, problem, alpha, beta, head=HeadTerm(weight.to(dtype), extra.contiguous()))
        finally:
            take_state(ctx.plan, ctx.slots)
        d_weight = d_bias = None
        if head_grad is not None:  # formed by the kernel while each row was in cache: [dW | db]
            d_weight = head_grad[:, :weight.shape[1]].to(weight.dtype) if ctx.needs_input_grad[1] else None
            d_bias = head_grad[:, weight.shape[1]].to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        else:
            if ctx.needs_input_grad[1]:
                d_weight = (d_logits_total.t() @ features.to(d_logits_total.dtype)).to(weight.dtype)
            if bias is not None and ctx.needs_input_grad[2]:
                d_bias = d_logits_total.sum(0).to(bias.dtype)
        return d_features.to(features.dtype), d_weight, d_bias, None, None, None


def _name_non_finite_input(features, weight, bias) -> None:
    """Non-finite logits computed here: raise naming the input that holds a NaN/Inf (else it overflowed)."""
    for name, t in (("features", features), ("weight", weight), ("bias", bias)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    raise ValueError("the head's logits (features @ weight.T + bias) overflow to Inf; check the scale of "
                     "features and weight")


def is_dtensor(t) -> bool:
    """Whether `t` is a torch.distributed DTensor (none exists unless its module was imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def check_head_tensors(features, weight, bias, options: dict) -> None:
    """`linear_head_alignment`'s checks of the head's tensors (and that no bias= flag comes with them)."""
    for name, t in (("features", features), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None; got {type(bias).__name__}")
    if "bias" in options:
        raise TypeError("linear_head_alignment takes the head's bias tensor (or None), not the bias= flag")
    for name, t in (("features", features), ("weight", weight), ("bias", bias)):
        if is_dtensor(t):
            raise TypeError(
                f"{name} is a DTensor (FSDP2's fully_shard keeps parameters sharded outside the module's forward, "
                "and tensor parallelism shards them too): the fused head reads plain tensors. Shard the head with "
                "its own fully_shard(head) and pass the module to HessianAlignmentLoss (calling it gathers the "
                "weight: the logits-based path), or pass head(features) as logits")
    if features.dim() != 2:
        raise ValueError(f"features must have shape (N, D); got {tuple(features.shape)}")
    if weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(f"weight must have shape (C, D) with D = features.shape[1] = {features.shape[1]}; "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    for name, t in (("features", features), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor; got {t.dtype}")
        if t.device.type == "meta" or t.device != features.device:
            raise ValueError(f"{name} is on {t.device}; features, weight and bias must share one cpu or cuda device"
                             + (" (meta tensors hold no values)" if t.device.type == "meta" else ""))
    mixed_dtype({"features": features, "weight": weight, "bias": bias})  # raises for a mix autocast never makes


def head_inputs(features, weight, bias):
    """(features, weight, bias) in one dtype: float32 where they mix float16/bfloat16 with float32
    (differentiable casts, so each gradient comes back in its input's dtype)."""
    common = mixed_dtype({"features": features, "weight": weight, "bias": bias})
    if common is None:
        return features, weight, bias
    return features.to(common), weight.to(common), None if bias is None else bias.to(common)


def fused_alignment(method: str, features, weight, bias, labels, envs, alpha, beta, options: dict) -> HeadAlignment:
    """`linear_head_alignment` through `HeadFunction`, for a penalty whose registry entry has a setup;
    `options` hold bias=. The logits are F.linear's under the caller's torch.autocast, as `head(features)`
    computes them (lower precision there); all that follows runs without autocast, in float32 for half
    logits, and the logits come back in the dtype autocast gave them."""
    entry = PENALTIES[method]
    resolved = _with_defaults(entry.function.__name__, entry.options, options)
    with torch.no_grad():
        logits = F.linear(features, weight, bias)
    return _fused_penalty(entry, features, weight, bias, logits, labels, envs, alpha, beta, resolved)


@autocast_off
def _fused_penalty(entry, features, weight, bias, logits, labels, envs, alpha, beta, resolved) -> HeadAlignment:
    if resolved["validate"] and not all_finite(logits):
        _name_non_finite_input(features, weight, bias)
    problem, plan, _ = entry.setup(logits, features, labels, envs, **resolved)
    logits_dtype = logits.dtype
    logits, erm, hessian, gradient = HeadFunction.apply(features, weight, bias, problem,
                                                        select(resolved["backend"], problem), plan)
    logits = logits.to(logits_dtype)  # prepare up-casts autocast's half logits beside float32 features
    return HeadAlignment(erm + alpha * hessian + beta * gradient, erm, hessian, gradient, logits)
