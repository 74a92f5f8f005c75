"""Shuffled against grouped environment ids: the same samples, the ids interleaved or in blocks.

Forward + backward of both penalties with the native backend (feature form, validate=False) at the
Colored MNIST head (N 50,000, D 390, C 1, E 2) and the PACS head (N 96, D 2048, C 7, E 3); float32,
the two layouts interleaved in one process, median of the rounds.

    python benchmarks/shuffled_ids.py
    python benchmarks/shuffled_ids.py --smoke      # tiny, for CI
"""
from __future__ import annotations

import statistics
from functools import partial

import torch

import hgkernels as hk
from hgk_bench import case, interleaved_times, table_script_main

HEADS = {"cmnist": dict(n=50000, d=390, c=1, e=2, loss="binary_cross_entropy", rounds=9),
         "pacs": dict(n=96, d=2048, c=7, e=3, loss="cross_entropy", rounds=41)}
SMOKE = {"tiny": dict(n=60, d=5, c=1, e=3, loss="binary_cross_entropy", rounds=3)}


def measure(heads) -> list:
    lines = ["| head | penalty | grouped ms | shuffled ms | shuffled ÷ grouped |", "|---|---|---|---|---|"]
    for name, head in heads.items():
        gen = torch.Generator().manual_seed(0)
        n, c = head["n"], head["c"]
        logits = torch.randn(n, c, generator=gen).requires_grad_(True)
        features = torch.randn(n, head["d"], generator=gen).relu_().requires_grad_(True)
        labels = (torch.randint(0, c, (n,), generator=gen) if head["loss"] == "cross_entropy"
                  else torch.randint(0, 2, (n, c), generator=gen).float())
        grouped = torch.arange(head["e"]).repeat_interleave(n // head["e"])
        layouts = {"grouped": grouped, "shuffled": grouped[torch.randperm(n, generator=gen)]}
        for penalty, fn in (("exact Hutchinson", hk.hutchinson_penalty), ("HGP", hk.hgp_penalty)):
            def call(envs, fn=fn):
                pen = fn(logits, features, labels, envs, loss=head["loss"], backend="native", form="feature",
                         validate=False)
                torch.autograd.grad(pen.hessian + pen.gradient, (logits, features))

            with case(f"{name} {penalty}"):
                times = interleaved_times({key: partial(call, envs) for key, envs in layouts.items()}, head["rounds"])
            g, s = (1e3 * statistics.median(times[key]) for key in ("grouped", "shuffled"))
            lines.append(f"| {name} (N={n}, D={head['d']}, C={c}, E={head['e']}) | {penalty} | {g:.2f} | {s:.2f} | "
                         f"{s / g:.2f}× |")
    return lines


def main(argv=None) -> int:
    return table_script_main(__doc__, measure, HEADS, SMOKE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
