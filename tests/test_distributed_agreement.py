"""process_group: ranks that disagree on an option, a dtype, a shape or a reduction, or one rank whose
input is bad, make EVERY rank raise the same ValueError promptly, naming what differs or which rank
failed and why (one agreement collective before any other: hgkernels.distributed.agree).

One spawned gloo group per world size (2 and 3) runs every case in turn and reports each as it ends;
the process group's timeout is long (60 s) and each raise must come within RAISE_S, so a hang shows as a
failure, and the parent kills workers that outlive DEADLINE_S, so CI never hangs.
"""
import datetime
import os
import queue
import time
import traceback

import pytest
import torch

import hgkernels as hk
from _helpers import start_ranks

pytestmark = pytest.mark.slow  # several processes per test

GROUP_TIMEOUT_S = 60
RAISE_S = 10.0
DEADLINE_S = 150
N, C, D, E = 18, 3, 4, 3


def _shard(rank, world, dtype=torch.float64, classes=C, width=D, loss="cross_entropy"):
    """This rank's slice of one global batch: logits, features, labels, env ids (every env on every rank)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(N, classes, generator=gen, dtype=torch.float64)
    features = torch.randn(N, width, generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        labels = torch.randint(0, min(classes, C), (N,), generator=gen)
    else:
        labels = torch.rand(N, classes, generator=gen, dtype=torch.float64)
    ids = torch.arange(N) % E
    rows = slice(rank, None, world)
    return logits[rows].to(dtype), features[rows].to(dtype), labels[rows], ids[rows]


def _hgp(rank, world, group, **options):
    logits, features, labels, ids = _shard(rank, world)
    return hk.hgp_penalty(logits, features, labels, ids, process_group=group, **{"num_envs": E, **options})


def _hutchinson_probes(rank, world, group, generator):
    logits, features, labels, ids = _shard(rank, world)
    return hk.hutchinson_penalty(logits, features, labels, ids, num_envs=E, estimator="hutchinson", num_probes=4,
                                 generator=generator, process_group=group)


def _fishr(rank, world, group, **options):
    logits, features, labels, ids = _shard(rank, world)
    return hk.fishr_penalty(logits, features, labels, ids, num_envs=E, process_group=group, **options)


def _case_validate(rank, world, group):
    return _hgp(rank, world, group, validate=rank != 1)


def _case_num_envs_on_one_rank(rank, world, group):
    return _hgp(rank, world, group, num_envs=E if rank == 0 else None)


def _case_ddp_reduction(rank, world, group):
    return _hgp(rank, world, group, ddp_reduction="avg" if rank == 1 else "mean")


def _case_generator_int(rank, world, group):
    return _hutchinson_probes(rank, world, group, 3 if rank == 1 else torch.Generator().manual_seed(3))


def _case_generator_state(rank, world, group):
    return _hutchinson_probes(rank, world, group, torch.Generator().manual_seed(3 + (rank == 1)))


def _case_dtype(rank, world, group):
    logits, features, labels, ids = _shard(rank, world, dtype=torch.float32 if rank == 1 else torch.float64)
    return hk.hgp_penalty(logits, features, labels, ids, num_envs=E, process_group=group)


def _case_num_classes(rank, world, group):
    logits, features, labels, ids = _shard(rank, world, classes=5 if rank == 1 else C)
    return hk.hutchinson_penalty(logits, features, labels, ids, num_envs=E, process_group=group)


def _case_feature_width(rank, world, group):
    logits, features, labels, ids = _shard(rank, world, width=6 if rank == 1 else D)
    return hk.hgp_penalty(logits, features, labels, ids, num_envs=E, process_group=group)


def _case_full_hessian_num_classes(rank, world, group):
    logits, features, labels, ids = _shard(rank, world, classes=5 if rank == 1 else C)
    return hk.full_hessian_penalty(logits, features, labels, ids, num_envs=E, process_group=group)


def _case_fishr_coordinate_reduction(rank, world, group):
    return _fishr(rank, world, group, coordinate_reduction="sum" if rank == 1 else "mean")


def _case_fishr_env_reduction(rank, world, group):
    return _fishr(rank, world, group, env_reduction="sum" if rank == 1 else "mean")


def _case_nan_on_one_rank(rank, world, group):
    logits, features, labels, ids = _shard(rank, world)
    if rank == 1:
        features[0, 0] = float("nan")
    return hk.hgp_penalty(logits, features, labels, ids, num_envs=E, process_group=group)


def _case_label_on_one_rank(rank, world, group):
    logits, features, labels, ids = _shard(rank, world)
    if rank == 1:
        labels[0] = 7
    return hk.hutchinson_penalty(logits, features, labels, ids, num_envs=E, process_group=group)


def _case_sizes_on_one_rank(rank, world, group):
    """Size lists without num_envs whose lengths differ: E is agreed, then one rank's list is short."""
    logits, features, labels, ids = _shard(rank, world)
    order = torch.argsort(ids, stable=True)
    sizes = torch.bincount(ids, minlength=E).tolist()
    if rank == 1:  # its last environment's samples counted in the one before
        sizes = sizes[:-2] + [sizes[-2] + sizes[-1]]
    return hk.hgp_penalty(logits[order], features[order], labels[order], sizes, process_group=group)


