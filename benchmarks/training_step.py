"""Whole training steps: ERM, ERM + penalty through hgkernels, ERM + penalty as the official code does it.

What a user feels is the time of a training step (featurizer forward, head, losses,
penalty, backward through everything, Adam), not the penalty's kernels alone. Per
shape and per method (exact Hutchinson, HGP) this times, in one process:

- ``erm``:      mean of the per-environment losses; backward; Adam step.
- ``ours-head``: `hgkernels.HessianAlignmentLoss(method, alpha, beta, **convention)(net.head, z, y, sizes)`,
                given the nn.Linear head itself: head, ERM and penalty in one fused autograd Function
                (hgkernels.linear_head_alignment), default options. What a training step should call.
- ``ours``:     erm + alpha * pen.hessian + beta * pen.gradient with `hgkernels.hutchinson_penalty`
                (exact diagonal) / `hgkernels.hgp_penalty` at default options (backend="auto",
                form="auto", validate=True) plus the shape's convention; ``ours-nv`` is the same
                with validate=False.
- ``official``: the same objective by generic autograd on the head's parameters, per environment,
                with create_graph=True (`official_penalty` below), as the official code runs it today.
                HGP's Hessian statistic is exact; Hutchinson uses ONE Rademacher probe per
                environment and one for the pooled reference (the official code uses more: 300
                in DomainBed, 150 in the Colored MNIST script; each probe adds one double backward).

Rounds interleave the variants (each round runs every variant once, in an order rotated
per round); each round's time of a variant is the mean of a few back-to-back steps.
The table gives medians over rounds, and ratios as medians of the per-round ratios to
that round's ERM time. Before timing, the penalties and the parameter gradients of
``ours`` and ``official`` are compared in float64 on the same model and batch (Hutchinson:
ours with estimator="hutchinson", num_probes=1 and the official code's probe, drawn from
the same seed, since the one-probe estimate is random; the timed ``ours`` is its
expectation, the exact diagonal).

    python benchmarks/training_step.py                                   # cmnist, pacs, domainnet; 7 rounds
    python benchmarks/training_step.py --shapes cmnist --rounds 9 --out /tmp/step.md
    python benchmarks/training_step.py --smoke                           # tiny shapes, a few seconds (CI)
    python benchmarks/training_step.py --shapes pacs-4x256 pacs-256envs  # 4 against 256 environments, N 1024
    python benchmarks/training_step.py --shapes cmnist --variants erm ours --json /tmp/r.json

Only `hutchinson_penalty`, `hgp_penalty` and `HessianAlignmentLoss` are imported from the library,
so the script also runs against older checkouts (PYTHONPATH=/path/to/checkout; ``--variants erm ours``
there, since ``ours-head`` needs the head-taking form of HessianAlignmentLoss).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import hgkernels
from hgkernels import HessianAlignmentLoss, hgp_penalty, hutchinson_penalty

METHODS = ("hutchinson", "hgp")
VARIANTS = ("erm", "ours-head", "ours", "ours-nv", "official")
PENALTY_FNS = {"hutchinson": hutchinson_penalty, "hgp": hgp_penalty}


@dataclass(frozen=True)
class StepShape:
    """A featurizer MLP (ReLU after every hidden layer) and a linear head on its last hidden layer."""

    name: str
    label: str
    in_dim: int
    hidden: Tuple[int, ...]
    num_classes: int
    env_sizes: Tuple[int, ...]
    # Distinct inputs the featurizer runs on; sample i's features are row rows[i] of its output.
    # 0: one input per sample. Colored MNIST's script runs the MLP once per distinct
    # (image, colour) pair (~7,600 for its 12,000-sample environments), see examples/colored_mnist.py.
    distinct_inputs: int
    loss: str  # "binary_cross_entropy" or "cross_entropy"
    env_reduction: str
    detach_reference: bool
    lr: float

    @property
    def num_features(self) -> int:
        return self.hidden[-1]

    @property
    def convention(self) -> Dict[str, object]:
        return dict(loss=self.loss, env_reduction=self.env_reduction, detach_reference=self.detach_reference)


SHAPES: Dict[str, StepShape] = {
    # examples/colored_mnist.py: MLP 392-390-390-1, 2 x 12,000 samples, full-batch Adam, BCE,
    # official Colored MNIST convention (sum over environments, undetached pooled reference).
    "cmnist": StepShape("cmnist", "Colored MNIST: MLP 392-390-390-1, 2 x 12000 (7600 distinct inputs), BCE",
                        392, (390, 390), 1, (12000, 12000), 7600, "binary_cross_entropy", "sum", False, 4.9e-4),
    # DomainBed-like: a small featurizer standing in for the ResNet, D = 2048, batch 32 per
    # environment, DomainBed's convention (mean over environments, detached reference).
    "pacs": StepShape("pacs", "PACS-like: MLP 512-2048 featurizer, 3 x 32, C = 7, CE",
                      512, (2048,), 7, (32, 32, 32), 0, "cross_entropy", "mean", True, 5e-5),
    "domainnet": StepShape("domainnet", "DomainNet-like: MLP 512-2048 featurizer, 5 x 32, C = 345, CE",
                           512, (2048,), 345, (32,) * 5, 0, "cross_entropy", "mean", True, 5e-5),
    # Hundreds of environments (WILDS-like, benchmarks/many_envs.py): the PACS-like step at N = 1024, as 4
    # environments of 256 and as 256 of 2 to 8.
    "pacs-4x256": StepShape("pacs-4x256", "PACS-like: MLP 512-2048 featurizer, 4 x 256, C = 7, CE",
                            512, (2048,), 7, (256,) * 4, 0, "cross_entropy", "mean", True, 5e-5),
    "pacs-256envs": StepShape("pacs-256envs", "PACS-like: MLP 512-2048 featurizer, 256 environments of 2 to 8 "
                              "(N 1024), C = 7, CE", 512, (2048,), 7, tuple([2, 8, 3, 5, 4, 2] * 42 + [4] * 4),
                              0, "cross_entropy", "mean", True, 5e-5),
}
SMOKE_SHAPES: Dict[str, StepShape] = {
    "smoke-bce": StepShape("smoke-bce", "smoke: MLP 20-16-16-1, 2 x 40 (50 distinct inputs), BCE",
                           20, (16, 16), 1, (40, 40), 50, "binary_cross_entropy", "sum", False, 1e-3),
    "smoke-ce": StepShape("smoke-ce", "smoke: MLP 12-24, 3 x 8, C = 5, CE",
                          12, (24,), 5, (8, 8, 8), 0, "cross_entropy", "mean", True, 1e-3),
}
ALL_SHAPES = {**SHAPES, **SMOKE_SHAPES}
DEFAULT_SHAPES = ("cmnist", "pacs", "domainnet")


# ----------------------------------------------------------------------------- model and data

class Net(nn.Module):
    def __init__(self, shape: StepShape):
        super().__init__()
        layers: List[nn.Module] = []
        width = shape.in_dim
        for h in shape.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, shape.num_classes)


@dataclass
class Batch:
    x: torch.Tensor                # (U, in_dim) featurizer inputs
    rows: Optional[torch.Tensor]   # (N,) row of x for each sample, or None (x is per sample)
    y: torch.Tensor                # (N,) int64 classes, or (N, 1) float targets for BCE
    sizes: List[int]               # environment sizes; samples grouped by environment


def make_batch(shape: StepShape, dtype: torch.dtype = torch.float32, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    n = sum(shape.env_sizes)
    u = shape.distinct_inputs or n
    x = torch.rand(u, shape.in_dim, generator=gen, dtype=dtype)
    rows = torch.randint(0, u, (n,), generator=gen) if shape.distinct_inputs else None
    if shape.loss == "binary_cross_entropy":
        y = torch.randint(0, 2, (n, 1), generator=gen).to(dtype)
    else:
        y = torch.randint(0, shape.num_classes, (n,), generator=gen)
    return Batch(x, rows, y, list(shape.env_sizes))


def make_net(shape: StepShape, dtype: torch.dtype = torch.float32, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(shape).to(dtype)


def features_of(net: Net, batch: Batch) -> torch.Tensor:
    z = net.body(batch.x)
    return z if batch.rows is None else z[batch.rows]


def loss_fn(shape: StepShape) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return F.binary_cross_entropy_with_logits if shape.loss == "binary_cross_entropy" else F.cross_entropy


# ----------------------------------------------------------------------------- the objectives

def ours_objective(method: str, shape: StepShape, net: Net, batch: Batch, *, alpha: float, beta: float,
                   validate: bool = True, **penalty_kwargs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total loss, hessian term, gradient term) with hgkernels; ERM alone when method is None."""
    z = features_of(net, batch)
    logits = net.head(z)
    fn = loss_fn(shape)
    erm = torch.stack([fn(a, t) for a, t in zip(logits.split(batch.sizes), batch.y.split(batch.sizes))]).mean()
    if method is None:
        return erm, erm.new_zeros(()), erm.new_zeros(())
    kwargs = dict(shape.convention, **penalty_kwargs)
    if not validate:
        kwargs["validate"] = False
    pen = PENALTY_FNS[method](logits, z, batch.y, batch.sizes, **kwargs)
    return erm + alpha * pen.hessian + beta * pen.gradient, pen.hessian, pen.gradient


