"""A/B of training steps across processes: checkouts (PYTHONPATH) or allocators (LD_PRELOAD).

Runs `training_step.py` once per arm per repeat, arms alternating (repeat 1: A B C, repeat 2:
B C A, ...), each in a fresh process with the arm's environment, and reports per arm the
median over processes of each process's median step time, with the spread (min-max over
processes), and the median per-round ratio to ERM.

    # the output pool of 30ce2cb vs the working tree, and the working tree with jemalloc
    git worktree add /tmp/pooled 30ce2cb && (cd /tmp/pooled && python setup.py build_ext --inplace)
    python benchmarks/ab_processes.py --repeats 3 \\
        --arm new= --arm old=PYTHONPATH=/tmp/pooled \\
        --arm new+jemalloc=LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \\
        -- --shapes cmnist --variants erm ours --rounds 5

An arm is NAME=[VAR=VALUE[;VAR=VALUE...]] (";" since MALLOC_CONF values hold commas); everything after `--` goes to training_step.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_arm(text: str) -> Tuple[str, Dict[str, str]]:
    name, _, rest = text.partition("=")
    env = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        env[key] = value
    return name, env


def run_once(env_extra: Dict[str, str], step_args: Sequence[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        env = {**os.environ, **env_extra}
        subprocess.run([sys.executable, os.path.join(HERE, "training_step.py"), *step_args, "--no-check", "--quiet",
                        "--json", path], check=True, env=env, stdout=subprocess.DEVNULL)
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def main(argv: Sequence[str] = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    step_args: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, step_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", action="append", required=True, help="NAME=[VAR=VALUE;...]")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    arms = [parse_arm(a) for a in args.arm]
    runs: Dict[str, List[dict]] = {name: [] for name, _ in arms}
    for r in range(args.repeats):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for name, env in order:
            print(f"repeat {r + 1}/{args.repeats}: {name} (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
            runs[name].append(run_once(env, step_args))
    lines = ["Arms: " + "; ".join(f"`{n}`: {e or '(as is)'}" for n, e in arms),
             *(f"- `{n}` ran {runs[n][0]['machine']}" for n, _ in arms), "",
             f"{args.repeats} processes per arm, alternating; each process: `training_step.py {' '.join(step_args)}`. "
             "ms: median over processes of each process's median (min-max over processes); "
             "/ERM and - ERM: medians over processes of the median per-round ratio to and difference from ERM; "
             "minor faults: median per step (getrusage).", "",
             "| arm | case | ms (min-max) | /ERM | - ERM, ms | minor faults / step |", "|---|---|---|---|---|---|"]
    for name, _ in arms:
        cases: Dict[str, List[Tuple[float, float, float, float]]] = {}
        for run in runs[name]:
            for shape, times in run["seconds"].items():
                erm = times.get(f"{shape}/erm")
                faults = run.get("minor_faults_per_step", {}).get(shape, {})
                for case, seconds in times.items():
                    ratio = statistics.median([s / e for s, e in zip(seconds, erm)]) if erm else float("nan")
                    delta = statistics.median([s - e for s, e in zip(seconds, erm)]) * 1e3 if erm else float("nan")
                    flt = statistics.median(faults[case]) if case in faults else float("nan")
                    cases.setdefault(case, []).append((statistics.median(seconds) * 1e3, ratio, delta, flt))
        for case, vals in cases.items():
            ms = [v[0] for v in vals]
            ratio, delta, flt = (statistics.median(v[i] for v in vals) for i in (1, 2, 3))
            lines.append(f"| {name} | {case} | {statistics.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f}) | "
                         f"{ratio:.3f} | {delta:+.1f} | {flt:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
