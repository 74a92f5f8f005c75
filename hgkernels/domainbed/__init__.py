"""DomainBed algorithms built on hgkernels: ``HGP``, ``Hutchinson``, ``FishrClosedForm`` and ``CMA``.

DomainBed (https://github.com/facebookresearch/DomainBed) is not on PyPI and ``import hgkernels``
never needs it. This subpackage imports it only when an algorithm class or `register` is used. The
recipe (torchvision matching torch, the clone, the data, a run, a sweep, the results) is in
``docs/domainbed.md``; in short::

    export PYTHONPATH=/path/to/DomainBed:$PYTHONPATH
    python -m hgkernels.domainbed.train --algorithm HGP --dataset PACS --data_dir ./data ...
    python -m hgkernels.domainbed.sweep launch --algorithms HGP Hutchinson FishrClosedForm ...

``python -m hgkernels.domainbed.train`` and ``python -m hgkernels.domainbed.sweep`` are DomainBed's
own ``domainbed.scripts.train`` and ``domainbed.scripts.sweep`` with the three algorithms registered;
every argument is passed through unchanged. In Python::

    import hgkernels.domainbed
    hgkernels.domainbed.register()      # adds the classes and their hparams to DomainBed's registries
    from domainbed import algorithms, hparams_registry
    hparams = hparams_registry.default_hparams("HGP", "PACS")
    algorithm = algorithms.get_algorithm_class("HGP")(input_shape, num_classes, num_domains, hparams)

The classes follow DomainBed's interface at commit `DOMAINBED_COMMIT` (`hgkernels.domainbed.algorithms`
documents the objectives and the hparams).
"""
from __future__ import annotations

from typing import Tuple

#: the algorithms this subpackage adds to DomainBed
ALGORITHMS: Tuple[str, ...] = ("HGP", "Hutchinson", "FishrClosedForm", "CMA")

from .requirements import CMA_FORK_COMMIT, DOMAINBED_COMMIT, OFFICIAL_FORK_COMMIT, require_domainbed


def register() -> None:
    """Add HGP, Hutchinson, FishrClosedForm and CMA to DomainBed's registries (idempotent).

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


__all__ = ["ALGORITHMS", "DOMAINBED_COMMIT", "CMA_FORK_COMMIT", "OFFICIAL_FORK_COMMIT", "register", "require_domainbed",
           *ALGORITHMS]
