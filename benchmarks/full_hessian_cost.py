"""Cost of the full-Hessian quantities against forming the head Hessians with autograd.

For each head: forward + backward of `full_hessian_penalty` (N × N Gram form), one spectral
`hessian_distance` between two environments (Lanczos with closed-form HVPs), and what forming the
E (C·Dh) × (C·Dh) Hessians with autograd costs (`torch.autograd.functional.hessian`-style: one
Hessian-vector product per row, batched; timed on a slice of rows and extrapolated, or refused when
the Hessians cannot fit in memory). float32, CPU, median of a few runs.

    python benchmarks/full_hessian_cost.py             # the named heads
    python benchmarks/full_hessian_cost.py --smoke     # tiny, for CI
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict

import torch
import torch.nn.functional as F

import hgkernels as hk
from hgk_bench import case  # benchmarks/ is the script's folder, first on sys.path

HEADS = {
    # Colored MNIST's binary head on the main job's per-environment subsample (the full 24,000-sample
    # batch would need several 24,000² Gram matrices, 2.3 GB each)
    "cmnist (2 × 1024 subsample)": dict(n=2048, d=390, c=1, e=2, loss="binary_cross_entropy"),
    "pacs": dict(n=96, d=2048, c=7, e=3, loss="cross_entropy"),
    "domainnet": dict(n=160, d=2048, c=345, e=5, loss="cross_entropy"),
}
SMOKE = {"tiny": dict(n=24, d=5, c=3, e=3, loss="cross_entropy")}
ROWS_TIMED = 64  # Hessian rows formed by autograd before extrapolating
MEMORY_LIMIT = 4 << 30


def _inputs(head: Dict):
    gen = torch.Generator().manual_seed(0)
    n, d, c = head["n"], head["d"], head["c"]
    logits = torch.randn(n, c, generator=gen)
    features = torch.randn(n, d, generator=gen).relu_()
    labels = (torch.randint(0, c, (n,), generator=gen) if head["loss"] == "cross_entropy"
              else torch.randint(0, 2, (n, c), generator=gen).float())
    sizes = [n // head["e"]] * head["e"]
    return logits, features, labels, sizes


def _median(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _autograd_hessian_seconds(head: Dict, logits, features, labels, sizes) -> str:
    """Forming every environment's Hessian by autograd: rows of H_e by batched double backward."""
    c, dh = head["c"], head["d"] + 1
    p = c * dh
    if head["e"] * p * p * 4 > MEMORY_LIMIT:
        return f"infeasible: {head['e']} Hessians of {p:,}² entries need {head['e'] * p * p * 4 / 2**30:,.0f} GiB"
    rows = min(ROWS_TIMED, p)
    start = 0
    elapsed = 0.0
    for e, size in enumerate(sizes):
        lg, ft, lb = logits[start:start + size], features[start:start + size], labels[start:start + size]
        start += size
        theta = torch.zeros(p, requires_grad=True)

        def env_loss(theta_):
            w, b = theta_[:c * head["d"]].view(c, head["d"]), theta_[c * head["d"]:]
            out = lg + ft @ w.T + b
            return (F.cross_entropy(out, lb) if head["loss"] == "cross_entropy"
                    else F.binary_cross_entropy_with_logits(out, lb))

        def some_rows():
            (grad,) = torch.autograd.grad(env_loss(theta), theta, create_graph=True)
            eye = torch.eye(p)[:rows]
            torch.autograd.grad(grad, theta, eye, is_grads_batched=True)

        elapsed += _median(some_rows, 3) * p / rows
    return f"{1e3 * elapsed:,.0f} ms (extrapolated from {rows} of {p:,} rows per environment)"


def measure(heads: Dict[str, Dict], repeat: int) -> list:
    lines = ["| head | full_hessian_penalty fwd+bwd | spectral distance (1 pair) | forming the E Hessians by autograd |",
             "|---|---|---|---|"]
    for name, head in heads.items():
        logits, features, labels, sizes = _inputs(head)

        def penalty():
            lg, ft = logits.clone().requires_grad_(True), features.clone().requires_grad_(True)
            pen = hk.full_hessian_penalty(lg, ft, labels, sizes, loss=head["loss"], validate=False)
            (pen.hessian + pen.gradient).backward()

        pair = sum(sizes[:2])

        def spectral():
            hk.hessian_distance(logits[:pair], features[:pair], labels[:pair], sizes[:2], norm="spectral",
                                loss=head["loss"], validate=False, tol=1e-4)

        with case(name):
            t_pen, t_spec = _median(penalty, repeat), _median(spectral, repeat)
            autograd = _autograd_hessian_seconds(head, logits, features, labels, sizes)
        lines.append(f"| {name} (N={head['n']}, D={head['d']}, C={head['c']}, E={head['e']}) | {1e3 * t_pen:.1f} ms | "
                     f"{1e3 * t_spec:.1f} ms | {autograd} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print("\n".join(measure(SMOKE if args.smoke else HEADS, 1 if args.smoke else args.repeat)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
