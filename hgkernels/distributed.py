"""Exact penalties across ranks: the statistics of the concatenation of every rank's batch.

Every statistic is a per-environment sum over samples divided by N_e (docs/design.md §5.3), so a
rank's share of the global statistic is its local sum over the global count. `GlobalStats` wraps
any closed-form backend and is the one place that knows about ranks:

- ``head_stats``: the backend's local per-environment means times the local counts give local
  sums; one all-reduce (SUM) of the packed sums — with the local counts on the first call, so the
  exact Hutchinson forward needs exactly one — and a division by the global counts give every rank
  the same global statistics.
- ``per_sample_backward``: local. Each rank's samples enter the global statistic with weight
  1/N_e(global) instead of the backend's 1/N_e(local); the per-sample backward is linear in that
  weight, so scaling the upstream matrices by N_e(local)/N_e(global) is exact. The result is this
  rank's share of dPsi/dinputs, times the world size for ``ddp_reduction="mean"`` (the default:
  DistributedDataParallel averages gradients over ranks, and the average of W shares is their sum)
  or as it is for ``"sum"`` (code that sums gradients itself).

Before any of these, every call makes one agreement (`agree`), whatever ``validate`` says: each rank
checks its own inputs, catching its error, and all ranks all-gather a fixed-size packet (failed or not,
the rank's E, a hash of its spec: the options, validate, num_envs, ddp_reduction, dtype, C, D), so ranks
that disagree on anything still match sizes and every rank raises the same ValueError at once instead
of hanging or returning different penalties. It costs one all-gather of 40 bytes per rank, which also
agrees E when ids come without num_envs. ``validate=False`` skips only the value scans: it keeps the
agreement, since a disagreement let through hangs or returns wrong penalties silently.

The plans run unchanged on top, so HGP's second statistic (the HVP of the global gradient) and
its backward's HVP of the upstream matrix each cost one more all-reduce. Every rank makes the same
collectives in the same order whatever its data: an empty shard contributes zeros.
"""
from __future__ import annotations

import hashlib
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ._inputs import EnvSegments, HeadProblem, short_list
from .penalties.base import Plan
from .backends.base import Backend, HeadStats, HeadTerm, add_head_term

DDP_REDUCTIONS = ("mean", "sum")


def world_size(group) -> int:
    return dist.get_world_size(group)


def check_group(process_group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD) or None; got {type(process_group).__name__}")


AGREEMENT_TEXT_BYTES = 4096  # a rank's spec and error, sent only when ranks disagree or one failed
_VALUE_CHARS, _ERROR_CHARS = 200, 1000


def local_num_envs(envs, num_envs) -> Tuple[int, bool]:
    """(this rank's E, whether it is fixed): ``num_envs``, or a size list's length (fixed); else the
    largest id plus one, a lower bound (0 for no ids) that the agreement raises to the ranks' maximum.
    Never raises: a malformed envs is `prepare`'s to reject, after which the rank still joins."""
    if num_envs is not None:
        return (num_envs if isinstance(num_envs, int) and not isinstance(num_envs, bool) else 0), True
    if isinstance(envs, (list, tuple)):
        return len(envs), True
    if (isinstance(envs, torch.Tensor) and envs.dim() == 1 and envs.numel()
            and not (envs.dtype.is_floating_point or envs.dtype.is_complex or envs.dtype == torch.bool)):
        return int(envs.max()) + 1, False
    return 0, False


def generator_fingerprint(generator, device) -> str:
    """A short hash of the probe generator's state (every rank must draw the same probes), or what
    the argument is when it is not a generator (that rank's own check rejects it)."""
    if generator is None:
        generator = (torch.cuda.default_generators[device.index or 0]
                     if isinstance(device, torch.device) and device.type == "cuda" else torch.default_generator)
    if not isinstance(generator, torch.Generator):
        return f"not a torch.Generator ({type(generator).__name__})"
    return hashlib.sha1(generator.get_state().cpu().numpy().tobytes()).hexdigest()[:16]


