"""Cost of CMA's Hessian alignment as its authors compute it, against `full_hessian_penalty`.

CMA (Chen et al., UAI 2025) aligns each environment's head gradient and full head Hessian. Its
DomainBed fork (chenyuen0103/DomainBed, ``domainbed/algorithms.py``, class ``CMA``) computes the
Hessian term in one of two ways; both are re-implemented below (`cma_explicit_hessian_term`,
`cma_pairwise_hessian_term`, with its gradient term `cma_gradient_term`), step for step, in our code:

- explicit (the fork's ``hessian`` + ``hessian_pen``, used below 70 classes): each environment's
  (C·d) x (C·d) Hessian, d = D + 1, formed by an einsum over the batch of (diag p - p p^T) ⊗ x x^T,
  then the Frobenius distances to their mean;
- pairwise (the fork's ``hessian_pen_mem``, from 70 classes on): for every pair of environments
  (e <= f), <H_e, H_f> as sum_{b,c} tr(A_b A_c) tr(X_b X_c) with X_b = x_b x_b^T, the trace of the
  feature outer products by ``einsum('bik,cjk->bcij')`` on chunks of 16 samples (which materialises
  a (16, B, d, d) tensor before taking its diagonal: 16·B·d^3 multiply-adds and 16·B·d^2 floats per
  chunk), the probability traces by the same einsum on (B, C, C) matrices (B^2·C^3, B^2·C^2 floats).

Against them: `hgkernels.full_hessian_penalty` (bias=False on [1, features], as `hgkernels.domainbed.CMA`
calls it), both terms / C^2. Each row is forward + backward of (Hessian term + gradient term) with
respect to logits and features, float32, CPU, N = 32 samples x E environments; time: median of
``--repeat`` runs after one warm-up (one run, no warm-up, for a case estimated above 5 s), from a
process with glibc's default allocator; peak memory: the
resident-set high-water mark over the call (VmHWM, `hgk_bench.peak_memory`) from a second process
with a fixed MALLOC_MMAP_THRESHOLD_, so that freed tensors leave the resident set. A CMA form whose
estimated peak exceeds ``--max-gb`` or whose estimated time (multiply-adds at the measured GEMM rate)
exceeds ``--max-seconds`` is not run: its row gives the estimated memory and time instead (marked
"est."); the memory model is in `explicit_bytes` / `pairwise_bytes`.

    python benchmarks/cma_cost.py                   # D 384, 2048 x C 2, 7, 65, 345, 1000; into benchmarks/out/
    python benchmarks/cma_cost.py --smoke           # tiny, for CI
    python benchmarks/cma_cost.py --out /tmp/cma_cost.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import hgkernels as hk  # noqa: E402
from hgk_bench import measure_ceilings, peak_memory, progress, write_table  # noqa: E402

FLOAT = 4
CHUNK = 16  # the fork's mini_batch_size in hessian_pen_mem
MMAP_THRESHOLD = "131072"
MEMORY_FLOOR = 1 << 20  # RSS-based peaks below this are not resolved (heap reuse below the mmap threshold)
# "extra": (D, C) rows outside the grid where every form runs, to check the estimates against measurements
GRID = dict(d=[384, 2048], c=[2, 7, 65, 345, 1000], e=4, n_e=32, extra=[(128, 7)])
SMOKE = dict(d=[6, 20], c=[2, 5], e=3, n_e=5, extra=[])
FORMS = ("ours", "explicit", "pairwise")


# ---- CMA's computations, re-implemented (following the fork's CMA class) -------------------------

def _softmax_hessians(logits: torch.Tensor) -> torch.Tensor:
    """(B, C, C) logit Hessians diag p - p p^T of the cross-entropy."""
    p = F.softmax(logits, 1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def cma_gradient_term(x: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int]):
    """CMA's ``grad_pen``: mean_e ||G_e - mean G||^2 with G_e = (p - onehot)^T x / (B_e C)."""
    c = logits.shape[1]
    grads = [(F.softmax(lg, 1) - F.one_hot(y, c).to(x.dtype)).T @ xe / (len(xe) * c)
             for xe, lg, y in zip(x.split(list(sizes)), logits.split(list(sizes)), labels.split(list(sizes)))]
    mean = torch.stack(grads).mean(0)
    return sum((g - mean).pow(2).sum() for g in grads) / len(grads)


