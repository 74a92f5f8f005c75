"""Run a subset of the benchmark cases and write a markdown report and a log-log plot.

    python benchmarks/report.py                      # named shapes + the N sweep, RESULTS.md + plot
    python benchmarks/report.py --subset all --repeat 7
    python benchmarks/report.py --smoke --out /tmp/r.md --plot /tmp/r.png
    python benchmarks/report.py --cases cmnist pacs --out /tmp/r.md --plot /tmp/r.png

Each case times forward + backward (forward alone for the diagonal rows) of every
available closed-form backend and of the generic autograd baselines on the same
seeded inputs. Each method gets a warm-up run (which also measures peak memory)
and then `--repeat` timed runs, interleaved across methods so machine noise hits
all alike; the table shows the median. A method whose single run exceeds
budget / repeat runs once. The official probe counts run once, last, when their
estimated time (from the one-probe median and a four-probe run) fits the budget;
otherwise they are reported as a time-out with that estimate.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hgk_bench as hb  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Blocks from 128 KiB up get their own mapping, returned to the OS when freed (see hgk_bench.peak_memory).
MMAP_THRESHOLD = "131072"


@dataclass
class Row:
    shape: hb.Shape
    method: hb.Method
    status: str = "ok"
    times: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    floor: Optional[float] = None  # seconds, set from the ceilings the parent process measured
    estimate: Optional[float] = None  # seconds, official baselines only

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate" in text


def _first_run(row: Row, step, device: torch.device) -> Optional[float]:
    """One call measuring time and peak memory; None (status set) when it runs out of memory."""
    try:
        with hb.peak_memory(device) as mem:
            first = hb.timed(step, device)
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        row.status = "out of memory"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"  {row.method.label} [{row.method.backend}]: out of memory")
        return None
    row.peak_bytes = mem["bytes"]
    log(f"  {row.method.label} [{row.method.backend}]: first run {first * 1e3:.1f} ms")
    return first


def run_case(shape: hb.Shape, device: torch.device, repeat: int, budget: float) -> Tuple[List[Row], Dict[str, str]]:
    """Time every method on one shape: (rows, {backend not timed: why})."""
    inputs = hb.make_inputs(shape, device)
    available, skipped = hb.closed_form_backends(shape, inputs)
    methods = hb.methods_for(shape, available, with_backpack=hb.backpack_reason() is None)
    rows = [Row(shape, m) for m in methods]
    steps = {id(row): hb.make_step(row.method, shape, inputs) for row in rows}
    memory_limit = hb.available_memory_bytes(device) // 2
    runnable = []
    for row in rows:
        need = hb.memory_estimate(row.method, shape)
        if need > memory_limit:
            row.status = f"out of memory (est. {need / 2**30:.1f} GiB > half the {2 * memory_limit / 2**30:.1f} GiB free)"
            log(f"  {row.method.label} [{row.method.backend}]: {row.status}")
        else:
            runnable.append(row)

    # The official probe counts cost K one-probe runs: they run once, last, within the budget.
    def costly(row: Row) -> bool:
        return row.method.kind == "official" and row.method.probes > 1

    # Everything else: warm-up (with memory), then interleaved repeats.
    repeated: List[Row] = []
    for row in (r for r in runnable if not costly(r)):
        first = _first_run(row, steps[id(row)], device)
        if first is None:
            continue
        if first * repeat > budget:
            row.times.append(first)  # too slow to repeat: its one (cold) run is the result
        else:
            repeated.append(row)
    for _ in range(repeat):
        for row in repeated:
            row.times.append(hb.timed(steps[id(row)], device))

    unit = _find(rows, "unit", "hutchinson")
    for row in (r for r in runnable if costly(r)):
        if unit is None or unit.median is None:
            row.status = "not run (the 1-probe run did not finish)"
            continue
        row.estimate = hb.official_estimate(row.method, shape, inputs, device, unit.median)
        if row.estimate > budget:
            row.status = f"time-out (est. {row.estimate:.0f} s > {budget:.0f} s budget)"
            log(f"  {row.method.label} [{row.method.backend}]: {row.status}")
            continue
        first = _first_run(row, steps[id(row)], device)
        if first is not None:
            row.times.append(first)
    return rows, skipped


def run_case_isolated(shape: hb.Shape, args: argparse.Namespace,
                      notes: List[str]) -> Tuple[List[Row], Dict[str, str]]:
    """`run_case` in fresh processes: a crash (a native backend's, say) becomes a result, not the
    end of the report, and each case's peak memory starts from a clean process.

    Each case runs twice. Times come from a process with glibc's default allocator settings (what
    users get: freed blocks are reused, so large temporaries are not page-faulted in on every call).
    Peak memory comes from a process with a fixed MALLOC_MMAP_THRESHOLD_, where freed tensors leave
    the resident set; that setting roughly doubles some times, so they are not taken from it."""
    # faulthandler: a crashing case prints the Python stack it crashed in to the log
    command = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), "--worker", shape.name,
               "--repeat", str(args.repeat), "--budget", str(args.budget), "--device", args.device]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    timing_env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    # glibc reads the threshold at start-up only; see hgk_bench.peak_memory.
    memory_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    log("  timing process")
    timed, skipped = _run_worker(shape, command, timing_env, notes)
    log("  memory process")
    measured, _ = _run_worker(shape, command, memory_env, notes)
    peaks = {(row.method.label, row.method.backend): row.peak_bytes for row in measured}
    for row in timed:
        row.peak_bytes = peaks.get((row.method.label, row.method.backend))
    return timed, skipped


def _run_worker(shape: hb.Shape, command: List[str], env: Dict[str, str],
                notes: List[str]) -> Tuple[List[Row], Dict[str, str]]:
    """One worker process; a crashed one is tried once more, and the crash is kept in `notes`
    (a module rebuilt under a running process crashes it too)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "case.json")
        for attempt in (1, 2):
            code = subprocess.run(command + ["--worker-out", out], env=env).returncode
            if code == 0:
                with open(out) as result:
                    data = json.load(result)
                rows = [Row(shape, hb.Method(**row.pop("method")), **row) for row in data["rows"]]
                return rows, data["skipped"]
            why = f"signal {-code}" if code < 0 else f"exit code {code}"
            notes.append(f"{shape.name}: attempt {attempt} crashed ({why})")
            log(f"  attempt {attempt} crashed ({why})")
    return [Row(shape, hb.Method("", "—", "crash", "all methods"), status=f"crashed ({why})")], {}


