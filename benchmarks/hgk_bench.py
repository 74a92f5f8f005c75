"""Benchmark harness shared by the pytest-benchmark suite and `report.py`.

One place for: the named head shapes and sweeps, seeded inputs, the timed calls
(forward + backward of each penalty per backend and the generic-autograd
baselines), peak memory, and the machine's floor for each case.
"""
from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from hgkernels import backends, head_hessian_diag, hgp_penalty, hutchinson_penalty
from hgkernels._inputs import prepare
from hgkernels._sample_space import SAMPLE_GRAM_COST, SAMPLE_QUAD_COST
from hgkernels.penalties._common import takes_sample_form

FLOAT_BYTES = 4  # float32, the training dtype every case uses


@dataclass(frozen=True)
class Shape:
    """One benchmark case: a linear head on N samples in E equal, grouped environments."""

    name: str
    n: int
    d: int
    c: int
    e: int
    loss: str = "cross_entropy"
    # The official estimator's probes per environment (DomainBed 300, Colored MNIST scripts 150),
    # with its environment reduction and reference detaching.
    official_probes: int = 300
    env_reduction: str = "mean"
    detach_reference: bool = True

    @property
    def label(self) -> str:
        return f"{self.name} (N={self.n}, D={self.d}, C={self.c}, E={self.e})"


_CMNIST = dict(loss="binary_cross_entropy", official_probes=150, env_reduction="sum", detach_reference=False)
_OFFICEHOME = Shape("officehome", n=96, d=2048, c=65, e=3)

SUBSETS: Dict[str, List[Shape]] = {
    "named": [
        Shape("cmnist", n=50000, d=390, c=1, e=2, **_CMNIST),
        Shape("pacs", n=96, d=2048, c=7, e=3),
        Shape("vlcs", n=96, d=2048, c=5, e=3),
        _OFFICEHOME,
        Shape("domainnet", n=160, d=2048, c=345, e=5),
        # an ImageNet-size head (ResNet-50 features, 1000 classes), 4 environments of 32
        Shape("imagenet", n=128, d=2048, c=1000, e=4),
    ],
    # Sweeps vary one size of the OfficeHome head at a time.
    "sweep-n": [replace(_OFFICEHOME, name=f"sweep-n{n}", n=n) for n in (24, 96, 384, 1536, 3072)],
    "sweep-c": [replace(_OFFICEHOME, name=f"sweep-c{c}", c=c) for c in (2, 7, 65, 345, 1000)],
    "sweep-d": [replace(_OFFICEHOME, name=f"sweep-d{d}", d=d) for d in (128, 512, 2048, 8192)],
    "sweep-e": [replace(_OFFICEHOME, name=f"sweep-e{e}", n=32 * e, e=e) for e in (2, 3, 5, 8)],
    "stress": [Shape("stress", n=256, d=4096, c=32768, e=4)],
    # Hundreds of environments of 4 samples against 4 environments, same N (benchmarks/many_envs.py
    # adds environments of 2 to 8 samples, both forms explicitly, Fishr and the full Hessian).
    "many-envs": [Shape(f"{name}-n1024-e{e}", n=1024, d=2048, c=c, e=e)
                  for name, c in (("pacs", 7), ("domainnet", 345)) for e in (4, 256)],
    # Tiny shapes for the CI smoke run: both loss kinds, few probes, two N for the plot.
    "smoke": [
        Shape("smoke-ce", n=24, d=6, c=3, e=3, official_probes=3),
        Shape("smoke-ce-n48", n=48, d=6, c=3, e=3, official_probes=3),
        Shape("smoke-bce", n=20, d=5, c=1, e=2, **{**_CMNIST, "official_probes": 3}),
    ],
}
SUBSET_ALIASES = {"sweeps": ["sweep-n", "sweep-c", "sweep-d", "sweep-e"],
                  "all": ["named", "sweep-n", "sweep-c", "sweep-d", "sweep-e", "stress"]}  # many-envs: by name