def cma_explicit_hessian_term(x: torch.Tensor, logits: torch.Tensor, sizes: Sequence[int]):
    """CMA's ``hessian`` + ``hessian_pen``: each H_e formed, (C·d)^2 entries, then mean_e ||H_e - H_bar||_F^2."""
    c, d = logits.shape[1], x.shape[1]
    hessians = []
    for xe, lg in zip(x.split(list(sizes)), logits.split(list(sizes))):
        a = _softmax_hessians(lg)
        outer = torch.einsum("bi,bj->bij", xe, xe)
        h = torch.einsum("bkl,bij->klij", a, outer).reshape(c, d, c, d).permute(0, 2, 1, 3).reshape(c * d, c * d)
        hessians.append(h / len(xe) / c)
    mean = torch.stack(hessians).mean(0)
    return sum(torch.linalg.matrix_norm(h - mean) ** 2 / len(hessians) for h in hessians)


def cma_pairwise_hessian_term(x: torch.Tensor, logits: torch.Tensor, sizes: Sequence[int]):
    """CMA's ``hessian_pen_mem``: <H_e, H_f> for every pair e <= f from sample-pair traces (chunks of
    16 samples), then mean_e ||H_e - H_bar||^2 = mean_e (<H_e,H_e> + mean_fg <H_f,H_g> - 2 mean_f <H_e,H_f>), / C^2."""
    c, num_envs = logits.shape[1], len(sizes)
    outers = [torch.einsum("bi,bj->bij", xe, xe) for xe in x.split(list(sizes))]
    probs = [_softmax_hessians(lg) for lg in logits.split(list(sizes))]
    inner = [[None] * num_envs for _ in range(num_envs)]
    for e in range(num_envs):
        for f in range(e, num_envs):
            prob_traces = torch.einsum("bik,cjk->bcij", probs[e], probs[f]).diagonal(dim1=-2, dim2=-1).sum(-1)
            x_traces = torch.cat([torch.einsum("bik,cjk->bcij", outers[e][i:i + CHUNK], outers[f])
                                  .diagonal(dim1=-2, dim2=-1).sum(-1) for i in range(0, len(outers[e]), CHUNK)])
            inner[e][f] = inner[f][e] = (prob_traces * x_traces).sum() / (len(outers[e]) * len(outers[f]))
    gram = torch.stack([torch.stack(row) for row in inner])
    total = (gram.diagonal() + gram.sum() / num_envs ** 2 - 2 * gram.sum(1) / num_envs).sum() / num_envs
    return total / c ** 2


def ours(x, logits, labels, sizes):
    pen = hk.full_hessian_penalty(logits, x, labels, list(sizes), bias=False, detach_reference=False, validate=False)
    return (pen.hessian + pen.gradient) / logits.shape[1] ** 2


def cma(form: str):
    hessian = cma_explicit_hessian_term if form == "explicit" else cma_pairwise_hessian_term
    return lambda x, logits, labels, sizes: hessian(x, logits, sizes) + cma_gradient_term(x, logits, labels, sizes)


# ---- estimates ----------------------------------------------------------------------------------

def explicit_bytes(d: int, c: int, e: int, n_e: int) -> int:
    """Peak of the explicit form: per environment the einsum's (C·d)^2 output and its permuted copy, the E
    Hessians kept, their stack, the mean, the E differences kept for the norm's backward, +1 in backward;
    and the E (B, d, d) feature outer products, kept for the einsum's backward, and their gradients."""
    dh = d + 1
    return ((3 * e + 3) * (c * dh) ** 2 + 2 * e * n_e * dh ** 2) * FLOAT


def pairwise_bytes(d: int, c: int, e: int, n_e: int) -> int:
    """Peak of the pairwise form: the E (B, d, d) outer products (kept for backward) and their gradients,
    one (16, B, d, d) chunk product and its gradient, the (B, B, C, C) probability product and its gradient."""
    dh = d + 1
    return (2 * e * n_e * dh ** 2 + 2 * CHUNK * n_e * dh ** 2 + 2 * n_e ** 2 * c ** 2) * FLOAT


