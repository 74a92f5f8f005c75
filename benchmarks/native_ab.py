"""Two builds of the native CPU module side by side: a kernel-level A/B in one process.

On these shared 2-core machines whole runs drift by 10–40% from minute to minute; two builds timed
alternately in one process keep their ratio to a few percent. This loads build A and build B (paths
of built ``_native_cpu*.so`` files) as two modules and, per named head, times the C++ plans that
`NativeBackend.plan_forward` / `plan_backward` run (exact Hutchinson and HGP, float32), in rounds
that alternate the builds. It prints each build's median µs per call and the median per-round
ratio B/A (below 1: B is faster).

    cp hgkernels/_native_cpu*.so /tmp/A.so              # before a kernel change
    pip install -e .                                     # rebuild with the change
    python benchmarks/native_ab.py /tmp/A.so hgkernels/_native_cpu*.so --heads pacs vlcs
    python benchmarks/native_ab.py --smoke               # the installed build against itself (CI)
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hgk_bench as hb  # noqa: E402
from hgkernels._inputs import prepare  # noqa: E402
from hgkernels._penalty import env_weight  # noqa: E402
from hgkernels.backends import load, native  # noqa: E402
from hgkernels.backends.base import PlanSpec  # noqa: E402

SHAPES = {shape.name: shape for shape in hb.SUBSETS["named"] + hb.SUBSETS["smoke"]}


def load_build(path: str, tag: str):
    """A built _native_cpu module from `path`, imported under its own package name `tag`."""
    spec = importlib.util.spec_from_file_location(f"{tag}._native_cpu", path)
    if spec is None:
        raise SystemExit(f"{path} is not a loadable module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "plan_forward"):
        raise SystemExit(f"{path} has no plan_forward: a build from before the C++ plans")
    return module


def specs(shape) -> dict:
    weight = env_weight(shape.env_reduction, shape.e)
    return {"exact Hutchinson": PlanSpec("exact", weight, False, shape.detach_reference),
            "HGP": PlanSpec("hgp", weight, shape.e > 1, shape.detach_reference)}


def measure(builds, shape, rounds: int, reps: int) -> list:
    inputs = hb.make_inputs(shape, torch.device("cpu"))
    problem = prepare(inputs.logits, inputs.features, inputs.labels, inputs.envs,
                      loss=shape.loss, bias=True)
    backend, alpha = load("native"), torch.tensor(1.0)
    rows = []
    saved = native._CPU
    try:
        for method, spec in specs(shape).items():
            native._CPU = builds[0]
            state = backend.plan_forward(problem, spec)[0]
            calls = {"forward": lambda: backend.plan_forward(problem, spec),
                     "backward": lambda: backend.plan_backward(problem, spec, state, alpha, alpha)}
            for direction, call in calls.items():
                hb.progress(f"{shape.name} {method} {direction}: started")
                times = [[] for _ in builds]
                for r in range(rounds + 1):  # the first round warms up
                    for k in (range(len(builds)) if r % 2 == 0 else reversed(range(len(builds)))):
                        native._CPU = builds[k]
                        start = time.perf_counter()
                        for _ in range(reps):
                            call()
                        times[k].append((time.perf_counter() - start) / reps)
                times = [t[1:] for t in times]
                ratio = statistics.median(b / a for a, b in zip(*times))
                hb.progress(f"{shape.name} {method} {direction}: done")
                rows.append(f"| {shape.name} | {method} | {direction} | {1e6 * statistics.median(times[0]):.0f} | "
                            f"{1e6 * statistics.median(times[1]):.0f} | {ratio:.3f} |")
    finally:
        native._CPU = saved
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", nargs="?", help="build A (a _native_cpu*.so path)")
    parser.add_argument("b", nargs="?", help="build B")
    parser.add_argument("--heads", nargs="+", choices=sorted(SHAPES), default=["pacs"])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--reps", type=int, default=10, help="calls per timed block")
    parser.add_argument("--smoke", action="store_true", help="the installed build against itself, tiny head")
    args = parser.parse_args(argv)
    if native._CPU is None:
        raise SystemExit("the native CPU module is not built")
    if args.smoke:
        args.a = args.b = native._CPU.__file__
        args.heads, args.rounds, args.reps = [hb.SUBSETS["smoke"][0].name], 2, 2
    if not (args.a and args.b):
        parser.error("give builds A and B (or --smoke)")
    builds = [load_build(args.a, "build_a"), load_build(args.b, "build_b")]
    print(f"A = {args.a}\nB = {args.b}\ntorch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} alternating rounds of {args.reps} calls\n")
    print("| head | penalty | C++ plan | A µs | B µs | B/A (median per round) |\n|---|---|---|---|---|---|")
    for name in args.heads:
        print("\n".join(measure(builds, SHAPES[name], args.rounds, args.reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
