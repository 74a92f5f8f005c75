"""process_group: penalties and DDP gradients across gloo ranks equal the one-process run on the
concatenated batch (float64, 1e-10), and a bad input on one rank makes every rank raise.

Workers are spawned processes that return plain Python values (lists of floats, strings) through a
queue; every collective has a timeout and the parent kills workers that outlive theirs, so a bug
shows as a failure, never as a hung CI.
"""
import datetime
import multiprocessing
import os
import traceback

import pytest
import torch

import hgkernels as hk
from _helpers import run_cases_on_ranks

pytestmark = pytest.mark.slow  # several processes per test

TIMEOUT_S = 60
N_PER_ENV = (7, 5, 6)  # three environments, unequal sizes
D_IN, D_FEAT = 5, 4


def _data(loss, num_classes, seed=0):
    """The global batch: inputs, labels, env ids (shuffled), all float64."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(N_PER_ENV)
    ids = torch.repeat_interleave(torch.arange(len(N_PER_ENV)), torch.tensor(N_PER_ENV))
    ids = ids[torch.randperm(n, generator=gen)]
    x = torch.randn(n, D_IN, generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, num_classes, (n,), generator=gen)
    else:
        y = torch.rand(n, num_classes, generator=gen, dtype=torch.float64)
    return x, y, ids


class _Net(torch.nn.Module):
    """A small MLP featurizer and a linear head; forward returns (features, logits)."""

    def __init__(self, num_classes):
        super().__init__()
        self.featurizer = torch.nn.Sequential(torch.nn.Linear(D_IN, D_FEAT), torch.nn.Tanh())
        self.head = torch.nn.Linear(D_FEAT, num_classes)

    def forward(self, x):
        features = self.featurizer(x)
        return features, self.head(features)


def _model(num_classes, seed=1):
    torch.manual_seed(seed)
    return _Net(num_classes).double()


def _shards(rule, ids, world):
    """Per-rank sample indices: 'even' (round robin), 'uneven' (sizes differ), 'missing' (rank 1 holds
    no sample of environment 2), 'empty' (the last rank holds nothing)."""
    n = ids.numel()
    order = torch.arange(n)
    if rule == "even":
        return [order[r::world] for r in range(world)]
    if rule == "uneven":
        cuts = [0, 3, 11, n] if world == 3 else [0, 5, n]
        return [order[cuts[r]:cuts[r + 1]] for r in range(world)]
    if rule == "missing":
        parts = [order[r::world] for r in range(world)]
        moved = parts[1][ids[parts[1]] == 2]
        parts[1] = parts[1][ids[parts[1]] != 2]
        parts[0] = torch.cat([parts[0], moved])
        return parts
    if rule == "empty":
        return [order[r::world - 1] for r in range(world - 1)] + [order[:0]]
    raise ValueError(rule)


def _penalty_fn(case):
    return {"hgp": hk.hgp_penalty, "full": hk.full_hessian_penalty, "fishr": _fishr}.get(
        case["method"], hk.hutchinson_penalty)


def _fishr(*args, **kwargs):
    """fishr_penalty in the Penalty shape of the others (its whole value as the Hessian-side term)."""
    return hk.Penalty(hk.fishr_penalty(*args, **kwargs), torch.zeros((), dtype=torch.float64))


def _options(case):
    opts = dict(loss=case["loss"], env_reduction=case["reduction"], backend=case["backend"])
    if case["method"] != "fishr":
        opts["detach_reference"] = case["detach"]
    if case["method"] == "stochastic":
        opts.update(estimator="hutchinson", num_probes=4, generator=torch.Generator().manual_seed(3))
    return opts


def _local_inputs(case, x, y, ids, index):
    """A rank's envs argument: ids (num_envs given or agreed) or a size list with its samples grouped."""
    if case["envs"] == "ids":
        return x[index], y[index], ids[index], dict(num_envs=3) if case.get("num_envs") else {}
    local_ids = ids[index]
    grouped = index[torch.argsort(local_ids, stable=True)]
    sizes = torch.bincount(local_ids, minlength=3).tolist()
    return x[grouped], y[grouped], sizes, {}