def multiply_adds(form: str, d: int, c: int, e: int, n_e: int) -> float:
    """Forward multiply-adds (the backward costs about twice as much)."""
    dh = d + 1
    if form == "explicit":
        return e * n_e * (c * dh) ** 2
    if form == "pairwise":
        return e * (e + 1) / 2 * n_e ** 2 * (dh ** 3 + c ** 3)
    return 2 * (e * n_e) ** 2 * d + 7 * (e * n_e) ** 2 * c


# ---- measuring ----------------------------------------------------------------------------------

def _inputs(d: int, c: int, e: int, n_e: int):
    gen = torch.Generator().manual_seed(0)
    n = e * n_e
    features = torch.randn(n, d, generator=gen).relu_()
    x = torch.cat([torch.ones(n, 1), features], 1)
    return x, torch.randn(n, c, generator=gen), torch.randint(0, c, (n,), generator=gen), [n_e] * e


def _call(fn, x, logits, labels, sizes):
    xg, lg = x.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    fn(xg, lg, labels, sizes).backward()


def _worker(mode: str, cases: List[dict], repeat: int, emit=lambda row: print(json.dumps(row), flush=True)) -> None:
    """Measure the cases (time or memory) and emit one row per case (default: a JSON line on stdout)."""
    torch.manual_seed(0)
    for case in cases:
        x, logits, labels, sizes = _inputs(case["d"], case["c"], case["e"], case["n_e"])
        fn = ours if case["form"] == "ours" else cma(case["form"])
        label = f"{case['form']} D={case['d']} C={case['c']} ({mode})"
        progress(f"{label}: started")
        if mode == "memory":
            if case.get("warmup", True):  # first calls initialise lazily allocated state
                _call(fn, x, logits, labels, sizes)
            with peak_memory(torch.device("cpu")) as peak:
                _call(fn, x, logits, labels, sizes)
            out = peak["bytes"]
        else:
            if case.get("warmup", True):
                _call(fn, x, logits, labels, sizes)
            times = []
            for _ in range(repeat if case.get("warmup", True) else 1):  # a slow case: one run
                start = time.perf_counter()
                _call(fn, x, logits, labels, sizes)
                times.append(time.perf_counter() - start)
            out = statistics.median(times)
        progress(f"{label}: done")
        emit({**case, mode: out})


