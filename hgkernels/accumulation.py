"""Exact penalties under gradient accumulation (GradCache: Gao et al., 2021).

The penalties are nonlinear in per-environment statistics, so the usual accumulation (one penalty per
micro-batch, gradients summed) optimises another objective than the full batch. Here the objective is
computed once, on the features of all micro-batches:

1. every micro-batch goes through the featurizer under ``no_grad`` (the global RNG state saved before
   each); only the (N, D) features are kept;
2. ERM + penalty on all N features, a leaf that requires grad, then backward: the head's gradient
   and the features' gradient (N, D);
3. every micro-batch goes through the featurizer again with grad, its RNG state restored (dropout
   draws the same masks), and is back-propagated with its rows of the features' gradient.

Values and parameter gradients are the full batch's (up to rounding), at the peak activation memory of
one micro-batch plus the N × D features (and their gradient). The featurizer runs twice per sample.

- RNG: the global CPU generator (and every CUDA generator once CUDA is initialised) is saved before each
  micro-batch's first pass and restored for its second; afterwards the generators are where one pass
  over the micro-batches and the objective leave them (the objective's own draws, e.g. the stochastic
  Hutchinson estimator's without a ``generator``, come between, as in the full batch).
- BatchNorm in training mode normalises with each micro-batch's statistics (an accumulation of any
  kind cannot give the full batch's); its running statistics are updated in the first pass and restored
  after the second, so they move once per micro-batch, as in naive accumulation.
- ``process_group``: every rank accumulates its own micro-batches; the statistics are summed over ranks
  and micro-batches (the penalty's ``process_group``), the ERM term is the global mean_e L_e over all
  ranks' samples, and every rank ends with the global gradient: a featurizer wrapped in
  ``DistributedDataParallel`` syncs in its last micro-batch's backward (``no_sync`` before it), one
  sharded by FSDP2's ``fully_shard`` likewise (``set_requires_gradient_sync``), a plain
  featurizer's and the head's gradients (the head is read directly, so DDP cannot see it) are
  all-reduced here.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._inputs import check_choice
from .distributed import agree
from .fused_head import HeadAlignment, is_dtensor
from .losses import per_sample_loss
from .module import env_mean_loss, linear_head_alignment
from .penalties.fishr import fishr_penalty
from .penalties.registry import PENALTIES

METHODS = ("hgp", "hutchinson", "full_hessian", "fishr")


class _RNGState(NamedTuple):
    cpu: torch.Tensor
    cuda: Optional[List[torch.Tensor]]


def _rng_state() -> _RNGState:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return _RNGState(torch.get_rng_state(), cuda)


def _set_rng_state(state: _RNGState) -> None:
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state_all(state.cuda)


def _batchnorm_buffers(module: torch.nn.Module) -> List[torch.Tensor]:
    return [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in m.buffers(recurse=False)]


def _is_ddp(module) -> bool:
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


def _is_fsdp2(module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, getattr(fsdp, "FSDPModule", ()))


def accumulated_backward(featurizer: torch.nn.Module, inputs: Sequence, objective: Callable, *,
                         process_group=None):
    """Back-propagate ``objective(features)`` through ``featurizer`` one micro-batch at a time.

    ``inputs``: the micro-batches' featurizer inputs; ``features`` is the concatenation of
    ``featurizer(x)`` over them, (N, D), a leaf that requires grad. ``objective`` returns a 0-dim tensor
    or a tuple whose first item is one (e.g. `HeadAlignment`); its backward reaches whatever else it
    uses (the head). Gradients accumulate into ``.grad`` as ``objective(featurizer(cat(inputs))).backward()``
    would, micro-batch statistics aside (BatchNorm). Returns what ``objective`` returned.

    ``process_group``: only how the featurizer's gradient is synchronised (a DDP or FSDP2 featurizer syncs in
    the last micro-batch; a plain one is all-reduced, summed and divided by the world size, as DDP averages);
    every rank must pass the same number of micro-batches. The objective makes its own collectives.
    """
    if not callable(featurizer):
        raise TypeError(f"featurizer must be a callable nn.Module; got {type(featurizer).__name__}")
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError(f"inputs must be a non-empty list of micro-batches; got {type(inputs).__name__} "
                         f"of length {len(inputs) if isinstance(inputs, (list, tuple)) else 'n/a'}")
    if not callable(objective):
        raise TypeError(f"objective must be callable (features -> loss); got {type(objective).__name__}")
    states, parts = [], []
    with torch.no_grad():
        for x in inputs:
            states.append(_rng_state())
            parts.append(featurizer(x))
    for k, part in enumerate(parts):
        if not isinstance(part, torch.Tensor) or part.dim() != 2 or part.shape[0] == 0:
            raise ValueError(f"featurizer must return non-empty (n, D) features for each micro-batch; micro-batch {k} "
                             f"gave {tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__}")
    bn_buffers = _batchnorm_buffers(featurizer)
    bn_saved = [b.clone() for b in bn_buffers]
    features = torch.cat(parts).requires_grad_(True)
    del parts
    with torch.enable_grad():
        out = objective(features)
        total = out[0] if isinstance(out, tuple) else out
        if not isinstance(total, torch.Tensor) or total.dim() != 0:
            raise TypeError("objective must return a 0-dim tensor or a tuple whose first item is one")
        total.backward()
    end_state = _rng_state()
    d_features = features.grad
    params = [p for p in featurizer.parameters() if p.requires_grad]
    own_sync = process_group is not None and not (_is_ddp(featurizer) or _is_fsdp2(featurizer))
    before = [None if p.grad is None else p.grad.clone() for p in params] if own_sync else None
    at = 0
    try:
        for k, x in enumerate(inputs):
            _set_rng_state(states[k])
            last = k == len(inputs) - 1
            sync = featurizer.no_sync() if _is_ddp(featurizer) and not last else contextlib.nullcontext()
            if _is_fsdp2(featurizer):  # FSDP2: reduce-scatter once, in the last micro-batch's backward
                featurizer.set_requires_gradient_sync(last)
            with sync, torch.enable_grad():
                part = featurizer(x)
                n = part.shape[0]
                if part.requires_grad and d_features is not None:  # None: the objective ignores the features
                    part.backward(d_features[at:at + n])
            at += n
    finally:
        _set_rng_state(end_state)
        if _is_fsdp2(featurizer):
            featurizer.set_requires_gradient_sync(True)
        with torch.no_grad():
            for b, saved in zip(bn_buffers, bn_saved):
                b.copy_(saved)
    if own_sync:
        _all_reduce_increment(params, before, process_group)
    return out


def _all_reduce_increment(params, before, group) -> None:
    """Average over ranks what this step added to each parameter's gradient (what DDP would do)."""
    world = dist.get_world_size(group)
    for p, old in zip(params, before):
        new = p.grad if p.grad is not None else torch.zeros_like(p)
        delta = new - old if old is not None else new.clone()
        dist.all_reduce(delta, group=group)
        delta /= world
        p.grad = delta if old is None else old + delta