def _case_bad_ids_without_validate(rank, world, group):
    """validate=False still agrees: an id beyond num_envs on one rank makes every rank raise."""
    logits, features, labels, ids = _shard(rank, world)
    if rank == 1:
        ids = ids.clone()
        ids[0] = E
    return hk.hgp_penalty(logits, features, labels, ids, num_envs=E, validate=False, process_group=group)


def _case_agreeing_ranks(rank, world, group):
    """After every failed case the group still works: the same penalty on every rank."""
    logits, features, labels, ids = _shard(rank, world)
    pen = hk.hgp_penalty(logits, features, labels, ids, process_group=group)  # E agreed from the ids
    return [float(pen.hessian), float(pen.gradient)]


def _case_collective_order(rank, world, group):
    """The agreement is the call's first collective and adds only itself: HGP makes one all-gather, then
    its two all-reduces forward and one backward, as without it."""
    made = []
    originals = {name: getattr(torch.distributed, name) for name in ("all_gather", "all_reduce", "all_gather_object")}

    def counted(name):
        def call(*args, **kwargs):
            made.append(name)
            return originals[name](*args, **kwargs)
        return call

    logits, features, labels, ids = _shard(rank, world)
    logits.requires_grad_(True)
    try:
        for name in originals:
            setattr(torch.distributed, name, counted(name))
        pen = hk.hgp_penalty(logits, features, labels, ids, process_group=group, validate=False)
        forward = list(made)
        (pen.hessian + pen.gradient).backward()
    finally:
        for name, fn in originals.items():
            setattr(torch.distributed, name, fn)
    return [forward, made[len(forward):]]


def _others(world, value):
    """How the message names the ranks other than rank 1 (which all share `value`)."""
    others = [r for r in range(world) if r != 1]
    return f"rank 0 has {value}" if len(others) == 1 else f"ranks {', '.join(map(str, others))} have {value}"


# (case, [what every rank's message must contain, given the world size])
CASES = {
    "validate": (_case_validate, lambda w: [f"ranks disagree on validate: {_others(w, True)}, rank 1 has False"]),
    "num_envs given on one rank": (_case_num_envs_on_one_rank, lambda w: [
        "ranks disagree on num_envs: rank 0 has 3, " + ("rank 1 has None" if w == 2 else "ranks 1, 2 have None")]),
    "ddp_reduction invalid on one rank": (_case_ddp_reduction, lambda w: [
        "rank 1 rejected its inputs (ValueError: ddp_reduction must be one of 'mean', 'sum'; got 'avg')",
        f"ranks disagree on ddp_reduction: {_others(w, repr('mean'))}, rank 1 has 'avg'"]),
    "generator an int on one rank": (_case_generator_int, lambda w: [
        "rank 1 rejected its inputs (TypeError: generator must be a torch.Generator or None; got int)",
        "ranks disagree on probe generator state"]),
    "generator state": (_case_generator_state, lambda w: ["ranks disagree on probe generator state"]),
    "dtype": (_case_dtype, lambda w: [f"ranks disagree on dtype: {_others(w, 'torch.float64')}, "
                                      "rank 1 has torch.float32"]),
    "num_classes": (_case_num_classes, lambda w: [f"ranks disagree on num_classes: {_others(w, 3)}, rank 1 has 5"]),
    "feature width": (_case_feature_width, lambda w: [
        f"ranks disagree on feature width: {_others(w, 4)}, rank 1 has 6"]),
    "full_hessian num_classes": (_case_full_hessian_num_classes, lambda w: [
        f"ranks disagree on num_classes: {_others(w, 3)}, rank 1 has 5"]),
    "fishr coordinate_reduction": (_case_fishr_coordinate_reduction, lambda w: [
        f"ranks disagree on coordinate_reduction: {_others(w, repr('mean'))}, rank 1 has 'sum'"]),
    "fishr env_reduction": (_case_fishr_env_reduction, lambda w: [
        f"ranks disagree on env_reduction: {_others(w, repr('mean'))}, rank 1 has 'sum'"]),
    "NaN feature on one rank": (_case_nan_on_one_rank, lambda w: [
        "rank 1 rejected its inputs (ValueError: features contains NaN or Inf)"]),
    "label out of range on one rank": (_case_label_on_one_rank, lambda w: [
        "rank 1 rejected its inputs (ValueError: labels must lie in [0, 3)"]),
    "size list short on one rank": (_case_sizes_on_one_rank, lambda w: [
        "ranks disagree on the number of environments: rank 1 gives 2 sizes, but the ranks' envs span 3"]),
    "bad id on one rank, validate=False": (_case_bad_ids_without_validate, lambda w: [
        "rank 1 rejected its inputs (ValueError: envs holds id 3 but num_envs=3)"]),
}
CONTROL = "agreeing ranks after the failures"
COLLECTIVES = "collectives of an HGP step"
ORDER = list(CASES) + [CONTROL, COLLECTIVES]
RUNS = {CONTROL: _case_agreeing_ranks, COLLECTIVES: _case_collective_order}