def input_spec(logits, features) -> List[Tuple[str, Any]]:
    """The dtype, C and D every rank must share, read without raising (a malformed input is described,
    and rejected by that rank's own checks)."""
    def described(t, column: str):
        if not isinstance(t, torch.Tensor):
            return f"not a tensor ({type(t).__name__})"
        if column == "num_classes" and t.dim() == 1:
            return 1
        return t.shape[1] if t.dim() == 2 else f"{t.dim()}-D"
    return [("dtype", getattr(logits, "dtype", type(logits).__name__)),
            ("num_classes", described(logits, "num_classes")), ("feature width", described(features, "features"))]


def _shown(value) -> str:
    try:
        return repr(value)
    except Exception:  # a value that cannot show itself still takes part, by its type
        return f"a {type(value).__name__}"


def _one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _gather(local: torch.Tensor, group) -> List[torch.Tensor]:
    if dist.get_backend(group) == "nccl":
        local = local.to(torch.device("cuda", torch.cuda.current_device()))
    parts = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(parts, local, group=group)
    return [part.cpu() for part in parts]


def _ranks(ranks: Sequence[int], limit: int = 8) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    shown = ", ".join(map(str, ranks[:limit]))
    return f"ranks {shown}" + (f", ... ({len(ranks)} in all)" if len(ranks) > limit else "")


def _message(texts: Sequence[str]) -> str:
    """The same ValueError text on every rank, from every rank's (error line, spec lines)."""
    errors, specs = [], []
    for text in texts:
        error, *lines = text.split("\n")
        errors.append(error)
        specs.append(dict(line.split("\t", 1) for line in lines if "\t" in line))
    parts = [f"rank {rank} {'rejected its inputs' if error.startswith(('ValueError', 'TypeError')) else 'failed'} "
             f"({error})" for rank, error in enumerate(errors) if error]
    names = list(dict.fromkeys(name for spec in specs for name in spec))
    for name in names:
        by_value = {}
        for rank, spec in enumerate(specs):
            by_value.setdefault(spec.get(name, "nothing"), []).append(rank)
        if len(by_value) > 1:
            have = ", ".join(f"{_ranks(ranks)} {'has' if len(ranks) == 1 else 'have'} {value}"
                             for value, ranks in by_value.items())
            parts.append(f"ranks disagree on {name}: {have}")
    return "process_group: " + "; ".join(parts) + " (every rank raises this error)"