def _run_workers(cases: List[dict], repeat: int, threads, in_process: bool = False) -> Dict[tuple, dict]:
    """Both measurements, each in a fresh process (``in_process``: here, for the smoke run, whose
    memory figures then include reused heap and mean little)."""
    results: Dict[tuple, dict] = {}
    if in_process:
        for mode in ("time", "memory"):
            _worker(mode, cases, repeat, lambda row, mode=mode: results.setdefault(
                (row["form"], row["d"], row["c"]), {}).update({mode: row[mode]}))
        return results
    for mode in ("time", "memory"):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        if mode == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # glibc reads it at start-up only
        progress(f"{mode} process: {len(cases)} cases")
        # the worker's progress lines go straight to this process's stderr
        command = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--repeat", str(repeat)]
        if threads is not None:
            command += ["--threads", str(threads)]
        proc = subprocess.run(command, input=json.dumps(cases), stdout=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the {mode} process failed ({proc.returncode})")
        for line in proc.stdout.splitlines():
            row = json.loads(line)
            key = (row["form"], row["d"], row["c"])
            results.setdefault(key, {}).update({mode: row[mode]})
    return results


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB" if b < 2**30 else f"{b / 2**30:,.1f} GiB"


def _fmt_time(t: float) -> str:
    return f"{t * 1e3:,.1f} ms" if t < 1 else f"{t:,.1f} s"


def build_table(grid: dict, repeat: int, max_gb: float, max_seconds: float, flops: float, threads=None,
                in_process: bool = False) -> List[str]:
    e, n_e = grid["e"], grid["n_e"]
    plan, runnable = {}, []
    rows = [(d, c) for d in grid["d"] for c in grid["c"]] + list(grid["extra"])
    for d, c in rows:
        if True:
            for form in FORMS:
                mem = {"ours": 0, "explicit": explicit_bytes, "pairwise": pairwise_bytes}[form]
                est_bytes = mem(d, c, e, n_e) if form != "ours" else 0
                est_time = 3 * 2 * multiply_adds(form, d, c, e, n_e) / flops
                run = form == "ours" or (est_bytes <= max_gb * 2**30 and est_time <= max_seconds)
                plan[form, d, c] = (run, est_bytes, est_time)
                if run:
                    runnable.append(dict(form=form, d=d, c=c, e=e, n_e=n_e, warmup=est_time < 5))
    measured = _run_workers(runnable, repeat, threads, in_process)
    lines = [f"N = {n_e} samples x {e} environments, float32, forward + backward of Hessian + gradient term. "
             f"CMA's forms are not run beyond {max_gb:g} GB or {max_seconds:g} s: est. = estimated, the memory "
             f"from the model in cma_cost.py, the time a lower bound (its multiply-adds at the measured GEMM rate; "
             f"measured runs take longer, see the check row). The fork uses the explicit form for C < 70, the "
             f"pairwise form from 70 on. Our peaks below {_fmt_bytes(MEMORY_FLOOR)} (the resolution of the RSS "
             f"figure) are shown as such and the ratios against it are lower bounds (≥).", "",
             "| D | C | ours: time | ours: peak | CMA explicit: time | peak | CMA pairwise: time | peak | "
             "CMA's form (the fork's choice) ÷ ours: time, memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d, c in rows:
        cells, values = [], {}
        for form in FORMS:
            run, est_bytes, est_time = plan[form, d, c]
            if run:
                got = measured[form, d, c]
                values[form] = (got["time"], got["memory"], False)
                if form == "ours":
                    small = got["memory"] < MEMORY_FLOOR
                    cells += [_fmt_time(got["time"]),
                              f"< {_fmt_bytes(MEMORY_FLOOR)}" if small else _fmt_bytes(got["memory"])]
                else:
                    cells += [f"{_fmt_time(got['time'])} (est. ≥ {_fmt_time(est_time)})",
                              f"{_fmt_bytes(got['memory'])} (est. {_fmt_bytes(est_bytes)})"]
            else:
                values[form] = (est_time, est_bytes, True)
                cells += [f"est. ≥ {_fmt_time(est_time)}", f"est. {_fmt_bytes(est_bytes)}"]
        fork = "explicit" if c < 70 else "pairwise"
        t, m, estimated = values[fork]
        t0, m0, _ = values["ours"]
        time_ratio = f"{'est. ≥ ' if estimated else ''}{t / t0:,.0f}×"
        mem_ratio = f"{'est. ' if estimated else ''}{'≥ ' if m0 < MEMORY_FLOOR else ''}{m / max(m0, MEMORY_FLOOR):,.0f}×"
        extra = " (check of the estimates)" if (d, c) in grid["extra"] else ""
        lines.append(f"| {d}{extra} | {c} | " + " | ".join(cells) + f" | {time_ratio}, {mem_ratio} ({fork}) |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, every form run (CI)")
    parser.add_argument("--out", default=None, help="markdown output (default benchmarks/out/cma_cost.md, git-ignored)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-gb", type=float, default=4.0)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        _worker(args.worker, json.load(sys.stdin), args.repeat)
        return 0
    progress("measuring the GEMM rate")
    flops = measure_ceilings(torch.device("cpu"), quick=args.smoke).sgemm_flops
    grid = SMOKE if args.smoke else GRID
    lines = build_table(grid, 1 if args.smoke else args.repeat, args.max_gb, args.max_seconds, flops, args.threads,
                        in_process=args.smoke)
    lines.append("")
    lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads, measured float32 GEMM "
                 f"{flops / 1e9:.0f} GFLOP/s (for the estimates); peak memory: RSS high-water mark (VmHWM).")
    out = write_table("\n".join(lines), args.out, "cma_cost.md")
    progress(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
