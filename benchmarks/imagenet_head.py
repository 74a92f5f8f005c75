"""Every penalty at an ImageNet-size head: C = 1000 classes, D = 2048 features, 4 environments x 32 samples.

Forward + backward (gradients of both terms with respect to logits and features, default options,
``validate=False``) of HGP, Hutchinson (exact diagonal), full-Hessian alignment and Fishr, float32,
CPU. Time: median of ``--repeat`` runs after a warm-up, from a process with glibc's default allocator.
Peak memory: the resident-set high-water mark over one call (VmHWM, `hgk_bench.peak_memory`), from a
second process with a fixed MALLOC_MMAP_THRESHOLD_ so that freed tensors leave the resident set; it is
compared with N·C·D·4 bytes (1 GB here), the size of any per-sample (N, C, D) intermediate such as
per-sample head gradients, which none of the penalties forms. Correctness at this head's structure on
a reduced copy, against ``backend="reference"``: tests/test_imagenet_head.py.

    python benchmarks/imagenet_head.py                 # into benchmarks/out/imagenet_head.md (git-ignored)
    python benchmarks/imagenet_head.py --smoke         # tiny, for CI
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import hgkernels as hk  # noqa: E402
from hgk_bench import peak_memory, progress, shape_named, write_table  # noqa: E402

MMAP_THRESHOLD = "131072"
PENALTIES = {
    "HGP": lambda *a: hk.hgp_penalty(*a, validate=False),
    "Hutchinson (exact)": lambda *a: hk.hutchinson_penalty(*a, validate=False),
    "full Hessian": lambda *a: hk.full_hessian_penalty(*a, validate=False),
    "Fishr": lambda *a: hk.fishr_penalty(*a, validate=False),
}


def _inputs(n: int, d: int, c: int, e: int):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, c, generator=gen), torch.randn(n, d, generator=gen).relu_(),
            torch.randint(0, c, (n,), generator=gen), [n // e] * e)


def _call(name, logits, features, labels, sizes):
    lg, ft = logits.clone().requires_grad_(True), features.clone().requires_grad_(True)
    out = PENALTIES[name](lg, ft, labels, sizes)
    total = out if isinstance(out, torch.Tensor) else out.hessian + out.gradient
    total.backward()


def _worker(mode: str, shape: dict, repeat: int, emit=lambda row: print(json.dumps(row), flush=True)) -> None:
    inputs = _inputs(shape["n"], shape["d"], shape["c"], shape["e"])
    for name in PENALTIES:
        progress(f"{name} ({mode}): started")
        _call(name, *inputs)  # warm-up: lazily initialised state, the kernels' first call
        if mode == "memory":
            with peak_memory(torch.device("cpu")) as peak:
                _call(name, *inputs)
            value = peak["bytes"]
        else:
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                _call(name, *inputs)
                times.append(time.perf_counter() - start)
            value = statistics.median(times)
        progress(f"{name} ({mode}): done")
        emit({"name": name, mode: value})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny head (CI)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None, help="markdown output (default benchmarks/out/imagenet_head.md)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    head = shape_named("smoke-ce" if args.smoke else "imagenet")
    shape = dict(n=head.n, d=head.d, c=head.c, e=head.e)
    if args.worker:
        _worker(args.worker, shape, 1 if args.smoke else args.repeat)
        return 0
    results = {}
    for mode in ("time", "memory"):
        if args.smoke:  # in this process: the smoke run checks the script, its memory figures mean little
            _worker(mode, shape, 1, lambda row: results.setdefault(row["name"], {}).update(row))
            continue
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        if mode == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        command = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--repeat", str(args.repeat)]
        if args.threads is not None:
            command += ["--threads", str(args.threads)]
        proc = subprocess.run(command + (["--smoke"] if args.smoke else []), stdout=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the {mode} process failed ({proc.returncode})")
        for line in proc.stdout.splitlines():
            row = json.loads(line)
            results.setdefault(row["name"], {}).update(row)
    per_sample = shape["n"] * shape["c"] * shape["d"] * 4
    lines = [f"{head.label}, float32, forward + backward, {torch.get_num_threads()} CPU threads, "
             f"torch {torch.__version__}; an (N, C, D) float32 intermediate would be {per_sample / 2**20:,.1f} MiB.", "",
             "| penalty | time | peak memory (RSS high-water mark) | peak ÷ N·C·D·4 bytes |", "|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['time'] * 1e3:,.1f} ms | {row['memory'] / 2**20:,.1f} MiB | "
                     f"{row['memory'] / per_sample:.3f} |")
    write_table("\n".join(lines), args.out, "imagenet_head.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
