"""Exact accumulation (`hgkernels.exact_accumulation_step`) against the full batch and naive accumulation.

The featurizer is a ResNet-18 written here (torchvision is not needed): the CIFAR form (3×3 stem, no
max-pool), four stages of two basic blocks, widths 64-128-256-512, 11.2 M parameters, 512-d features,
with GroupNorm (32 groups) instead of BatchNorm, so that the three ways below compute the same
objective where they should (BatchNorm would normalise each micro-batch with its own statistics).
Images are random 3 × S × S (S = 32 by default), E environments of n samples, a linear head, C classes.

Ways, each timed in its own fresh process (peak memory is that process's peak RSS above its RSS
after setup: model, data, nothing run):

- ``full``: one forward and backward over all E·n samples, ERM + penalty (`linear_head_alignment`).
- ``exact``: K micro-batches, micro-batch k holding part k of every environment;
  `exact_accumulation_step` (features under no_grad, objective on all of them, re-forward each
  micro-batch with its slice of the features' gradient). Same objective as ``full``.
- ``naive``: the usual accumulation: ERM + penalty per micro-batch, (1/K) of each back-propagated,
  gradients summed. Another objective: its gap to the full batch is reported, for every penalty, as
  the relative difference of the penalty terms (mean over micro-batches against the full batch's) and
  of the gradients of all parameters (‖g_naive − g_full‖ / ‖g_full‖), for the whole objective and for
  the penalty alone (alpha·hessian + beta·gradient); ``exact``'s gap (rounding) beside it.

    python benchmarks/accumulation.py                       # ResNet-18, 32×32, E=3, n=16, K=4: ~2 min on 2 cores
    python benchmarks/accumulation.py --smoke               # tiny network, seconds (CI)
    python benchmarks/accumulation.py --out benchmarks/out/accumulation.md

Progress goes to stderr; the tables to stdout and to ``--out`` (default benchmarks/out/accumulation.md,
git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import hgkernels as hk  # noqa: E402

METHODS = ("hgp", "hutchinson", "full_hessian", "fishr")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(min(groups, cout), cout))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 (CIFAR stem), GroupNorm; forward returns the pooled features (N, widths[-1])."""

    def __init__(self, widths=(64, 128, 256, 512), groups=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.GroupNorm(min(groups, widths[0]), widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1, groups))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.n_outputs = cin

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


def setup(args, dtype=torch.float32):
    torch.manual_seed(0)
    featurizer = ResNet18(tuple(args.widths), args.groups).to(dtype)
    head = nn.Linear(featurizer.n_outputs, args.classes).to(dtype)
    gen = torch.Generator().manual_seed(1)
    envs = [(torch.randn(args.per_env, 3, args.image, args.image, generator=gen, dtype=dtype),
             torch.randint(0, args.classes, (args.per_env,), generator=gen)) for _ in range(args.envs)]
    return featurizer, head, envs


def micro_batches(envs, k):
    """[(x, labels, env ids)]: micro-batch j holds part j of every environment."""
    parts = [(x.tensor_split(k), y.tensor_split(k)) for x, y in envs]
    out = []
    for j in range(k):
        xs = [xp[j] for xp, _ in parts]
        out.append((torch.cat(xs), torch.cat([yp[j] for _, yp in parts]),
                    torch.cat([torch.full((x.shape[0],), e, dtype=torch.int64) for e, x in enumerate(xs)])))
    return out


def objective(features, head, labels, ids, method, alpha, beta, num_envs):
    """(total, erm, hessian, gradient) of ERM + penalty on these features (logits path for fishr)."""
    if method == "fishr":
        logits = head(features)
        erm = hk.env_mean_loss(logits, labels, ids, num_envs=num_envs).mean()
        pen = hk.fishr_penalty(logits, features, labels, ids, num_envs=num_envs)
        return erm + alpha * pen, erm, pen, torch.zeros_like(pen)
    out = hk.linear_head_alignment(features, head.weight, head.bias, labels, ids, method=method, alpha=alpha,
                                   beta=beta, num_envs=num_envs)
    return out.total, out.erm, out.hessian, out.gradient


