"""Fishr (Rame, Dancette, Cord, ICML 2022) in closed form for a linear head, without BackPACK.

Fishr aligns across environments the variance of the per-sample gradients of the head. For a linear
head the sample's own gradient is r_i zh_i^T, so each environment's variance is

    v_e = (1/N_e) sum_i (r_i ⊙ r_i)(zh_i ⊙ zh_i)^T - G_e ⊙ G_e          (docs/design.md §5.1)

one reduction of the exact Hessian diagonal's shape with weights r ⊙ r, beside the gradient G_e:
`hgkernels.head_gradient_variance` computes it on any closed-form backend, with the hand-written
backward of those two statistics. The penalty is upstream DomainBed's distance between the
environments' variances and their mean (not detached), averaged over environments and over the head's
coordinates; `FishrLoss` adds upstream's exponential moving average of the variances, kept in a
registered buffer so that it survives `state_dict`. On the native CPU plans `fishr_penalty` is one whole
plan (`FishrPlan`), which keeps no per-environment state beyond a limit; elsewhere it is torch algebra on
the variances, in chunks of environments where they are many.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from .. import backends
from .._dispatch import check_targets_grad, plan_backend, traced
from .._inputs import EnvSegments, EnvsArg, HeadProblem, autocast_off, check_choice, prepare
from .._penalty import differentiable_grads, env_weight, penalty_function
from ..backends import Backend
from ..backends.base import HeadTerm, PlanSpec
from ..head_statistics import head_statistic
from .base import WholePlan

COORDINATE_REDUCTIONS = ("mean", "sum")
_VARIANCE_DEFAULTS = dict(loss="cross_entropy", bias=True, num_envs=None, backend="auto", validate=True)


def _check_reductions(env_reduction: str, coordinate_reduction: str) -> None:
    check_choice("coordinate_reduction", coordinate_reduction, COORDINATE_REDUCTIONS)
    check_choice("env_reduction", env_reduction, ("mean", "sum"))


def _flat_variances(logits, features, labels, envs, *, agreed=(), env_reduction: str = "mean",
                    coordinate_reduction: str = "mean", **kwargs) -> torch.Tensor:
    """(E, C·Dh) per-environment variances, weight and bias entries together. The reductions (and
    `agreed`) join the ranks' spec with a process group: they decide the penalty each rank returns."""
    agreed = (("env_reduction", env_reduction), ("coordinate_reduction", coordinate_reduction), *agreed)
    v = head_statistic("gradient_variance", logits, features, labels, envs, **{**_VARIANCE_DEFAULTS, **kwargs},
                        agreed=agreed, check_agreed=lambda: _check_reductions(env_reduction, coordinate_reduction))
    parts = [v.weight.flatten(1)] + ([v.bias] if v.bias is not None else [])
    return torch.cat(parts, 1)


def variance_distance(variances: torch.Tensor, *, env_reduction: str = "mean",
                      coordinate_reduction: str = "mean") -> torch.Tensor:
    """R_e sum_e reduce_coordinates((v_e - v_bar)^2) for (E, M) variances, v_bar = mean_e v_e (not detached)."""
    check_choice("env_reduction", env_reduction, ("mean", "sum"))
    check_choice("coordinate_reduction", coordinate_reduction, COORDINATE_REDUCTIONS)
    squared = (variances - variances.mean(0)).square()
    per_env = squared.mean(1) if coordinate_reduction == "mean" else squared.sum(1)
    return env_weight(env_reduction, variances.shape[0]) * per_env.sum()


