"""Small heads, where the host path decides: a penalty's forward + backward against F.cross_entropy's.

At a tiny head (N 12, D 5, C 3, E 3) the arithmetic is nothing and the time is Python and small-op
dispatch; at the PACS head (N 96, D 2048, C 7, E 3) it is both. Per head this times, in one process,
interleaved, forward + backward (torch.autograd.grad to the leaves) of:

- ``F.cross_entropy``: the same logits' plain loss, the floor of any loss with autograd;
- each penalty at default options (backend and form "auto", validate=True), and with validate=False;
- ``generic 1 probe`` / ``generic HGP``: backend="reference" (autograd double backward, the official
  formulation) with one Hutchinson probe / the HGP double backward, at the PACS head.

Ratios are medians of per-round ratios to F.cross_entropy (or of the generic time to ours); the
variants' order is shuffled from round to round (seeded).

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --smoke     # a few rounds, for CI
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

import hgkernels as hk
from hgk_bench import case, interleaved_times, table_script_main

HEADS = {"tiny": dict(n=12, d=5, c=3, e=3, rounds=41, reps=50),
         "pacs": dict(n=96, d=2048, c=7, e=3, rounds=21, reps=10)}
SMOKE = {"tiny": dict(n=12, d=5, c=3, e=3, rounds=2, reps=2)}


def cases(head):
    gen = torch.Generator().manual_seed(0)
    n, c, e = head["n"], head["c"], head["e"]
    logits = torch.randn(n, c, generator=gen).requires_grad_(True)
    features = torch.randn(n, head["d"], generator=gen).requires_grad_(True)
    labels = torch.randint(0, c, (n,), generator=gen)
    sizes = [n // e] * (e - 1) + [n - (n // e) * (e - 1)]

    def penalty(fn, **kwargs):
        def run():
            pen = fn(logits, features, labels, sizes, **kwargs)
            torch.autograd.grad(pen.hessian + pen.gradient, (logits, features))
        return run

    def cross_entropy():
        torch.autograd.grad(F.cross_entropy(logits, labels), (logits,))

    out = {"F.cross_entropy": cross_entropy,
           "exact Hutchinson": penalty(hk.hutchinson_penalty),
           "exact Hutchinson, validate=False": penalty(hk.hutchinson_penalty, validate=False),
           "HGP": penalty(hk.hgp_penalty),
           "HGP, validate=False": penalty(hk.hgp_penalty, validate=False)}
    if n > 12:  # the generic baselines of the core issue's ratios
        out["generic 1 probe"] = penalty(hk.hutchinson_penalty, backend="reference", estimator="hutchinson",
                                         num_probes=1, generator=torch.Generator().manual_seed(1))
        out["generic HGP"] = penalty(hk.hgp_penalty, backend="reference")
    return out


def measure(heads) -> list:
    lines = []
    for name, head in heads.items():
        with case(f"{name}: {head['rounds']} rounds"):
            times = interleaved_times(cases(head), head["rounds"], head["reps"])
        base = times["F.cross_entropy"]
        lines += ["", f"{name}: N={head['n']}, D={head['d']}, C={head['c']}, E={head['e']}, float32, "
                  f"{torch.get_num_threads()} threads; median of {head['rounds']} rounds of {head['reps']} calls", "",
                  "| forward + backward | µs | ÷ F.cross_entropy |", "|---|---|---|"]
        for key, t in times.items():
            ratio = statistics.median(a / b for a, b in zip(t, base))
            lines.append(f"| {key} | {1e6 * statistics.median(t):.0f} | {ratio:.1f}× |")
        for ours, generic in (("exact Hutchinson", "generic 1 probe"), ("HGP", "generic HGP")):
            if generic in times:
                speedup = statistics.median(g / o for g, o in zip(times[generic], times[ours]))
                lines.append(f"\n{generic} ÷ {ours} (default options): {speedup:.1f}×")
    return lines


def main(argv=None) -> int:
    return table_script_main(__doc__, measure, HEADS, SMOKE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
