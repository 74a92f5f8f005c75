"""One DomainBed ``update`` with hgkernels' algorithms against the same objective by generic autograd.

A DomainBed-shaped step without the ResNet: DomainBed's MLP featurizer (512-d random inputs to 2048-d
features, ``mlp_width=2048, mlp_depth=3``), a linear head and Adam over everything, E environments of
n samples each. Per shape:

- ``HGP``: `hgkernels.domainbed.HGP.update` against the official objective by autograd: per environment
  ``autograd.grad`` on the classifier's parameters with ``create_graph=True``, H_e G_e and the pooled
  H_bar G_bar as double-backward Hessian-vector products (as the official code does).
- ``Hutchinson (exact)``: `Hutchinson.update` with the exact diagonal against the official K-probe
  autograd estimator (the code it replaces; the same objective in expectation).
- ``Hutchinson (K-probe)``: `Hutchinson.update` with ``hutchinson_probes=K`` against the same K-probe
  estimator by autograd (one timing of it serves both rows). K defaults to 30, not the official 300:
  autograd's cost is one double-backward HVP per probe and environment, linear in K: 300 probes take
  about 1.9 s per update at PACS and 68 s (11 GB peak memory) at DomainNet on one CPU thread, against
  about 0.1 s for the exact ``Hutchinson``; ``--probes 300`` runs them.
- ``FishrClosedForm``: `FishrClosedForm.update` (penalty on, ``penalty_anneal_iters=0``) against upstream
  Fishr's objective with the per-sample head gradients from torch.func (``vmap(grad)``, the CPU stand-in
  for BackPACK's BatchGrad) and from BackPACK itself when it imports
  (``pip install --no-deps backpack-for-pytorch einops unfoldNd``). BackPACK runs upstream's
  ``_get_grads`` except that ``backward(inputs=...)`` names the features too: with the classifier's
  parameters alone (upstream's call) BackPACK 1.7.1 sets no ``grad_batch`` under torch 2.13.

Every variant holds its own copy of one initial network and its own Adam. The baselines run the same
featurizer pass as ours (one pass over the concatenated minibatches), so the difference is the penalty.
Rounds interleave the variants (order rotated per round); a variant's time in a round is the mean of
``--reps`` updates; the table gives medians over rounds, and speed-ups as medians of per-round ratios.
The first update of each pair starts from the same weights and batch; its penalty's relative
difference is shown (n/a between the exact and a stochastic Hutchinson).

DomainBed itself is used when importable; otherwise the stand-in in tests/domainbed_stub (the same
interface; its MLP featurizer is Linear-Tanh-Linear).

    python benchmarks/domainbed_update.py                     # PACS and DomainNet heads
    python benchmarks/domainbed_update.py --shapes pacs --rounds 7 --reps 3 --threads 1
    python benchmarks/domainbed_update.py --smoke             # tiny shapes, seconds (CI)
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import autograd
from torch.func import functional_call, grad, vmap

from hgk_bench import case  # benchmarks/ is the script's folder, first on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Shape:
    name: str
    d_in: int
    width: int
    classes: int
    envs: int
    n: int
    probes: int  # K of the stochastic Hutchinson, ours and autograd's


SHAPES = {
    "pacs": Shape("PACS", 512, 2048, 7, 3, 32, 30),
    "domainnet": Shape("DomainNet", 512, 2048, 345, 5, 32, 30),
}
SMOKE = {
    "pacs": Shape("PACS-smoke", 16, 32, 7, 3, 4, 3),
    "domainnet": Shape("DomainNet-smoke", 16, 32, 23, 5, 4, 3),
}


def import_domainbed():
    """(algorithms, hparams_registry, source) with hgkernels' algorithms registered."""
    source = "DomainBed"
    try:
        import domainbed.algorithms  # noqa: F401
        import domainbed.hparams_registry  # noqa: F401
    except ImportError:
        for k in [k for k in sys.modules if k == "domainbed" or k.startswith("domainbed.")]:
            del sys.modules[k]
        sys.path.insert(0, os.path.join(ROOT, "tests", "domainbed_stub"))
        source = "tests/domainbed_stub (DomainBed not importable)"
    import hgkernels.domainbed as hd
    hd.register()
    from domainbed import algorithms, hparams_registry
    return algorithms, hparams_registry, source


