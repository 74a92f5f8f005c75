"""One command for a lent GPU: build, check correctness on the device, then time the named heads.

    python benchmarks/device_check.py               # on a CUDA machine, under 8 minutes on one H100/H200
    python benchmarks/device_check.py --dry-run     # the same steps on the CPU with tiny shapes (CI runs it)

It needs no pip install and no network: it builds the package in place in this checkout and
imports it from here (this checkout's root first on sys.path and on its children's PYTHONPATH),
checking that the hgkernels it and its children import is this checkout's, not an installed one.

Steps, stopping at the first failure:
1. build: the native extension with its CUDA module for the device's architecture, in place
   (`python setup.py build_ext --inplace`, HGK_CUDA=1, HGK_CUDA_ARCHS from the device); the dry
   run builds the CPU modules in place only when this checkout has none;
2. correctness: the CUDA and Triton tests on the device (`tests/test_native.py`, `tests/test_triton.py`,
   `tests/test_fused_head.py`),
   then every backend against `reference` on fresh inputs of each named head;
3. no host synchronisation: a `validate=False` call with envs as a size list runs under
   `torch.cuda.set_sync_debug_mode("error")` (a device-to-host copy or sync raises), forward and backward,
   so the penalties can be captured in CUDA graphs / torch.compile(mode="reduce-overhead");
4. launches per penalty (forward + backward) from the profiler's kernel events, per backend;
5. timings: forward + backward of both penalties at the named heads for triton / native / torch /
   reference (median of interleaved rounds), written to `benchmarks/out/RESULTS-GPU.md` (git-ignored)
   and a JSON beside it. Warm up, synchronise, take medians, one process.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# This checkout's package, ahead of any installed hgkernels (an editable install of another
# checkout included): the check is of this tree, built in place.
sys.path[:0] = [ROOT, HERE]

TIME_BUDGET_S = 7.5 * 60
PENALTIES = ("hutchinson", "hgp")


def log(message: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def child_env(**extra: str) -> Dict[str, str]:
    """The environment of every child process: this checkout first on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else ""), **extra}


def build(dry_run: bool) -> None:
    if dry_run:
        built = glob.glob(os.path.join(ROOT, "hgkernels", "_native*.so"))
        if built:
            log(f"build: skipped (dry run; this checkout has {os.path.relpath(built[0], ROOT)})")
            return
        env = child_env(HGK_CUDA="0", HGK_REQUIRE_NATIVE="1")
        log("build: the native module in place, without CUDA (dry run, none built in this checkout)")
    else:
        major, minor = torch.cuda.get_device_capability()
        env = child_env(HGK_CUDA="1", HGK_REQUIRE_NATIVE="1", HGK_CUDA_ARCHS=f"{major}{minor}",
                        MAX_JOBS=str(os.cpu_count() or 4))
        log(f"build: native extension with CUDA for sm_{major}{minor}, in place")
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env, check=True)


def check_import() -> str:
    """That this process and its children import this checkout's hgkernels; its path."""
    want = os.path.realpath(os.path.join(ROOT, "hgkernels", "__init__.py"))
    import hgkernels

    probe = subprocess.run([sys.executable, "-c", "import hgkernels; print(hgkernels.__file__)"], cwd=ROOT,
                           env=child_env(), capture_output=True, text=True)
    child = probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 and probe.stdout.strip() else probe.stderr
    for who, got in (("this process", hgkernels.__file__), ("a child process", child)):
        if os.path.realpath(got) != want:
            raise SystemExit(f"device_check: {who} imports hgkernels from {got!r}, not this checkout's {want}")
    log(f"hgkernels imported from {os.path.dirname(want)} (here and in child processes)")
    return os.path.dirname(want)


def device_tests(dry_run: bool) -> None:
    args = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_native.py",
            "tests/test_triton.py", "tests/test_fused_head.py"]
    if dry_run:  # one fast test of each file keeps the step from rotting
        args += ["-k", "test_two_runs_are_bitwise_equal or test_primitives_match_torch_backend"]
    log("tests: " + " ".join(args[3:]))
    subprocess.run(args, cwd=ROOT, check=True, env=child_env(TRITON_INTERPRET="1") if dry_run else child_env())


