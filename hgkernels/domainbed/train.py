"""``python -m hgkernels.domainbed.train ARGS``: DomainBed's ``domainbed.scripts.train`` with hgkernels' algorithms.

Registers HGP, Hutchinson, FishrClosedForm and CMA (`hgkernels.domainbed.register`) and runs DomainBed's
training script as ``__main__`` with the command line passed through unchanged, e.g.::

    python -m hgkernels.domainbed.train --data_dir ./data --dataset PACS --algorithm HGP --test_envs 0

DomainBed must be importable (a clone on ``PYTHONPATH``) with its requirements, torchvision first:
``docs/domainbed.md``. Sweeps: ``python -m hgkernels.domainbed.sweep``.
"""
from __future__ import annotations

import runpy
import sys
from typing import Optional, Sequence

from . import register
from .requirements import require_domainbed

TRAIN_MODULE = "domainbed.scripts.train"


def prepare(prog: str, *modules: str) -> None:
    """Import DomainBed (and ``modules``) and `register`; a missing piece exits with what to install."""
    try:
        register()  # first: it imports DomainBed's algorithms, so a missing requirement is named here
        require_domainbed(*modules)
    except ImportError as err:
        # the message says what to install; a traceback through importlib would only hide it
        raise SystemExit(f"{prog}: {err}") from err


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run DomainBed's train script with ``argv`` (default: this process's arguments) after `register`."""
    prepare("hgkernels.domainbed.train", "scripts")
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = [TRAIN_MODULE, *args]  # run_module(alter_sys=True) replaces argv[0] by the script's path
    runpy.run_module(TRAIN_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