# ---------------------------------------------------------------- baselines: the same objectives by autograd

def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


class AutogradUpdate:
    """A baseline update on its own copy of the network with its own Adam (one featurizer pass)."""

    def __init__(self, network, hp, sizes):
        self.network = copy.deepcopy(network)
        self.featurizer, self.classifier = self.network[0], self.network[1]
        self.hp, self.sizes = hp, sizes
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])

    def _forward(self, minibatches):
        z = self.featurizer(torch.cat([x for x, _ in minibatches]))
        y = torch.cat([y for _, y in minibatches])
        return z, self.classifier(z), y

    def _step(self, loss):
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


class OfficialHessianAlignment(AutogradUpdate):
    """The official HGP / Hutchinson objective: per-environment autograd.grad(create_graph=True)."""

    def __init__(self, network, hp, sizes, method: str, probes: int = 0):
        super().__init__(network, hp, sizes)
        self.method, self.probes = method, probes

    def _hvp(self, g, v):
        return _flat(autograd.grad(g, list(self.classifier.parameters()), grad_outputs=v, create_graph=True))

    def _stat(self, g):
        if self.method == "HGP":
            return self._hvp(g, g)
        diag = 0
        for _ in range(self.probes):  # the official calc_hessian_diag: Rademacher probes from the global generator
            v = 2 * torch.randint_like(g, high=2) - 1
            diag = diag + v * self._hvp(g, v)
        return diag / self.probes

    def update(self, minibatches, unlabeled=None):
        params = list(self.classifier.parameters())
        _, logits, y = self._forward(minibatches)
        nlls = [F.cross_entropy(lg, yy) for lg, yy in zip(logits.split(self.sizes), y.split(self.sizes))]
        grads = [_flat(autograd.grad(l, params, create_graph=True)) for l in nlls]
        nll = torch.stack(nlls).mean()
        mean_grad = _flat(autograd.grad(nll, params, create_graph=True))
        ref = self._stat(mean_grad).detach()
        hessian = torch.stack([(self._stat(g) - ref).pow(2).sum() for g in grads]).mean()
        gradient = torch.stack([(g - mean_grad.detach()).pow(2).sum() for g in grads]).mean()
        penalty = self.hp["penalty_alpha"] * hessian + self.hp["penalty_beta"] * gradient
        loss = nll + penalty
        self._step(loss)
        return {"loss": loss.item(), "nll": nll.item(), "penalty": penalty.item()}


