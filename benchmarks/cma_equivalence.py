"""hgkernels.domainbed.CMA against the CMA authors' own ``CMA`` class, on the fork's own networks (outside CI).

The fork (github.com/chenyuen0103/DomainBed) is read from a local git mirror: its ``domainbed`` package
(algorithms.py, networks.py, hparams_registry.py, lib/) is extracted with ``git show`` into a temporary
directory and imported as ``domainbed``. Imports it has but does not need for CMA (BackPACK, timm,
torchvision, its missing ``domainbed.utils`` modules) are replaced by empty stand-ins when they are not
installed. Both classes are built from the same torch seed (they then start from the same parameters:
checked), run the same minibatches ((x, y, env) triples) in float64 for ``--steps`` updates with the
anneal switch inside, and the script prints, per configuration, the worst relative difference of the
parameters (max |ours - fork| / max |fork| per tensor, over every tensor and step) and of the logged
values. Configurations: the fork's MLP and MNIST_CNN featurizers, below 70 classes (its explicit
Hessians) and from 70 on (its pairwise form, L1 term and column masking: 5 features
forced to zero).

    python benchmarks/cma_equivalence.py --fork-git-dir /path/to/chenyuen0103+DomainBed/repo
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORK_FILES = ["domainbed/__init__.py", "domainbed/algorithms.py", "domainbed/networks.py",
              "domainbed/hparams_registry.py", "domainbed/lib/misc.py", "domainbed/lib/wide_resnet.py"]
LOGGED = ["loss", "erm_loss", "grad_pen", "hess_pen", "l1_reg", "first_moment_diff", "second_moment_diff"]

# name, input shape, classes, environments x samples, hparams over the fork's defaults
CONFIGS = [
    ("MLP, C=7 (explicit Hessians)", (16,), 7, (3, 12), {"mlp_width": 64, "mlp_depth": 3, "mlp_dropout": 0.0}),
    ("MLP + dropout 0.1, C=7", (16,), 7, (3, 12), {"mlp_width": 64, "mlp_depth": 3, "mlp_dropout": 0.1}),
    ("MLP, C=80 (pairwise form, L1, masking)", (16,), 80, (3, 12), {"mlp_width": 64, "mlp_depth": 3,
                                                                     "mlp_dropout": 0.0, "zero_features": 5}),
    ("MNIST_CNN, C=2", (3, 28, 28), 2, (3, 8), {}),
    ("MNIST_CNN, C=80", (3, 28, 28), 80, (3, 8), {}),
]


def extract_fork(git_dir: str, dest: str) -> str:
    commit = subprocess.run(["git", "--git-dir", git_dir, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    for path in FORK_FILES:
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"], capture_output=True,
                              text=True, check=True).stdout
        os.makedirs(os.path.join(dest, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(dest, path), "w") as f:
            f.write(text)
    open(os.path.join(dest, "domainbed", "lib", "__init__.py"), "a").close()
    return commit


def stand_in(name: str, **attrs) -> None:
    """An empty module ``name`` (and its parents) unless the real one imports."""
    try:
        if not name.startswith("domainbed."):
            __import__(name)
            return
    except ImportError:
        pass
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules or i == len(parts):
            mod = sys.modules.get(sub) if sub == "domainbed" else types.ModuleType(sub)
            if mod is None:
                continue
            mod.__path__ = getattr(mod, "__path__", [])
            sys.modules[sub] = mod
            if i > 1:
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], mod)
    for k, v in attrs.items():
        setattr(sys.modules[name], k, v)


def import_fork(src: str):
    sys.path.insert(0, src)
    for k in [k for k in sys.modules if k == "domainbed" or k.startswith("domainbed.")]:
        del sys.modules[k]
    import domainbed  # noqa: F401  (the fork's package)
    stand_in("backpack", backpack=None, extend=lambda m: m)
    stand_in("backpack.extensions", BatchGrad=None, DiagHessian=None)
    stand_in("timm")
    stand_in("torchvision.models")
    stand_in("domainbed.utils.scheduler", WarmupCosineSchedule=None)
    stand_in("domainbed.utils.data_utils", get_loader_train=None)
    stand_in("domainbed.utils.dist_util", get_world_size=lambda: 1)
    stand_in("domainbed.utils.loss_utils", LossComputer=None)
    from domainbed import algorithms, hparams_registry
    return algorithms, hparams_registry


def compare(config, fork_algorithms, fork_registry, ours_cls, steps, anneal):
    name, shape, num_classes, (num_envs, n), over = config
    over = dict(over)
    zero = over.pop("zero_features", 0)  # dead features (as ReLU units can be): the fork masks their columns
    hp = fork_registry.default_hparams("CMA", "Debug28")
    hp.update(lr=1e-3, weight_decay=1e-4, penalty_anneal_iters=anneal, **over)
    # the fork's defaults (5000, 1000) are for its features; smaller here so that 5 Adam steps stay tame
    hp.update(grad_alpha=50.0, hess_beta=500.0)
    torch.manual_seed(0)
    theirs = fork_algorithms.CMA(shape, num_classes, num_envs, hp).double()
    torch.manual_seed(0)
    ours = ours_cls(shape, num_classes, num_envs, hp).double()
    if zero:
        for alg in (theirs, ours):
            alg.featurizer.register_forward_hook(lambda m, i, out: torch.cat([out[:, :zero] * 0, out[:, zero:]], 1))
    same_start = all(torch.equal(a, b) for a, b in zip(ours.network.parameters(), theirs.network.parameters()))
    if not same_start:
        ours.network.load_state_dict(theirs.network.state_dict())
    g = torch.Generator().manual_seed(1)
    worst_param, worst_log, times = 0.0, 0.0, [0.0, 0.0]
    for step in range(steps):
        mbs = [(torch.randn(n, *shape, generator=g, dtype=torch.float64),
                torch.randint(0, num_classes, (n,), generator=g), torch.full((n,), e)) for e in range(num_envs)]
        logs = []
        for i, alg in enumerate((theirs, ours)):
            torch.manual_seed(100 + step)
            t0 = time.perf_counter()
            logs.append(alg.update(mbs))
            times[i] += time.perf_counter() - t0
        for k in LOGGED:
            a, b = float(logs[1][k]), float(logs[0][k])
            worst_log = max(worst_log, abs(a - b) / max(abs(b), 1e-300) if a != b else 0.0)
        for a, b in zip(ours.network.parameters(), theirs.network.parameters()):
            worst_param = max(worst_param, ((a - b).abs().max() / b.abs().max()).item())
    num_params = sum(p.numel() for p in theirs.network.parameters())
    return dict(name=name, params=num_params, steps=steps, same_start=same_start, worst_param=worst_param,
                worst_log=worst_log, t_fork=times[0] / steps, t_ours=times[1] / steps,
                hess_pen=float(logs[0]["hess_pen"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fork-git-dir", default="/work/.mirror/chenyuen0103+DomainBed/repo",
                        help="git directory of a clone or mirror of chenyuen0103/DomainBed")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--anneal", type=int, default=2, help="penalty_anneal_iters (the Adam reset inside the run)")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)  # the fork makes some tensors in the default dtype
    with tempfile.TemporaryDirectory() as src:
        commit = extract_fork(args.fork_git_dir, src)
        fork_algorithms, fork_registry = import_fork(src)
        sys.path.insert(0, ROOT)
        from hgkernels.domainbed.algorithms import CMA  # on the fork's Algorithm and networks
        print(f"fork commit {commit}; torch {torch.__version__}; float64; {args.steps} updates, "
              f"penalty_anneal_iters {args.anneal}", flush=True)
        print("| configuration | parameters | updates | same start | worst rel. diff, parameters | "
              "worst rel. diff, logged values | fork update | ours |")
        print("|---|---|---|---|---|---|---|---|")
        worst = 0.0
        for config in CONFIGS:
            r = compare(config, fork_algorithms, fork_registry, CMA, args.steps, args.anneal)
            worst = max(worst, r["worst_param"])
            print(f"| {r['name']} | {r['params']:,} | {r['steps']} | {r['same_start']} | {r['worst_param']:.1e} | "
                  f"{r['worst_log']:.1e} | {r['t_fork'] * 1e3:.0f} ms | {r['t_ours'] * 1e3:.0f} ms |", flush=True)
    print(f"worst relative parameter difference over all configurations: {worst:.1e}")
    return 0 if worst < 1e-8 else 1


if __name__ == "__main__":
    sys.exit(main())