def _run_rank(case, rank, world, group):
    from torch.nn.parallel import DistributedDataParallel as DDP
    num_classes = 1 if case["loss"] != "cross_entropy" else 3
    x, y, ids = _data(case["loss"], num_classes)
    xs, ys, envs, extra = _local_inputs(case, x, y, ids, _shards(case["shards"], ids, world)[rank])
    inner = _model(num_classes)
    model = DDP(inner) if case["ddp"] == "mean" else inner  # DDP averages the gradients in backward
    feats, logits = model(xs)
    if case.get("head"):  # HessianAlignmentLoss given the head: its process-group path, local ERM included
        assert case["ddp"] == "mean"
        pen = hk.HessianAlignmentLoss(case["method"], 0.6, 1.7, process_group=group, ddp_reduction=case["ddp"],
                                      **_options(case), **extra)(inner.head, feats, ys, envs)
        objective = pen.total
    else:
        pen = _penalty_fn(case)(logits, feats, ys, envs, process_group=group, ddp_reduction=case["ddp"],
                                **_options(case), **extra)
        objective = 0.6 * pen.hessian + 1.7 * pen.gradient
        if case["ddp"] == "mean":
            from hgkernels.module import _local_erm
            objective = objective + _local_erm(logits, ys, envs, case["loss"], extra.get("num_envs"))
    objective.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in inner.parameters()]
    if case["ddp"] == "sum":
        for g in grads:
            torch.distributed.all_reduce(g, group=group)
    return [float(pen.hessian), float(pen.gradient), torch.cat([g.flatten() for g in grads]).tolist()]


def _spawn(world, cases, tmp_path):
    return run_cases_on_ranks(_run_rank, world, cases, tmp_path, "ddp", TIMEOUT_S)


def _single_process(case, world):
    """The same objective on one process: penalty on the concatenated batch; DDP's mean of the ranks'
    local ERMs for the 'mean' cases."""
    from hgkernels.module import _local_erm
    num_classes = 1 if case["loss"] != "cross_entropy" else 3
    x, y, ids = _data(case["loss"], num_classes)
    model = _model(num_classes)
    feats, logits = model(x)
    pen = _penalty_fn(case)(logits, feats, y, ids, **_options(case))
    objective = 0.6 * pen.hessian + 1.7 * pen.gradient
    if case["ddp"] == "mean":
        parts = [p for p in _shards(case["shards"], ids, world)]
        erms = [_local_erm(logits[p], y[p], ids[p], case["loss"], 3) for p in parts if p.numel()]
        erms += [logits.sum() * 0] * (len(parts) - len(erms))
        objective = objective + torch.stack(erms).mean()
    objective.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return float(pen.hessian), float(pen.gradient), grads


def _case(**kw):
    base = dict(method="hgp", loss="cross_entropy", envs="ids", num_envs=True, shards="even", reduction="mean",
                detach=True, ddp="mean", backend="auto")
    base.update(kw)
    return base


CASES_2 = [
    _case(),
    _case(method="hutchinson", envs="sizes"),
    _case(method="hgp", shards="uneven", reduction="sum", detach=False),
    _case(method="hutchinson", shards="missing", num_envs=False),
    _case(method="hgp", shards="missing", envs="sizes", detach=False, backend="torch"),
    _case(method="stochastic", detach=False, shards="uneven"),
    _case(method="hgp", loss="binary_cross_entropy", reduction="sum", detach=False, ddp="sum"),
    _case(method="hutchinson", loss="binary_cross_entropy", ddp="sum", backend="torch"),
    _case(method="hgp", backend="native", shards="uneven"),
    _case(method="full", shards="uneven", detach=False),
    _case(method="full", shards="missing", envs="sizes", reduction="sum", ddp="sum", loss="binary_cross_entropy"),
    _case(method="fishr", shards="uneven"),
    _case(method="fishr", shards="missing", envs="sizes", ddp="sum", loss="binary_cross_entropy", backend="native"),
    _case(method="hgp", head=True, shards="uneven"),  # the head form of HessianAlignmentLoss
    _case(method="hutchinson", head=True, envs="sizes", shards="missing", loss="binary_cross_entropy"),
]
CASES_3 = [
    _case(shards="uneven"),
    _case(method="hutchinson", shards="empty", envs="sizes"),
    _case(method="hgp", shards="empty", detach=False, reduction="sum"),
    _case(method="stochastic", shards="missing", ddp="sum"),
    _case(method="full", shards="empty"),
    _case(method="fishr", shards="empty", reduction="sum"),
]