class UpstreamFishr(AutogradUpdate):
    """Upstream Fishr's objective (penalty on from the first update) with per-sample head gradients
    from torch.func (``per_sample="func"``) or BackPACK's BatchGrad (``per_sample="backpack"``)."""

    def __init__(self, network, hp, sizes, per_sample: str):
        super().__init__(network, hp, sizes)
        self.per_sample = per_sample
        self.ema_data: List[Optional[torch.Tensor]] = [None] * len(sizes)
        if per_sample == "backpack":
            from backpack import extend
            self.classifier = extend(self.classifier)
            self.loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="none"))

    def _grads(self, z, logits, y):
        if self.per_sample == "func":
            params = dict(self.classifier.named_parameters())

            def loss(p, zi, yi):
                return F.cross_entropy(functional_call(self.classifier, p, (zi[None],)), yi[None])

            g = vmap(grad(loss), in_dims=(None, 0, 0))(params, z, y)
            return torch.cat([g[k].reshape(len(z), -1) for k in params], 1)
        from backpack import backpack
        from backpack.extensions import BatchGrad
        self.optimizer.zero_grad()
        with backpack(BatchGrad()):
            self.loss_fn(logits, y).sum().backward(inputs=[*self.classifier.parameters(), z], retain_graph=True,
                                                   create_graph=True)
        g = OrderedDict((n, w.grad_batch.clone().view(len(z), -1)) for n, w in self.classifier.named_parameters())
        return torch.cat(list(g.values()), 1)

    def update(self, minibatches, unlabeled=None):
        z, logits, y = self._forward(minibatches)
        grads = self._grads(z, logits, y)
        ema, variances = self.hp["ema"], []
        for e, g in enumerate(grads.split(self.sizes)):
            var = (g - g.mean(0, keepdim=True)).pow(2).mean(0)
            prev = torch.zeros_like(var) if self.ema_data[e] is None else self.ema_data[e]
            avg = ema * prev + (1 - ema) * var
            self.ema_data[e] = avg.clone().detach()
            variances.append(avg / (1 - ema))
        mean = torch.stack(variances).mean(0)
        penalty = torch.stack([(v - mean).pow(2).mean() for v in variances]).mean()
        nll = F.cross_entropy(logits, y)
        loss = nll + self.hp["lambda"] * penalty
        self._step(loss)
        return {"loss": loss.item(), "nll": nll.item(), "penalty": penalty.item()}


# ---------------------------------------------------------------- timing

def _backpack_available() -> Optional[str]:
    try:
        import backpack  # noqa: F401
        from backpack.extensions import BatchGrad  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None


def build_pairs(shape: Shape, algorithms, registry, with_backpack: bool) -> List[dict]:
    """[{row, ours, baseline name, baseline}] for one shape, all from one initial network per method."""
    sizes = [shape.n] * shape.envs
    common = dict(mlp_width=shape.width, mlp_depth=3, mlp_dropout=0.0, lr=1e-4, weight_decay=1e-5)

    def ours(name, **over):
        hp = {**registry.default_hparams(name, "DomainNet" if shape.classes > 100 else "PACS"), **common, **over}
        torch.manual_seed(0)
        return algorithms.get_algorithm_class(name)((shape.d_in,), shape.classes, shape.envs, hp), hp

    pairs = []
    hgp, hp = ours("HGP")
    pairs.append(dict(row="HGP", ours=hgp, base="autograd double backward",
                      baseline=OfficialHessianAlignment(hgp.network, hp, sizes, "HGP")))
    hut, hp = ours("Hutchinson")
    hutk, hpk = ours("Hutchinson", hutchinson_probes=shape.probes)
    official = OfficialHessianAlignment(hutk.network, hpk, sizes, "Hutchinson", shape.probes)  # timed once, two rows
    pairs.append(dict(row="Hutchinson (exact)", ours=hut, base=f"autograd, {shape.probes} probes (official estimator)",
                      baseline=official, compare=False))
    pairs.append(dict(row=f"Hutchinson ({shape.probes}-probe)", ours=hutk, base=f"autograd, {shape.probes} probes",
                      baseline=official, compare=False))
    fishr, hp = ours("FishrClosedForm", penalty_anneal_iters=0)
    pairs.append(dict(row="FishrClosedForm", ours=fishr, base="torch.func per-sample grads",
                      baseline=UpstreamFishr(fishr.network, hp, sizes, "func")))
    if with_backpack:
        fishr2, hp = ours("FishrClosedForm", penalty_anneal_iters=0)
        pairs.append(dict(row="FishrClosedForm", ours=fishr2, base="BackPACK BatchGrad",
                          baseline=UpstreamFishr(fishr2.network, hp, sizes, "backpack")))
    return pairs


def minibatches(shape: Shape, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape.n, shape.d_in, generator=g), torch.randint(0, shape.classes, (shape.n,), generator=g))
            for _ in range(shape.envs)]


