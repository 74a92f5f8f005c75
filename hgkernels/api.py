"""Public functions: the two penalties and the per-environment head statistics."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import backends, distributed, reference as reference_path
from ._inputs import ENV_REDUCTIONS, LOSSES, EnvSegments, EnvsArg, HeadProblem, check_choice, prepare
from ._penalty import ExactDiagPlan, HGPPlan, StochasticDiagPlan, differentiable_grads, penalty_function
from ._sample_space import SampleExactDiagPlan, SampleHGPPlan, prefers_sample_space, sample_space_possible
from .backends.base import Backend


class Penalty(NamedTuple):
    """The two alignment terms, 0-dim tensors (float32 for half-precision inputs)."""

    hessian: torch.Tensor
    gradient: torch.Tensor


class HeadParams(NamedTuple):
    """A per-environment head quantity split like the head: weight (E, C, D), bias (E, C) or None."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]


FORMS = ("auto", "feature", "sample")
ESTIMATORS = ("exact", "hutchinson")
REFERENCES = ("pooled", "mean")
# The enumerated options of the penalty functions, checked by them and by HessianAlignmentLoss.
OPTION_CHOICES = {"loss": LOSSES, "env_reduction": ENV_REDUCTIONS, "backend": backends.BACKEND_NAMES, "form": FORMS,
                  "estimator": ESTIMATORS, "reference": REFERENCES}

# Each penalty's options and their defaults, as its signature states them (tests/test_structure.py
# checks that they agree): what HessianAlignmentLoss accepts and what the fused head path fills in.
HUTCHINSON_OPTIONS = dict(loss="cross_entropy", bias=True, estimator="exact", num_probes=300, generator=None,
                          env_reduction="mean", detach_reference=True, backend="auto", num_envs=None, validate=True,
                          form="auto", process_group=None, ddp_reduction="mean")
HGP_OPTIONS = dict(loss="cross_entropy", bias=True, reference="pooled", env_reduction="mean", detach_reference=True,
                   backend="auto", num_envs=None, validate=True, form="auto", process_group=None,
                   ddp_reduction="mean")


def check_shared_options(env_reduction: str, detach_reference: bool, backend: str, form: str) -> None:
    check_choice("env_reduction", env_reduction, ENV_REDUCTIONS)
    check_choice("form", form, FORMS)
    if not isinstance(detach_reference, bool):
        raise TypeError(f"detach_reference must be a bool; got {type(detach_reference).__name__}")
    check_choice("backend", backend, backends.BACKEND_NAMES)


def _sample_form(form: str, problem: HeadProblem, method: str, backend: str = "auto") -> bool:
    """Whether the plan works in sample space (N × N Gram matrices) rather than on C × Dh statistics;
    "auto" weighs the C × Dh form on the backend `backend` resolves to. One environment always takes
    the C × Dh form, whose deviations are then exact zeros."""
    if problem.segments.num_envs < 2 or form == "feature":
        return False
    if form == "sample":
        return True
    if not sample_space_possible(method, problem.logits.shape[0], problem.num_classes, problem.head_width):
        return False  # (before resolving the backend, which costs a few checks)
    resolved = "torch" if backend == "reference" else backends.select(backend, problem).name
    return prefers_sample_space(method, problem.logits.shape[0], problem.num_classes, problem.head_width, resolved)


def check_targets_grad(labels) -> None:
    if isinstance(labels, torch.Tensor) and labels.requires_grad and torch.is_grad_enabled():
        raise ValueError("labels requires grad (soft targets from a trainable model): the closed-form backends give "
                         "no gradient with respect to targets; pass labels.detach(), or backend='reference', "
                         "which differentiates through them")


def traced() -> bool:
    """torch.compile tracing, or a torch.func transform (grad, jacrev, ...) around the call."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def _defers_value_checks(backend: str, shard: bool) -> bool:
    """Whether the value scans wait for the penalty's gradient term (_inputs.check_deferred_values):
    in the autograd Functions, which check it, so not for the reference path, a rank's shard (ranks must
    agree on errors before any collective) or a traced call (the composed path)."""
    return backend != "reference" and not shard and not traced()


def composed_backend(impl: Backend) -> Backend:
    """Statistics autograd can differentiate: the native custom ops while torch.compile traces (their
    autograd formula is the per-sample backward), else the torch backend's ops."""
    if impl.name == "native" and torch.compiler.is_compiling():
        return impl
    return backends.load("torch")