def agree(group, spec: Sequence[Tuple[str, Any]], error: Optional[BaseException],
          envs: Tuple[int, bool]) -> int:
    """The call's one agreement across ranks, before any other collective: returns E, or raises the same
    ValueError on every rank when any rank rejected its inputs (``error``) or the ranks' specs differ.

    Each rank sends a fixed-size packet (failed, its E and whether it is fixed, a 128-bit hash of its
    spec), so ranks that disagree on anything still match sizes: one all-gather of 5 int64 per rank.
    Only when a rank failed or the hashes differ, every rank (all see the same packets) sends its spec
    and error as text of a fixed size, a second all-gather, to name what differs."""
    lines = [f"{_one_line(name, _VALUE_CHARS)}\t{_one_line(_shown(value), _VALUE_CHARS)}" for name, value in spec]
    digest = hashlib.sha256("\n".join(lines).encode()).digest()
    local_e, fixed = envs
    packet = torch.tensor([int(error is not None), local_e, int(fixed),
                           int.from_bytes(digest[:8], "little", signed=True),
                           int.from_bytes(digest[8:16], "little", signed=True)], dtype=torch.int64)
    rows = [part.tolist() for part in _gather(packet, group)]
    if any(row[0] for row in rows) or any(row[3:] != rows[0][3:] for row in rows):
        error_line = "" if error is None else _one_line(f"{type(error).__name__}: {error}", _ERROR_CHARS)
        encoded = "\n".join([error_line, *lines]).encode()[:AGREEMENT_TEXT_BYTES]
        text = torch.zeros(AGREEMENT_TEXT_BYTES, dtype=torch.uint8)
        text[:len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        texts = [bytes(part.tolist()).rstrip(b"\0").decode(errors="replace") for part in _gather(text, group)]
        message = _message(texts)
        if error is not None:
            raise ValueError(message) from error
        raise ValueError(message)
    num_envs = max(row[1] for row in rows)
    if num_envs < 1:
        raise ValueError("process_group: no rank holds a sample, so the environments are unknown (every rank raises "
                         "this error)")
    short = [(rank, row[1]) for rank, row in enumerate(rows) if row[2] and row[1] != num_envs]
    if short:  # only size lists can be fixed here: equal num_envs are in the spec, ids beyond it fail locally
        have = ", ".join(f"rank {rank} gives {e} sizes" for rank, e in short)
        raise ValueError(f"process_group: ranks disagree on the number of environments: {have}, but the ranks' envs "
                         f"span {num_envs} (every rank raises this error)")
    return num_envs


class GlobalStats(Backend):
    """`inner`'s statistics made global over `group` (see the module docstring)."""

    differentiable_again = False

    def __init__(self, inner: Backend, group, ddp_reduction: str, local_counts: torch.Tensor):
        self.inner = inner
        self.name = inner.name
        self.group = group
        self.world = world_size(group)
        self.ddp_reduction = ddp_reduction
        self.local_counts = local_counts
        self.global_counts: Optional[torch.Tensor] = None
        # for benchmarks and tests: collectives made and bytes all-reduced by this call
        self.collectives = 0
        self.bytes_reduced = 0

    def unsupported_reason(self, problem: HeadProblem, auto: bool = False) -> Optional[str]:
        return self.inner.unsupported_reason(problem, auto)

    def num_samples(self, problem: HeadProblem) -> int:
        return int(self.global_counts.sum()) if self.global_counts is not None else problem.logits.shape[0]

    def _all_reduce(self, flat: torch.Tensor) -> None:
        dist.all_reduce(flat, group=self.group)
        self.collectives += 1
        self.bytes_reduced += flat.numel() * flat.element_size()

    def _share(self) -> torch.Tensor:
        """(E,) N_e(local) / N_e(global): a rank's weight in each environment's global mean."""
        return self.local_counts.to(self.global_counts.dtype) / self.global_counts

    def head_stats(self, problem: HeadProblem, *, gradient: bool = False, hess_diag: bool = False,
                   hvp_dirs: Optional[torch.Tensor] = None, diag_weight: str = "curvature") -> HeadStats:
        e, c, dh = problem.segments.num_envs, problem.num_classes, problem.head_width
        dtype, device = problem.compute_dtype, problem.logits.device
        wanted = [gradient, hess_diag, hvp_dirs is not None]
        if problem.logits.shape[0] > 0:
            local = list(self.inner.head_stats(problem, gradient=gradient, hess_diag=hess_diag, hvp_dirs=hvp_dirs,
                                               diag_weight=diag_weight))
        else:  # an empty shard still joins the collective
            k = 0 if hvp_dirs is None else hvp_dirs.shape[1]
            shapes = [(e, c, dh), (e, c, dh), (e, k, c, dh)]
            local = [torch.zeros(shape, dtype=dtype, device=device) if want else None
                     for want, shape in zip(wanted, shapes)]
        counts = self.local_counts.to(dtype)
        present = counts > 0
        # local means times local counts = local sums; an environment absent here contributes 0
        sums = [torch.where(present.view(-1, *[1] * (t.dim() - 1)), t * counts.view(-1, *[1] * (t.dim() - 1)), 0)
                for t in local if t is not None]
        first = self.global_counts is None
        flat = torch.cat([s.flatten() for s in sums] + ([counts] if first else []))
        self._all_reduce(flat)
        if first:
            self.global_counts = flat[-e:].clone()
            empty = (self.global_counts == 0).nonzero().flatten().tolist()
            if empty:  # every rank holds the same counts, so every rank raises
                raise ValueError(f"envs: environment(s) {short_list(empty)} of {e} have no samples on any rank")
        out, at = [], 0
        for t in local:
            if t is None:
                out.append(None)
                continue
            size = t.numel()
            total = flat[at:at + size].view(t.shape)
            out.append(total / self.global_counts.view(-1, *[1] * (t.dim() - 1)))
            at += size
        return HeadStats(*out)

    def partial_head_stats(self, problem: HeadProblem, *, hvp_dirs: torch.Tensor) -> torch.Tensor:
        """This rank's share of the global H_e V: local mean times N_e(local) / N_e(global)."""
        e, c, dh = problem.segments.num_envs, problem.num_classes, problem.head_width
        if problem.logits.shape[0] == 0:
            return torch.zeros((e, hvp_dirs.shape[1], c, dh), dtype=problem.compute_dtype, device=hvp_dirs.device)
        hvp = self.inner.head_stats(problem, hvp_dirs=hvp_dirs).hvp
        share = self._share().to(hvp.dtype).view(-1, 1, 1, 1)
        return torch.where(share > 0, hvp * share, 0)

    def reduce_partial(self, partial_sum: torch.Tensor) -> torch.Tensor:
        total = partial_sum.contiguous().clone()
        self._all_reduce(total)
        return total

    def per_sample_backward(self, problem: HeadProblem, *, grad_up: Optional[torch.Tensor] = None,
                            diag_up: Optional[torch.Tensor] = None, hvp_dirs: Optional[torch.Tensor] = None,
                            hvp_up: Optional[torch.Tensor] = None, diag_weight: str = "curvature",
                            head: Optional[HeadTerm] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        n, dtype = problem.logits.shape[0], problem.compute_dtype
        if n == 0:
            return add_head_term(problem.logits.new_zeros(problem.logits.shape, dtype=dtype),
                                 problem.features.new_zeros(problem.features.shape, dtype=dtype), head)
        share = self._share()
        scale = share * self.world if self.ddp_reduction == "mean" else share

        def scaled(up: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if up is None else up * scale.view(-1, *[1] * (up.dim() - 1)).to(up.dtype)

        return self.inner.per_sample_backward(problem, grad_up=scaled(grad_up), diag_up=scaled(diag_up),
                                              hvp_dirs=hvp_dirs, hvp_up=scaled(hvp_up), diag_weight=diag_weight,
                                              head=head)


def _all_gather_rows(local: torch.Tensor, counts: Sequence[int], group) -> torch.Tensor:
    """Every rank's rows of `local`, concatenated in rank order (padded to the largest shard for the
    collective, then trimmed)."""
    longest = max(counts)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


class GatheredPlan(Plan):
    """A plan over every rank's samples for penalties whose N × N Gram form couples samples across ranks
    (the full Hessian): each rank gathers the batch (logits, features, targets, env ids; about
    N·(C + D) numbers, against E·C·Dh for `GlobalStats`), runs `inner` on it, and its backward keeps this
    rank's rows, times the world size for ``ddp_reduction="mean"``. Every rank does the whole N² work."""

    def __init__(self, inner, group, ddp_reduction: str):
        self.inner, self.group, self.ddp_reduction = inner, group, ddp_reduction

    def feature_form(self, generator_state=None):
        raise ValueError("process_group under torch.compile, torch.func or create_graph is not supported")

    def _global_problem(self, problem: HeadProblem) -> HeadProblem:
        world = world_size(self.group)
        local_n = torch.tensor([problem.logits.shape[0]], device=problem.logits.device)
        sizes = [torch.zeros_like(local_n) for _ in range(world)]
        dist.all_gather(sizes, local_n, group=self.group)
        counts = [int(s) for s in sizes]
        rank = dist.get_rank(self.group)
        logits, features, targets, env_ids = (_all_gather_rows(t, counts, self.group) for t in (
            problem.logits, problem.features, problem.targets, problem.segments.env_ids))
        env_counts = torch.bincount(env_ids, minlength=problem.segments.num_envs).tolist()
        empty = [e for e, c in enumerate(env_counts) if c == 0]
        if empty:  # the gathered ids are the same on every rank, so every rank raises
            raise ValueError(f"envs: environment(s) {short_list(empty)} of {len(env_counts)} have no samples on any rank")
        segments = EnvSegments(env_ids, len(env_counts), env_counts, grouped=False)
        self.rows = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
        return HeadProblem(logits, features, targets, problem.loss, problem.bias, segments)

    def forward(self, backend, problem: HeadProblem):
        global_problem = self._global_problem(problem)
        self.global_problem = global_problem.with_tensors(None, None)
        self.global_problem_tensors = (global_problem.logits, global_problem.features)
        return self.inner.forward(backend, global_problem)

    def backward(self, backend, problem: HeadProblem, alpha, beta):
        logits, features = self.global_problem_tensors
        d_logits, d_features = self.inner.backward(backend, self.global_problem.with_tensors(logits, features),
                                                   alpha, beta)
        scale = world_size(self.group) if self.ddp_reduction == "mean" else 1
        return d_logits[self.rows] * scale, d_features[self.rows] * scale