def head_objective(method: str, shape: StepShape, net: Net, batch: Batch, *, alpha: float, beta: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, hessian term, gradient term) with `hgkernels.HessianAlignmentLoss` given the head itself
    (one fused Function for head, ERM and penalty), default options plus the shape's convention."""
    out = HessianAlignmentLoss(method, alpha, beta, **shape.convention)(net.head, features_of(net, batch), batch.y,
                                                                       batch.sizes)
    return out.total, out.hessian, out.gradient


def draw_probes(num_envs: int, num_classes: int, num_features: int, dtype: torch.dtype,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(E + 1, C, D + 1) Rademacher probes: one per environment, then the pooled reference's;
    bias entries last. hgkernels draws its stochastic estimator's probes the same way, so one
    seed gives both the same probes (used only by the agreement check)."""
    bits = torch.randint(0, 2, (num_envs + 1, num_classes, num_features + 1), generator=generator)
    return (2 * bits - 1).to(dtype)


def _sq_dist(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x - y).pow(2).sum() for x, y in zip(a, b))


def official_penalty(method: str, shape: StepShape, head: nn.Linear, z: torch.Tensor, y: torch.Tensor,
                     sizes: Sequence[int], probes: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-environment losses (E,), hessian term, gradient term) by generic autograd, as the official code.

    For each environment e, L_e = loss(head(z_e), y_e) and g_e = dL_e/d(head params) with
    create_graph=True. HGP: S_e = H_e g_e = grad(g_e, params, grad_outputs=g_e, create_graph=True)
    (the official Colored MNIST script writes it ||g|| grad ||g||, the same cost). Hutchinson:
    S_e = v_e * H_e v_e, one Rademacher probe v_e. The reference S_ref is the same statistic of the
    pooled loss mean_e L_e (its own probe), detached under DomainBed's convention; g_ref = its
    gradient. Penalty: R_e sum_e ||S_e - S_ref||^2 and R_e sum_e ||g_e - g_ref||^2, R_e = 1/E or 1.
    """
    params = tuple(head.parameters())  # (weight (C, D), bias (C,))
    fn = loss_fn(shape)
    losses = [fn(head(ze), ye) for ze, ye in zip(z.split(list(sizes)), y.split(list(sizes)))]
    num_envs = len(losses)
    if method == "hutchinson" and probes is None:
        probes = draw_probes(num_envs, shape.num_classes, z.shape[1], z.dtype)

    def probe(e: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return probes[e, :, :-1], probes[e, :, -1]

    def statistic(g: Sequence[torch.Tensor], e: int) -> Sequence[torch.Tensor]:
        if method == "hgp":
            return torch.autograd.grad(g, params, grad_outputs=g, create_graph=True)
        v = probe(e)
        hv = torch.autograd.grad(g, params, grad_outputs=v, create_graph=True)
        return [vi * hvi for vi, hvi in zip(v, hv)]

    pooled = sum(losses) / num_envs
    g_ref = torch.autograd.grad(pooled, params, create_graph=True)
    s_ref = statistic(g_ref, num_envs)
    if shape.detach_reference:
        s_ref = [s.detach() for s in s_ref]
    hessian = z.new_zeros(())
    gradient = z.new_zeros(())
    for e, loss_e in enumerate(losses):
        g_e = torch.autograd.grad(loss_e, params, create_graph=True)
        hessian = hessian + _sq_dist(statistic(g_e, e), s_ref)
        gradient = gradient + _sq_dist(g_e, g_ref)
    weight = 1.0 / num_envs if shape.env_reduction == "mean" else 1.0
    return torch.stack(losses), weight * hessian, weight * gradient


def official_objective(method: str, shape: StepShape, net: Net, batch: Batch, *, alpha: float, beta: float,
                       probes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = features_of(net, batch)
    losses, hessian, gradient = official_penalty(method, shape, net.head, z, batch.y, batch.sizes, probes)
    return losses.mean() + alpha * hessian + beta * gradient, hessian, gradient


# ----------------------------------------------------------------------------- agreement check

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-300)
    return float((a - b).abs().max()) / scale


def agreement(shape: StepShape, method: str, *, alpha: float = 1.0, beta: float = 1.0,
              dtype: torch.dtype = torch.float64) -> Dict[str, float]:
    """Relative differences (max |ours - official| / max |official|) of the two terms and of every
    parameter gradient of the total loss, same model and batch, in `dtype`."""
    batch = make_batch(shape, dtype)
    net = make_net(shape, dtype)
    kwargs: Dict[str, object] = {}
    probes = None
    if method == "hutchinson":  # the one-probe estimator on both sides, same probes
        seed = 1234
        kwargs = dict(estimator="hutchinson", num_probes=1, generator=torch.Generator().manual_seed(seed))
        probes = draw_probes(len(batch.sizes), shape.num_classes, shape.num_features, dtype,
                             torch.Generator().manual_seed(seed))
    out = {}
    grads = []
    for which in ("ours", "official"):
        net.zero_grad(set_to_none=True)
        if which == "ours":
            total, hess, grad = ours_objective(method, shape, net, batch, alpha=alpha, beta=beta, **kwargs)
        else:
            total, hess, grad = official_objective(method, shape, net, batch, alpha=alpha, beta=beta, probes=probes)
        total.backward()
        out[which] = (hess.detach(), grad.detach())
        grads.append([p.grad.detach().clone() for p in net.parameters()])
    return {"hessian": _rel(out["ours"][0], out["official"][0]),
            "gradient": _rel(out["ours"][1], out["official"][1]),
            "param_grads": max(_rel(a, b) for a, b in zip(*grads)),
            "hessian_value": float(out["official"][0]), "gradient_value": float(out["official"][1])}


# ----------------------------------------------------------------------------- timing

def make_step(shape: StepShape, variant: str, method: Optional[str], *, alpha: float = 1.0, beta: float = 1.0,
              dtype: torch.dtype = torch.float32, seed: int = 0) -> Callable[[], float]:
    """One training step (zero_grad, forward, backward, Adam) of a fresh model; returns the loss."""
    batch = make_batch(shape, dtype, seed)
    net = make_net(shape, dtype, seed)
    opt = torch.optim.Adam(net.parameters(), lr=shape.lr)
    if variant == "erm":
        objective = lambda: ours_objective(None, shape, net, batch, alpha=alpha, beta=beta)  # noqa: E731
    elif variant == "ours-head":
        objective = lambda: head_objective(method, shape, net, batch, alpha=alpha, beta=beta)  # noqa: E731
    elif variant in ("ours", "ours-nv"):
        objective = lambda: ours_objective(method, shape, net, batch, alpha=alpha, beta=beta,  # noqa: E731
                                           validate=variant == "ours")
    elif variant == "official":
        objective = lambda: official_objective(method, shape, net, batch, alpha=alpha, beta=beta)  # noqa: E731
    else:
        raise ValueError(f"unknown variant {variant!r}")

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        total, _, _ = objective()
        total.backward()
        opt.step()
        return float(total.detach())
    return step


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(step: Callable[[], float], repeat: int, faults: Optional[List[float]] = None) -> float:
    """Seconds per step over `repeat` back-to-back steps; appends minor page faults per step to `faults`."""
    flt = _minor_faults()
    start = time.perf_counter()
    for _ in range(repeat):
        step()
    seconds = (time.perf_counter() - start) / repeat
    if faults is not None:
        faults.append((_minor_faults() - flt) / repeat)
    return seconds


def run_rounds(cases: Dict[str, Callable[[], float]], rounds: int, min_seconds: float,
               progress: Optional[Callable[[str], None]] = None,
               faults: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """Seconds per step of each case in each round; cases interleaved, order rotated per round.
    `faults`, when given, receives each case's minor page faults per step in each round."""
    names = list(cases)
    repeats = {}
    for name in names:  # warm-up (2 steps), then enough back-to-back steps per round for min_seconds
        if progress:
            progress(f"warm-up: {name}")
        cases[name]()
        t = _timed(cases[name], 1)
        repeats[name] = max(1, min(20, math.ceil(min_seconds / max(t, 1e-6))))
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            gc.collect()
            times[name].append(_timed(cases[name], repeats[name],
                                      None if faults is None else faults.setdefault(name, [])))
        if progress:
            progress(f"round {r + 1}/{rounds} done")
    return times


def case_name(shape: str, variant: str, method: Optional[str]) -> str:
    return f"{shape}/erm" if variant == "erm" else f"{shape}/{method}/{variant}"


def benchmark(shape_names: Sequence[str], methods: Sequence[str], variants: Sequence[str], rounds: int,
              min_seconds: float, alpha: float = 1.0, beta: float = 1.0,
              progress: Optional[Callable[[str], None]] = None,
              faults: Optional[Dict[str, Dict[str, List[float]]]] = None) -> Dict[str, Dict[str, List[float]]]:
    """Per shape, {case name: seconds per round}; one shape's cases are interleaved together.
    `faults`, when given, receives per shape {case name: minor page faults per step per round}."""
    results = {}
    for name in shape_names:
        shape = ALL_SHAPES[name]
        cases: Dict[str, Callable[[], float]] = {}
        if "erm" in variants:
            cases[case_name(name, "erm", None)] = make_step(shape, "erm", None, alpha=alpha, beta=beta)
        for method in methods:
            for variant in variants:
                if variant != "erm":
                    cases[case_name(name, variant, method)] = make_step(shape, variant, method, alpha=alpha, beta=beta)
        if progress:
            progress(f"{name}: {len(cases)} cases x {rounds} rounds")
        results[name] = run_rounds(cases, rounds, min_seconds, progress,
                                   None if faults is None else faults.setdefault(name, {}))
    return results


# ----------------------------------------------------------------------------- report

def _ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f}"


def _ratio(values: Sequence[float], base: Sequence[float]) -> str:
    return f"{statistics.median([v / b for v, b in zip(values, base)]):.2f}"


def format_table(results: Dict[str, Dict[str, List[float]]], methods: Sequence[str], variants: Sequence[str]) -> str:
    """Markdown: per shape and method, medians (ms) and median per-round ratios to ERM."""
    cols = ["shape", "method"]
    if "erm" in variants:
        cols.append("ERM ms")
    for v, title in (("ours-head", "ours, head"), ("ours", "ours"), ("ours-nv", "ours, validate=False"),
                     ("official", "official")):
        if v in variants:
            cols.append(f"{title} ms")
            if "erm" in variants:
                cols.append(f"{title}/ERM")
    if "ours" in variants and "official" in variants:
        cols.append("official/ours")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for shape, times in results.items():
        erm = times.get(case_name(shape, "erm", None))
        for method in methods:
            row = [shape, "exact Hutchinson" if method == "hutchinson" else "HGP"]
            if erm is not None:
                row.append(_ms(erm))
            for v in ("ours-head", "ours", "ours-nv", "official"):
                if v in variants:
                    t = times[case_name(shape, v, method)]
                    row.append(_ms(t))
                    if erm is not None:
                        row.append(_ratio(t, erm))
            if "ours" in variants and "official" in variants:
                row.append(_ratio(times[case_name(shape, "official", method)], times[case_name(shape, "ours", method)]))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_agreement(rows: Dict[Tuple[str, str], Dict[str, float]]) -> str:
    lines = ["| shape | method | hessian term | gradient term | parameter gradients | official hessian / gradient term |",
             "|---|---|---|---|---|---|"]
    for (shape, method), a in rows.items():
        label = "Hutchinson, 1 probe (same probes)" if method == "hutchinson" else "HGP"
        lines.append(f"| {shape} | {label} | {a['hessian']:.1e} | {a['gradient']:.1e} | {a['param_grads']:.1e} | "
                     f"{a['hessian_value']:.4g} / {a['gradient_value']:.4g} |")
    return "\n".join(lines)


def machine() -> str:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
            f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; "
            f"hgkernels from {os.path.dirname(hgkernels.__file__)}; load average {load}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=sorted(ALL_SHAPES), default=None,
                   help="default: cmnist pacs domainnet (smoke-bce smoke-ce with --smoke)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-seconds", type=float, default=0.3,
                   help="back-to-back steps per case and round until about this long (default 0.3)")
    p.add_argument("--alpha", type=float, default=1.0, help="hessian-term weight (default 1)")
    p.add_argument("--beta", type=float, default=1.0, help="gradient-term weight (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 3 rounds, short rounds (CI)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 agreement check")
    p.add_argument("--out", default=None, help="also write the Markdown here")
    p.add_argument("--json", default=None, help="write the raw seconds per round here")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        shapes = args.shapes or list(SMOKE_SHAPES)
        rounds, min_seconds = min(args.rounds, 3), min(args.min_seconds, 0.02)
    else:
        shapes, rounds, min_seconds = args.shapes or list(DEFAULT_SHAPES), args.rounds, args.min_seconds
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    parts = ["# Training step: ERM vs ERM + penalty (hgkernels) vs ERM + penalty (official generic autograd)",
             "", machine(), ""]
    parts += [f"- `{name}`: {ALL_SHAPES[name].label}; " + ", ".join(f"{k}={v}" for k, v in ALL_SHAPES[name].convention.items())
              for name in shapes]
    if not args.no_check and "official" in args.variants:
        log("agreement check (float64)")
        rows = {(s, m): agreement(ALL_SHAPES[s], m, alpha=args.alpha, beta=args.beta) for s in shapes for m in args.methods}
        parts += ["", "Agreement of ours and official, float64, max |ours - official| / max |official| "
                  "(Hutchinson: ours with estimator=\"hutchinson\", num_probes=1 and the same probes):", "",
                  format_agreement(rows)]
    log(machine())
    faults: Dict[str, Dict[str, List[float]]] = {}
    results = benchmark(shapes, args.methods, args.variants, rounds, min_seconds, args.alpha, args.beta, log, faults)
    parts += ["", f"Median ms per step over {rounds} interleaved rounds; ratios are medians of per-round ratios. "
              f"alpha = {args.alpha}, beta = {args.beta}; ours = default options (backend/form auto).", "",
              format_table(results, args.methods, args.variants), "", "After: " + machine()]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rounds": rounds, "shapes": {s: asdict(ALL_SHAPES[s]) for s in shapes},
                       "seconds": results, "minor_faults_per_step": faults}, f, indent=1)
    return text


if __name__ == "__main__":
    main()
