"""Exact penalties under gradient accumulation (hgkernels.accumulation): the value and every parameter
gradient of ERM + penalty back-propagated one micro-batch at a time equal the full batch's (float64,
1e-10), computed here by plain autograd on the whole batch with the penalty's autograd reference."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hgkernels as hk
from _helpers import assert_close

D_IN, D_FEAT, C, E = 6, 5, 3, 3
SIZES = (5, 3, 7)  # unequal micro-batches
PENALTY_FNS = {"hgp": hk.hgp_penalty, "hutchinson": hk.hutchinson_penalty, "full_hessian": hk.full_hessian_penalty}


def _models(dropout=0.0, batchnorm=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(D_IN, 8), nn.Tanh()]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(8, D_FEAT), nn.Tanh()]
    return nn.Sequential(*layers).double(), nn.Linear(D_FEAT, C).double()


def _micro_batches(sizes=SIZES, seed=1, loss="cross_entropy", as_sizes=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(sizes):
        x = torch.randn(n, D_IN, generator=gen, dtype=torch.float64)
        if loss == "cross_entropy":
            y = torch.randint(0, C, (n,), generator=gen)
        else:
            y = torch.rand(n, C, generator=gen, dtype=torch.float64)
        ids = torch.arange(n) % E if k == 0 else torch.randint(0, E, (n,), generator=gen)
        if as_sizes:
            ids, _ = ids.sort()
            out.append((x, y, torch.bincount(ids, minlength=E).tolist()))
        else:
            out.append((x, y, ids))
    return out


def _ids(envs):
    return envs if isinstance(envs, torch.Tensor) else torch.repeat_interleave(torch.arange(len(envs)),
                                                                               torch.tensor(envs))


def _full_batch(featurizer, head, micro_batches, method, alpha, beta, seed=None, **options):
    """The full-batch objective by plain autograd: features of every micro-batch with grad (one pass over
    the concatenation, or micro-batch by micro-batch from `seed` for dropout), the penalty's autograd
    reference backend, backward. Returns (total, erm, penalty value, gradients)."""
    xs = [x for x, _, _ in micro_batches]
    if seed is None:
        features = featurizer(torch.cat(xs))
    else:
        torch.manual_seed(seed)
        features = torch.cat([featurizer(x) for x in xs])
    labels = torch.cat([y for _, y, _ in micro_batches])
    ids = torch.cat([_ids(e) for _, _, e in micro_batches])
    logits = head(features)
    loss = options.get("loss", "cross_entropy")
    erm = hk.env_mean_loss(logits, labels, ids, loss=loss, num_envs=E).mean()
    if method == "fishr":
        pen = hk.fishr_penalty(logits, features, labels, ids, num_envs=E, backend="reference", **options)
        total = erm + alpha * pen
    else:
        pen = PENALTY_FNS[method](logits, features, labels, ids, num_envs=E, backend="reference", **options)
        total = erm + alpha * pen.hessian + beta * pen.gradient
        pen = pen.hessian
    total.backward()
    grads = [p.grad.clone() for p in [*featurizer.parameters(), *head.parameters()]]
    return total.detach(), erm.detach(), pen.detach(), grads


def _accumulated(featurizer, head, micro_batches, method, alpha, beta, seed=None, **options):
    if seed is not None:
        torch.manual_seed(seed)
    out = hk.exact_accumulation_step(featurizer, head, micro_batches, method=method, alpha=alpha,
                                     **({} if method == "fishr" else {"beta": beta}), **options)
    grads = [p.grad.clone() for p in [*featurizer.parameters(), *head.parameters()]]
    return out, grads


def _compare(out, grads, want):
    total, erm, pen, want_grads = want
    assert_close(out.total, total, 1e-10, "total")
    assert_close(out.erm, erm, 1e-10, "erm")
    assert_close(out.hessian, pen, 1e-10, "penalty")
    assert len(grads) == len(want_grads)
    for k, (g, w) in enumerate(zip(grads, want_grads)):
        assert_close(g, w, 1e-10, f"gradient of parameter {k}")


@pytest.mark.parametrize("method", ["hgp", "hutchinson", "full_hessian", "fishr"])
@pytest.mark.parametrize("loss,as_sizes", [("cross_entropy", False), ("binary_cross_entropy", True)])
def test_accumulation_equals_the_full_batch(method, loss, as_sizes):
    featurizer, head = _models()
    batches = _micro_batches(loss=loss, as_sizes=as_sizes)
    options = dict(loss=loss)
    if method != "fishr":
        options["detach_reference"] = False  # the reference's own gradient paths too
    want = _full_batch(*_models(), batches, method, 0.7, 1.3, **options)
    out, grads = _accumulated(featurizer, head, batches, method, 0.7, 1.3, **options)
    _compare(out, grads, want)


def test_a_featurizer_with_dropout_replays_its_masks():
    featurizer, head = _models(dropout=0.4)
    batches = _micro_batches()
    want = _full_batch(*_models(dropout=0.4), batches, "hgp", 0.7, 1.3, seed=5)
    after_full = torch.get_rng_state()
    out, grads = _accumulated(featurizer, head, batches, "hgp", 0.7, 1.3, seed=5)
    _compare(out, grads, want)
    # the global generator ends where one pass over the micro-batches leaves it
    assert torch.equal(torch.get_rng_state(), after_full)
    # and the masks matter: another seed gives other gradients
    _, other = _accumulated(*_models(dropout=0.4), batches, "hgp", 0.7, 1.3, seed=6)
    assert max(float((a - b).abs().max()) for a, b in zip(other, grads)) > 1e-6


def test_the_stochastic_estimator_draws_from_the_global_generator_in_full_batch_order():
    featurizer, head = _models(dropout=0.3)
    batches = _micro_batches()
    opts = dict(estimator="hutchinson", num_probes=5)
    torch.manual_seed(9)
    full_feat, full_head = _models(dropout=0.3)
    torch.manual_seed(9)
    xs = torch.cat([full_feat(x) for x, _, _ in batches])
    labels = torch.cat([y for _, y, _ in batches])
    ids = torch.cat([e for _, _, e in batches])
    logits = full_head(xs)
    pen = hk.hutchinson_penalty(logits, xs, labels, ids, num_envs=E, **opts)
    out, _ = _accumulated(featurizer, head, batches, "hutchinson", 0.7, 1.3, seed=9, **opts)
    assert_close(out.hessian, pen.hessian.detach(), 1e-10, "stochastic Hessian term")


def test_batchnorm_running_statistics_move_once_per_micro_batch():
    featurizer, head = _models(batchnorm=True)
    reference = copy.deepcopy(featurizer)
    batches = _micro_batches()
    hk.exact_accumulation_step(featurizer, head, batches, method="hutchinson", alpha=0.5, beta=0.5)
    with torch.no_grad():
        for x, _, _ in batches:
            reference(x)
    for a, b in zip(featurizer.buffers(), reference.buffers()):
        assert torch.equal(a, b)


def test_gradients_accumulate_into_existing_grads():
    featurizer, head = _models()
    batches = _micro_batches()
    out1, g1 = _accumulated(featurizer, head, batches, "hgp", 0.7, 1.3)
    out2, g2 = _accumulated(featurizer, head, batches, "hgp", 0.7, 1.3)
    for a, b in zip(g1, g2):
        assert_close(b, 2 * a, 1e-12, "accumulated .grad")


def test_accumulated_backward_with_any_objective():
    featurizer, _ = _models()
    xs = [x for x, _, _ in _micro_batches()]
    ref = copy.deepcopy(featurizer)
    (ref(torch.cat(xs)) ** 2).sum().sin().backward()
    got = hk.accumulated_backward(featurizer, xs, lambda z: (z ** 2).sum().sin())
    assert got.dim() == 0
    for a, b in zip(featurizer.parameters(), ref.parameters()):
        assert_close(a.grad, b.grad, 1e-10, "gradient")


def test_bad_inputs_name_the_argument():
    featurizer, head = _models()
    batches = _micro_batches()
    with pytest.raises(ValueError, match="method"):
        hk.exact_accumulation_step(featurizer, head, batches, method="irm")
    with pytest.raises(TypeError, match="head"):
        hk.exact_accumulation_step(featurizer, nn.Sequential(head), batches)
    with pytest.raises(ValueError, match="micro_batches"):
        hk.exact_accumulation_step(featurizer, head, [])
    with pytest.raises(TypeError, match=r"micro_batches\[1\]"):
        hk.exact_accumulation_step(featurizer, head, [batches[0], batches[1][:2]])
    with pytest.raises(ValueError, match=r"micro_batches\[0\]"):
        hk.exact_accumulation_step(featurizer, head, [(batches[0][0], batches[0][1], batches[0][2][:2])])
    with pytest.raises(TypeError, match="beta"):
        hk.exact_accumulation_step(featurizer, head, batches, method="fishr", beta=1.0)
    with pytest.raises(TypeError, match="bias"):
        hk.exact_accumulation_step(featurizer, head, batches, bias=True)
    with pytest.raises(TypeError, match="objective"):
        hk.accumulated_backward(featurizer, [batches[0][0]], 3)
    with pytest.raises(ValueError, match="inputs"):
        hk.accumulated_backward(featurizer, [], lambda z: z.sum())


# ---------------------------------------------------------------- two gloo ranks (slow)

def _rank_micro_batches(rank, world):
    """This rank's share of the global batch (_micro_batches() concatenated), in two unequal micro-batches."""
    x = torch.cat([b[0] for b in _micro_batches()])
    y = torch.cat([b[1] for b in _micro_batches()])
    ids = torch.cat([b[2] for b in _micro_batches()])
    mine = torch.arange(x.shape[0])[rank::world]
    cut = 2 if rank == 0 else len(mine) - 2
    return [(x[mine[:cut]], y[mine[:cut]], ids[mine[:cut]]), (x[mine[cut:]], y[mine[cut:]], ids[mine[cut:]])]


