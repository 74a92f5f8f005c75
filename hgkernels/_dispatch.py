"""How every penalty and head statistic call runs, in one place: the checks shared by all (targets without
gradient), the agreement across ranks with a process group (`prepared`) and the choice between the
reference path, the composed path (torch.compile, torch.func) and the hand-written autograd Function
(`dispatch`)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch

from . import backends, distributed
from ._inputs import EnvSegments, HeadProblem, check_choice
from .backends.base import Backend


def check_targets_grad(labels, backend: str) -> None:
    """Targets that require grad are refused on the closed forms; the reference path differentiates them."""
    if (backend != "reference" and isinstance(labels, torch.Tensor) and labels.requires_grad
            and torch.is_grad_enabled()):
        raise ValueError("labels requires grad (soft targets from a trainable model): the closed-form backends give "
                         "no gradient with respect to targets; pass labels.detach(), or backend='reference', "
                         "which differentiates through them")


def traced() -> bool:
    """torch.compile tracing, or a torch.func transform (grad, jacrev, ...) around the call."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def defers_value_checks(backend: str, shard: bool) -> bool:
    """Whether the value scans wait for the penalty's gradient term (_inputs.check_deferred_values):
    in the autograd Functions, which check it, so not for the reference path, a rank's shard (ranks must
    agree on errors before any collective) or a traced call (the composed path)."""
    return backend != "reference" and not shard and not traced()


def composed_backend(impl: Backend) -> Backend:
    """Statistics autograd can differentiate: the native operators while torch.compile traces (their
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


# backend="auto" leaves CPU heads above native.AUTO_MAX_CPU_HEAD entries to the torch backend's GEMMs, whose
# feature form holds every environment's C x Dh statistics. Over many small environments the native plans hold
# none (pairs of samples within each environment; Fishr's register strips) and cost less from about this many
# samples per environment down (docs/performance.md, "Many environments").
NATIVE_MAX_SAMPLES_PER_ENV = 32


def plan_backend(name: str, problem: HeadProblem, method: str) -> Backend:
    """`backends.select` for a whole plan (`method`: its PlanSpec name), except that "auto" takes the native CPU
    plans over many small environments where they form no per-environment statistics."""
    chosen = backends.select(name, problem)
    if name != "auto" or chosen.runs_plans_whole(problem) or backends.unavailable_reason("native") is not None:
        return chosen
    native = backends.load("native")
    if (problem.logits.shape[0] <= NATIVE_MAX_SAMPLES_PER_ENV * problem.segments.num_envs
            and native.unsupported_reason(problem) is None and native.runs_plans_whole(problem)
            and (method == "fishr" or not native.forms_env_statistics(problem))):
        return native
    return chosen


def dispatch(problem: HeadProblem, backend: str, process_group, ddp_reduction: str, *, reference, composed,
             function, method: Optional[str] = None):
    """The one place for the backend, reference, process-group and tracing rules: `reference()` for
    backend="reference"; under torch.compile or a torch.func transform, whose tracing cannot enter the
    hand-written backward, `composed(impl)` with statistics autograd differentiates (same values up to
    rounding); else `function(impl)`, the autograd Function, impl made global with a process group.
    `method`: a whole plan's, whose backend `plan_backend` chooses for this process's batch."""
    if backend == "reference":
        if process_group is not None:
            raise ValueError("backend='reference' has no process_group support: its autograd statistics are "
                             "this rank's; use a closed-form backend")
        return reference()
    if method is not None and process_group is None and not traced():
        return function(plan_backend(backend, problem, method))
    impl = backends.select(backend, problem)
    if process_group is not None:
        if traced():
            raise ValueError("process_group under torch.compile or torch.func is not supported: the collectives "
                             "run inside the hand-written backward")
        return function(distributed.GlobalStats(impl, process_group, ddp_reduction, problem.segments.counts_tensor))
    if traced():
        return composed(composed_backend(impl))
    return function(impl)
