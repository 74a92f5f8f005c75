"""hgkernels.domainbed against hand-written objectives, on a stand-in of DomainBed's interface.

CI has no DomainBed: tests/domainbed_stub/ is a minimal `domainbed` package of the same shape (written
for these tests). The hand-written objectives below follow the official code: per-environment
autograd.grad on the classifier's parameters with create_graph=True (HGP, Hutchinson), per-sample
gradients by torch.func (Fishr, the stand-in for BackPACK's BatchGrad), upstream's moving average,
anneal and Adam reset. None of them calls hgkernels.
"""
from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import autograd
from torch.func import functional_call, grad, vmap

from _helpers import assert_close_params, run_updates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = os.path.join(ROOT, "tests", "domainbed_stub")
NAMES = ("HGP", "Hutchinson", "FishrClosedForm")
D_IN, C, E, N_E = 6, 3, 3, 5


def _forget_our_algorithms():
    """Drop hgkernels.domainbed.algorithms, bound to the `domainbed` it was imported with, so that the
    next import binds to the current one (another test module, e.g. test_cma.py, uses this fixture too)."""
    sys.modules.pop("hgkernels.domainbed.algorithms", None)
    package = sys.modules.get("hgkernels.domainbed")
    if package is not None and "algorithms" in vars(package):
        delattr(package, "algorithms")


