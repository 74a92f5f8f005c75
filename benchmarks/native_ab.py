"""Two builds of the native module: a kernel-level A/B in alternating processes.

A build is a checkout directory with its native module built in place (``python setup.py build_ext
--inplace``). Both register the same torch operators, so each runs in a process of its own: per named
head, a child times the C++ plans that `NativeBackend.plan_forward` / `plan_backward` run (exact
Hutchinson and HGP, float32; median µs per call over rounds of calls), and the parent alternates A and B
(A B, B A, ...) ``--repeats`` times. It prints each build's median µs and the median over repeats of
the ratio B/A of a back-to-back pair (below 1: B is faster). Whole processes on these shared machines
drift from minute to minute; pairs that run back to back keep their ratio within a few percent.

    git worktree add /tmp/before HEAD && (cd /tmp/before && python setup.py build_ext --inplace)
    python benchmarks/native_ab.py /tmp/before . --heads pacs vlcs
    python benchmarks/native_ab.py --smoke               # this checkout against itself (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(heads, rounds: int, reps: int) -> dict:
    """{row: median seconds per call} for this process's hgkernels (the checkout on PYTHONPATH)."""
    import torch

    sys.path.insert(0, HERE)
    import hgk_bench as hb
    from hgkernels._inputs import prepare
    from hgkernels._penalty import env_weight
    from hgkernels.backends import load
    from hgkernels.backends.base import PlanSpec

    shapes = {shape.name: shape for shape in hb.SUBSETS["named"] + hb.SUBSETS["smoke"]}
    backend, alpha = load("native"), torch.tensor(1.0)
    out = {}
    for name in heads:
        shape = shapes[name]
        inputs = hb.make_inputs(shape, torch.device("cpu"))
        problem = prepare(inputs.logits, inputs.features, inputs.labels, inputs.envs, loss=shape.loss, bias=True)
        weight = env_weight(shape.env_reduction, shape.e)
        for method, spec in (("exact Hutchinson", PlanSpec("exact", weight, False, shape.detach_reference)),
                             ("HGP", PlanSpec("hgp", weight, shape.e > 1, shape.detach_reference))):
            state = backend.plan_forward(problem, spec)[0]
            calls = {"forward": lambda: backend.plan_forward(problem, spec),
                     "backward": lambda: backend.plan_backward(problem, spec, state, alpha, alpha)}
            for direction, call in calls.items():
                times = []
                for r in range(rounds + 1):  # the first round warms up
                    start = time.perf_counter()
                    for _ in range(reps):
                        call()
                    times.append((time.perf_counter() - start) / reps)
                out[f"| {name} | {method} | {direction} |"] = statistics.median(times[1:])
    return out


def run_build(checkout: str, heads, rounds: int, reps: int) -> dict:
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout) + (os.pathsep + path if path else "")}
    args = [sys.executable, os.path.abspath(__file__), "--child", "--heads", *heads, "--rounds", str(rounds),
            "--reps", str(reps)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"build {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", nargs="?", help="build A (a checkout directory, built in place)")
    parser.add_argument("b", nargs="?", help="build B")
    parser.add_argument("--heads", nargs="+", default=["pacs"])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--reps", type=int, default=10, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="A/B process pairs")
    parser.add_argument("--smoke", action="store_true", help="this checkout against itself, tiny head")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.heads, args.rounds, args.reps)))
        return 0
    if args.smoke:
        args.a = args.b = ROOT
        args.heads, args.rounds, args.reps, args.repeats = ["smoke-ce"], 2, 2, 1
    if not (args.a and args.b):
        parser.error("give builds A and B (or --smoke)")
    print(f"A = {args.a}\nB = {args.b}\nmedian µs per call of {args.rounds} rounds of {args.reps} calls per "
          f"process; {args.repeats} A/B pairs\n", flush=True)
    times = {"A": [], "B": []}
    for repeat in range(args.repeats):
        order = ("A", "B") if repeat % 2 == 0 else ("B", "A")
        for arm in order:
            print(f"[native_ab] repeat {repeat + 1}/{args.repeats}: {arm}", file=sys.stderr, flush=True)
            times[arm].append(run_build(args.a if arm == "A" else args.b, args.heads, args.rounds, args.reps))
    print("| head | penalty | C++ plan | A µs | B µs | B/A (median per pair) |\n|---|---|---|---|---|---|")
    for row in times["A"][0]:
        a = [t[row] for t in times["A"]]
        b = [t[row] for t in times["B"]]
        ratio = statistics.median(y / x for x, y in zip(a, b))
        print(f"{row} {1e6 * statistics.median(a):.0f} | {1e6 * statistics.median(b):.0f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
