"""Input validation and the environment-segment layout shared by every backend.

Everything user-facing is checked here, once, with the argument's name in the
message; backends assume validated inputs (they check only what they themselves cannot run).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.utils._python_dispatch

LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")
ENV_REDUCTIONS = ("mean", "sum")

EnvsArg = Union[torch.Tensor, Sequence[int]]


class EnvSegments:
    """Samples grouped by environment.

    ``env_ids`` (N,) int64 holds each sample's environment; ``order`` (N,) lists
    sample indices sorted by environment (stable), so environment ``e`` owns
    ``order[offsets[e]:offsets[e+1]]``. Kernels read rows through ``order``
    instead of gathering the features into a sorted copy.

    ``counts`` are the per-environment sizes on the host, or None while torch.compile
    traces ids given as a tensor (reading them would need the data); the device-side
    ``counts_tensor`` then comes from the ids and ``max_count`` is the bound N.
    The derived tensors are made on first use and kept (plain attributes rather than
    functools.cached_property, whose lock torch.compile cannot trace).
    """

    def __init__(self, env_ids: torch.Tensor, num_envs: int, counts: Optional[Sequence[int]], grouped: bool):
        self.env_ids = env_ids
        self.num_envs = num_envs
        self.counts = None if counts is None else tuple(int(c) for c in counts)
        self.device = env_ids.device
        # grouped: env_ids is already non-decreasing, so `order` is the identity
        self.grouped = grouped
        self._counts_tensor = self._offsets = self._order = None

    @classmethod
    def from_layout(cls, env_ids: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor) -> "EnvSegments":
        """The segments a kernel call was made with (env_ids, order and offsets as `EnvSegments` made them)."""
        counts = offsets.diff()
        segments = cls(env_ids, offsets.numel() - 1, counts.tolist(), grouped=False)
        segments._counts_tensor, segments._offsets, segments._order = counts, offsets, order
        return segments

    @property
    def counts_tensor(self) -> torch.Tensor:
        if self._counts_tensor is None:
            if self.counts is not None:
                self._counts_tensor = torch.tensor(self.counts, dtype=torch.int64, device=self.device)
            else:
                ones = torch.ones_like(self.env_ids)
                self._counts_tensor = ones.new_zeros(self.num_envs).index_add_(0, self.env_ids, ones)
        return self._counts_tensor

    @property
    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            self._offsets = torch.cat([self.counts_tensor.new_zeros(1), torch.cumsum(self.counts_tensor, 0)])
        return self._offsets

    @property
    def order(self) -> torch.Tensor:
        if self._order is None:
            self._order = (torch.arange(self.env_ids.numel(), device=self.device) if self.grouped
                           else torch.argsort(self.env_ids, stable=True))
        return self._order

    @property
    def max_count(self) -> int:
        return max(self.counts) if self.counts is not None else self.env_ids.numel()


@dataclass
class HeadProblem:
    """Validated inputs of one call, in the layout backends consume.

    logits (N, C) and features (N, D) keep the caller's dtype (any strides), or both become float32 where
    the caller mixed float16/bfloat16 with float32 (autocast's output; `mixed_dtype`);
    ``compute_dtype`` is float32 for float16/bfloat16 inputs, else their own.
    ``targets``: int64 (N,) class ids for cross_entropy, else (N, C) floats.
    """

    logits: torch.Tensor
    features: torch.Tensor
    targets: torch.Tensor
    loss: str
    bias: bool
    segments: EnvSegments
    # validate=True left the value scans to `check_deferred_values` (see `prepare`)
    value_checks_deferred: bool = False

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    @property
    def head_width(self) -> int:
        """Dh: D + 1 with a bias column, else D."""
        return self.num_features + int(self.bias)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.logits.dtype)

    def with_tensors(self, logits: Optional[torch.Tensor], features: Optional[torch.Tensor],
                     targets: Optional[torch.Tensor] = None) -> "HeadProblem":
        """The same problem on other tensors (None drops them: an autograd context keeps its
        tensors as saved tensors, which autograd frees after backward)."""
        return HeadProblem(logits, features, self.targets if targets is None else targets, self.loss, self.bias,
                           self.segments, self.value_checks_deferred)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Dtypes that may be mixed in one call (what torch.autocast makes of float32 tensors): computed in float32.
MIXABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
AUTOCAST_DEVICES = ("cpu", "cuda")


def mixed_dtype(named: dict) -> Optional[torch.dtype]:
    """None when the named floating tensors (None entries skipped) share one dtype; float32 when they mix
    float16, bfloat16 and float32 (autocast's logits beside float32 features, or the reverse): the call
    computes in float32, as it does for half inputs. Any other mix (float64 with another dtype) is the
    caller's own choice of dtypes and raises a TypeError naming the arguments."""
    present = {name: t.dtype for name, t in named.items() if t is not None}
    if len(set(present.values())) <= 1:
        return None
    if all(d in MIXABLE_DTYPES for d in present.values()):
        return torch.float32
    (first, first_dtype), *rest = present.items()
    other, other_dtype = next((n, d) for n, d in rest if d != first_dtype)
    raise TypeError(f"{other} dtype {other_dtype} must match {first} dtype {first_dtype} (float16, bfloat16 and "
                    "float32 may be mixed, as torch.autocast makes them, and are computed in float32; float64 "
                    "must not be mixed with another dtype)")


def autocast_off(fn):
    """`fn` run with torch.autocast disabled (cpu and cuda): inside autocast the library computes in the
    dtype its inputs' rules give (float32 for half inputs), never in autocast's lower precision; the
    inputs are whatever autocast made (`mixed_dtype`). Outside autocast it costs two flag reads."""
    @functools.wraps(fn)
    def without_autocast(*args, **kwargs):
        enabled = [device for device in AUTOCAST_DEVICES if torch.is_autocast_enabled(device)]
        if not enabled:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in enabled:
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)
    return without_autocast


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf. A sum is finite only when every entry is, and it is one pass without temporaries
    (isfinite makes several N×D masks); only a non-finite sum (or one that overflowed, as half-precision
    sums of finite values can) needs the elementwise check."""
    return math.isfinite(tensor.sum().item()) or bool(torch.isfinite(tensor).all())


def _check_finite(name: str, tensor: torch.Tensor, masked_logits: bool = False) -> None:
    """NaN/Inf raise; with ``masked_logits`` (cross_entropy) a -inf logit is a masked class and
    allowed, as long as each row keeps a finite one."""
    if all_finite(tensor):
        return
    if not masked_logits:
        raise ValueError(f"{name} contains NaN or Inf")
    if bool(torch.isnan(tensor).any()) or bool((tensor == float("inf")).any()):
        raise ValueError(f"{name} contains NaN or +Inf (-inf is allowed, for masked classes)")
    if bool((tensor.amax(1) == float("-inf")).any()):
        raise ValueError(f"{name} has a row whose every entry is -inf (at least one class must be unmasked)")


_SIZES_NOT_IDS = ("; a list or tuple is read as per-environment sizes (samples grouped by environment), "
                  "per-sample environment ids must be a tensor: torch.as_tensor(envs)")


def short_list(ids: Sequence[int], limit: int = 8) -> str:
    """A short list for an error message: the first `limit` ids and how many there are."""
    shown = ", ".join(map(str, ids[:limit]))
    return f"[{shown}]" if len(ids) <= limit else f"[{shown}, ...] ({len(ids)} in all)"


def _in_compiled_trace() -> bool:
    return torch.compiler.is_compiling()


# Segments of size lists, kept by (sizes, device): a training loop passes the same sizes every step, and
# building the ids, offsets and order is several small ops. Nothing in them is ever written after they
# are built, and none is handed to the user (backward keeps env_ids as a saved tensor, read only).
_SIZED_SEGMENTS: dict = {}
_SIZED_SEGMENTS_KEPT = 32


def plain_eager() -> bool:
    """Neither torch.compile tracing nor a dispatch mode (FakeTensorMode, ...) is active: tensors are
    real, their memory may be handed to the kernels and kept."""
    return not (_in_compiled_trace() or torch.utils._python_dispatch._get_current_dispatch_mode() is not None)


def _may_keep_segments() -> bool:
    """Kept segments must be ordinary tensors usable by any later call: not inference tensors (autograd
    cannot save them), nor tensors made while torch.compile, a torch.func transform or a dispatch mode
    (fake tensors) is active."""
    return (plain_eager() and not torch.is_inference_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None)


def _sized_segments(sizes: tuple, device: torch.device, n: int) -> EnvSegments:
    env_ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device),
                                      output_size=n)
    segments = EnvSegments(env_ids, len(sizes), sizes, grouped=True)
    if not _in_compiled_trace():  # build the derived tensors now, once
        segments.counts_tensor, segments.offsets, segments.order  # noqa: B018
    return segments


def _segments(envs: EnvsArg, n: int, device: torch.device, num_envs: Optional[int], shard: bool) -> EnvSegments:
    """``shard``: this is one rank's part of a distributed batch, where an environment (or the whole
    batch) may be absent locally; the emptiness check then runs on the global counts."""
    if num_envs is not None and (isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1):
        raise ValueError(f"num_envs must be a positive int; got {num_envs!r}")
    if isinstance(envs, torch.Tensor):
        if envs.dtype.is_floating_point or envs.dtype.is_complex or envs.dtype == torch.bool:
            raise TypeError(f"envs must be an integer tensor of environment ids; got dtype {envs.dtype}")
        if envs.dim() != 1 or envs.shape[0] != n:
            raise ValueError(f"envs must have shape ({n},) to match logits; got {tuple(envs.shape)}")
        if envs.device != device:
            raise ValueError(f"envs is on {envs.device} but logits are on {device}")
        env_ids = envs.to(torch.int64)
        if _in_compiled_trace():
            # The sizes live in the data; a traced graph cannot read them (see EnvSegments).
            if num_envs is None:
                raise ValueError("under torch.compile, envs given as a tensor of ids needs num_envs= "
                                 "(or pass envs as a list of sizes)")
            return EnvSegments(env_ids, num_envs, None, grouped=False)
        # Checked whatever `validate` says: the sizes are read on the host anyway, and an id
        # outside [0, E) or an empty environment has no meaning (a mean over no samples).
        if shard and n == 0:
            return EnvSegments(env_ids, num_envs, [0] * num_envs, grouped=True)
        # Ids already grouped (DomainBed's concatenated minibatches) need no pass beyond this check: the
        # range is the first and last id and the sizes come from a binary search.
        grouped = n < 2 or bool((env_ids[1:] >= env_ids[:-1]).all())
        lo, hi = env_ids[[0, -1]].tolist() if grouped else (int(v) for v in torch.aminmax(env_ids))
        if lo < 0:
            raise ValueError(f"envs holds a negative environment id ({lo})")
        if num_envs is not None and hi >= num_envs:
            raise ValueError(f"envs holds id {hi} but num_envs={num_envs}")
        e = num_envs if num_envs is not None else hi + 1
        if e > n and not shard:  # some environment must be empty; say so before sizing anything by E
            raise ValueError(f"envs: {e} environments (ids 0..{e - 1}) but only {n} samples, so some environment "
                             "has no samples; number the environments 0..E-1")
        if grouped:
            bounds = torch.searchsorted(env_ids, torch.arange(e + 1, device=env_ids.device))
            counts = bounds.diff().tolist()
        else:
            counts = torch.bincount(env_ids, minlength=e).tolist()
        empty = [i for i, c in enumerate(counts) if c == 0]
        if empty and not shard:
            raise ValueError(f"envs: environment(s) {short_list(empty)} of {e} have no samples")
        return EnvSegments(env_ids, e, counts, grouped)
    if isinstance(envs, (list, tuple)):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in envs):
            raise TypeError("envs given as a sequence must hold ints (per-environment sizes)")
        if len(envs) == 0 or any(c < 0 or (c == 0 and not shard) for c in envs):
            raise ValueError(f"envs sizes must be positive (an environment needs samples); got {short_list(list(envs))}"
                             + _SIZES_NOT_IDS)
        if sum(envs) != n:
            raise ValueError(f"envs sizes sum to {sum(envs)} but logits hold {n} samples" + _SIZES_NOT_IDS)
        if num_envs is not None and num_envs != len(envs):
            raise ValueError(f"num_envs={num_envs} disagrees with {len(envs)} sizes in envs")
        if not _may_keep_segments():
            return _sized_segments(tuple(envs), device, n)
        key = (tuple(envs), device)
        segments = _SIZED_SEGMENTS.pop(key, None) or _sized_segments(*key, n)
        _SIZED_SEGMENTS[key] = segments  # most recent last; the oldest goes when full
        if len(_SIZED_SEGMENTS) > _SIZED_SEGMENTS_KEPT:
            del _SIZED_SEGMENTS[next(iter(_SIZED_SEGMENTS))]
        return segments
    raise TypeError(f"envs must be a 1-D integer tensor of ids or a list of sizes; got {type(envs).__name__}")


def _targets(loss: str, labels, n: int, c: int, device, dtype, validate: bool) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but logits are on {device}")
    if loss == "cross_entropy":
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels for loss='cross_entropy' must be integer class ids; got dtype {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must have shape ({n},) for loss='cross_entropy'; got {tuple(labels.shape)}")
        labels = labels.to(torch.int64)
        if validate:
            _check_label_range(labels, c)
        return labels
    if not labels.dtype.is_floating_point:
        raise TypeError(f"labels for loss={loss!r} must be floating targets; got dtype {labels.dtype}")
    if labels.dim() == 1 and c == 1 and labels.shape[0] == n:
        labels = labels.unsqueeze(1)
    if labels.shape != (n, c):
        raise ValueError(f"labels for loss={loss!r} must have shape ({n}, {c})" + (f" or ({n},)" if c == 1 else "")
                         + f"; got {tuple(labels.shape)}")
    if validate:
        _check_finite("labels", labels)
        if loss == "binary_cross_entropy" and n and (float(labels.min()) < 0 or float(labels.max()) > 1):
            raise ValueError("labels for loss='binary_cross_entropy' must lie in [0, 1]")
    return labels.to(dtype)


def _check_label_range(labels: torch.Tensor, c: int) -> None:
    if labels.numel():
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= c:
            raise ValueError(f"labels must lie in [0, {c}) (C = logits.shape[1]); got range [{lo}, {hi}]")


def _check_not_vmapped(**tensors) -> None:
    for name, t in tensors.items():
        while isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t):
            if torch._C._functorch.is_batchedtensor(t):
                raise ValueError(f"{name} is batched by torch.func.vmap (vmap, jacfwd and hessian batch the inputs): "
                                 "hgkernels penalties do not support vmap, since their environment layout is "
                                 "read from the data; call once per batch element (torch.func.grad and jacrev work)")
            t = torch._C._functorch.get_unwrapped(t)


def prepare(logits, features, labels, envs, *, loss: str, bias: bool, num_envs: Optional[int] = None,
            validate: bool = True, shard: bool = False, defer_value_checks: bool = False) -> HeadProblem:
    """Check the user's tensors and build the `HeadProblem` every backend consumes.

    1-D logits are read as a single logit per sample (C = 1). Raises TypeError
    for wrong types/dtypes and ValueError for wrong shapes, devices or values.

    ``validate=False`` skips the scans that read every value (NaN/Inf in logits, features
    and targets; the label range; binary targets in [0, 1]). The structural checks stay: an
    environment id outside [0, E) or an empty environment always raises. ``shard`` (one rank's
    part of a distributed batch, ids needing ``num_envs``) admits an empty batch or environment:
    the distributed path checks the global counts. A cross_entropy
    label outside [0, C) then makes every label-dependent output NaN (the gradient term, HGP's
    Hessian term, all gradients) on every backend; nothing is read out of bounds.
    """
    check_choice("loss", loss, LOSSES)
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool; got {type(bias).__name__}")
    for name, t in (("logits", logits), ("features", features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor; got dtype {t.dtype}")
    if logits.dim() == 1:
        logits = logits.unsqueeze(1)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, C) or (N,); got {tuple(logits.shape)}")
    if features.dim() != 2:
        raise ValueError(f"features must have shape (N, D); got {tuple(features.shape)}")
    n, c = logits.shape
    if features.shape[0] != n:
        raise ValueError(f"features has {features.shape[0]} rows but logits has {n}")
    if (n == 0 and not shard) or c == 0 or features.shape[1] == 0:
        raise ValueError(f"logits {tuple(logits.shape)} and features {tuple(features.shape)} must be non-empty")
    if features.device != logits.device:
        raise ValueError(f"features is on {features.device} but logits are on {logits.device}")
    if logits.device.type == "meta":
        raise ValueError("logits are on the meta device, which holds no values: hgkernels needs cpu or cuda tensors "
                         "(under torch.compile, fake tensors are traced as usual)")
    if not _in_compiled_trace():  # dynamo traces neither functorch's queries nor vmap
        _check_not_vmapped(logits=logits, features=features, labels=labels, envs=envs)
    common = mixed_dtype({"logits": logits, "features": features})
    if common is not None:  # differentiable casts: autograd returns each gradient in its input's dtype
        logits, features = logits.to(common), features.to(common)
    # Deferred (validate and defer_value_checks): the scans wait for the gradient term, which any value they
    # reject makes non-finite (check_deferred_values). The logits and label range only with cross_entropy:
    # a sigmoid saturates at an infinite logit.
    deferred = validate and defer_value_checks
    scan_logits_labels = validate and not (deferred and loss == "cross_entropy")
    if scan_logits_labels:
        _check_finite("logits", logits, masked_logits=loss == "cross_entropy")
    if validate and not deferred:
        _check_finite("features", features)
    targets = _targets(loss, labels, n, c, logits.device, compute_dtype(logits.dtype), scan_logits_labels)
    if shard and isinstance(envs, torch.Tensor) and num_envs is None:
        raise ValueError("num_envs is needed for a rank's shard given as ids (hgkernels.distributed agrees on it)")
    segments = _segments(envs, n, logits.device, num_envs, shard)
    return HeadProblem(logits, features, targets, loss, bias, segments, deferred)


def check_deferred_values(problem: HeadProblem, gradient_term: torch.Tensor) -> None:
    """The value scans that `prepare` deferred, run only when the gradient term is non-finite (they then
    raise in prepare's order, logits, features, labels, or pass on a genuine overflow). The structural
    checks (types, shapes, environment ids) ran in `prepare`, so an input with a structural and a value
    problem reports the structural one here, the value one on the eager paths (backend="reference",
    shards). Each rejected value makes that term non-finite on every backend: a non-finite feature z_ij makes every G_e[c, j] = (1/N_e) sum_i r_ic z_ij
    of its environment inf or NaN (NaN when r_ic = 0), and with cross_entropy a NaN or +inf logit, a row of
    -inf logits (softmax NaN) or a label outside [0, C) (a NaN residual, as validate=False documents)
    makes a sample's residual r_i NaN; the term is a sum of the G_e's squared deviations."""
    if problem.value_checks_deferred and not math.isfinite(gradient_term.item()):
        cross_entropy = problem.loss == "cross_entropy"
        if cross_entropy:
            _check_finite("logits", problem.logits, masked_logits=True)
        _check_finite("features", problem.features)
        if cross_entropy:
            _check_label_range(problem.targets, problem.num_classes)