@pytest.fixture(scope="module")
def db():
    """The stand-in `domainbed` on sys.path, hgkernels' algorithms registered; removed afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k == "domainbed" or k.startswith("domainbed.")}
    for k in saved:
        del sys.modules[k]
    _forget_our_algorithms()
    sys.path.insert(0, STUB)
    try:
        import hgkernels.domainbed as hd
        from domainbed import algorithms, hparams_registry, networks
        hd.register()
        yield {"hd": hd, "algorithms": algorithms, "registry": hparams_registry, "networks": networks}
    finally:
        sys.path.remove(STUB)
        for k in [k for k in sys.modules if k == "domainbed" or k.startswith("domainbed.")]:
            del sys.modules[k]
        _forget_our_algorithms()
        sys.modules.update(saved)


def _hparams(db, name, **over):
    hp = db["registry"].default_hparams(name, "PACS")
    hp.update(lr=1e-2, weight_decay=1e-3, mlp_width=8)
    hp.update(over)
    return hp


def _minibatches(seed, sizes=(N_E,) * E, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, D_IN, generator=g, dtype=dtype), torch.randint(0, C, (n,), generator=g)) for n in sizes]


def _build(db, name, hp, seed=0):
    torch.manual_seed(seed)
    alg = db["algorithms"].get_algorithm_class(name)((D_IN,), C, E, hp).double()
    return alg


# ---------------------------------------------------------------- hand-written objectives (no hgkernels)

def _forward(featurizer, classifier, minibatches, per_env):
    if per_env:
        feats = [featurizer(x) for x, _ in minibatches]
    else:
        feats = featurizer(torch.cat([x for x, _ in minibatches])).split([len(x) for x, _ in minibatches])
    return [classifier(z) for z in feats]


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _split_like(vec, params):
    out, i = [], 0
    for p in params:
        out.append(vec[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


def _hvp(g, params, v):
    """H v for the loss whose gradient (create_graph) is g, v a flat vector (differentiable if v is)."""
    return _flat(autograd.grad(_flat(g), params, grad_outputs=v, create_graph=True))


def official_hessian_alignment(featurizer, classifier, minibatches, hp, method, probes=None):
    """The official HGP / Hutchinson update's objective (HessianAlignment/domainbed/algorithms.py).

    Hutchinson: exact diagonal by one HVP per head coordinate (unit vectors) when `probes` is None; else
    `probes` is a list over k of (E + 1, C, D + 1) ±1 tensors (one per environment, then the reference).
    """
    params = list(classifier.parameters())
    logits = _forward(featurizer, classifier, minibatches, hp["featurizer_per_env"])
    nlls = [F.cross_entropy(lg, y) for lg, (_, y) in zip(logits, minibatches)]
    grads = [autograd.grad(l, params, create_graph=True) for l in nlls]
    nll = torch.stack(nlls).mean()
    mean_grad = autograd.grad(nll, params, create_graph=True)
    if method == "HGP":
        stats = [_hvp(g, params, _flat(g)) for g in grads]
        ref = _hvp(mean_grad, params, _flat(mean_grad))
    elif probes is None:
        n = sum(p.numel() for p in params)
        eye = torch.eye(n, dtype=nll.dtype)
        diag = lambda g: torch.stack([_hvp(g, params, eye[j])[j] for j in range(n)])  # noqa: E731
        stats = [diag(g) for g in grads]
        ref = diag(mean_grad)
    else:
        def flat_probe(v):  # (C, D + 1), bias last -> [W.flatten(), b]
            return torch.cat([v[:, :-1].reshape(-1), v[:, -1]])
        k = len(probes)
        stats = [sum(flat_probe(p[e]) * _hvp(g, params, flat_probe(p[e])) for p in probes) / k
                 for e, g in enumerate(grads)]
        ref = sum(flat_probe(p[-1]) * _hvp(mean_grad, params, flat_probe(p[-1])) for p in probes) / k
    hessian = torch.stack([(s - ref.detach()).pow(2).sum() for s in stats]).mean()
    gradient = torch.stack([(_flat(g) - _flat(mean_grad).detach()).pow(2).sum() for g in grads]).mean()
    penalty = hp["penalty_alpha"] * hessian + hp["penalty_beta"] * gradient
    return nll + penalty, {"nll": nll, "penalty": penalty, "hessian": hessian, "gradient": gradient}


def per_sample_head_grads(classifier, z, y):
    """(N, P) per-sample gradients of each sample's own cross-entropy in the head (torch.func)."""
    params = {k: v for k, v in classifier.named_parameters()}

    def loss(p, zi, yi):
        return F.cross_entropy(functional_call(classifier, p, (zi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, z, y)
    return torch.cat([g[k].reshape(len(z), -1) for k in params], 1)


class OfficialFishr:
    """Upstream DomainBed's Fishr objective with upstream's per-domain moving average and anneal."""

    def __init__(self, hp):
        self.hp, self.ema_data, self.updates, self.update_count = hp, [None] * E, 0, 0

    def objective(self, featurizer, classifier, minibatches):
        sizes = [len(x) for x, _ in minibatches]
        if self.hp["featurizer_per_env"]:
            z = torch.cat([featurizer(x) for x, _ in minibatches])
        else:
            z = featurizer(torch.cat([x for x, _ in minibatches]))
        y = torch.cat([y for _, y in minibatches])
        logits = classifier(z)
        grads = per_sample_head_grads(classifier, z, y)
        variances = []
        for e, g in enumerate(grads.split(sizes)):
            var = (g - g.mean(0, keepdim=True)).pow(2).mean(0)
            prev = torch.zeros_like(var) if self.updates == 0 else self.ema_data[e]
            ema = self.hp["ema"] * prev + (1 - self.hp["ema"]) * var
            self.ema_data[e] = ema.clone().detach()
            variances.append(ema / (1 - self.hp["ema"]))
        self.updates += 1
        mean = torch.stack(variances).mean(0)
        penalty = torch.stack([(v - mean).pow(2).mean() for v in variances]).mean()
        nll = F.cross_entropy(logits, y)
        weight, reset = 0.0, False
        if self.update_count >= self.hp["penalty_anneal_iters"]:
            weight = self.hp["lambda"]
            reset = self.update_count == self.hp["penalty_anneal_iters"] != 0
        self.update_count += 1
        return nll + weight * penalty, {"nll": nll, "penalty": penalty}, reset


def _run_oracle(name, alg0, hp, batches):
    """Two (or more) steps of the hand-written objective on a copy of alg0's network."""
    net = copy.deepcopy(alg0.network)
    featurizer, classifier = net[0], net[1]
    new_adam = lambda: torch.optim.Adam(net.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])  # noqa: E731
    opt, logs = new_adam(), []
    fishr = OfficialFishr(hp) if name == "FishrClosedForm" else None
    for seed, mb in batches:
        torch.manual_seed(seed)
        if fishr is not None:
            loss, terms, reset = fishr.objective(featurizer, classifier, mb)
            if reset:
                opt = new_adam()
        else:
            probes = None
            if hp.get("hutchinson_probes", 0):
                probes = [2 * torch.randint(0, 2, (E + 1, C, classifier.in_features + 1)).double() - 1
                          for _ in range(hp["hutchinson_probes"])]
            loss, terms = official_hessian_alignment(featurizer, classifier, mb, hp, name, probes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        logs.append({"loss": loss.item(), **{k: v.item() for k, v in terms.items()}})
    return net, logs


def _assert_close_logs(ours, theirs, rtol=1e-10):
    for mine, ref in zip(ours, theirs):
        assert all(isinstance(v, float) for v in mine.values()), mine
        for k, v in ref.items():
            assert mine[k] == pytest.approx(v, rel=rtol, abs=1e-300), (k, mine[k], v)


CASES = [
    ("HGP", {}),
    ("HGP", {"featurizer_per_env": True, "stub_batchnorm": True}),
    ("Hutchinson", {}),
    ("Hutchinson", {"featurizer_per_env": True, "stub_batchnorm": True}),
    ("Hutchinson", {"hutchinson_probes": 7}),
    ("FishrClosedForm", {"penalty_anneal_iters": 0}),
    ("FishrClosedForm", {"penalty_anneal_iters": 0, "featurizer_per_env": True, "stub_batchnorm": True}),
]


@pytest.mark.parametrize("name,over", CASES, ids=[f"{n}-{'-'.join(o) or 'default'}" for n, o in CASES])
def test_update_matches_hand_written_objective(db, name, over):
    hp = _hparams(db, name, **over)
    if name != "FishrClosedForm":
        hp.update(penalty_alpha=3.0, penalty_beta=2.0)  # large enough that the penalty moves the parameters
    else:
        hp.update({"lambda": 50.0})
    alg = _build(db, name, hp)
    start = copy.deepcopy(alg)
    batches = [(11, _minibatches(1)), (12, _minibatches(2))]
    net, ref_logs = _run_oracle(name, start, hp, batches)
    logs = run_updates(alg, batches)
    _assert_close_logs(logs, ref_logs)
    assert_close_params(alg.network, net)
    # the penalty mattered: ERM's two steps land elsewhere
    erm_hp = dict(hp, penalty_alpha=0.0, penalty_beta=0.0, **{"lambda": 0.0})
    erm = copy.deepcopy(start)
    erm.hparams, erm.penalty_alpha, erm.penalty_beta = erm_hp, 0.0, 0.0
    erm._init_optimizer()
    run_updates(erm, batches)
    moved = max((a - b).abs().max().item() for a, b in zip(erm.network.parameters(), net.parameters()))
    assert moved > 1e-6
    expected = {"loss", "nll", "penalty"} | ({"hessian", "gradient"} if name != "FishrClosedForm" else set())
    assert set(logs[0]) == expected


def test_featurizer_passes_differ_only_with_batchnorm(db):
    batches = [(0, _minibatches(3))]
    outs = {}
    for bn in (False, True):
        for per_env in (False, True):
            alg = _build(db, "HGP", _hparams(db, "HGP", featurizer_per_env=per_env, stub_batchnorm=bn))
            outs[bn, per_env] = run_updates(alg, batches)[0]["loss"]
    assert outs[False, False] == pytest.approx(outs[False, True], rel=1e-12)
    assert abs(outs[True, False] - outs[True, True]) > 1e-6


def test_predict_is_the_network(db):
    for name in NAMES:
        alg = _build(db, name, _hparams(db, name))
        x = _minibatches(4)[0][0]
        out = alg.predict(x)
        assert out.shape == (N_E, C)
        torch.testing.assert_close(out, alg.classifier(alg.featurizer(x)), rtol=0, atol=0)
        assert isinstance(alg.network, torch.nn.Sequential) and list(alg.network) == [alg.featurizer, alg.classifier]
        assert isinstance(alg.optimizer, torch.optim.Adam)
        assert {id(p) for g in alg.optimizer.param_groups for p in g["params"]} == {id(p) for p in alg.network.parameters()}


def test_nonlinear_classifier_is_refused(db):
    for name in NAMES:
        with pytest.raises(ValueError, match="nonlinear_classifier"):
            _build(db, name, _hparams(db, name, nonlinear_classifier=True))


def test_fishr_anneal_switch_resets_adam(db):
    hp = _hparams(db, "FishrClosedForm", penalty_anneal_iters=2)
    hp["lambda"] = 50.0
    alg = _build(db, "FishrClosedForm", hp)
    start = copy.deepcopy(alg)
    batches = [(s, _minibatches(s)) for s in (5, 6, 7, 8)]
    optimizers, logs = [], []
    for seed, mb in batches:
        torch.manual_seed(seed)
        logs.append(alg.update(mb))
        optimizers.append(alg.optimizer)
    # weight 0 before the switch (loss == nll, the penalty still reported), lambda from update 2 on
    assert logs[0]["loss"] == logs[0]["nll"] and logs[1]["loss"] == logs[1]["nll"] and logs[0]["penalty"] > 0
    assert logs[2]["loss"] == pytest.approx(logs[2]["nll"] + 50.0 * logs[2]["penalty"], rel=1e-12)
    # a fresh Adam at the switch, and only then
    assert optimizers[0] is optimizers[1] and optimizers[1] is not optimizers[2] and optimizers[2] is optimizers[3]
    assert int(alg.update_count) == 4
    net, ref_logs = _run_oracle("FishrClosedForm", start, hp, batches)
    _assert_close_logs(logs, ref_logs)
    assert_close_params(alg.network, net)


def test_hgp_and_hutchinson_do_not_anneal(db):
    for name in ("HGP", "Hutchinson"):
        alg = _build(db, name, _hparams(db, name))
        opt = alg.optimizer
        log = run_updates(alg, [(0, _minibatches(9))])[0]
        assert log["penalty"] > 0 and log["loss"] == pytest.approx(log["nll"] + log["penalty"], rel=1e-12)
        assert alg.optimizer is opt and int(alg.update_count) == 1


def test_fishr_moving_average_survives_state_dict(db):
    hp = _hparams(db, "FishrClosedForm", penalty_anneal_iters=3)
    alg = _build(db, "FishrClosedForm", hp)
    run_updates(alg, [(0, _minibatches(20)), (1, _minibatches(21))])
    buf = io.BytesIO()
    torch.save(alg.state_dict(), buf)
    assert any("ema" in k for k in alg.state_dict()) and "update_count" in alg.state_dict()
    fresh = _build(db, "FishrClosedForm", hp, seed=99)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh.fishr.ema_variances, alg.fishr.ema_variances, rtol=0, atol=0)
    assert int(fresh.update_count) == 2
    # the next update sees the same average (and the same anneal position) as the original
    mb = _minibatches(22)
    a, b = alg.update(mb), fresh.update(mb)
    assert a["penalty"] == b["penalty"] and a["nll"] == b["nll"]
    # without the average, the penalty would differ
    amnesic = _build(db, "FishrClosedForm", hp, seed=99)
    state = {k: v for k, v in alg.state_dict().items() if not k.startswith("fishr.")}
    amnesic.load_state_dict(state, strict=False)
    assert amnesic.update(mb)["penalty"] != a["penalty"]


def test_fishr_average_updates_in_eval_mode_too(db):
    alg = _build(db, "FishrClosedForm", _hparams(db, "FishrClosedForm"))
    alg.eval()
    run_updates(alg, [(0, _minibatches(30))])
    assert int(alg.fishr.updates) == 1 and not alg.fishr.training


# ---------------------------------------------------------------- hparams and registration

OFFICIAL_RANGES = {  # name -> (default, exponent range or value range, log10?)
    ("HGP", "penalty_alpha"): (1e-4, (-5, -3), True),
    ("HGP", "penalty_beta"): (5e-3, (-3, -1), True),
    ("Hutchinson", "penalty_alpha"): (1e-3, (1, 4), True),
    ("Hutchinson", "penalty_beta"): (5e-3, (2, 6), True),
    ("FishrClosedForm", "lambda"): (1000.0, (1, 4), True),
    ("FishrClosedForm", "penalty_anneal_iters"): (1500, (0, 5000), False),
    ("FishrClosedForm", "ema"): (0.95, (0.90, 0.99), False),
}


def test_hparams_defaults_and_random_ranges(db):
    registry, misc = db["registry"], sys.modules["domainbed.lib.misc"]
    for (name, key), (default, (lo, hi), log) in OFFICIAL_RANGES.items():
        assert registry.default_hparams(name, "PACS")[key] == default
        for seed in range(1, 30):
            v = registry.random_hparams(name, "PACS", seed)[key]
            x = np.log10(v) if log else v
            assert lo <= x <= hi, (name, key, v)
    # drawn exactly as upstream's _hparam: RandomState(seed_hash(seed, name)), the official argument order
    r = lambda name, seed: np.random.RandomState(misc.seed_hash(seed, name))  # noqa: E731
    assert registry.random_hparams("HGP", "PACS", 7)["penalty_alpha"] == 10 ** r("penalty_alpha", 7).uniform(-3, -5)
    assert registry.random_hparams("Hutchinson", "PACS", 7)["penalty_beta"] == 10 ** r("penalty_beta", 7).uniform(6, 2)
    # Fishr's entries are upstream Fishr's, value for value
    for seed in (0, 3, 11):
        ours, theirs = registry._hparams("FishrClosedForm", "PACS", seed), registry._hparams("Fishr", "PACS", seed)
        for key in ("lambda", "penalty_anneal_iters", "ema"):
            assert ours[key] == theirs[key]
    # the extras, and the generic entries untouched
    assert registry.default_hparams("Hutchinson", "PACS")["hutchinson_probes"] == 0
    for name in NAMES:
        assert registry.default_hparams(name, "PACS")["featurizer_per_env"] is False
        generic = registry.random_hparams("ERM", "ColoredMNIST", 5)
        mine = registry.random_hparams(name, "ColoredMNIST", 5)
        assert {k: mine[k] for k in generic} == generic
    assert "penalty_alpha" not in registry.default_hparams("ERM", "PACS")


def test_register_effects_and_idempotence(db):
    algorithms, registry, hd = db["algorithms"], db["registry"], db["hd"]
    wrapped = registry._hparams
    hd.register()
    assert registry._hparams is wrapped and wrapped._hgkernels_original is not None
    for name in NAMES:
        assert algorithms.ALGORITHMS.count(name) == 1
        cls = algorithms.get_algorithm_class(name)
        assert cls is getattr(hd, name) and issubclass(cls, algorithms.Algorithm)
    assert algorithms.ALGORITHMS[:2] == ["ERM", "Fishr"]


def _subprocess(code_or_args, pythonpath):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_missing_domainbed_says_how_to_get_it():
    code = ("import sys, hgkernels, hgkernels.domainbed as hd\n"
            "assert 'domainbed' not in sys.modules\n"
            "try:\n    hd.register()\nexcept ImportError as e:\n    print('MSG', e)\n"
            "try:\n    hd.HGP\nexcept ImportError as e:\n    print('ATTR', type(e).__name__)\n")
    out = _subprocess(code, [ROOT])
    assert out.returncode == 0, out.stderr
    assert "MSG hgkernels.domainbed needs DomainBed" in out.stdout
    assert "git clone https://github.com/facebookresearch/DomainBed" in out.stdout and "PYTHONPATH" in out.stdout
    assert "ATTR ImportError" in out.stdout


def test_import_hgkernels_does_not_import_the_subpackage():
    out = _subprocess("import sys, hgkernels; print(sorted(m for m in sys.modules if 'domainbed' in m))", [ROOT, STUB])
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


TRAIN_CASES = [  # algorithm, --hparams, (the overridden key, the drawn key and its range), a logged term, test envs
    ("HGP", {"penalty_beta": 0.25}, ("penalty_beta", "penalty_alpha", 1e-5, 1e-3), "hessian", ["0", "2"]),
    ("CMA", {"hess_beta": 0.25, "penalty_anneal_iters": 1}, ("hess_beta", "grad_alpha", 10, 1e4), "hess_pen", ["0"]),
]


@pytest.mark.parametrize("name,over,keys,term,test_envs", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_entry_point_runs_domainbed_train_with_arguments_unchanged(tmp_path, name, over, keys, term, test_envs):
    out_dir = str(tmp_path / "run")
    argv = ["--algorithm", name, "--dataset", "Debug28", "--hparams_seed", "4", "--test_envs", *test_envs,
            "--hparams", json.dumps(over), "--steps", "3", "--output_dir", out_dir]
    out = _subprocess(["-m", "hgkernels.domainbed.train", *argv], [ROOT, STUB])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["argv"] == argv and got["args"]["test_envs"] == [int(e) for e in test_envs]
    assert got["algorithm"] == f"hgkernels.domainbed.algorithms.{name}"
    fixed, drawn, lo, hi = keys
    assert got["hparams"][fixed] == over[fixed] and lo <= got["hparams"][drawn] <= hi
    # it trained: upstream's records (our update's terms among them) at step 0 and the last step
    with open(os.path.join(out_dir, "results.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [0, 2] and os.path.exists(os.path.join(out_dir, "done"))
    assert all(np.isfinite(r[term]) and r["loss"] > 0 for r in records)
    if len(test_envs) == 1:  # two training environments: the penalty is on at the last step
        assert records[-1][term] > 0


def test_benchmark_smoke_runs():
    out = _subprocess([os.path.join("benchmarks", "domainbed_update.py"), "--smoke"], [ROOT])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| FishrClosedForm" in out.stdout and "| HGP" in out.stdout


@pytest.mark.parametrize("name,over", [
    ("HGP", {}), ("Hutchinson", {"hutchinson_probes": 3}), ("FishrClosedForm", {"penalty_anneal_iters": 1}),
    ("Hutchinson", {"featurizer_per_env": True}),
])
def test_accumulation_steps_give_the_one_pass_update(db, name, over):
    """accumulation_steps=2 (and 3, with a micro-batch one sample short) updates the network as 1 does."""
    hp = _hparams(db, name, mlp_dropout=0.0, **over)
    if name != "FishrClosedForm":
        hp.update(penalty_alpha=3.0, penalty_beta=2.0)
    else:
        hp.update({"lambda": 50.0})
    batches = [(11, _minibatches(1)), (12, _minibatches(2, sizes=(5, 4, 6)))]
    one = _build(db, name, dict(hp, accumulation_steps=1))
    logs_one = run_updates(one, batches)
    for steps in (2, 3):
        acc = _build(db, name, dict(hp, accumulation_steps=steps))
        logs = run_updates(acc, batches)
        _assert_close_logs(logs, logs_one)
        assert_close_params(acc.network, one.network)
    moved = max((a - b).abs().max().item() for a, b in zip(one.network.parameters(),
                                                           _build(db, name, hp).network.parameters()))
    assert moved > 1e-6


def test_accumulation_steps_is_checked(db):
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="accumulation_steps"):
            _build(db, "HGP", _hparams(db, "HGP", accumulation_steps=bad))


def test_cma_refuses_accumulation_steps(db):
    """CMA's update is one pass (as the fork's): accumulation_steps other than 1 is an error, not ignored."""
    with pytest.raises(ValueError, match="CMA takes no hparams\\['accumulation_steps'\\]"):
        _build(db, "CMA", _hparams(db, "CMA", accumulation_steps=2))
    _build(db, "CMA", _hparams(db, "CMA", accumulation_steps=1))