def _backends(device: torch.device) -> List[str]:
    names = ["torch", "native", "reference"]
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        names.insert(0, "triton")
    return names


def _call(hb, shape, inputs, backend: str, penalty: str, validate: bool = False):
    import hgkernels as hk
    fn = hk.hgp_penalty if penalty == "hgp" else hk.hutchinson_penalty
    logits = inputs.logits.detach().requires_grad_(True)
    features = inputs.features.detach().requires_grad_(True)
    sizes = [shape.n // shape.e] * (shape.e - 1) + [shape.n - (shape.n // shape.e) * (shape.e - 1)]
    pen = fn(logits, features, inputs.labels, sizes, loss=shape.loss, env_reduction=shape.env_reduction,
             detach_reference=shape.detach_reference, backend=backend, validate=validate)
    grads = torch.autograd.grad(pen.hessian + pen.gradient, (logits, features))
    return pen, grads


def correctness(hb, shapes, device: torch.device) -> Dict[str, float]:
    """Worst relative error of each backend against `reference` (float32 inputs, 1e-3 bound)."""
    worst: Dict[str, float] = {}
    for shape in shapes:
        log(f"correctness: {shape.label}")
        inputs = hb.make_inputs(shape, device, seed=1)
        for penalty in PENALTIES:
            ref_pen, ref_grads = _call(hb, shape, inputs, "reference", penalty, validate=True)
            want = [ref_pen.hessian, ref_pen.gradient, *ref_grads]
            for backend in _backends(device):
                if backend == "reference":
                    continue
                pen, grads = _call(hb, shape, inputs, backend, penalty, validate=True)
                for got, exp in zip([pen.hessian, pen.gradient, *grads], want):
                    got, exp = got.detach().double(), exp.detach().double()
                    err = float((got - exp).abs().max() / exp.abs().max().clamp_min(1e-30))
                    worst[backend] = max(worst.get(backend, 0.0), err)
                    if not err <= 1e-3:
                        raise AssertionError(f"{shape.name} {penalty} {backend}: relative error {err:.2e} > 1e-3")
    log("correctness against reference (worst relative error): " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    return worst


def sync_free(hb, shape, device: torch.device) -> Dict[str, str]:
    """Whether a validate=False call (sizes list) runs forward and backward without a host sync."""
    out = {}
    inputs = hb.make_inputs(shape, device)
    for backend in _backends(device):
        if backend == "reference":
            continue
        for penalty in PENALTIES:
            _call(hb, shape, inputs, backend, penalty)  # warm-up: compilation may sync
            if device.type != "cuda":
                out[f"{backend} {penalty}"] = "not checked (CPU)"
                continue
            torch.cuda.synchronize()
            try:
                torch.cuda.set_sync_debug_mode("error")
                _call(hb, shape, inputs, backend, penalty)
                out[f"{backend} {penalty}"] = "no sync"
            except RuntimeError as err:
                out[f"{backend} {penalty}"] = f"SYNC: {str(err).splitlines()[0]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
    log("host synchronisation with validate=False: " + "; ".join(f"{k}: {v}" for k, v in out.items()))
    return out


def launches(hb, shape, device: torch.device) -> Dict[str, int]:
    """Kernel launches per forward + backward, per backend and penalty (profiler kernel events)."""
    from torch.profiler import ProfilerActivity, profile
    out = {}
    if device.type != "cuda":
        log("launches: not counted (CPU)")
        return out
    inputs = hb.make_inputs(shape, device)
    for backend in _backends(device):
        for penalty in PENALTIES:
            _call(hb, shape, inputs, backend, penalty)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                _call(hb, shape, inputs, backend, penalty)
                torch.cuda.synchronize()
            out[f"{backend} {penalty}"] = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    log("kernel launches per forward + backward: " + ", ".join(f"{k}: {v}" for k, v in out.items()))
    return out


def timings(hb, shapes, device: torch.device, rounds: int, deadline: float) -> List[Dict]:
    rows = []
    for shape in shapes:
        log(f"timing {shape.label}: started")
        inputs = hb.make_inputs(shape, device)
        steps = {(backend, penalty): (lambda b=backend, p=penalty: _call(hb, shape, inputs, b, p))
                 for backend in _backends(device) for penalty in PENALTIES}
        for step in steps.values():
            step()  # warm-up (compilation, allocator)
        samples: Dict = {key: [] for key in steps}
        for _ in range(rounds):
            for key, step in steps.items():
                samples[key].append(hb.timed(step, device))
            if time.monotonic() > deadline:
                log("time budget reached: fewer rounds")
                break
        for (backend, penalty), times in samples.items():
            times.sort()
            rows.append({"head": shape.label, "backend": backend, "penalty": penalty,
                         "median_ms": 1e3 * times[len(times) // 2], "rounds": len(times)})
        log(f"timed {shape.label}")
    return rows


def write_results(path: str, machine: Dict[str, str], worst: Dict, syncs: Dict, counts: Dict, rows: List[Dict]):
    lines = ["# GPU results", "", f"Command: `python benchmarks/device_check.py` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", "## Correctness against `reference` (worst relative error, float32 inputs)", ""]
    lines += [f"- {k}: {v:.1e}" for k, v in worst.items()]
    lines += ["", "## Host synchronisation of a `validate=False` call (sizes list)", ""]
    lines += [f"- {k}: {v}" for k, v in syncs.items()]
    lines += ["", "## Kernel launches per forward + backward", ""]
    lines += [f"- {k}: {v}" for k, v in counts.items()] or ["- not counted"]
    lines += ["", "## Forward + backward, median ms", "", "| head | penalty | " +
              " | ".join(_backends_in(rows)) + " | reference ÷ best |", "|---|---|" + "---|" * (len(_backends_in(rows)) + 1)]
    for head in dict.fromkeys(r["head"] for r in rows):
        for penalty in PENALTIES:
            cells = {r["backend"]: r["median_ms"] for r in rows if r["head"] == head and r["penalty"] == penalty}
            closed = [v for k, v in cells.items() if k != "reference"]
            ratio = cells.get("reference", float("nan")) / min(closed) if closed else float("nan")
            lines.append(f"| {head} | {penalty} | " + " | ".join(f"{cells[b]:.3f}" for b in _backends_in(rows))
                         + f" | {ratio:.1f}× |")
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")


def _backends_in(rows: List[Dict]) -> List[str]:
    return list(dict.fromkeys(r["backend"] for r in rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no build (what CI runs)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "out"),
                        help="where RESULTS-GPU.md and results-gpu.json go (default benchmarks/out/, git-ignored)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    start = time.monotonic()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on a CPU machine")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    if args.dry_run:  # Triton's kernels run on the CPU through its interpreter (set before triton is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    build(args.dry_run)
    package = check_import()
    device_tests(args.dry_run)
    import hgk_bench as hb
    shapes = hb.SUBSETS["smoke"][:2] if args.dry_run else hb.SUBSETS["named"]
    worst = correctness(hb, shapes[:1] if args.dry_run else shapes, device)
    syncs = sync_free(hb, shapes[0] if args.dry_run else hb.shape_named("pacs"), device)
    counts = launches(hb, hb.shape_named("pacs"), device)
    rows = timings(hb, shapes, device, 2 if args.dry_run else args.rounds, start + TIME_BUDGET_S)
    os.makedirs(args.out_dir, exist_ok=True)
    name = "RESULTS-GPU-dry-run" if args.dry_run else "RESULTS-GPU"
    machine = {**hb.machine_description(device), "hgkernels": package}
    write_results(os.path.join(args.out_dir, f"{name}.md"), machine, worst, syncs, counts, rows)
    with open(os.path.join(args.out_dir, f"{name.lower()}.json"), "w") as out:
        json.dump({"correctness": worst, "sync": syncs, "launches": counts, "timings": rows}, out, indent=1)
    log(f"done in {time.monotonic() - start:.0f} s: {os.path.join(args.out_dir, name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