def _micro_batch_parts(micro_batches):
    """(inputs, labels, env ids, E given by sizes or None) from [(x, labels, envs), ...]."""
    if not isinstance(micro_batches, (list, tuple)) or not micro_batches:
        raise ValueError("micro_batches must be a non-empty list of (inputs, labels, envs) tuples")
    inputs, labels, ids, sizes_e = [], [], [], None
    for k, item in enumerate(micro_batches):
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise TypeError(f"micro_batches[{k}] must be an (inputs, labels, envs) tuple; got {type(item).__name__}")
        x, y, envs = item
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"micro_batches[{k}]: labels must be a torch.Tensor; got {type(y).__name__}")
        if isinstance(envs, torch.Tensor):
            if envs.dim() != 1 or envs.dtype.is_floating_point or envs.dtype == torch.bool:
                raise ValueError(f"micro_batches[{k}]: envs must be a 1-D integer tensor of ids or a list of sizes")
            env_ids = envs.to(torch.int64)
        elif isinstance(envs, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                      for s in envs):
            if sizes_e is not None and len(envs) != sizes_e:
                raise ValueError(f"micro_batches[{k}]: envs lists {len(envs)} sizes, an earlier micro-batch {sizes_e}")
            sizes_e = len(envs)
            env_ids = torch.repeat_interleave(torch.arange(len(envs)), torch.tensor(list(envs), dtype=torch.int64))
            env_ids = env_ids.to(y.device)
        else:
            raise TypeError(f"micro_batches[{k}]: envs must be a 1-D tensor of environment ids or a list of "
                            f"non-negative sizes; got {type(envs).__name__}")
        if env_ids.shape[0] != y.shape[0]:
            raise ValueError(f"micro_batches[{k}]: envs describe {env_ids.shape[0]} samples, labels have {y.shape[0]}")
        inputs.append(x)
        labels.append(y)
        ids.append(env_ids)
    return inputs, labels, ids, sizes_e


def _global_erm(logits, labels, env_ids, num_envs: int, loss: str, group):
    """(this rank's share of the global mean_e L_e, scaled by the world size as DDP averages; the global value)."""
    counts = torch.bincount(env_ids, minlength=num_envs).to(logits.dtype)
    dist.all_reduce(counts, group=group)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"envs: environment(s) {empty} of {num_envs} have no samples on any rank")
    targets = labels if loss == "cross_entropy" or labels.dim() == 2 else labels.unsqueeze(1)
    share = (per_sample_loss(loss, logits, targets) / (num_envs * counts[env_ids])).sum()
    value = share.detach().clone()
    dist.all_reduce(value, group=group)
    return share * dist.get_world_size(group), value