def _rank_worker(rank, world, init_file, results, cases):
    import datetime
    import traceback
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=60))
        group = torch.distributed.group.WORLD
        out = []
        for method, wrap in cases:
            featurizer, head = _models()
            if wrap == "fsdp2_head":
                from torch.distributed.fsdp import fully_shard
                fully_shard(head)
                try:
                    hk.exact_accumulation_step(featurizer, head, _rank_micro_batches(rank, world), method=method,
                                               num_envs=E, process_group=group)
                    out.append("no error")
                except TypeError as err:
                    out.append(str(err))
                continue
            if wrap in ("mismatch", "rejected"):  # rank 1 passes one micro-batch more, or a bad one: all raise
                batches = _rank_micro_batches(rank, world)
                if wrap == "mismatch":
                    batches = batches + batches[:rank]
                elif rank == 1:
                    batches[0] = (batches[0][0], batches[0][1], batches[0][2][:-1])
                try:
                    hk.exact_accumulation_step(featurizer, head, batches, method=method, num_envs=E,
                                               process_group=group)
                    out.append("no error")
                except ValueError as err:
                    out.append(str(err))
                continue
            if wrap == "ddp":
                featurizer = nn.parallel.DistributedDataParallel(featurizer)
            elif wrap == "fsdp2":
                from torch.distributed.fsdp import fully_shard
                fully_shard(featurizer)
            res = hk.exact_accumulation_step(featurizer, head, _rank_micro_batches(rank, world), method=method,
                                             alpha=0.7, **({} if method == "fishr" else {"beta": 1.3}),
                                             num_envs=E, process_group=group)
            grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                     for p in [*featurizer.parameters(), *head.parameters()]]
            out.append([float(res.total), float(res.erm), float(res.hessian),
                        torch.cat([g.flatten() for g in grads]).tolist()])
        results.put((rank, out))
        torch.distributed.destroy_process_group()
    except Exception:
        results.put((rank, traceback.format_exc()))