def prepared(build, *, process_group, ddp_reduction: str, envs, num_envs: Optional[int], validate: bool,
             config: Sequence[Tuple[str, object]], logits, features):
    """Run `build(num_envs, shard)` -> (problem, plan), the option checks and `prepare`. With a process
    group the call first makes its one agreement (`distributed.agree`), whatever `validate` says: every
    rank checks its own inputs, catching its error, then all ranks exchange that and their spec (`config`,
    validate, num_envs, ddp_reduction, dtype, C, D) and raise the same ValueError if any rank failed or
    any field differs; it also gives E when ids come without num_envs."""
    if process_group is None:
        check_choice("ddp_reduction", ddp_reduction, distributed.DDP_REDUCTIONS)
        return build(num_envs, False)
    distributed.check_group(process_group)
    spec = [*config, ("validate", validate), ("num_envs", num_envs), ("ddp_reduction", ddp_reduction),
            *distributed.input_spec(logits, features)]
    built, error, (local_e, fixed) = None, None, (0, False)
    try:  # any error here joins the agreement, so that no rank is left waiting in a collective
        local_e, fixed = distributed.local_num_envs(envs, num_envs)
        check_choice("ddp_reduction", ddp_reduction, distributed.DDP_REDUCTIONS)
        # ids without num_envs: this rank's E for now, padded to the agreed E below
        built = build(num_envs if fixed else max(local_e, 1), True)
    except Exception as err:
        error = err
    agreed_e = distributed.agree(process_group, spec, error, (local_e, fixed))
    problem = built[0]
    if problem.segments.num_envs != agreed_e:
        segments = problem.segments
        counts = list(segments.counts) + [0] * (agreed_e - segments.num_envs)
        problem = dataclasses.replace(problem, segments=EnvSegments(segments.env_ids, agreed_e, counts,
                                                                     segments.grouped))
    return (problem, *built[1:])


def dispatch(problem: HeadProblem, backend: str, process_group, ddp_reduction: str, *, reference, composed,
             function):
    """The one place for the backend, reference, process-group and tracing rules: `reference()` for
    backend="reference"; under torch.compile or a torch.func transform, whose tracing cannot enter the
    hand-written backward, `composed(impl)` with statistics autograd differentiates (same values up to
    rounding); else `function(impl)`, the autograd Function, impl made global with a process group."""
    if backend == "reference":
        if process_group is not None:
            raise ValueError("backend='reference' has no process_group support: its autograd statistics are "
                             "this rank's; use a closed-form backend")
        return reference()
    impl = backends.select(backend, problem)
    if process_group is not None:
        if traced():
            raise ValueError("process_group under torch.compile or torch.func is not supported: the collectives "
                             "run inside the hand-written backward")
        return function(distributed.GlobalStats(impl, process_group, ddp_reduction, problem.segments.counts_tensor))
    if traced():
        return composed(composed_backend(impl))
    return function(impl)


def run_penalty(problem: HeadProblem, backend: str, plan, reference_call, process_group=None,
                ddp_reduction: str = "mean") -> Penalty:
    return Penalty(*dispatch(
        problem, backend, process_group, ddp_reduction, reference=reference_call,
        composed=lambda impl: plan.feature_form().forward(impl, problem),
        function=lambda impl: penalty_function(problem, impl, plan)))