def _check(cases, world, tmp_path):
    worst = 0.0
    for case, per_rank in zip(cases, _spawn(world, cases, tmp_path)):
        statuses = {status for status, _ in per_rank}
        assert statuses == {"ok"}, f"{case}: {per_rank}"
        hessian, gradient, grads = _single_process(case, world)
        for _, (h, g, rank_grads) in per_rank:
            assert h == per_rank[0][1][0] and g == per_rank[0][1][1], "ranks disagree on the penalty"
            for got, want in ((h, hessian), (g, gradient)):
                assert abs(got - want) <= 1e-10 * max(abs(want), 1e-30), f"{case}: {got} vs {want}"
            rank_grads = torch.tensor(rank_grads, dtype=torch.float64)
            err = float((rank_grads - grads).abs().max() / grads.abs().max())
            worst = max(worst, err)
            assert err <= 1e-10, f"{case}: gradient relative error {err:.2e}"
    return worst


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    _check(CASES_2, 2, tmp_path)


def test_three_ranks_with_an_empty_rank_and_a_missing_environment(tmp_path):
    _check(CASES_3, 3, tmp_path)


def _bad_rank_worker(rank, world, init_file, results):
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=TIMEOUT_S))
        group = torch.distributed.group.WORLD
        x, y, ids = _data("cross_entropy", 3)
        out = []
        for what in ("label", "backend", "num_envs"):
            labels, backend, num_envs = y.clone(), "auto", 3
            if rank == 1 and what == "label":
                labels[0] = 7  # out of range on one rank only
            if rank == 1 and what == "backend":
                backend = "torch"
            if rank == 1 and what == "num_envs":
                num_envs = 4
            try:
                hk.hgp_penalty(x[:, :3], x[:, 3:], labels, ids, num_envs=num_envs, backend=backend,
                               process_group=group)
                out.append("no error")
            except ValueError as err:
                out.append(str(err))
        results.put((rank, out))
        torch.distributed.destroy_process_group()
    except Exception:
        results.put((rank, ["crash " + traceback.format_exc()]))


def test_a_rank_that_rejects_its_input_makes_every_rank_raise(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_file = os.path.join(str(tmp_path), "init-bad")
    procs = [ctx.Process(target=_bad_rank_worker, args=(r, 2, init_file, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        out = dict(results.get(timeout=3 * TIMEOUT_S) for _ in range(2))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    label, backend, num_envs = zip(*(out[r] for r in range(2)))
    assert "labels must lie in" in label[1] and "rank 1 rejected its inputs" in label[0]
    assert label[0] == label[1]
    assert backend[0] == backend[1] and "ranks disagree on backend: rank 0 has 'auto', rank 1 has 'torch'" in backend[0]
    assert all("num_envs" in m for m in num_envs), num_envs


def test_process_group_needs_an_initialized_group():
    with pytest.raises(ValueError, match="not initialized"):
        hk.hgp_penalty(torch.randn(6, 3), torch.randn(6, 2), torch.zeros(6, dtype=torch.int64), [3, 3],
                       process_group=object())


def test_collectives_per_penalty():
    """One all-reduce forward for exact Hutchinson; HGP two forward and one backward; the 300-probe
    estimator two forward (benchmarks/distributed_bytes.py on a one-rank group)."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "distributed_bytes.py")
    out = subprocess.run([sys.executable, script, "--smoke"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    counts = {line.split("|")[2].strip(): line.split("|")[3].strip() for line in out.splitlines()
              if line.startswith("| tiny")}
    assert counts == {"hutchinson": "1 / 0", "hgp": "2 / 1", "hutchinson 300 probes": "2 / 0"}, out


def test_ddp_reduction_is_checked_with_or_without_a_group():
    with pytest.raises(ValueError, match="ddp_reduction"):
        hk.hgp_penalty(torch.randn(6, 3), torch.randn(6, 2), torch.zeros(6, dtype=torch.int64), [3, 3],
                       ddp_reduction="avg")
