"""The C++ autograd node against the Python autograd.Function, in one process.

Default CPU calls of `hutchinson_penalty` (exact) and `hgp_penalty` run as the ``penalty`` operator,
whose autograd node is C++ (csrc/ops.cpp); the Python `PenaltyFunction` runs the same C++ plans otherwise. This times
forward + backward (torch.autograd.grad to the leaves, default options) both ways, alternating per
round, at a tiny head, the PACS head and the Colored MNIST main job's head, and prints each one's
median µs and the median per-round ratio node ÷ Function (below 1: the node is faster). Same values
either way: tests/test_native_ops.py checks them bitwise.

    python benchmarks/autograd_node_ab.py
    python benchmarks/autograd_node_ab.py --smoke      # tiny, for CI
"""
from __future__ import annotations

import statistics

import torch

import hgkernels as hk
from hgk_bench import case, interleaved_times, table_script_main
from hgkernels.backends import native

HEADS = {"tiny": dict(n=12, d=5, c=3, e=3, loss="cross_entropy", rounds=30, reps=50),
         "pacs": dict(n=96, d=2048, c=7, e=3, loss="cross_entropy", rounds=30, reps=10),
         "cmnist": dict(n=24000, d=390, c=1, e=2, loss="binary_cross_entropy", rounds=15, reps=1)}
SMOKE = {"tiny": dict(n=12, d=5, c=3, e=3, loss="cross_entropy", rounds=2, reps=2)}


def measure(heads) -> list:
    if native.NATIVE_ERROR is not None:
        return [f"no autograd node: {native.NATIVE_ERROR}"]
    with_node = native.NativeBackend.autograd_plan

    def without_node(self, problem, spec):
        return None

    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32", "",
             "| head | penalty | node µs | Function µs | node ÷ Function |", "|---|---|---|---|---|"]
    for name, head in heads.items():
        gen = torch.Generator().manual_seed(0)
        n, c = head["n"], head["c"]
        logits = torch.randn(n, c, generator=gen).requires_grad_(True)
        features = torch.randn(n, head["d"], generator=gen).requires_grad_(True)
        labels = (torch.randint(0, c, (n,), generator=gen) if head["loss"] == "cross_entropy"
                  else torch.randint(0, 2, (n, c), generator=gen).float())
        sizes = [n // head["e"]] * head["e"]
        for penalty, fn in (("exact Hutchinson", hk.hutchinson_penalty), ("HGP", hk.hgp_penalty)):
            def call(fn=fn):
                pen = fn(logits, features, labels, sizes, loss=head["loss"])
                torch.autograd.grad(pen.hessian + pen.gradient, (logits, features))

            def switch(key):  # the same calls, through the node or through the Function
                native.NativeBackend.autograd_plan = with_node if key == "node" else without_node

            try:
                with case(f"{name} {penalty}"):
                    times = interleaved_times({"node": call, "Function": call}, head["rounds"], head["reps"], switch)
            finally:
                native.NativeBackend.autograd_plan = with_node
            node, function = times["node"], times["Function"]
            ratio = statistics.median(a / b for a, b in zip(node, function))
            lines.append(f"| {name} (N={n}, D={head['d']}, C={c}, E={head['e']}) | {penalty} | "
                         f"{1e6 * statistics.median(node):.0f} | {1e6 * statistics.median(function):.0f} | "
                         f"{ratio:.2f} |")
    return lines


def main(argv=None) -> int:
    return table_script_main(__doc__, measure, HEADS, SMOKE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