def _worker(rank, world, init_file, results, names):
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        group = torch.distributed.group.WORLD
        for name in names:
            run = RUNS[name] if name in RUNS else CASES[name][0]
            start = time.monotonic()
            try:
                value = run(rank, world, group)
                outcome = ("ok", value if isinstance(value, list) else "no error")
            except Exception as err:  # reported to the parent as text
                outcome = (type(err).__name__, str(err))
            results.put((rank, name, outcome, time.monotonic() - start))
        torch.distributed.destroy_process_group()
    except Exception:
        results.put((rank, "crash", ("crash", traceback.format_exc()), 0.0))


def _run_group(world, directory):
    """{case: [(outcome, seconds) per rank, None for a rank that never reported]} for one group."""
    procs, results = start_ranks(_worker, world, directory, f"init-agreement-{world}", ORDER)
    got = {name: [None] * world for name in ORDER}
    crashes = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        expected = world * len(ORDER)
        while expected and time.monotonic() < deadline:
            try:
                rank, name, outcome, seconds = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):  # a worker killed inside gloo reports nothing
                    break
                continue
            expected -= 1
            if name == "crash":
                crashes.append(outcome[1])
            else:
                got[name][rank] = (outcome, seconds)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return got, crashes


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def group_results(request, tmp_path_factory):
    world = request.param
    return world, *_run_group(world, tmp_path_factory.mktemp(f"agreement-{world}"))


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_raises_the_same_value_error_promptly(group_results, name):
    world, got, crashes = group_results
    per_rank = got[name]
    assert all(r is not None for r in per_rank), f"{name}: a rank never reported (hung or died): {per_rank}; {crashes}"
    kinds = [outcome[0] for outcome, _ in per_rank]
    messages = [outcome[1] for outcome, _ in per_rank]
    assert kinds == ["ValueError"] * world, f"{name}: {per_rank}"
    assert len(set(messages)) == 1, f"{name}: ranks raised different messages: {messages}"
    for expected in CASES[name][1](world):
        assert expected in messages[0], f"{name}: {expected!r} not in {messages[0]!r}"
    slowest = max(seconds for _, seconds in per_rank)
    assert slowest < RAISE_S, f"{name}: a rank took {slowest:.1f} s to raise"


def test_the_group_still_agrees_after_the_failures(group_results):
    world, got, crashes = group_results
    per_rank = got[CONTROL]
    assert all(r is not None for r in per_rank), f"a rank never reported: {per_rank}; {crashes}"
    values = [outcome for outcome, _ in per_rank]
    assert all(v[0] == "ok" for v in values) and all(v == values[0] for v in values), values


def test_the_agreement_is_the_first_collective_and_the_only_one_added(group_results):
    world, got, crashes = group_results
    per_rank = got[COLLECTIVES]
    assert all(r is not None for r in per_rank), f"a rank never reported: {per_rank}; {crashes}"
    for outcome, _ in per_rank:
        assert outcome[0] == "ok", outcome
        forward, backward = outcome[1]
        assert forward == ["all_gather", "all_reduce", "all_reduce"] and backward == ["all_reduce"], (forward, backward)
