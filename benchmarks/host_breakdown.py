"""Where a penalty call's time goes at a small head, in layers, interleaved in one process.

Forward + backward at the PACS head (N 96, D 2048, C 7, E 3, float32), each row adding one layer:

- ``C++ plans``: the ``plan_forward`` + ``plan_backward`` operators (kernels, plan algebra and the
  operator calls);
- ``+ autograd node``: the ``penalty`` operator and `torch.autograd.grad` (the node, torch's engine);
- ``+ API, validate=False`` / ``+ API, default``: `hutchinson_penalty` / `hgp_penalty` as users call them;
- ``generic``: backend="reference" (one Hutchinson probe / the HGP double backward), the baseline of
  the speed-up targets.

Medians of rounds whose order is shuffled (seeded).

    python benchmarks/host_breakdown.py
    python benchmarks/host_breakdown.py --smoke      # tiny, for CI
"""
from __future__ import annotations

import statistics

import torch

import hgkernels as hk
from hgk_bench import case, interleaved_times, table_script_main
from hgkernels._inputs import prepare
from hgkernels._penalty import env_weight
from hgkernels.backends import native
from hgkernels.backends.base import PlanSpec

HEADS = {"pacs": dict(n=96, d=2048, c=7, e=3, rounds=24, reps=10)}
SMOKE = {"tiny": dict(n=12, d=5, c=3, e=3, rounds=2, reps=2)}


def measure(heads) -> list:
    if native.NATIVE_ERROR is not None:
        return [f"no autograd node: {native.NATIVE_ERROR}"]
    ops = torch.ops.hgkernels
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; µs per forward + backward", "",
             "| head | penalty | C++ plans | + autograd node | + API, validate=False | + API, default | generic | "
             "generic ÷ API |", "|---|---|---|---|---|---|---|---|"]
    for name, head in heads.items():
        gen = torch.Generator().manual_seed(0)
        n, c, e = head["n"], head["c"], head["e"]
        logits = torch.randn(n, c, generator=gen).requires_grad_(True)
        features = torch.randn(n, head["d"], generator=gen).requires_grad_(True)
        labels = torch.randint(0, c, (n,), generator=gen)
        sizes = [n // e] * e
        problem = prepare(logits, features, labels, sizes, loss="cross_entropy", bias=True)
        segments = problem.segments
        for penalty, fn, method in (("exact Hutchinson", hk.hutchinson_penalty, "exact"), ("HGP", hk.hgp_penalty, "hgp")):
            spec = PlanSpec(method, env_weight("mean", e), method == "hgp", True)
            operands = (logits.detach(), features.detach(), problem.targets, segments.order, segments.offsets,
                        segments.env_ids, "cross_entropy", True)

            def plans():
                state = ops.plan_forward(*operands, *spec)[0]
                ops.plan_backward(*operands, *spec, state, 1.0, 1.0, None, None)

            def node():
                h, g = ops.penalty(logits, features, *operands[2:], *spec)
                torch.autograd.grad(h + g, (logits, features))

            def api(**kwargs):
                def run():
                    pen = fn(logits, features, labels, sizes, **kwargs)
                    torch.autograd.grad(pen.hessian + pen.gradient, (logits, features))
                return run

            generic_kwargs = (dict(estimator="hutchinson", num_probes=1, generator=torch.Generator().manual_seed(1))
                              if method == "exact" else {})
            runs = {"plans": plans, "node": node, "api_nv": api(validate=False), "api": api(),
                    "generic": api(backend="reference", **generic_kwargs)}
            with case(f"{name} {penalty}"):
                times = interleaved_times(runs, head["rounds"], head["reps"])
            us = {key: 1e6 * statistics.median(t) for key, t in times.items()}
            lines.append(f"| {name} (N={n}, D={head['d']}, C={c}, E={e}) | {penalty} | {us['plans']:.0f} | "
                         f"{us['node']:.0f} | {us['api_nv']:.0f} | {us['api']:.0f} | {us['generic']:.0f} | "
                         f"{us['generic'] / us['api']:.1f}× |")
    return lines


def main(argv=None) -> int:
    return table_script_main(__doc__, measure, HEADS, SMOKE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