def write_table(text: str, out: Optional[str], default_name: str) -> str:
    """Print a script's table and write it to ``out``, or to benchmarks/out/<default_name> (git-ignored)."""
    print(text)
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", default_name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
    return out


def shapes_for(subsets: List[str]) -> List[Shape]:
    """Shapes of the named subsets (aliases expanded, order kept); a shape equal in every size
    and option to an earlier one (the sweeps pass through OfficeHome) is run once, under its first name."""
    names: List[str] = []
    for subset in subsets:
        for name in SUBSET_ALIASES.get(subset, [subset]):
            if name not in SUBSETS:
                raise ValueError(f"subset must be one of {', '.join(list(SUBSETS) + list(SUBSET_ALIASES))}; "
                                 f"got {subset!r}")
            if name not in names:
                names.append(name)
    shapes: Dict[Shape, Shape] = {}
    for shape in (shape for name in names for shape in SUBSETS[name]):
        shapes.setdefault(replace(shape, name=""), shape)
    return list(shapes.values())


def shape_named(name: str) -> Shape:
    for shape in (shape for shapes in SUBSETS.values() for shape in shapes):
        if shape.name == name:
            return shape
    raise ValueError(f"no benchmark shape named {name!r}")


@dataclass
class Inputs:
    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    envs: torch.Tensor


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> Inputs:
    """Seeded float32 inputs: logits ~ N(0, 1), nonnegative ReLU-like features, grouped env ids."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape.n, shape.c, generator=gen)
    features = torch.randn(shape.n, shape.d, generator=gen).relu_()
    if shape.loss == "cross_entropy":
        labels = torch.randint(0, shape.c, (shape.n,), generator=gen)
    else:
        labels = torch.randint(0, 2, (shape.n, shape.c), generator=gen).float()
    envs = torch.arange(shape.e).repeat_interleave(shape.n // shape.e)
    envs = torch.cat([envs, torch.full((shape.n - envs.numel(),), shape.e - 1)])
    return Inputs(*(t.to(device) for t in (logits, features, labels, envs)))


# ---- what is timed ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One timed computation. ``kind``: closed (a closed-form backend, form="auto"), feature (the same
    forced into the C × Dh form, timed where auto takes the sample form, so the backend's own kernels
    show), unit (generic path, one probe), official (generic path at the official probe count or HGP
    double backward), peer."""

    penalty: str  # "hutchinson", "hgp", or "diag" (the exact diagonal's forward alone): which floor applies
    backend: str
    kind: str
    label: str
    probes: int = 0

    @property
    def form(self) -> str:
        return "feature" if self.kind == "feature" else "auto"

    @property
    def forward_only(self) -> bool:
        return self.penalty == "diag"


def closed_form_backends(shape: Shape, inputs: Inputs) -> Tuple[List[str], Dict[str, str]]:
    """(available backend names, {unavailable name: reason}) for these inputs, found at run time."""
    problem = prepare(inputs.logits, inputs.features, inputs.labels, inputs.envs, loss=shape.loss, bias=True,
                      validate=False)
    available, skipped = [], {}
    for name in ("torch", "native", "triton"):
        if name == "triton" and inputs.logits.device.type != "cuda":
            skipped[name] = "CPU: Triton runs only under TRITON_INTERPRET, which is not a speed path"
            continue
        try:
            reason = backends.load(name).unsupported_reason(problem)
        except (ImportError, RuntimeError) as err:
            reason = f"not importable ({err})"
        if reason is None:
            available.append(name)
        else:
            skipped[name] = reason
    return available, skipped


def backpack_reason() -> Optional[str]:
    """None when BackPACK (backpack-for-pytorch) imports, else why not."""
    try:
        import backpack  # noqa: F401
    except ImportError as err:
        return f"backpack-for-pytorch not importable ({err})"
    return None


def auto_takes_sample_form(penalty: str, inputs: Inputs, shape: Shape, backend: str) -> bool:
    """Whether form="auto" computes `penalty` ("hutchinson", "hgp") in the sample form on these inputs on
    `backend`: the library's own choice (hgkernels.penalties._common.takes_sample_form)."""
    problem = prepare(inputs.logits, inputs.features, inputs.labels, inputs.envs, loss=shape.loss, bias=True,
                      validate=False)
    return takes_sample_form("auto", problem, penalty, backend)


