"""``python -m hgkernels.domainbed.sweep launch|delete_incomplete ARGS``: DomainBed's sweep with hgkernels' algorithms.

Runs DomainBed's ``domainbed.scripts.sweep`` as ``__main__`` with the command line unchanged, after
`hgkernels.domainbed.register` and with every command launcher of
``domainbed.command_launchers.REGISTRY`` wrapped so that each job runs ``python -m
hgkernels.domainbed.train`` (the same arguments) instead of ``python -m domainbed.scripts.train``.
Nothing in the DomainBed checkout is edited. The jobs' output directories are DomainBed's (a hash of
the training arguments), so ``delete_incomplete`` and ``python -m domainbed.scripts.collect_results``
work on them as on an upstream sweep. E.g.::

    python -m hgkernels.domainbed.sweep launch --datasets PACS --algorithms HGP Hutchinson FishrClosedForm \\
        --data_dir ./data --output_dir ./sweep --command_launcher local --n_hparams 5 --n_trials 3

Without ``--algorithms``, DomainBed's default list is every registered algorithm, upstream's and ours.
"""
from __future__ import annotations

import functools
import runpy
import sys
from typing import Callable, List, Optional, Sequence

from .train import prepare

SWEEP_MODULE = "domainbed.scripts.sweep"
#: how DomainBed's sweep.Job starts each job's command, and what it becomes
UPSTREAM_TRAIN = "python -m domainbed.scripts.train"
OUR_TRAIN = "python -m hgkernels.domainbed.train"


def retarget(command: str) -> str:
    """``command`` (one of sweep.Job's) with DomainBed's train module replaced by hgkernels' entry point."""
    if command.startswith(OUR_TRAIN + " "):
        return command
    if not command.startswith(UPSTREAM_TRAIN + " "):
        # a DomainBed whose sweep builds its commands otherwise: launching them would run jobs without
        # hgkernels' algorithms, each failing only once it starts
        raise RuntimeError(f"hgkernels.domainbed.sweep expected DomainBed's sweep commands to start with "
                           f"{UPSTREAM_TRAIN!r}; got {command[:120]!r}. This DomainBed differs from the "
                           f"one hgkernels was matched against.")
    return OUR_TRAIN + command[len(UPSTREAM_TRAIN):]


def _retargeted(launcher: Callable[[List[str]], None]) -> Callable[[List[str]], None]:
    if getattr(launcher, "_hgkernels_launcher", None) is not None:
        return launcher

    @functools.wraps(launcher)
    def launch(commands):
        return launcher([retarget(c) for c in commands])

    launch._hgkernels_launcher = launcher
    return launch


def patch_launchers(registry: dict) -> None:
    """Wrap each launcher of DomainBed's ``command_launchers.REGISTRY`` with `retarget` (idempotent)."""
    for name, launcher in list(registry.items()):
        registry[name] = _retargeted(launcher)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run DomainBed's sweep script with ``argv`` (default: this process's arguments)."""
    prepare("hgkernels.domainbed.sweep", "scripts", "command_launchers")
    patch_launchers(sys.modules["domainbed.command_launchers"].REGISTRY)
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = [SWEEP_MODULE, *args]
    runpy.run_module(SWEEP_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
