"""Run a subset of the benchmark cases and write a markdown report, its raw data and a log-log plot.

    python benchmarks/report.py                      # named shapes + the N sweep, into benchmarks/out/
    python benchmarks/report.py --out benchmarks/RESULTS.md   # regenerate the tracked report
    python benchmarks/report.py --subset all --repeat 7
    python benchmarks/report.py --smoke --out /tmp/r.md --plot /tmp/r.png
    python benchmarks/report.py --cases cmnist pacs --out /tmp/r.md --plot /tmp/r.png
    python benchmarks/report.py --from-data benchmarks/out/RESULTS.json   # markdown again, no run

Outputs: the markdown (`--out`, default benchmarks/out/RESULTS.md, a git-ignored folder, so a run
never overwrites a tracked file unless asked), the raw data it is generated from (`--data`, default
the markdown's path with .json) and the plot (`--plot`, default time_vs_n.png beside the markdown).
The markdown is always rendered from the raw data, so `--from-data` reproduces it exactly.

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
# Default output folder, git-ignored: the tracked RESULTS.md changes only through an explicit --out.
OUT_DIR = os.path.join(HERE, "out")
DATA_FORMAT = 1  # version of the raw data file's layout
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
    methods = hb.methods_for(shape, inputs, available, with_backpack=hb.backpack_reason() is None)
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
                rows = [row_from_dict(shape, row) for row in data["rows"]]
                return rows, data["skipped"]
            why = f"signal {-code}" if code < 0 else f"exit code {code}"
            notes.append(f"{shape.name}: attempt {attempt} crashed ({why})")
            log(f"  attempt {attempt} crashed ({why})")
    return [Row(shape, hb.Method("", "—", "crash", "all methods"), status=f"crashed ({why})")], {}


def _worker(args: argparse.Namespace) -> int:
    rows, skipped = run_case(hb.shape_named(args.worker), torch.device(args.device), args.repeat, args.budget)
    with open(args.worker_out, "w") as out:
        json.dump({"skipped": skipped,
                   "rows": [row_to_dict(row) for row in rows]},
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


def row_to_dict(row: Row) -> Dict:
    return {k: v for k, v in dataclasses.asdict(row).items() if k != "shape"}


def row_from_dict(shape: hb.Shape, data: Dict) -> Row:
    data = dict(data)
    return Row(shape, hb.Method(**data.pop("method")), **data)


def make_data(all_rows: Dict[str, List[Row]], ceilings: hb.Ceilings, machine: Dict[str, str], command: str,
              skipped_backends: Dict[str, str], notes: List[str], repeat: int, budget: float,
              device: torch.device, elapsed: float) -> Dict:
    """Everything the markdown shows, as plain JSON: times in seconds, every timed run kept."""
    return {"format": DATA_FORMAT, "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "elapsed_s": elapsed, "device": device.type, "repeat": repeat, "budget_s": budget,
            "machine": machine, "ceilings": dataclasses.asdict(ceilings),
            "skipped_backends": skipped_backends, "backpack_reason": hb.backpack_reason(), "notes": notes,
            "cases": [{"label": label, "shape": dataclasses.asdict(rows[0].shape),
                       "rows": [row_to_dict(row) for row in rows]} for label, rows in all_rows.items()]}


def rows_of(data: Dict) -> Dict[str, List[Row]]:
    out = {}
    for case in data["cases"]:
        shape = hb.Shape(**case["shape"])
        out[case["label"]] = [row_from_dict(shape, row) for row in case["rows"]]
    return out


def write_data(path: str, data: Dict) -> None:
    with open(path, "w") as out:
        json.dump(data, out, indent=1)
        out.write("\n")


def read_data(path: str) -> Dict:
    with open(path) as source:
        data = json.load(source)
    if data.get("format") != DATA_FORMAT:
        raise SystemExit(f"{path}: raw data format {data.get('format')!r}, this report.py reads {DATA_FORMAT}")
    return data


def render_markdown(data: Dict, md_path: str, data_path: str, plot_path: Optional[str]) -> str:
    """The report, from the raw data alone (plus where the data and plot files lie, for links)."""
    all_rows = rows_of(data)
    ceilings = hb.Ceilings(**data["ceilings"])
    repeat, budget = data["repeat"], data["budget_s"]
    here = os.path.dirname(os.path.abspath(md_path))
    lines = ["# hgkernels benchmarks", "",
             f"Produced by `{data['command']}` on {data['date']} in {data['elapsed_s'] / 60:.1f} min. "
             f"Raw data: [{os.path.basename(data_path)}]({os.path.relpath(data_path, here)}); "
             "`python benchmarks/report.py --from-data FILE --out FILE.md` renders this page from it.",
             "", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in data["machine"].items()]
    lines += [f"- measured ceilings: sgemm {ceilings.sgemm_flops / 1e9:.1f} GFLOP/s, "
              f"copy {ceilings.copy_bytes / 1e9:.1f} GB/s ({ceilings.notes})",
              f"- peak memory: {_memory_note(data['device'])}"]
    if data["device"] != "cuda":
        lines.append("- GPU: none on this machine; no GPU numbers (triton backend not timed).")
    if data["skipped_backends"]:
        lines += ["", "Backends not timed:"] + [f"- {name}: {why}" for name, why in data["skipped_backends"].items()]
    if data["backpack_reason"]:
        lines.append(f"- BackPACK peer not timed: {data['backpack_reason']}")
    if data["notes"]:
        lines += ["", "Crashed case processes (each crashed case is run once more):"] + [f"- {n}" for n in data["notes"]]
    lines += ["", "## Isolated calls: closed form vs the generic double-backward path", "",
              "Speed-up = the baseline's median time ÷ the closed form's median time, forward + backward "
              "(forward alone in the last column), same run and inputs: the penalty call alone, not a training step "
              "(for that, `python benchmarks/training_step.py`).", ""]
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
        lines += ["## Scaling", "", f"![time vs N]({os.path.relpath(plot_path, here)})", ""]
    return "\n".join(lines) + "\n"


def write_report(data: Dict, md_path: str, data_path: str, plot_path: Optional[str]) -> Optional[str]:
    """Plot and markdown from the raw data: (re)generated the same way after a run and with --from-data."""
    for path in (md_path, data_path, plot_path):
        if path and os.path.dirname(os.path.abspath(path)):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plot_path = write_plot(plot_path, rows_of(data)) if plot_path else None
    text = render_markdown(data, md_path, data_path, plot_path)
    with open(md_path, "w") as out:
        out.write(text)
    return plot_path


def _memory_note(device: str) -> str:
    if device == "cuda":
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
    parser.add_argument("--out", default=os.path.join(OUT_DIR, "RESULTS.md"),
                        help="markdown report path (default benchmarks/out/RESULTS.md, git-ignored; "
                             "--out benchmarks/RESULTS.md regenerates the tracked report)")
    parser.add_argument("--data", default=None,
                        help="raw data (JSON) path (default: --out with .json in place of .md)")
    parser.add_argument("--plot", default=None, help="PNG plot path (default: time_vs_n.png beside --out)")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--from-data", metavar="FILE",
                        help="render the markdown (and plot) from this raw data file; runs nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one case, write JSON
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.subset, args.repeat = ["smoke"], min(args.repeat, 2)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.data is None:
        args.data = args.from_data or os.path.splitext(args.out)[0] + ".json"
    if args.plot is None and not args.no_plot:
        args.plot = os.path.join(os.path.dirname(os.path.abspath(args.out)), "time_vs_n.png")
    if args.no_plot:
        args.plot = None
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        return _worker(args)
    if args.from_data:
        data = read_data(args.from_data)
        if os.path.abspath(args.data) != os.path.abspath(args.from_data):
            write_data(args.data, data)
        plot_path = write_report(data, args.out, args.data, args.plot)
        log(f"wrote {args.out} from {args.from_data}" + (f" and {plot_path}" if plot_path else " (no plot)"))
        return 0
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
        log(f"[{index}/{len(shapes)}] {shape.label}: started")
        case_start = datetime.datetime.now()
        rows, skipped = run_case_isolated(shape, args, notes)
        for row in (r for r in rows if r.method.kind != "crash"):
            row.floor = hb.floor_seconds(row.method.penalty, shape, ceilings, row.method.form)
        all_rows[shape.label] = rows
        skipped_backends.update(skipped)
        log(f"[{index}/{len(shapes)}] {shape.label}: done in "
            f"{(datetime.datetime.now() - case_start).total_seconds():.1f} s")
    elapsed = (datetime.datetime.now() - start).total_seconds()
    data = make_data(all_rows, ceilings, machine, command.strip(), skipped_backends, notes, args.repeat,
                     args.budget, device, elapsed)
    os.makedirs(os.path.dirname(os.path.abspath(args.data)), exist_ok=True)
    write_data(args.data, data)
    plot_path = write_report(read_data(args.data), args.out, args.data, args.plot)  # from the file, as --from-data
    log(f"wrote {args.out}, {args.data}" + (f" and {plot_path}" if plot_path else " (no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