def time_update(fn: Callable, batch, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn(batch)
    return (time.perf_counter() - start) / reps * 1e3


def run_shape(shape: Shape, args, algorithms, registry, with_backpack) -> List[dict]:
    pairs = build_pairs(shape, algorithms, registry, with_backpack)
    batch = minibatches(shape, 0)
    with case(f"{shape.name}: first update of each pair (agreement, warm-up)"):
        _first_updates(pairs, batch)
    variants = list({id(p[side]): p[side] for p in pairs for side in ("ours", "baseline")}.values())
    for r in range(args.rounds):
        with case(f"{shape.name}: round {r + 1}/{args.rounds} of {len(variants)} variants"):
            _one_round(pairs, variants, r, batch, args.reps)
    return [dict(shape=f"{shape.name} (C={shape.classes}, E={shape.envs}x{shape.n}, D={shape.width})", row=p["row"],
                 ours=statistics.median(p["ours_ms"]), base=p["base"], base_ms=statistics.median(p["base_ms"]),
                 speedup=statistics.median(p["ratio"]), agree=p["agree"]) for p in pairs]


def _first_updates(pairs, batch) -> None:
    for p in pairs:  # first update from the same weights and batch: the penalties agree (also a warm-up)
        p["ours_ms"], p["base_ms"], p["ratio"], p["agree"] = [], [], [], None
        if not p.get("compare", True):
            p["ours"].update(batch)  # warm-up (the slow baseline's own first-call costs are negligible)
            continue
        torch.manual_seed(1)
        a = p["ours"].update(batch)["penalty"]
        torch.manual_seed(1)
        b = p["baseline"].update(batch)["penalty"]
        p["agree"] = abs(a - b) / max(abs(b), 1e-30)


def _one_round(pairs, variants, r: int, batch, reps: int) -> None:
    times: Dict[int, float] = {}
    rot = r % len(variants)
    for v in variants[rot:] + variants[:rot]:  # each distinct update object once per round
        times[id(v)] = time_update(v.update, batch, reps)
    for p in pairs:
        p["ours_ms"].append(times[id(p["ours"])])
        p["base_ms"].append(times[id(p["baseline"])])
        p["ratio"].append(times[id(p["baseline"])] / times[id(p["ours"])])


def markdown(rows: List[dict]) -> str:
    out = ["| shape | algorithm | ours (ms) | baseline | baseline (ms) | speed-up | penalty rel. diff, 1st update |",
           "|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        agree = "n/a (stochastic)" if r["agree"] is None else f"{r['agree']:.1e}"
        out.append(f"| {r['shape']} | {r['row']} | {r['ours']:.1f} | {r['base']} | {r['base_ms']:.1f} | "
                   f"{r['speedup']:.1f}x | {agree} |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["pacs", "domainnet"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=1, help="updates per variant per round (their mean)")
    parser.add_argument("--probes", type=int, default=None,
                        help="K of the stochastic Hutchinson rows (default 30; the official code uses 300, and "
                             "autograd's time is linear in K: 300 probes take about a minute per DomainNet update "
                             "on a CPU thread)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's). On a shared machine use 1: with other processes "
                             "busy, every multi-threaded op can wait a scheduler slice for a descheduled thread")
    parser.add_argument("--no-backpack", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round (CI)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    shapes = SMOKE if args.smoke else SHAPES
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.rounds, args.reps = 1, 1
    algorithms, registry, source = import_domainbed()
    backpack_missing = "--no-backpack" if args.no_backpack else _backpack_available()
    lines = ["# DomainBed update: hgkernels.domainbed vs autograd",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
             f"domainbed from {source}; rounds {args.rounds} x {args.reps} updates; float32, CPU"]
    if backpack_missing:
        lines.append(f"BackPACK rows skipped ({backpack_missing})")
    rows = []
    for key in args.shapes:
        shape = shapes[key]
        if args.probes is not None:
            shape = Shape(**{**shape.__dict__, "probes": args.probes})
        rows += run_shape(shape, args, algorithms, registry, with_backpack=not backpack_missing)
    text = "\n".join(lines) + "\n\n" + markdown(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