def exact_accumulation_step(featurizer: torch.nn.Module, head: torch.nn.Linear, micro_batches, *,
                            method: str = "hgp", alpha: float = 1.0, beta: Optional[float] = None,
                            **options) -> HeadAlignment:
    """ERM + ``method``'s penalty on the concatenation of ``micro_batches``, back-propagated one micro-batch
    at a time (`accumulated_backward`): the full batch's value and gradients (in ``.grad``, accumulated as
    ``backward`` does), at one micro-batch's activation memory plus the (N, D) features.

    ``micro_batches``: ``[(inputs, labels, envs), ...]``, ``envs`` each micro-batch's environment ids
    (1-D tensor) or sizes (list, samples grouped), sizes of any length per micro-batch. ``head``: the
    ``nn.Linear`` head (its ``bias`` sets the bias option). ``method``: ``"hgp"``, ``"hutchinson"``,
    ``"full_hessian"`` (total = erm + alpha * hessian + beta * gradient, beta defaulting to 1) or
    ``"fishr"`` (total = erm + alpha * fishr_penalty, returned as ``hessian``; ``gradient`` is 0 and
    ``beta`` must not be given). erm = mean_e L_e. ``options``: the penalty function's keywords
    (``loss``, ``num_envs``, ``env_reduction``, ``backend``, ``process_group``, ...; not ``bias`` or
    ``ddp_reduction``). Returns HeadAlignment(total, erm, hessian, gradient, logits), detached.

    With ``process_group`` every rank passes its own micro-batches (the same number on every rank); the
    statistics and the ERM term are those of all ranks' samples together, and every rank ends with the
    global gradient (see the module docstring).
    """
    check_choice("method", method, METHODS)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"head must be the nn.Linear head itself (not wrapped in DDP or another module); "
                        f"got {type(head).__name__}")
    if is_dtensor(head.weight):
        raise TypeError("head: its weight is a DTensor (sharded by FSDP2's fully_shard): exact_accumulation_step reads "
                        "the head's weight directly; keep the head unsharded (shard the featurizer only)")
    for name in ("bias", "ddp_reduction"):
        if name in options:
            raise TypeError(f"exact_accumulation_step sets {name} itself ({'the head decides it' if name == 'bias' else 'gradients come back averaged, as DDP does'}); drop the option")
    if method == "fishr":
        if beta is not None:
            raise TypeError("beta is not used by method='fishr' (total = erm + alpha * penalty); drop it")
        beta = 0.0
    elif beta is None:
        beta = 1.0
    group = options.get("process_group")
    if group is not None and (not dist.is_available() or not dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized")
    num_envs, error, inputs = options.pop("num_envs", None), None, []
    try:
        inputs, labels, ids, sizes_e = _micro_batch_parts(micro_batches)
        if num_envs is None:
            num_envs = sizes_e if sizes_e is not None else int(max(int(i.max()) for i in ids) + 1)
    except (ValueError, TypeError) as err:
        if group is None:
            raise
        error = err
    if group is not None:
        # before any other collective: every rank raises the same error if one rejected its micro-batches or the
        # ranks' counts differ (the featurizer's collectives pair up by call); E is the ranks' largest
        num_envs = agree(group, [("micro-batches", len(inputs))], error,
                         (num_envs if isinstance(num_envs, int) else 0, False))
    labels, env_ids = torch.cat(labels), torch.cat(ids)
    loss = options.get("loss", "cross_entropy")
    has_bias = head.bias is not None

    def objective(features):
        if method != "fishr" and group is None:
            out = linear_head_alignment(features, head.weight, head.bias, labels, env_ids, method=method,
                                        alpha=alpha, beta=beta, num_envs=num_envs, **options)
            return (out.total, out)
        logits = F.linear(features, head.weight, head.bias)
        if method == "fishr":
            hessian = fishr_penalty(logits, features, labels, env_ids, bias=has_bias, num_envs=num_envs, **options)
            gradient = torch.zeros((), dtype=hessian.dtype, device=hessian.device)
        else:
            hessian, gradient = PENALTIES[method].function(logits, features, labels, env_ids, bias=has_bias,
                                                           num_envs=num_envs, **options)
        if group is None:
            erm = env_mean_loss(logits, labels, env_ids, loss=loss, num_envs=num_envs, validate=False).mean()
            erm_value = erm
        else:
            erm, erm_value = _global_erm(logits, labels, env_ids, num_envs, loss, group)
        total = erm + alpha * hessian + beta * gradient
        return (total, HeadAlignment(erm_value + alpha * hessian + beta * gradient, erm_value, hessian, gradient,
                                     logits))

    head_params = [p for p in head.parameters() if p.requires_grad]
    before = [None if p.grad is None else p.grad.clone() for p in head_params] if group is not None else None
    _, out = accumulated_backward(featurizer, inputs, objective, process_group=group)
    if group is not None:
        _all_reduce_increment(head_params, before, group)
    return HeadAlignment(*(t.detach() for t in out))