@autocast_off
def fishr_penalty(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, envs: EnvsArg, *,
                  loss: str = "cross_entropy", bias: bool = True, env_reduction: str = "mean",
                  coordinate_reduction: str = "mean", backend: str = "auto", num_envs: Optional[int] = None,
                  validate: bool = True, process_group=None, ddp_reduction: str = "mean") -> torch.Tensor:
    """Fishr's penalty for a linear head: the spread of the environments' per-sample gradient variances.

    Arguments as in `hgkernels.hutchinson_penalty` (labels, envs, loss, bias, backend, num_envs, validate,
    process_group, ddp_reduction), plus ``coordinate_reduction``: ``"mean"`` over the C·Dh head
    coordinates (upstream DomainBed's Fishr) or ``"sum"`` (the Colored MNIST script's). The variance is
    the biased one over each environment's samples of each sample's own gradient, as upstream.

    Returns:
        0-dim tensor R_e sum_e reduce_coordinates((v_e - v_bar)^2), v_bar = mean_e v_e (not detached);
        exactly 0 with one environment. Differentiable in logits and features (hand-written backward of
        the statistics, autograd on the small (E, C·Dh) algebra).
    """
    if process_group is None and backend != "reference" and not traced():
        _check_reductions(env_reduction, coordinate_reduction)
        check_choice("backend", backend, backends.BACKEND_NAMES)
        problem = prepare(logits, features, labels, envs, loss=loss, bias=bias, num_envs=num_envs, validate=validate)
        check_targets_grad(labels, backend)
        chosen = plan_backend(backend, problem, FishrPlan.method)
        scale = (env_weight(env_reduction, problem.segments.num_envs)
                 / (problem.num_classes * problem.head_width if coordinate_reduction == "mean" else 1))
        if chosen.runs_plans_whole(problem):
            return penalty_function(problem, chosen, FishrPlan(scale))[0]
        chunk = envs_per_chunk(problem)
        if chunk is not None:
            return _ChunkedFishr.apply(problem.logits, problem.features, problem, chosen, chunk, scale)
    variances = _flat_variances(logits, features, labels, envs, env_reduction=env_reduction,
                                coordinate_reduction=coordinate_reduction, loss=loss, bias=bias, backend=backend,
                                num_envs=num_envs, validate=validate, process_group=process_group,
                                ddp_reduction=ddp_reduction)
    return variance_distance(variances, env_reduction=env_reduction, coordinate_reduction=coordinate_reduction)


# The (E, C·Dh) variances are held whole while they are small; beyond CHUNK_ENTRIES entries `fishr_penalty`
# walks the environments in chunks of at most that many entries (4 MB in float32; one environment at
# least), so that its memory does not grow with E (hundreds of environments: benchmarks/many_envs.py).
CHUNK_ENTRIES = 1 << 20


