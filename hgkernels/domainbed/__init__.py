"""DomainBed algorithms built on hgkernels: ``HGP``, ``Hutchinson`` and ``FishrClosedForm``.

DomainBed (https://github.com/facebookresearch/DomainBed) is not on PyPI and ``import hgkernels``
never needs it. This subpackage imports it only when an algorithm class or `register` is used::

    git clone https://github.com/facebookresearch/DomainBed /path/to/DomainBed
    export PYTHONPATH=/path/to/DomainBed:$PYTHONPATH

    python -m hgkernels.domainbed.train --algorithm HGP --dataset PACS --data_dir ./data ...

``python -m hgkernels.domainbed.train`` is DomainBed's own ``domainbed.scripts.train`` with the three
algorithms registered; every argument is passed through unchanged. In Python::

    import hgkernels.domainbed
    hgkernels.domainbed.register()      # adds the classes and their hparams to DomainBed's registries
    from domainbed import algorithms, hparams_registry
    hparams = hparams_registry.default_hparams("HGP", "PACS")
    algorithm = algorithms.get_algorithm_class("HGP")(input_shape, num_classes, num_domains, hparams)

To make DomainBed's ``domainbed/scripts/sweep.py`` launch these algorithms, change the one line of
``Job.__init__`` that builds the command::

    command = ['python', '-m', 'domainbed.scripts.train']      # upstream
    command = ['python', '-m', 'hgkernels.domainbed.train']    # with hgkernels' algorithms registered

and pass ``--algorithms HGP Hutchinson FishrClosedForm``. The classes follow DomainBed's interface at
commit `DOMAINBED_COMMIT` (`hgkernels.domainbed.algorithms` documents the objectives and the hparams).
"""
from __future__ import annotations

import importlib
from typing import Tuple

#: the algorithms this subpackage adds to DomainBed
ALGORITHMS: Tuple[str, ...] = ("HGP", "Hutchinson", "FishrClosedForm")

#: the facebookresearch/DomainBed commit whose interfaces (Algorithm, networks, hparams_registry,
#: scripts/train.py, lib/misc.MovingAverage, Fishr) these classes were matched against
DOMAINBED_COMMIT = "b93c22a1cfc3b2428398272c1a116c8de1f4139e"

#: the official HGP/Hutchinson code (huawei-noah/Federated-Learning, HessianAlignment/domainbed/) read
OFFICIAL_FORK_COMMIT = "89965534740d34afd8080674d809902eb29cbca0"

MISSING_DOMAINBED = (
    "hgkernels.domainbed needs DomainBed, which is not on PyPI. Get it with\n"
    "    git clone https://github.com/facebookresearch/DomainBed /path/to/DomainBed\n"
    "    export PYTHONPATH=/path/to/DomainBed:$PYTHONPATH\n"
    "(hgkernels was matched against DomainBed commit " + DOMAINBED_COMMIT + "; "
    "DomainBed's own requirements, e.g. torchvision, must be installed too)."
)


def require_domainbed(*modules: str):
    """Import ``domainbed`` and the given submodules (e.g. ``"algorithms"``); a clear ImportError if missing."""
    try:
        importlib.import_module("domainbed")
    except ImportError as err:
        if getattr(err, "name", None) not in (None, "domainbed"):
            raise  # DomainBed is there but one of its own dependencies is missing: torch's message is clearer
        raise ImportError(MISSING_DOMAINBED) from err
    return tuple(importlib.import_module(f"domainbed.{m}") for m in modules)


def register() -> None:
    """Add HGP, Hutchinson and FishrClosedForm to DomainBed's registries (idempotent).

    - ``domainbed.algorithms``: the classes become module attributes (so
      ``algorithms.get_algorithm_class(name)`` finds them) and their names are appended to
      ``algorithms.ALGORITHMS`` (sweep.py's default list).
    - ``domainbed.hparams_registry``: ``_hparams`` is wrapped so that, for these algorithms, it
      adds their hparams after DomainBed's own (the generic ones: lr, weight_decay, batch_size, ...),
      each drawn, as upstream's ``_hparam`` does, from ``RandomState(misc.seed_hash(random_seed, name))``.
      ``default_hparams`` and ``random_hparams`` call ``_hparams`` by name, so both see them.
    """
    from . import algorithms as ours
    from .hparams import wrap_hparams_registry

    algorithms, hparams_registry = require_domainbed("algorithms", "hparams_registry")
    for name in ALGORITHMS:
        setattr(algorithms, name, getattr(ours, name))
        if name not in algorithms.ALGORITHMS:
            algorithms.ALGORITHMS.append(name)
    wrap_hparams_registry(hparams_registry)


def __getattr__(name: str):
    if name in ALGORITHMS:
        from . import algorithms
        return getattr(algorithms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ALGORITHMS", "DOMAINBED_COMMIT", "register", "require_domainbed", *ALGORITHMS]