def methods_for(shape: Shape, inputs: Inputs, available: List[str], with_backpack: bool) -> List[Method]:
    methods = []
    labels = {"hutchinson": "exact Hutchinson", "hgp": "HGP"}
    for name in available:
        for penalty, label in labels.items():
            methods.append(Method(penalty, name, "closed", label))
            if auto_takes_sample_form(penalty, inputs, shape, name):
                methods.append(Method(penalty, name, "feature", f"{label}, C × Dh form"))
    methods += [
        Method("hutchinson", "reference", "unit", "generic Hutchinson, 1 probe", probes=1),
        Method("hutchinson", "reference", "official", f"generic Hutchinson, {shape.official_probes} probes",
               probes=shape.official_probes),
        Method("hgp", "reference", "official", "generic HGP double backward"),
    ]
    methods += [Method("diag", name, "closed", "exact diagonal, forward") for name in available]
    if with_backpack:
        methods.append(Method("diag", "backpack", "peer", "BackPACK DiagHessian, forward"))
    return methods


def make_step(method: Method, shape: Shape, inputs: Inputs) -> Callable[[], None]:
    """A zero-argument call doing the method once on fresh leaves (forward, then backward unless forward_only)."""
    if method.backend == "backpack":
        return _backpack_step(shape, inputs)
    common = dict(loss=shape.loss, env_reduction=shape.env_reduction, detach_reference=shape.detach_reference,
                  backend=method.backend, validate=False, form=method.form)
    device = inputs.logits.device

    def step() -> None:
        logits = inputs.logits.detach().requires_grad_(True)
        features = inputs.features.detach().requires_grad_(True)
        if method.penalty == "diag":
            head_hessian_diag(logits, features, inputs.labels, inputs.envs, loss=shape.loss,
                              backend=method.backend, validate=False)
            return
        if method.penalty == "hgp":
            pen = hgp_penalty(logits, features, inputs.labels, inputs.envs, **common)
        elif method.probes:
            gen = torch.Generator(device=device).manual_seed(0)
            pen = hutchinson_penalty(logits, features, inputs.labels, inputs.envs, estimator="hutchinson",
                                     num_probes=method.probes, generator=gen, **common)
        else:
            pen = hutchinson_penalty(logits, features, inputs.labels, inputs.envs, **common)
        (pen.hessian + pen.gradient).backward()

    return step


def _backpack_step(shape: Shape, inputs: Inputs) -> Callable[[], None]:
    """BackPACK's exact DiagHessian of each environment's loss on an nn.Linear head (its own loop over E)."""
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    # BackPACK hooks the head's backward; with constant features torch warns on every call.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    head = extend(torch.nn.Linear(shape.d, shape.c).to(inputs.features.device))
    loss_fn = extend(torch.nn.CrossEntropyLoss() if shape.loss == "cross_entropy" else torch.nn.BCEWithLogitsLoss())
    env_rows = [(inputs.envs == e).nonzero().squeeze(1) for e in range(shape.e)]

    def step() -> None:
        for rows in env_rows:
            head.zero_grad()
            with backpack(DiagHessian()):
                loss_fn(head(inputs.features[rows]), inputs.labels[rows]).backward()

    return step