def envs_per_chunk(problem: HeadProblem) -> Optional[int]:
    """Environments per chunk of `_ChunkedFishr`, or None where the variances fit in one."""
    counts = problem.segments.counts
    width = problem.num_classes * problem.head_width
    if counts is None or problem.segments.num_envs * width <= CHUNK_ENTRIES:
        return None
    return max(1, CHUNK_ENTRIES // width)


def _env_chunks(problem: HeadProblem, chunk: int) -> Iterator[Tuple[HeadProblem, torch.Tensor]]:
    """(the problem of environments [e0, e0 + chunk), the rows of its samples) for each chunk."""
    seg = problem.segments
    offsets = [0]
    for count in seg.counts:
        offsets.append(offsets[-1] + count)
    for e0 in range(0, seg.num_envs, chunk):
        e1 = min(e0 + chunk, seg.num_envs)
        rows = seg.order[offsets[e0]:offsets[e1]]
        if seg.grouped:  # rows a..b: views
            pick = lambda t: t[offsets[e0]:offsets[e1]]  # noqa: E731
        else:
            pick = lambda t: t.index_select(0, rows)  # noqa: E731
        sub = EnvSegments(pick(seg.env_ids) - e0, e1 - e0, seg.counts[e0:e1], grouped=True)
        yield HeadProblem(pick(problem.logits), pick(problem.features), pick(problem.targets), problem.loss,
                          problem.bias, sub), rows


def _chunk_variances(backend: Backend, problem: HeadProblem):
    """(v_e, G_e) of a chunk's environments, (E', C, Dh) each (docs/design.md §5.1)."""
    stats = backend.head_stats(problem, gradient=True, hess_diag=True, diag_weight="residual_squared")
    return stats.hess_diag - stats.grad.square(), stats.grad


def _variances_backward(backend: Backend, problem: HeadProblem, d_v: torch.Tensor, grad: torch.Tensor,
                        head: Optional[HeadTerm] = None):
    """The per-sample backward of d_v = dPsi/dv_e through v_e = Dr_e - G_e ⊙ G_e (Dr_e the second moment)."""
    return backend.per_sample_backward(problem, grad_up=-2 * d_v * grad, diag_up=d_v, diag_weight="residual_squared",
                                       head=head)


class FishrPlan(WholePlan):
    """`fishr_penalty` as a whole plan, scale · sum_e ||v_e - v_bar||^2, one term returned as ``hessian``
    (``gradient`` is 0), for backends that run plans whole: the native CPU plans (csrc/hgk_plans.h FISHR,
    which keep no per-environment state beyond a limit). Its own forward is the algebra on the (E, C, Dh)
    variances, what a create_graph=True backward differentiates."""

    method = "fishr"

    def __init__(self, scale: float):
        self.weight = scale

    @classmethod
    def from_spec(cls, spec: PlanSpec) -> "FishrPlan":
        return cls(spec.weight)

    def feature_form(self, generator_state=None) -> "FishrPlan":
        return FishrPlan(self.weight)

    def plan_spec(self, problem: HeadProblem) -> PlanSpec:
        return PlanSpec(self.method, self.weight, False, False)

    def forward(self, backend: Backend, problem: HeadProblem):
        whole = self.run_whole(backend, problem, self.plan_spec(problem))
        if whole is not None:
            return whole
        v, self.grad = _chunk_variances(backend, problem)
        self.deviation = v - v.mean(0)
        value = self.weight * self.deviation.square().sum()
        return value, torch.zeros_like(value)

    def backward(self, backend: Backend, problem: HeadProblem, alpha, beta, head: Optional[HeadTerm] = None):
        if self.backend_state is not None:
            return self.backward_whole(backend, problem, alpha, beta, head)
        # v_bar's own share vanishes: the deviations sum to zero
        return _variances_backward(backend, problem, (2 * self.weight * alpha) * self.deviation, self.grad, head)


class _ChunkedFishr(torch.autograd.Function):
    """`fishr_penalty` without the (E, C·Dh) variances: scale · sum_e ||v_e - v_bar||^2 = scale · (sum_e
    ||v_e||^2 - ||sum_e v_e||^2 / E), accumulated over chunks of environments. The backward recomputes
    each chunk's variances: dPsi/dv_e = 2 scale (v_e - v_bar) (v_bar's own share vanishes, the deviations
    summing to zero), through the statistics' per-sample backward. Rounding: like the sample form's, the
    difference cancels, so nearly identical environments give rounding × ||v||^2 (clamped at zero)."""

    @staticmethod
    def forward(ctx, logits, features, problem: HeadProblem, backend: Backend, chunk: int, scale: float):
        problem = problem.with_tensors(logits, features)
        total, squares = None, 0.0
        for sub, _ in _env_chunks(problem, chunk):
            v, _ = _chunk_variances(backend, sub)
            total = v.sum(0) if total is None else total.add_(v.sum(0))
            squares = squares + v.square().sum()
        num_envs = problem.segments.num_envs
        value = (scale * (squares - total.square().sum() / num_envs)).clamp(min=0)
        ctx.save_for_backward(logits, features, problem.targets, problem.segments.env_ids, total)
        ctx.problem, ctx.backend, ctx.chunk, ctx.scale = problem.with_tensors(None, None), backend, chunk, scale
        return value

    @staticmethod
    @autocast_off
    def backward(ctx, upstream):
        logits, features, targets, _env_ids, total = ctx.saved_tensors
        problem = ctx.problem.with_tensors(logits, features, targets)
        scale, num_envs = ctx.scale, problem.segments.num_envs
        if torch.is_grad_enabled():  # create_graph=True (_penalty.DOUBLE_BACKWARD_NOTE): the whole variances
            torch_backend = backends.load("torch")

            def penalty(lg, ft):
                v, _ = _chunk_variances(torch_backend, problem.with_tensors(lg, ft))
                return scale * (v - v.mean(0)).square().sum()
            return (*differentiable_grads(penalty, (logits, features), upstream), None, None, None, None)
        dtype = problem.compute_dtype
        d_logits = logits.new_empty(logits.shape, dtype=dtype)
        d_features = features.new_empty(features.shape, dtype=dtype)
        mean = total / num_envs
        for sub, rows in _env_chunks(problem, ctx.chunk):
            v, grad = _chunk_variances(ctx.backend, sub)
            d_lg, d_ft = _variances_backward(ctx.backend, sub, (2 * scale * upstream) * (v - mean), grad)
            d_logits.index_copy_(0, rows, d_lg.to(dtype))
            d_features.index_copy_(0, rows, d_ft.to(dtype))
        return d_logits.to(logits.dtype), d_features.to(features.dtype), None, None, None, None


class FishrLoss(torch.nn.Module):
    """Fishr's penalty with upstream DomainBed's exponential moving average of the variances.

    Each training-mode call updates, per environment, ``ema_variances = ema * previous + (1 - ema) * v``
    (previous = 0 before the first update; the gradient flows only through this step's v) and returns the
    distance between the corrected averages ``ema_variances / (1 - ema)`` (upstream's
    ``oneminusema_correction``). In eval mode the average is read, not updated. The average and the
    update count are registered buffers, so they travel with ``state_dict`` (upstream keeps them in a list
    attribute, which checkpoints lose).

    Args:
        num_envs, num_classes, num_features: the shapes of the buffer (E, C·Dh).
        ema: the moving average's weight on the past (upstream's default 0.95).
        bias: whether the head has a bias. Other keywords go to `fishr_penalty`'s statistics (loss,
            env_reduction, coordinate_reduction, backend, validate, process_group, ddp_reduction).
    """

    def __init__(self, num_envs: int, num_classes: int, num_features: int, *, ema: float = 0.95, bias: bool = True,
                 **penalty_kwargs):
        super().__init__()
        if not 0 <= ema < 1:
            raise ValueError(f"ema must lie in [0, 1); got {ema!r}")
        self.ema = ema
        self.bias = bias
        self.env_reduction = penalty_kwargs.pop("env_reduction", "mean")
        self.coordinate_reduction = penalty_kwargs.pop("coordinate_reduction", "mean")
        check_choice("env_reduction", self.env_reduction, ("mean", "sum"))
        check_choice("coordinate_reduction", self.coordinate_reduction, COORDINATE_REDUCTIONS)
        self.penalty_kwargs = penalty_kwargs
        self.num_envs = num_envs
        self.register_buffer("ema_variances", torch.zeros(num_envs, num_classes * (num_features + int(bias))))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    @autocast_off
    def forward(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                envs: EnvsArg) -> torch.Tensor:
        # with a process group every rank's average must be the same one
        agreed = (("FishrLoss ema", self.ema), ("FishrLoss buffer shape", tuple(self.ema_variances.shape)),
                  ("FishrLoss training", self.training), ("FishrLoss updates", int(self.updates)))
        variances = _flat_variances(logits, features, labels, envs, agreed=agreed, env_reduction=self.env_reduction,
                                    coordinate_reduction=self.coordinate_reduction, bias=self.bias,
                                    num_envs=self.num_envs, **self.penalty_kwargs)
        if variances.shape != self.ema_variances.shape:
            raise ValueError(f"the head's variances have shape {tuple(variances.shape)} but FishrLoss was built for "
                             f"{tuple(self.ema_variances.shape)} (num_envs, num_classes * (num_features + bias))")
        previous = self.ema_variances.to(variances.dtype) if int(self.updates) > 0 else torch.zeros_like(variances)
        averaged = self.ema * previous + (1 - self.ema) * variances
        if self.training:
            with torch.no_grad():
                self.ema_variances.copy_(averaged.detach())
                self.updates += 1
        return variance_distance(averaged / (1 - self.ema), env_reduction=self.env_reduction,
                                 coordinate_reduction=self.coordinate_reduction)

    def extra_repr(self) -> str:
        return f"num_envs={self.num_envs}, ema={self.ema}"