def hutchinson_penalty(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, envs: EnvsArg, *,
                       loss: str = "cross_entropy", bias: bool = True, estimator: str = "exact",
                       num_probes: int = 300, generator: Optional[torch.Generator] = None,
                       env_reduction: str = "mean", detach_reference: bool = True, backend: str = "auto",
                       num_envs: Optional[int] = None, validate: bool = True, form: str = "auto",
                       process_group=None, ddp_reduction: str = "mean") -> Penalty:
    """Hessian-diagonal alignment (the paper's Hutchinson method) for a linear head.

    Args:
        logits: (N, C) or (N,) head outputs ``features @ W.T + b``, any float dtype.
        features: (N, D) head inputs, same dtype and device as logits.
        labels: int class ids (N,) for ``loss="cross_entropy"``; float targets (N, C),
            or (N,) when C = 1, for ``"binary_cross_entropy"`` (with logits, in [0, 1]) and ``"mse"``.
        envs: (N,) integer environment ids in any order, or a list of per-environment
            sizes for samples grouped contiguously.
        loss: each environment's loss is torch's functional loss with mean reduction.
        bias: whether the head has a bias (its parameters join the statistics).
        estimator: ``"exact"`` (closed-form diagonal, the default) or ``"hutchinson"``
            (the official Rademacher estimator with ``num_probes`` probes per environment
            and as many for the pooled reference, drawn from ``generator``).
        env_reduction: ``"mean"`` (DomainBed) or ``"sum"`` (Colored MNIST scripts) over environments.
        detach_reference: detach the pooled reference (DomainBed) or not (Colored MNIST).
        backend: ``"auto"``, ``"torch"``, ``"reference"`` (generic autograd), or a compiled backend.
        num_envs: E when some environment ids may be absent from envs (absent ones raise).
        validate: run the scans that read every value (label range, NaN/Inf, BCE targets in [0, 1]);
            they synchronise a GPU, so ``False`` skips them in tight loops. The environment checks
            and, with a process group, the agreement across ranks run either way.
        form: how the closed form is organised (same values up to rounding): ``"feature"``
            builds the C × Dh statistics (cost ∝ N·C·Dh), ``"sample"`` works with N × N Gram
            matrices of the features (cost ∝ N²·Dh, cheaper when the batch is small against
            the classes, e.g. DomainNet's 345), ``"auto"`` picks by a cost model fitted
            to both forms' CPU times (hgkernels/_sample_space.py).
            Only the exact estimator has a sample form; ``backend="reference"`` ignores it,
            and one environment always takes the feature form (exact zeros).
        process_group: a ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD``): the
            statistics are those of the concatenation of every rank's batch, the penalty is the
            same on every rank (environments identified by id; ``num_envs`` or a size list, or it
            is agreed from every rank's ids), computed in the feature form. A rank may hold no sample
            of an environment, or none at all; it still joins. Every call first makes one agreement,
            whatever ``validate`` says (one all-gather of 40 bytes per rank, before the statistics'
            collectives): if any rank rejected its inputs or the ranks differ in an option, validate,
            num_envs, ddp_reduction, the probe generator's state, dtype, C or D, every rank raises the
            same ValueError naming the rank and its error or what differs. ``None``: this process's
            batch only.
        ddp_reduction: with a process group, how the ranks' gradients are combined afterwards:
            ``"mean"`` (DistributedDataParallel's averaging; each rank's backward returns its share
            times the world size, so the average is the global gradient) or ``"sum"`` (its share).

    Returns:
        Penalty(hessian, gradient): R_e ||Dg_e - mean Dg||^2 and R_e ||G_e - G_bar||^2.
    """
    problem, plan, reference_call = hutchinson_setup(
        logits, features, labels, envs, loss=loss, bias=bias, estimator=estimator, num_probes=num_probes,
        generator=generator, env_reduction=env_reduction, detach_reference=detach_reference, backend=backend,
        num_envs=num_envs, validate=validate, form=form, process_group=process_group, ddp_reduction=ddp_reduction)
    return run_penalty(problem, backend, plan, reference_call, process_group, ddp_reduction)


def hgp_penalty(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, envs: EnvsArg, *,
                loss: str = "cross_entropy", bias: bool = True, reference: str = "pooled",
                env_reduction: str = "mean", detach_reference: bool = True, backend: str = "auto",
                num_envs: Optional[int] = None, validate: bool = True, form: str = "auto",
                process_group=None, ddp_reduction: str = "mean") -> Penalty:
    """Hessian-gradient-product alignment (the paper's HGP method) for a linear head.

    Arguments as in `hutchinson_penalty` (``form``, ``process_group`` and ``ddp_reduction`` included),
    plus ``reference``: ``"pooled"`` (official: H_bar G_bar, the pooled loss's Hessian times its
    gradient) or ``"mean"`` (mean_e H_e G_e).

    Returns:
        Penalty(hessian, gradient): R_e ||H_e G_e - ref||^2 and R_e ||G_e - G_bar||^2.
    """
    problem, plan, reference_call = hgp_setup(
        logits, features, labels, envs, loss=loss, bias=bias, reference=reference, env_reduction=env_reduction,
        detach_reference=detach_reference, backend=backend, num_envs=num_envs, validate=validate, form=form,
        process_group=process_group, ddp_reduction=ddp_reduction)
    return run_penalty(problem, backend, plan, reference_call, process_group, ddp_reduction)