# ---- timing and memory ---------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds for one call, device work included."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def official_estimate(method: Method, shape: Shape, inputs: Inputs, device: torch.device,
                      unit_seconds: float) -> float:
    """Seconds an official baseline should take, from the one-probe time `unit_seconds`.

    The generic estimator costs a + b K for K probes, so a run with a few probes gives b (four,
    so that the slope stands above timing noise); HGP's double backward does as many
    Hessian-vector products as one probe."""
    if method.probes <= 1:
        return unit_seconds
    few = min(4, method.probes)
    t_few = timed(make_step(replace(method, probes=few), shape, inputs), device)
    return unit_seconds + (method.probes - 1) * max(t_few - unit_seconds, 0.0) / (few - 1)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "bytes" holds, after the block, the peak memory it added.

    GPU: torch.cuda.max_memory_allocated over what was allocated before. CPU: the
    resident-set high-water mark (VmHWM, reset by writing 5 to /proc/self/clear_refs)
    over the resident size before. With a fixed MALLOC_MMAP_THRESHOLD_ (report.py sets
    it in each case's process) every large tensor is its own mapping, unmapped when freed,
    so RSS tracks live tensors; without it glibc may reuse freed heap and the figure undercounts.
    """
    result = {"bytes": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    base = _proc_status_kb("VmRSS")
    yield result
    result["bytes"] = max(0, _proc_status_kb("VmHWM") - base) * 1024


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def memory_estimate(method: Method, shape: Shape) -> int:
    """Rough bytes a method needs, used only to refuse cases that clearly cannot fit.

    Closed form: about eight (E, C, Dh) matrices live at once (statistics, their upstream
    gradients and one product) plus a few per-sample copies. Generic path: autograd keeps the
    graph of E+1 gradients and each HVP, about sixteen; official probes run in the same graph size.
    """
    stat = shape.e * shape.c * (shape.d + 1) * FLOAT_BYTES
    per_sample = shape.n * (shape.c + shape.d) * FLOAT_BYTES
    matrices = 16 if method.backend in ("reference", "backpack") else 8
    return matrices * stat + 8 * per_sample


# ---- the machine's floor -------------------------------------------------------------------------

@dataclass
class Ceilings:
    """Measured peak rates: float32 GEMM (flop/s) and memory copy bandwidth (bytes/s, read + write)."""

    sgemm_flops: float
    copy_bytes: float
    notes: str = field(default="")


def measure_ceilings(device: torch.device, repeats: int = 3, quick: bool = False) -> Ceilings:
    """Best of `repeats`: a large square float32 torch.mm, and copy_ between two buffers far larger
    than the caches (``quick`` shrinks both for smoke runs, whose floors mean little)."""
    size = 512 if quick else 4096 if device.type == "cuda" else 1536
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)
    mm_time = min(timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
    numel = (1 << 22) if quick else (1 << 28) if device.type == "cuda" else (1 << 26)  # 16 MiB / 1 GiB / 256 MiB
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_time = min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return Ceilings(2 * size ** 3 / mm_time, 2 * numel * FLOAT_BYTES / copy_time,
                    f"sgemm {size}x{size}x{size}, copy of {numel * FLOAT_BYTES >> 20} MiB")


def work(penalty: str, shape: Shape) -> Dict[str, Tuple[float, float]]:
    """{form: (flops, bytes)} the closed form must at least do for forward + backward (forward only
    for "diag") in each of its forms, "feature" (C × Dh statistics) and "sample" (N × N Gram).

    Feature form: flops count 2 per multiply-add of the per-environment GEMMs, each N x C x Dh:
    exact Hutchinson forward reduces G and Dg (2 GEMMs); backward forms dr = Lam zh,
    dq = Gam (zh*zh) and d zh from Gam^T q and Lam^T r (4) — 6 in all. HGP forward: G, s = G zh,
    HG, and the pooled reference's G_bar zh and H_e G_bar (5); backward: tau = Gam zh, the M
    reduction, d zh from three products and dr = M zh (6) — 11 in all, with s, t kept from forward.
    Bytes: each pass over the samples reads logits and features once (exact: 1 forward + 1
    backward pass that also writes their gradients; HGP: 2 dependent forward passes, M pass +
    per-sample pass backward), plus every (E, C, Dh) statistic written or read once (exact 4, HGP 9).
    Sample form: the Gram GEMMs (N x N x Dh; exact: features and squared features, forward and
    backward, 4; HGP 2) and the N x N x C quadratic forms (hgkernels._sample_space's counts); bytes:
    one forward and one backward pass over the samples.
    Elementwise work is not counted: it is cheap next to these. The generic path computes the same
    quantity (probes estimate the exact diagonal), so its rows are held to the same floor.
    """
    nc_dh = shape.n * shape.c * (shape.d + 1)
    samples = shape.n * (shape.c + shape.d) * FLOAT_BYTES
    stat = shape.e * shape.c * (shape.d + 1) * FLOAT_BYTES
    if penalty == "diag":
        return {"feature": (2 * 2 * nc_dh, samples + stat)}
    if penalty == "hutchinson":
        feature = (6 * 2 * nc_dh, 3 * samples + 4 * stat)
    else:
        feature = (11 * 2 * nc_dh, 5 * samples + 9 * stat)
    n2 = shape.n * shape.n
    sample = (2 * (SAMPLE_GRAM_COST[penalty] * n2 * (shape.d + 1) + SAMPLE_QUAD_COST[penalty] * n2 * shape.c),
              3 * samples)
    return {"feature": feature, "sample": sample} if shape.e > 1 else {"feature": feature}


def floor_seconds(penalty: str, shape: Shape, ceilings: Ceilings, form: str = "auto") -> float:
    """The case can run no faster than its flops at the sgemm rate or its bytes at the copy bandwidth,
    in the given form ("auto": whichever form needs less)."""
    forms = work(penalty, shape)
    if form != "auto":
        forms = {form: forms[form]}
    return min(max(flops / ceilings.sgemm_flops, nbytes / ceilings.copy_bytes) for flops, nbytes in forms.values())


# ---- machine description -------------------------------------------------------------------------

def machine_description(device: torch.device) -> Dict[str, str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = {
        "CPU": f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "memory": f"{available_memory_bytes(torch.device('cpu')) / 2 ** 30:.1f} GiB available at start",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no GPU used)",
        "load average (1, 5, 15 min) at start": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "hgkernels", "csrc"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        desc["hgkernels commit"] = commit + (" (with uncommitted changes in hgkernels/ or csrc/)" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return desc


def interleaved_times(runs: Dict[str, Callable[[], None]], rounds: int, reps: int = 1,
                      before: Optional[Callable[[str], None]] = None) -> Dict[str, List[float]]:
    """Seconds per call of each run, one value per round: `rounds` rounds after a warm-up round (dropped),
    each timing every run `reps` times in an order shuffled from round to round (seeded). A call right
    after another's large GEMMs or allocations runs slower, and the machine drifts: a shuffle gives each
    run varied neighbours, where a rotated order kept each run after the same other one (the first
    penalty after the generic path's allocations measured 100 µs above its validate=False twin at PACS).
    `before(key)`, when given, runs untimed ahead of each run's calls (e.g. to switch a code path)."""
    keys = list(runs)
    times: Dict[str, List[float]] = {key: [] for key in keys}
    shuffler = random.Random(0)
    for _ in range(rounds + 1):
        order = keys[:]
        shuffler.shuffle(order)
        for key in order:
            if before is not None:
                before(key)
            start = time.perf_counter()
            for _ in range(reps):
                runs[key]()
            times[key].append((time.perf_counter() - start) / reps)
    return {key: t[1:] for key, t in times.items()}


def progress(message: str) -> None:
    """One progress line on stderr, flushed at once: a long run shows where it is, and stdout keeps
    only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def case(label: str):
    """Progress lines as a case starts and as it finishes (or fails), with its wall time."""
    progress(f"{label}: started")
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        progress(f"{label}: failed after {time.perf_counter() - start:.1f} s")
        raise
    progress(f"{label}: done in {time.perf_counter() - start:.1f} s")


def table_script_main(doc: str, measure: Callable[[dict], List[str]], heads: dict, smoke_heads: dict,
                      argv: Optional[List[str]] = None) -> int:
    """The command line of the small table scripts (shuffled_ids.py, host_overhead.py, ...): print
    `measure(heads)`, or `measure(smoke_heads)` with --smoke (what CI runs)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny and quick, for CI")
    args = parser.parse_args(argv)
    print("\n".join(measure(smoke_heads if args.smoke else heads)))
    return 0