@pytest.mark.slow
def test_two_ranks_accumulating_equal_one_process_on_the_whole_batch(tmp_path):
    from _helpers import start_ranks
    cases = [("hgp", "ddp"), ("hutchinson", "plain"), ("full_hessian", "ddp"), ("fishr", "plain"), ("hgp", "fsdp2"),
             ("hgp", "fsdp2_head"), ("hgp", "mismatch"), ("hgp", "rejected")]
    procs, results = start_ranks(_rank_worker, 2, tmp_path, "init-accum", cases)
    try:
        got = dict(results.get(timeout=60 * (len(cases) + 2)) for _ in range(2))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    for rank in range(2):
        assert not isinstance(got[rank], str), got[rank]
    messages = [got[rank][-2] for rank in range(2)]
    assert messages[0] == messages[1] and "rank 0 has 2, rank 1 has 3" in messages[0], messages
    rejected = [got[rank][-1] for rank in range(2)]
    assert rejected[0] == rejected[1] and "rank 1 rejected its inputs" in rejected[0], rejected
    assert "micro_batches[0]" in rejected[0], rejected
    assert all("weight is a DTensor" in got[rank][-3] for rank in range(2)), [got[r][-3] for r in range(2)]
    for k, (method, wrap) in enumerate(cases[:-3]):
        total, erm, pen, grads = _full_batch(*_models(), _micro_batches(), method, 0.7, 1.3)
        for rank in range(2):
            r_total, r_erm, r_pen, r_grads = got[rank][k]
            r_grads = torch.tensor(r_grads, dtype=torch.float64)
            for name, a, b in (("total", r_total, total), ("erm", r_erm, erm), ("penalty", r_pen, pen)):
                assert abs(a - float(b)) <= 1e-10 * abs(float(b)), f"{method}/{wrap} rank {rank} {name}: {a} vs {float(b)}"
            assert_close(r_grads, torch.cat([g.flatten() for g in grads]), 1e-10, f"{method}/{wrap} rank {rank} gradients")


class _SavedBytes:
    """Bytes of the activations autograd holds for backward (saved tensors other than the parameters),
    live and at their peak (saved_tensors_hooks)."""

    def __init__(self, modules):
        self.live = self.peak = 0
        self.params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}

    def pack(self, t):
        meter = self
        size = 0 if t.untyped_storage().data_ptr() in self.params else t.numel() * t.element_size()

        class Held:
            def __init__(self):
                self.t = t
                meter.live += size
                meter.peak = max(meter.peak, meter.live)

            def __del__(self):
                meter.live -= size
        return Held()

    @staticmethod
    def unpack(held):
        return held.t


def test_peak_saved_activations_are_one_micro_batchs():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(D_IN, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, D_FEAT)).double()
    head = nn.Linear(D_FEAT, C).double()
    batches = _micro_batches(sizes=(100, 100, 100, 100), seed=3)
    peaks = {}
    for way in ("full", "exact"):
        meter = _SavedBytes([wide, head])
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            if way == "full":
                _full_batch(wide, head, batches, "hgp", 0.7, 1.3)
            else:
                hk.exact_accumulation_step(wide, head, batches, method="hgp", alpha=0.7, beta=1.3)
        peaks[way] = meter.peak
    # four equal micro-batches: about a quarter of the full batch's, plus the head's N x D share
    assert peaks["exact"] < 0.35 * peaks["full"], peaks