def _worker(args: argparse.Namespace) -> int:
    rows, skipped = run_case(hb.shape_named(args.worker), torch.device(args.device), args.repeat, args.budget)
    with open(args.worker_out, "w") as out:
        json.dump({"skipped": skipped,
                   "rows": [{k: v for k, v in dataclasses.asdict(row).items() if k != "shape"} for row in rows]},
                  out)
    return 0


# ---- markdown ----------------------------------------------------------------------------------

def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def _ratio(x: Optional[float]) -> str:
    return "—" if x is None else (f"{x:.3g}" if x < 100 else f"{x:,.0f}")


def _find(rows: List[Row], kind: str, penalty: str, backend: Optional[str] = None) -> Optional[Row]:
    for row in rows:
        m = row.method
        if m.kind == kind and m.penalty == penalty and (backend is None or m.backend == backend):
            return row
    return None


def _speedup(baseline: Optional[Row], row: Optional[Row]) -> Optional[float]:
    """Baseline median ÷ row median (from the baseline's estimate when it timed out)."""
    if baseline is None or row is None or row.median is None:
        return None
    base = baseline.median if baseline.median is not None else baseline.estimate
    return None if base is None else base / row.median


def case_table(rows: List[Row]) -> List[str]:
    unit = _find(rows, "unit", "hutchinson")
    lines = ["| method | backend | median (ms) | best (ms) | runs | peak mem (MiB) | floor (ms) | median ÷ floor "
             "| speed-up vs generic 1 probe |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        m = row.method
        if row.median is None:
            lines.append(f"| {m.label} | {m.backend} | {row.status} | — | 0 | — | {_ms(row.floor)} | — | — |")
            continue
        mem = "—" if row.peak_bytes is None else f"{row.peak_bytes / 2**20:,.1f}"
        speedup = None if m.forward_only else _speedup(unit, row)
        lines.append(f"| {m.label} | {m.backend} | {_ms(row.median)} | {_ms(min(row.times))} | {len(row.times)} "
                     f"| {mem} | {_ms(row.floor)} | {_ratio(row.median / row.floor)} | {_ratio(speedup)} |")
    return lines


def _versus(base: Optional[Row], mine: Optional[Row]) -> str:
    """The speed-up as "12.3×", marked as an estimate when the baseline timed out."""
    value = _speedup(base, mine)
    if value is None:
        return "—"
    return f"{_ratio(value)}×" if base.median is not None else f"~{_ratio(value)}× (est.: time-out)"


def headline_table(all_rows: Dict[str, List[Row]]) -> List[str]:
    lines = ["| case | backend | exact Hutchinson vs generic 1 probe | K | vs generic K probes (official) "
             "| HGP vs generic 1 probe | vs generic HGP double backward (official) "
             "| diagonal forward vs BackPACK DiagHessian |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for rows in all_rows.values():
        crash = _find(rows, "crash", "")
        if crash is not None:
            lines.append(f"| {crash.shape.name} | — | {crash.status} | {crash.shape.official_probes} | — | — | — | — |")
            continue
        unit = _find(rows, "unit", "hutchinson")
        official_diag = _find(rows, "official", "hutchinson")
        official_hgp = _find(rows, "official", "hgp")
        backpack = _find(rows, "peer", "diag")
        for row in rows:
            if row.method.kind == "closed" and row.method.penalty == "hutchinson":
                name = row.method.backend
                hgp, diag = _find(rows, "closed", "hgp", name), _find(rows, "closed", "diag", name)
                lines.append(f"| {row.shape.name} | {name} | {_versus(unit, row)} | {row.shape.official_probes} "
                             f"| {_versus(official_diag, row)} | {_versus(unit, hgp)} | {_versus(official_hgp, hgp)} "
                             f"| {_versus(backpack, diag)} |")
    return lines


def write_markdown(path: str, all_rows: Dict[str, List[Row]], ceilings: hb.Ceilings, machine: Dict[str, str],
                   command: str, skipped_backends: Dict[str, str], notes: List[str], plot_path: Optional[str],
                   repeat: int, budget: float, device: torch.device, elapsed: float) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# hgkernels benchmarks", "",
             f"Produced by `{command}` on {now} in {elapsed / 60:.1f} min.", "", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines += [f"- measured ceilings: sgemm {ceilings.sgemm_flops / 1e9:.1f} GFLOP/s, "
              f"copy {ceilings.copy_bytes / 1e9:.1f} GB/s ({ceilings.notes})",
              f"- peak memory: {_memory_note(device)}"]
    if device.type != "cuda":
        lines.append("- GPU: none on this machine; no GPU numbers (triton backend not timed).")
    if skipped_backends:
        lines += ["", "Backends not timed:"] + [f"- {name}: {why}" for name, why in skipped_backends.items()]
    reason = hb.backpack_reason()
    if reason:
        lines.append(f"- BackPACK peer not timed: {reason}")
    if notes:
        lines += ["", "Crashed case processes (each crashed case is run once more):"] + [f"- {n}" for n in notes]
    lines += ["", "## Headline: closed form vs the generic double-backward path", "",
              "Speed-up = the baseline's median time ÷ the closed form's median time, forward + backward "
              "(forward alone in the last column), same run and inputs.", ""]
    lines += headline_table(all_rows)
    lines += ["", "## Per case", "",
              f"float32, validate=False, median of {repeat} interleaved runs after a warm-up run "
              f"(methods slower than {budget:.0f} s ÷ {repeat} run once; the official probe counts run once, "
              f"and not at all when estimated over {budget:.0f} s: time-out). *floor* = max(flops ÷ sgemm rate, bytes ÷ copy bandwidth) for "
              "the quantity the row computes, in the cheaper of its two forms (C × Dh statistics or N × N Gram "
              "matrices; counting in `hgk_bench.work`). Closed-form rows use `form=\"auto\"`. Generic rows are "
              "`backend=\"reference\"`: autograd double backward as in the official code. "
              "Diagonal rows time the forward alone: `head_hessian_diag` against BackPACK's DiagHessian "
              "(its loop over environments, gradient included).", ""]
    for label, rows in all_rows.items():
        lines += [f"### {label}", ""] + case_table(rows) + [""]
    if plot_path:
        lines += ["## Scaling", "", f"![time vs N]({os.path.relpath(plot_path, os.path.dirname(path))})", ""]
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")


def _memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above what was allocated before the warm-up call"
    return (f"resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) above the resident "
            f"size before the warm-up call, from a second process per case with "
            f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}, so freed tensors leave the resident set; times come "
            f"from a process with glibc's default allocator settings (that threshold would page-fault "
            f"every large temporary in again and roughly double some times)")


# ---- plot --------------------------------------------------------------------------------------

def write_plot(path: str, all_rows: Dict[str, List[Row]]) -> Optional[str]:
    """Time vs N (log-log) per method and backend over the largest family of cases differing only in N."""
    families: Dict[tuple, Dict[int, List[Row]]] = {}
    for rows in all_rows.values():
        s = rows[0].shape
        families.setdefault((s.d, s.c, s.e, s.loss), {})[s.n] = rows
    key, family = max(families.items(), key=lambda item: len(item[1]))
    if len(family) < 2:
        log("no plot: no cases differ only in N")
        return None
    try:
        import matplotlib
    except ImportError:
        log("no plot: matplotlib is not installed")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: Dict[str, List[tuple]] = {}
    for n, rows in sorted(family.items()):
        for row in rows:
            if row.median is not None:
                series.setdefault(f"{row.method.label} [{row.method.backend}]", []).append((n, row.median))
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for name, points in series.items():
        ns, ts = zip(*points)
        ax.plot(ns, [t * 1e3 for t in ts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (samples)")
    ax.set_ylabel("time (ms)")
    d, c, e, loss = key
    ax.set_title(f"time vs N: D={d}, C={c}, E={e}, {loss}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- command line ------------------------------------------------------------------------------

def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = list(hb.SUBSETS) + list(hb.SUBSET_ALIASES)
    parser.add_argument("--subset", nargs="+", default=["named", "sweep-n"], choices=choices,
                        help="case groups to run (default: named sweep-n)")
    parser.add_argument("--cases", nargs="+", default=None, help="only these case names of the subsets (e.g. cmnist)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repeats: checks the suite runs")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per method (median reported)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds allowed per method's single run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="markdown report path")
    parser.add_argument("--plot", default=os.path.join(HERE, "time_vs_n.png"), help="PNG plot path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one case, write JSON
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.subset, args.repeat = ["smoke"], min(args.repeat, 2)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        return _worker(args)
    command = "python benchmarks/report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = datetime.datetime.now()
    machine = hb.machine_description(device)
    log(f"measuring the machine's ceilings on {device} ...")
    ceilings = hb.measure_ceilings(device, quick=args.smoke)
    log(f"  sgemm {ceilings.sgemm_flops / 1e9:.1f} GFLOP/s, copy {ceilings.copy_bytes / 1e9:.1f} GB/s")
    shapes = hb.shapes_for(args.subset)
    if args.cases:
        unknown = set(args.cases) - {shape.name for shape in shapes}
        if unknown:
            raise SystemExit(f"--cases: {sorted(unknown)} not in subsets {args.subset}")
        shapes = [shape for shape in shapes if shape.name in args.cases]
    all_rows: Dict[str, List[Row]] = {}
    skipped_backends: Dict[str, str] = {}
    notes: List[str] = []
    for index, shape in enumerate(shapes, 1):
        log(f"[{index}/{len(shapes)}] {shape.label}")
        rows, skipped = run_case_isolated(shape, args, notes)
        for row in (r for r in rows if r.method.kind != "crash"):
            row.floor = hb.floor_seconds(row.method.penalty, shape, ceilings, row.method.form)
        all_rows[shape.label] = rows
        skipped_backends.update(skipped)
    plot_path = write_plot(args.plot, all_rows)
    elapsed = (datetime.datetime.now() - start).total_seconds()
    write_markdown(args.out, all_rows, ceilings, machine, command.strip(), skipped_backends, notes,
                   plot_path, args.repeat, args.budget, device, elapsed)
    log(f"wrote {args.out}" + (f" and {plot_path}" if plot_path else " (no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
