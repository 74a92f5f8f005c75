"""hgkernels.domainbed.CMA against a hand-written float64 expression of CMA's objective.

The oracle below follows the ``CMA`` class of the authors' DomainBed fork (chenyuen0103/DomainBed,
domainbed/algorithms.py) and does not call hgkernels: each environment's (C·d)^2 head Hessian is formed
explicitly (sum over samples of (diag p - p p^T) ⊗ x x^T, over the batch size and C), the gradient as
(p - onehot)^T x over the batch size and C; below 70 classes the Frobenius distances to the mean
Hessian, from 70 on the fork's pairwise form (inner products <H_e, H_f>, all-zero feature columns
dropped, the L1 term added). The explicit Hessian is itself checked against
torch.autograd.functional.hessian. Runs on the stand-in DomainBed (tests/domainbed_stub/).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _helpers import assert_close_params, run_updates
from test_domainbed import db  # noqa: F401  (the stand-in DomainBed fixture)

D_IN, E = 6, 3


def _hparams(db, **over):  # noqa: F811
    hp = db["registry"].default_hparams("CMA", "Debug28")
    hp.update(lr=1e-2, weight_decay=1e-3, mlp_width=3, grad_alpha=300.0, hess_beta=2000.0)
    hp.update(over)
    return hp


def _minibatches(seed, num_classes, sizes=(5, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, D_IN, generator=g, dtype=torch.float64),
             torch.randint(0, num_classes, (n,), generator=g)) for n in sizes]


def _build(db, hp, num_classes, seed=0, zero_column=None):  # noqa: F811
    torch.manual_seed(seed)
    alg = db["algorithms"].get_algorithm_class("CMA")((D_IN,), num_classes, E, hp).double()
    if zero_column is not None:  # a dead feature (as a ReLU unit can be): exercises the fork's masking
        mask = torch.ones(alg.featurizer.n_outputs, dtype=torch.float64)
        mask[zero_column] = 0
        alg.featurizer.register_forward_hook(lambda m, i, out: out * mask)
    return alg


# ---------------------------------------------------------------- the oracle (no hgkernels)

def explicit_hessian(x, logits):
    """CMA's per-environment head Hessian, formed: (1/(n C)) sum_b (diag p_b - p_b p_b^T) ⊗ x_b x_b^T."""
    n, d = x.shape
    c = logits.shape[1]
    p = F.softmax(logits, 1)
    a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("bkl,bi,bj->kilj", a, x, x).reshape(c * d, c * d) / (n * c)


def explicit_gradient(x, logits, y):
    c = logits.shape[1]
    return (F.softmax(logits, 1) - F.one_hot(y, c).to(x.dtype)).T @ x / (x.shape[0] * c)


def cma_objective(featurizer, classifier, minibatches, alpha, beta, passes):
    """The fork's exact_hessian_loss, written out; ``passes`` featurizer calls in the fork's order."""
    all_x = torch.cat([x for x, _ in minibatches])
    y = torch.cat([y for _, y in minibatches])
    sizes = [len(x) for x, _ in minibatches]
    ones = torch.ones(len(all_x), 1, dtype=all_x.dtype)
    first = featurizer(all_x)
    logits = classifier(torch.cat([ones, first], 1))
    if passes == 3:
        featurizer(all_x)  # the diagnostics' pass (only its dropout draws and BatchNorm updates matter)
    x = torch.cat([ones, featurizer(all_x) if passes == 3 else first], 1)
    c = logits.shape[1]
    if c >= 70:
        x = x[:, x.abs().sum(0) > 0]
    xs, ls, ys = x.split(sizes), logits.split(sizes), y.split(sizes)
    grads = [explicit_gradient(xe, le, ye) for xe, le, ye in zip(xs, ls, ys)]
    g_bar = torch.stack(grads).mean(0)
    grad_pen = sum((g - g_bar).pow(2).sum() for g in grads) / E
    hessians = [explicit_hessian(xe, le) for xe, le in zip(xs, ls)]
    if c < 70:
        h_bar = torch.stack(hessians).mean(0)
        hess_pen = sum((h - h_bar).pow(2).sum() for h in hessians) / E
    else:  # the fork's hessian_pen_mem: from the inner products <H_e, H_f> (unscaled by C), then / C^2
        inner = torch.stack([torch.stack([(c * he * c * hf).sum() for hf in hessians]) for he in hessians])
        hess_pen = (inner.diagonal() + inner.sum() / E ** 2 - 2 * inner.sum(1) / E).sum() / E / c ** 2
    l1 = x.abs().sum() * 1e-5
    erm = F.cross_entropy(logits, y)
    loss = erm + alpha * grad_pen + beta * hess_pen + (l1 if c >= 70 else 0)
    return loss, {"erm_loss": erm, "grad_pen": grad_pen if alpha else 0.0, "hess_pen": hess_pen if beta else 0.0,
                  "l1_reg": l1}