def hutchinson_setup(logits, features, labels, envs, *, loss, bias, estimator, num_probes, generator, env_reduction,
                      detach_reference, backend, num_envs, validate, form, process_group, ddp_reduction):
    """`hutchinson_penalty`'s checks: (problem, plan, the reference path's call)."""
    def build(num_envs, shard):
        check_choice("estimator", estimator, ESTIMATORS)
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"num_probes must be a positive int; got {num_probes!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        check_shared_options(env_reduction, detach_reference, backend, form)
        if form == "sample" and estimator != "exact":
            raise ValueError("form='sample' needs estimator='exact': Rademacher probes live in C × Dh space")
        problem = prepare(logits, features, labels, envs, loss=loss, bias=bias, num_envs=num_envs,
                          validate=validate, shard=shard, defer_value_checks=_defers_value_checks(backend, shard))
        if backend != "reference":
            check_targets_grad(labels)
        if generator is not None and generator.device.type != problem.logits.device.type:
            raise ValueError(f"generator is on {generator.device} but logits are on {problem.logits.device}")
        if estimator == "exact" and not shard and _sample_form(form, problem, "hutchinson", backend):
            return problem, SampleExactDiagPlan(env_reduction, detach_reference)
        if estimator == "exact":
            return problem, ExactDiagPlan(env_reduction, detach_reference)
        return problem, StochasticDiagPlan(env_reduction, detach_reference, num_probes, generator)

    config = [("function", "hutchinson_penalty"), ("loss", loss), ("bias", bias), ("estimator", estimator),
              ("num_probes", num_probes), ("env_reduction", env_reduction), ("detach_reference", detach_reference),
              ("backend", backend), ("form", form)]
    if process_group is not None and estimator == "hutchinson":
        device = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
        config.append(("probe generator state", distributed.generator_fingerprint(generator, device)))
    problem, plan = prepared(build, process_group=process_group, ddp_reduction=ddp_reduction, envs=envs,
                             num_envs=num_envs, validate=validate, config=config, logits=logits, features=features)
    return problem, plan, lambda: reference_path.penalty(
        problem, "hutchinson", env_reduction=env_reduction, detach_reference=detach_reference,
        estimator=estimator, num_probes=num_probes, generator=generator)


def hgp_setup(logits, features, labels, envs, *, loss, bias, reference, env_reduction, detach_reference, backend,
               num_envs, validate, form, process_group, ddp_reduction):
    """`hgp_penalty`'s checks: (problem, plan, the reference path's call), as `hutchinson_setup`."""
    def build(num_envs, shard):
        check_choice("reference", reference, REFERENCES)
        check_shared_options(env_reduction, detach_reference, backend, form)
        problem = prepare(logits, features, labels, envs, loss=loss, bias=bias, num_envs=num_envs,
                          validate=validate, shard=shard, defer_value_checks=_defers_value_checks(backend, shard))
        if backend != "reference":
            check_targets_grad(labels)
        if not shard and _sample_form(form, problem, "hgp", backend):
            return problem, SampleHGPPlan(env_reduction, detach_reference, reference)
        return problem, HGPPlan(env_reduction, detach_reference, reference)

    config = [("function", "hgp_penalty"), ("loss", loss), ("bias", bias), ("reference", reference),
              ("env_reduction", env_reduction), ("detach_reference", detach_reference), ("backend", backend),
              ("form", form)]
    problem, plan = prepared(build, process_group=process_group, ddp_reduction=ddp_reduction, envs=envs,
                             num_envs=num_envs, validate=validate, config=config, logits=logits, features=features)
    return problem, plan, lambda: reference_path.penalty(
        problem, "hgp", env_reduction=env_reduction, detach_reference=detach_reference, reference=reference)


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
        if backend != "reference":
            check_targets_grad(labels)
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