def step(way, featurizer, head, envs, args, method, alpha, beta):
    """One step of `way`: gradients in .grad (zeroed first); returns (hessian, gradient) values."""
    for p in [*featurizer.parameters(), *head.parameters()]:
        p.grad = None
    batches = micro_batches(envs, args.k)
    e = len(envs)
    if way == "full":
        x = torch.cat([b[0] for b in batches])
        labels, ids = torch.cat([b[1] for b in batches]), torch.cat([b[2] for b in batches])
        total, _, h, g = objective(featurizer(x), head, labels, ids, method, alpha, beta, e)
        total.backward()
        return float(h.detach()), float(g.detach())
    if way == "exact":
        kw = {} if method == "fishr" else {"beta": beta}
        out = hk.exact_accumulation_step(featurizer, head, batches, method=method, alpha=alpha, num_envs=e, **kw)
        return float(out.hessian), float(out.gradient)
    hs, gs = [], []
    for x, labels, ids in batches:  # naive
        total, _, h, g = objective(featurizer(x), head, labels, ids, method, alpha, beta, e)
        (total / len(batches)).backward()
        hs.append(float(h.detach()))
        gs.append(float(g.detach()))
    return statistics.mean(hs), statistics.mean(gs)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_way(args) -> dict:
    """In this (fresh) process: time `args.way` and its peak RSS above the RSS after setup."""
    torch.set_num_threads(args.threads)
    featurizer, head, envs = setup(args)
    base = rss_bytes()
    times = []
    for r in range(args.reps + 1):
        t0 = time.perf_counter()
        step(args.way, featurizer, head, envs, args, args.method, args.alpha, args.beta)
        times.append(time.perf_counter() - t0)
        log(f"  {args.way}: step {r} {times[-1]:.2f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"way": args.way, "peak_mb": (peak - base) / 2 ** 20, "step_s": statistics.median(times[1:])}


def flat_grads(modules):
    return torch.cat([p.grad.flatten() for m in modules for p in m.parameters()])


def gaps(args) -> list:
    """Per penalty: the naive and exact ways' relative gaps to the full batch (values and gradients)."""
    torch.set_num_threads(args.threads)
    featurizer, head, envs = setup(args)
    rows, erm_grads = [], {}
    for way in ("full", "exact", "naive"):  # ERM alone (alpha = beta = 0), the same for every penalty
        log(f"  gap: ERM alone, {way}")
        step(way, featurizer, head, envs, args, "hgp", 0.0, 0.0)
        erm_grads[way] = flat_grads([featurizer, head])
    for method in METHODS:
        got = {}
        for way in ("full", "exact", "naive"):
            log(f"  gap: {method} {way}")
            values = step(way, featurizer, head, envs, args, method, args.alpha, args.beta)
            g_total = flat_grads([featurizer, head])
            # the penalty alone: alpha*hessian + beta*gradient (its gradient: the total's minus ERM's)
            got[way] = (values, g_total, g_total - erm_grads[way])

        def rel(a, b):
            return float((a - b).norm() / b.norm()) if float(b.norm()) else float((a - b).norm())
        full_values, full_g, full_pen = got["full"]
        row = {"method": method}
        for way in ("naive", "exact"):
            values, g, pen = got[way]
            row[way] = {"hessian": abs(values[0] - full_values[0]) / abs(full_values[0]),
                        "gradient": (abs(values[1] - full_values[1]) / abs(full_values[1])) if full_values[1] else 0.0,
                        "grad_total": rel(g, full_g), "grad_penalty": rel(pen, full_pen)}
        rows.append(row)
    return rows


def child(args, extra) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *extra, *args.passthrough]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, default=3)
    parser.add_argument("--per-env", type=int, default=16, help="samples per environment in the full batch")
    parser.add_argument("--k", type=int, default=4, help="micro-batches")
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--widths", type=int, nargs=4, default=[64, 128, 256, 512])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--method", choices=METHODS, default="hgp", help="the penalty timed")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per way (after one untimed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny network and batch (CI)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "accumulation.md"))
    parser.add_argument("--way", choices=("full", "exact", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--gaps", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.widths, args.groups, args.image, args.per_env, args.k, args.reps = [4, 8, 8, 16], 4, 8, 4, 2, 1
    if args.way:
        print(json.dumps(run_way(args)))
        return
    if args.gaps:
        print(json.dumps(gaps(args)))
        return
    args.passthrough = [f"--envs={args.envs}", f"--per-env={args.per_env}", f"--k={args.k}", f"--image={args.image}",
                        f"--classes={args.classes}", "--widths", *map(str, args.widths), f"--groups={args.groups}",
                        f"--method={args.method}", f"--alpha={args.alpha}", f"--beta={args.beta}",
                        f"--reps={args.reps}", f"--threads={args.threads}"]
    n = args.envs * args.per_env
    params = sum(p.numel() for p in ResNet18(tuple(args.widths), args.groups).parameters())
    title = (f"ResNet-18-style featurizer (GroupNorm, widths {'-'.join(map(str, args.widths))}, "
             f"{params / 1e6:.2f} M parameters), {args.image}×{args.image} images, E={args.envs} × n={args.per_env} "
             f"= {n} samples, K={args.k} micro-batches, {args.classes} classes, float32, {args.threads} threads, "
             f"torch {torch.__version__}")
    log(title)
    start = time.perf_counter()
    results = {}
    for way in ("full", "exact", "naive"):
        log(f"timing {way} ...")
        results[way] = child(args, [f"--way={way}"])
    log("gaps ...")
    gap_rows = child(args, ["--gaps"])
    lines = [f"### {title}", "",
             f"Peak memory and step time ({args.method}, alpha={args.alpha}, beta={args.beta}; median of "
             f"{args.reps} steps after one):", "",
             "| way | peak memory above setup (MB) | step (s) | objective |", "|---|---|---|---|"]
    what = {"full": "the full batch", "exact": "the full batch's", "naive": "another (gaps below)"}
    for way in ("full", "exact", "naive"):
        r = results[way]
        lines.append(f"| {way} | {r['peak_mb']:.0f} | {r['step_s']:.2f} | {what[way]} |")
    lines += ["", "Relative gap to the full batch (naive / exact):", "",
              "| penalty | hessian term | gradient term | gradient, whole objective | gradient, penalty alone |",
              "|---|---|---|---|---|"]
    for row in gap_rows:
        cells = [f"{row['naive'][k]:.2e} / {row['exact'][k]:.1e}" for k in
                 ("hessian", "gradient", "grad_total", "grad_penalty")]
        if row["method"] == "fishr":
            cells[1] = "n/a"
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    log(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