def run_oracle(alg0, hp, batches):
    net = copy.deepcopy(alg0.network)
    featurizer, classifier = net[0], net[1]
    new_adam = lambda: torch.optim.Adam(net.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])  # noqa: E731
    opt, logs = new_adam(), []
    for step, (seed, mb) in enumerate(batches):
        torch.manual_seed(seed)
        on = step >= hp["penalty_anneal_iters"]
        if step == hp["penalty_anneal_iters"] != 0:
            opt = new_adam()
        loss, terms = cma_objective(featurizer, classifier, mb, hp["grad_alpha"] if on else 0,
                                    hp["hess_beta"] if on else 0, hp["featurizer_passes"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        logs.append({"loss": loss.item(),
                     **{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}})
    return net, logs


# ---------------------------------------------------------------- tests

def test_explicit_hessian_is_the_head_hessian_over_c():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    loss = lambda flat: F.cross_entropy(x @ flat.view(3, 4).T, y)  # noqa: E731
    auto = torch.autograd.functional.hessian(loss, w.reshape(-1))
    torch.testing.assert_close(explicit_hessian(x, x @ w.T) * 3, auto, rtol=1e-12, atol=1e-14)
    grad = torch.autograd.functional.jacobian(loss, w.reshape(-1))
    torch.testing.assert_close(explicit_gradient(x, x @ w.T, y).reshape(-1) * 3, grad, rtol=1e-12, atol=1e-14)


CASES = [  # (id, num_classes, hparam overrides, minibatch sizes, zero feature column)
    ("C3", 3, {}, (5, 5, 5), None),
    ("C3-anneal-unequal", 3, {"penalty_anneal_iters": 1}, (4, 6, 5), None),
    ("C3-dropout-3-passes", 3, {"mlp_dropout": 0.3}, (5, 5, 5), None),
    ("C3-one-pass", 3, {"featurizer_passes": 1, "mlp_dropout": 0.3}, (5, 5, 5), None),
    ("C70-l1-masking", 70, {"hess_beta": 2e5, "grad_alpha": 3e4}, (5, 5, 5), 1),
]


@pytest.mark.parametrize("num_classes,over,sizes,zero", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_update_matches_hand_written_cma(db, num_classes, over, sizes, zero):  # noqa: F811
    hp = _hparams(db, **over)
    alg = _build(db, hp, num_classes, zero_column=zero)
    start = copy.deepcopy(alg)
    batches = [(11, _minibatches(1, num_classes, sizes)), (12, _minibatches(2, num_classes, sizes))]
    net, ref_logs = run_oracle(start, hp, batches)
    optimizers = []
    logs = []
    for seed, mb in batches:
        torch.manual_seed(seed)
        logs.append(alg.update(mb))
        optimizers.append(alg.optimizer)
    for mine, ref in zip(logs, ref_logs):
        assert set(mine) == {"loss", "erm_loss", "grad_pen", "hess_pen", "l1_reg", "first_moment_diff",
                             "second_moment_diff"}
        for k, v in ref.items():
            assert mine[k] == pytest.approx(v, rel=1e-10, abs=1e-300), (k, mine[k], v)
    assert_close_params(alg.network, net)
    if over.get("penalty_anneal_iters"):
        assert logs[0]["grad_pen"] == logs[0]["hess_pen"] == 0 and logs[1]["hess_pen"] > 0
        assert optimizers[0] is not optimizers[1]  # a fresh Adam at the switch
    else:
        assert logs[0]["hess_pen"] > 0 and optimizers[0] is optimizers[1]
    if num_classes >= 70:
        assert logs[0]["loss"] == pytest.approx(logs[0]["erm_loss"] + hp["grad_alpha"] * logs[0]["grad_pen"]
                                                + hp["hess_beta"] * logs[0]["hess_pen"] + logs[0]["l1_reg"], rel=1e-12)
        assert (alg.predict(batches[0][1][0][0]) != 0).all()
    # the penalty mattered: ERM's two steps land elsewhere
    erm = copy.deepcopy(start)
    erm.grad_alpha = erm.hess_beta = 0.0
    run_updates(erm, batches)
    moved = max((a - b).abs().max().item() for a, b in zip(erm.network.parameters(), net.parameters()))
    assert moved > 1e-6


def test_masking_zero_columns_changes_nothing(db):  # noqa: F811
    """The fork drops all-zero feature columns at C >= 70; the oracle with and without the drop agrees."""
    hp = _hparams(db, hess_beta=2e5, grad_alpha=3e4)
    alg = _build(db, hp, 70, zero_column=2)
    mb = _minibatches(5, 70)
    feats = torch.cat([torch.ones(15, 1, dtype=torch.float64), alg.featurizer(torch.cat([x for x, _ in mb]))], 1)
    assert (feats[:, 3] == 0).all()
    logits = alg.classifier(feats)
    full = [explicit_hessian(f, lg) for f, lg in zip(feats.split(5), logits.split(5))]
    kept = [explicit_hessian(f[:, feats.abs().sum(0) > 0], lg) for f, lg in zip(feats.split(5), logits.split(5))]
    dist = lambda hs: sum((h - torch.stack(hs).mean(0)).pow(2).sum() for h in hs)  # noqa: E731
    assert dist(full).item() == pytest.approx(dist(kept).item(), rel=1e-12) and dist(full) > 0


def test_initial_head_consumes_the_rng_like_the_fork(db):  # noqa: F811
    """The fork builds ERM's biased classifier, then CMA's bias-free one: same torch stream here."""
    hp = _hparams(db)
    alg = _build(db, hp, 3, seed=4)
    torch.manual_seed(4)
    networks = db["networks"]
    featurizer = networks.Featurizer((D_IN,), hp)
    networks.Classifier(featurizer.n_outputs, 3, False)
    head = torch.nn.Linear(featurizer.n_outputs + 1, 3, bias=False)
    torch.testing.assert_close(alg.classifier.weight, head.weight.double(), rtol=0, atol=0)
    assert alg.classifier.bias is None and alg.classifier.in_features == featurizer.n_outputs + 1
    x = _minibatches(0, 3)[0][0]
    z = alg.featurizer(x)
    torch.testing.assert_close(alg.predict(x), z @ alg.classifier.weight[:, 1:].T + alg.classifier.weight[:, 0],
                               rtol=1e-12, atol=1e-12)


def test_moment_diagnostics_match_numpy(db):  # noqa: F811
    hp = _hparams(db)
    alg = _build(db, hp, 3)
    mb = _minibatches(7, 3, (4, 1, 6))
    with torch.no_grad():
        feats = [alg.featurizer(x).numpy() for x, _ in mb]
    log = alg.update(mb)
    covs = [np.cov(f, rowvar=False) if len(f) > 1 else np.zeros((f.shape[1],) * 2) for f in feats]
    pairs = [(0, 1), (0, 2), (1, 2)]
    mean_diff = np.mean([np.linalg.norm(feats[i].mean(0) - feats[j].mean(0)) for i, j in pairs])
    cov_diff = np.mean([np.linalg.norm(covs[i] - covs[j], ord="fro") for i, j in pairs])
    assert log["first_moment_diff"] == pytest.approx(mean_diff, rel=1e-12)
    assert log["second_moment_diff"] == pytest.approx(cov_diff, rel=1e-12) and cov_diff > 0
    off = _build(db, _hparams(db, moment_diagnostics=False), 3)
    assert off.update(mb)["second_moment_diff"] == 0.0


def test_featurizer_passes_matter_only_with_dropout(db):  # noqa: F811
    losses = {}
    for dropout in (0.0, 0.3):
        for passes in (1, 3):
            alg = _build(db, _hparams(db, featurizer_passes=passes, mlp_dropout=dropout), 3)
            losses[dropout, passes] = run_updates(alg, [(0, _minibatches(3, 3))])[0]["loss"]
    assert losses[0.0, 1] == pytest.approx(losses[0.0, 3], rel=1e-12)
    assert abs(losses[0.3, 1] - losses[0.3, 3]) > 1e-6


def test_bad_hparams_and_minibatches_raise(db):  # noqa: F811
    with pytest.raises(ValueError, match="featurizer_passes"):
        _build(db, _hparams(db, featurizer_passes=2), 3)
    with pytest.raises(ValueError, match="hess_beta"):
        _build(db, _hparams(db, hess_beta=-1.0), 3)
    with pytest.raises(ValueError, match="nonlinear_classifier"):
        _build(db, _hparams(db, nonlinear_classifier=True), 3)
    alg = _build(db, _hparams(db), 3)
    with pytest.raises(ValueError, match="minibatches"):
        alg.update([torch.zeros(2, D_IN)] * E)
    # the fork's (x, y, env) triples are accepted and give the same update as pairs
    twin = copy.deepcopy(alg)
    mb = _minibatches(9, 3)
    a = alg.update(mb)
    b = twin.update([(x, y, torch.full_like(y, e)) for e, (x, y) in enumerate(mb)])
    assert a == b


def test_hparams_defaults_ranges_and_resnet_rescale(db):  # noqa: F811
    registry, misc = db["registry"], __import__("domainbed.lib.misc", fromlist=["seed_hash"])
    small, big = registry.default_hparams("CMA", "Debug28"), registry.default_hparams("CMA", "PACS")
    assert (small["grad_alpha"], small["hess_beta"], small["penalty_anneal_iters"]) == (5000, 1000, 0)
    assert big["grad_alpha"] == pytest.approx(5000 * 384 / 2048)
    assert big["hess_beta"] == pytest.approx(1000 * (384 / 2048) ** 2)
    assert (small["featurizer_passes"], small["moment_diagnostics"], small["l1_weight"], small["l1_min_classes"]) \
        == (3, True, 1e-5, 70)
    for seed in range(1, 20):
        s, b = registry.random_hparams("CMA", "ColoredMNIST", seed), registry.random_hparams("CMA", "PACS", seed)
        r = np.random.RandomState(misc.seed_hash(seed, "grad_alpha"))
        assert s["grad_alpha"] == 10 ** r.uniform(1, 4)
        assert b["grad_alpha"] == pytest.approx(s["grad_alpha"] * 384 / 2048)
        assert 1 <= np.log10(s["hess_beta"]) <= 4
        assert s["penalty_anneal_iters"] in (500, 1500, 2500, 3500, 4500)
        assert registry.random_hparams("CMA", "PACS", seed)["penalty_anneal_iters"] == s["penalty_anneal_iters"]
    generic = registry.random_hparams("ERM", "ColoredMNIST", 5)
    mine = registry.random_hparams("CMA", "ColoredMNIST", 5)
    assert {k: mine[k] for k in generic} == generic
    assert "CMA" in db["algorithms"].ALGORITHMS and db["algorithms"].get_algorithm_class("CMA") is db["hd"].CMA
