"""Shared test helpers: random cases and one "assert close, show where not" check."""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

import hgkernels as hk


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both vanish)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> float:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    if not err <= rtol:  # also catches NaN
        diff = (actual.detach().double() - expected.detach().double()).abs()
        worst = torch.topk(diff.flatten(), min(5, diff.numel())).indices
        rows = [f"  at {tuple(int(i) for i in torch.unravel_index(w, diff.shape))}: "
                f"got {actual.flatten()[w].item():.12g}, expected {expected.flatten()[w].item():.12g}"
                for w in worst]
        raise AssertionError(f"{what}: relative error {err:.3e} > {rtol:.1e}\n" + "\n".join(rows))
    return err


@dataclass
class Case:
    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    envs: Union[torch.Tensor, List[int]]
    loss: str
    bias: bool

    def leaves(self, dtype: Optional[torch.dtype] = None):
        """Fresh requires-grad copies of logits and features (optionally cast)."""
        dtype = dtype or self.logits.dtype
        return (self.logits.detach().to(dtype).requires_grad_(True),
                self.features.detach().to(dtype).requires_grad_(True))


def make_case(seed: int, *, loss: str, bias: bool, sizes: List[int], num_classes: int, num_features: int,
              shuffle: bool = True, as_sizes: bool = False, dtype=torch.float64, scale: float = 1.5) -> Case:
    """A random case: env sizes `sizes`; ids shuffled (or a size list when as_sizes)."""
    gen = torch.Generator().manual_seed(seed)
    n, c, d = sum(sizes), num_classes, num_features
    env_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if shuffle and not as_sizes:
        env_ids = env_ids[torch.randperm(n, generator=gen)]
    logits = scale * torch.randn(n, c, generator=gen, dtype=torch.float64)
    features = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        labels = torch.randint(0, c, (n,), generator=gen)
    elif loss == "binary_cross_entropy":
        labels = torch.rand(n, c, generator=gen, dtype=torch.float64)
        labels[: n // 2] = labels[: n // 2].round()  # hard and soft targets
    else:
        labels = torch.randn(n, c, generator=gen, dtype=torch.float64)
    return Case(logits.to(dtype), features.to(dtype), labels if loss == "cross_entropy" else labels.to(dtype),
                list(sizes) if as_sizes else env_ids, loss, bias)


def penalty_and_grads(fn, case: Case, dtype=None, alpha: float = 0.7, beta: float = 1.3, form: str = "feature",
                      **kwargs):
    """Penalty values and d(alpha*hessian + beta*gradient)/d(logits, features).

    ``form`` defaults to the C × Dh form, so backend kernels stay under test; tests of the
    sample (Gram) form ask for it."""
    logits, features = case.leaves(dtype)
    labels = case.labels if case.loss == "cross_entropy" else case.labels.to(logits.dtype)
    pen = fn(logits, features, labels, case.envs, loss=case.loss, bias=case.bias, form=form, **kwargs)
    d_logits, d_features = torch.autograd.grad(alpha * pen.hessian + beta * pen.gradient, (logits, features))
    return pen.hessian.detach(), pen.gradient.detach(), d_logits, d_features


def start_ranks(worker, world: int, directory, init_name: str, *args):
    """Spawn `world` processes running worker(rank, world, init_file, results, *args), the ranks of one
    gloo group initialised through a file in `directory`; returns (processes, results queue)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_file = os.path.join(str(directory), init_name)
    procs = [ctx.Process(target=worker, args=(rank, world, init_file, results, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    return procs, results


def _cases_worker(rank, world, init_file, results, run_rank, cases, timeout_s):
    import datetime
    import traceback
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=timeout_s))
        group = torch.distributed.group.WORLD
        out = []
        for case in cases:
            try:
                out.append(("ok", run_rank(case, rank, world, group)))
            except Exception as err:  # reported to the parent as text
                out.append(("error", f"{type(err).__name__}: {err}"))
        results.put((rank, out))
        torch.distributed.destroy_process_group()
    except Exception:
        results.put((rank, [("crash", traceback.format_exc())]))


def run_cases_on_ranks(run_rank, world: int, cases, directory, name: str, timeout_s: float = 60):
    """Every case's ``run_rank(case, rank, world, group)`` on `world` gloo ranks (one group for all cases):
    per case, each rank's ("ok", result) or ("error", text); ranks still alive after the results (or
    after the timeout) are killed, so a hung collective fails the test instead of hanging it."""
    procs, results = start_ranks(_cases_worker, world, directory, f"init-{name}-{world}-{os.getpid()}", run_rank,
                                 cases, timeout_s)
    try:
        gathered = dict(results.get(timeout=timeout_s * (len(cases) + 2)) for _ in range(world))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return [[gathered[r][i] for r in range(world)] for i in range(len(cases))]


CLOSED_FORM = ["torch", "native"]
# (backend, form) pairs that every call can take on CPU
ALL_PATHS = [("torch", "feature"), ("native", "feature"), ("torch", "sample"), ("reference", "feature"),
             ("triton", "feature")]
FORMS = ["feature", "sample"]
PENALTIES = {"hutchinson": hk.hutchinson_penalty, "hgp": hk.hgp_penalty}


def small_case(seed=0, loss="cross_entropy", sizes=(5, 7, 4), c=3, d=4, **kw):
    """A small case with a bias column, 3 environments of unequal sizes by default."""
    return make_case(seed, loss=loss, bias=True, sizes=list(sizes), num_classes=c, num_features=d, **kw)


def head_inputs(case, dtype=torch.float64):
    """A head W (leaf) producing the case's logits shape from its features: (W, features leaf)."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(case.logits.shape[1], case.features.shape[1], generator=gen, dtype=dtype, requires_grad=True)
    feats = case.features.to(dtype).requires_grad_(True)
    return w, feats


def run_updates(algorithm, batches):
    """A DomainBed algorithm's logs over (seed, minibatches) batches, torch seeded before each update."""
    logs = []
    for seed, mb in batches:
        torch.manual_seed(seed)
        logs.append(algorithm.update(mb))
    return logs


def assert_close_params(net_a, net_b, rtol=1e-10):
    """Each parameter of net_a within rtol of net_b's, relative to net_b's largest entry."""
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= rtol * scale, f"{name}: max |diff| {err:.3e} vs max |param| {scale:.3e}"
