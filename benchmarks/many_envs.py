"""Hundreds of environments: E = 256 environments of 2 to 8 samples against E = 4, same N.

Forward + backward of each penalty (exact Hutchinson and HGP in both forms, full Hessian, Fishr;
backend="auto", float32, validate=False, environments as a size list) at the PACS head (C 7) and the
DomainNet head (C 345), D 2048, N 1024: the median time over rounds that interleave the E = 4 and
E = 256 calls (after a warm-up round; a shared machine's load drifts), and the peak memory one call
adds (resident-set high-water mark, measured in a second process with MALLOC_MMAP_THRESHOLD_ fixed so
freed tensors leave the resident set, as benchmarks/report.py does), and E = 256 ÷ E = 4 for both.

    python benchmarks/many_envs.py                    # writes benchmarks/out/many_envs.md (git-ignored)
    python benchmarks/many_envs.py --out FILE         # elsewhere
    python benchmarks/many_envs.py --smoke            # tiny, for CI
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

import hgkernels as hk
from hgk_bench import available_memory_bytes, case, interleaved_times, peak_memory, progress  # benchmarks/ is first on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "out", "many_envs.md")
MMAP_THRESHOLD = "131072"
HEADS = {"pacs": dict(n=1024, d=2048, c=7), "domainnet": dict(n=1024, d=2048, c=345)}
SMOKE = {"tiny": dict(n=64, d=5, c=3)}
ENVS = (4, 256)
SMOKE_ENVS = (2, 16)
METHODS = {  # name -> (call, form)
    "exact Hutchinson, feature form": (hk.hutchinson_penalty, "feature"),
    "exact Hutchinson, sample form": (hk.hutchinson_penalty, "sample"),
    "exact Hutchinson, auto form": (hk.hutchinson_penalty, "auto"),
    "HGP, feature form": (hk.hgp_penalty, "feature"),
    "HGP, sample form": (hk.hgp_penalty, "sample"),
    "HGP, auto form": (hk.hgp_penalty, "auto"),
    "full Hessian": (hk.full_hessian_penalty, None),
    "Fishr": (lambda *a, **k: (hk.fishr_penalty(*a, **k),), None),
}


def sizes_for(n: int, e: int):
    """E environment sizes summing to N: equal for few environments; for many, a repeating pattern of 2
    to 8 samples (mean 4 at E = N / 4) completed by equal sizes."""
    if n % e == 0 and n // e > 8:
        return [n // e] * e
    pattern = [2, 8, 3, 5, 4, 2]
    mean = n // e
    sizes = [s - 4 + mean for s in pattern] * (e // len(pattern))
    sizes += [mean] * (e - len(sizes))
    sizes[-1] += n - sum(sizes)
    assert len(sizes) == e and sum(sizes) == n and min(sizes) >= 1, sizes
    return sizes


def inputs(head: dict, e: int):
    gen = torch.Generator().manual_seed(0)
    n, c = head["n"], head["c"]
    logits = torch.randn(n, c, generator=gen).requires_grad_(True)
    features = torch.randn(n, head["d"], generator=gen).relu_().requires_grad_(True)
    labels = torch.randint(0, c, (n,), generator=gen)
    return logits, features, labels, sizes_for(n, e)


def step_fn(method: str, head: dict, e: int):
    fn, form = METHODS[method]
    logits, features, labels, sizes = inputs(head, e)
    options = dict(validate=False) if form is None else dict(validate=False, form=form)

    def step():
        terms = fn(logits, features, labels, sizes, **options)
        torch.autograd.grad(sum(terms), (logits, features))
    return step


def measure_part(part: str, heads: dict, envs, repeat: int) -> dict:
    """{key: seconds or bytes} for every (head, method, E), in this process."""
    results = {}
    for head_name, head in heads.items():
        for method in METHODS:
            steps = {e: step_fn(method, head, e) for e in envs}
            if part == "time":  # the E's calls interleaved, round by round: a shared machine's load drifts
                with case(f"time: {head_name} {method}, E={', '.join(map(str, envs))} interleaved"):
                    times = interleaved_times(steps, repeat)
                results.update({f"{head_name}|{method}|{e}": statistics.median(times[e]) for e in envs})
                continue
            for e, step in steps.items():
                with case(f"memory: {head_name} {method}, E={e}"):
                    step()  # warm-up
                    with peak_memory(torch.device("cpu")) as peak:
                        step()
                results[f"{head_name}|{method}|{e}"] = peak["bytes"]
    return results


def run_part(part: str, args) -> dict:
    """One part in its own process (the memory part with the fixed mmap threshold)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if part == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    command = [sys.executable, os.path.abspath(__file__), "--part", part, "--repeat", str(args.repeat)]
    command += ["--smoke"] if args.smoke else ["--heads", args.heads]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(heads: dict, envs, times: dict, memory: dict) -> list:
    few, many = envs
    lines = [f"| head | method | E={few} ms | E={many} ms | time E={many} ÷ E={few} | E={few} MB | E={many} MB | "
             f"memory E={many} ÷ E={few} |", "|---|---|---|---|---|---|---|---|"]
    for head_name, head in heads.items():
        for method in METHODS:
            t = [times[f"{head_name}|{method}|{e}"] for e in envs]
            m = [memory[f"{head_name}|{method}|{e}"] for e in envs]
            lines.append(f"| {head_name} (N={head['n']}, D={head['d']}, C={head['c']}) | {method} | {1e3 * t[0]:.1f} | "
                         f"{1e3 * t[1]:.1f} | {t[1] / t[0]:.2f} | {m[0] / 2**20:.1f} | {m[1] / 2**20:.1f} | "
                         f"{m[1] / max(m[0], 1):.2f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny and quick, for CI")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per case (median)")
    parser.add_argument("--out", default=None, help=f"the table's file (default {os.path.relpath(DEFAULT_OUT)})")
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated heads (default all)")
    parser.add_argument("--part", choices=("time", "memory"), help=argparse.SUPPRESS)  # a child process's part
    args = parser.parse_args(argv)
    heads, envs = (SMOKE, SMOKE_ENVS) if args.smoke else ({h: HEADS[h] for h in args.heads.split(",")}, ENVS)
    if args.part:
        print(json.dumps(measure_part(args.part, heads, envs, 1 if args.smoke else args.repeat)))
        return 0
    progress(f"{available_memory_bytes(torch.device('cpu')) / 2**30:.1f} GiB available; "
             f"{torch.get_num_threads()} threads")
    times, memory = run_part("time", args), run_part("memory", args)
    lines = table(heads, envs, times, memory)
    out = args.out or DEFAULT_OUT
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    progress(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
