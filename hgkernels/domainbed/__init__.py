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

import importlib
from typing import Tuple

#: the algorithms this subpackage adds to DomainBed
ALGORITHMS: Tuple[str, ...] = ("HGP", "Hutchinson", "FishrClosedForm", "CMA")

#: the facebookresearch/DomainBed commit whose interfaces (Algorithm, networks, hparams_registry,
#: scripts/train.py, lib/misc.MovingAverage, Fishr) these classes were matched against
DOMAINBED_COMMIT = "b93c22a1cfc3b2428398272c1a116c8de1f4139e"

#: the CMA authors' DomainBed fork (chenyuen0103/DomainBed) whose ``CMA`` class `algorithms.CMA` reproduces
CMA_FORK_COMMIT = "898b6b2d96143c60a321e602462b7319e748ae2f"

#: the official HGP/Hutchinson code (huawei-noah/Federated-Learning, HessianAlignment/domainbed/) read
OFFICIAL_FORK_COMMIT = "89965534740d34afd8080674d809902eb29cbca0"

MISSING_DOMAINBED = (
    "hgkernels.domainbed needs DomainBed, which is not on PyPI. Get it with\n"
    "    git clone https://github.com/facebookresearch/DomainBed /path/to/DomainBed\n"
    "    export PYTHONPATH=/path/to/DomainBed:$PYTHONPATH\n"
    "(hgkernels was matched against DomainBed commit " + DOMAINBED_COMMIT + "; "
    "DomainBed's own requirements, torchvision first, must be installed too: see docs/domainbed.md)."
)

#: modules DomainBed imports that pip installs, and their PyPI names (torchvision is handled apart)
DOMAINBED_REQUIREMENTS = {"wilds": "wilds", "timm": "timm", "gdown": "gdown", "PIL": "pillow",
                          "tqdm": "tqdm", "backpack": "backpack-for-pytorch"}

TORCH_INDEX = "https://download.pytorch.org/whl/"


#: writes the installed torch's exact version as a pip constraint, so that pip cannot replace it
PIN_TORCH = "python -c \"import torch; print('torch==' + torch.__version__)\" > torch-pin.txt"


def torchvision_install_command(torch_version: str) -> str:
    """The pip command that installs the torchvision built for this torch, after `PIN_TORCH`.

    torchvision 0.(m + 15) is the release for torch 2.m (its metadata pins that torch), and it must be
    the same build as torch, from the same index: a ``+cpu`` torch needs the CPU index's torchvision
    (PyPI's Linux torchvision is a CUDA build, whose operators do not load on a CPU torch), a ``+cuXYZ``
    torch the cuXYZ index, PyPI's torch (no local label) PyPI's. ``-c torch-pin.txt`` makes pip stop
    with an error, rather than replace torch, when no torchvision fits.
    """
    public, _, local = torch_version.partition("+")
    major, _, rest = public.partition(".")
    minor = rest.partition(".")[0]
    spec = f'"torchvision==0.{int(minor) + 15}.*"' if major == "2" and minor.isdigit() else "torchvision"
    index = f" --index-url {TORCH_INDEX}{local}" if local else ""
    return f"pip install {spec} -c torch-pin.txt{index}"


def missing_requirement_message(module: str) -> str:
    """What to install when DomainBed's import of ``module`` (a top-level name) fails."""
    import torch

    if module == "torchvision":
        return (f"DomainBed needs torchvision, the build made for this torch ({torch.__version__}). Install it with\n"
                f"    {PIN_TORCH}\n"
                f"    {torchvision_install_command(torch.__version__)}\n"
                f"    pip install -c torch-pin.txt wilds timm gdown   # DomainBed's other imports\n"
                f"(a plain `pip install torchvision` replaces torch, which hgkernels' native module was "
                f"built against; see docs/domainbed.md).")
    package = DOMAINBED_REQUIREMENTS.get(module, module)
    return (f"DomainBed imports {module!r}, which is not installed. Install it with torch pinned, so that "
            f"pip cannot replace torch {torch.__version__}:\n"
            f"    {PIN_TORCH}\n"
            f"    pip install -c torch-pin.txt {package}\n"
            f"(see docs/domainbed.md).")


def mismatched_torchvision_message(err: BaseException) -> str:
    import torch

    try:
        from importlib.metadata import version
        installed = f"torchvision {version('torchvision')}"
    except Exception:  # only for the message
        installed = "the installed torchvision"
    return (f"{installed} does not load with torch {torch.__version__} ({err}): it is another build "
            f"(CUDA vs CPU) or made for another torch release. Replace it with the matching one:\n"
            f"    pip uninstall -y torchvision\n"
            f"    {PIN_TORCH}\n"
            f"    {torchvision_install_command(torch.__version__)}\n"
            f"(see docs/domainbed.md).")


def require_domainbed(*modules: str):
    """Import ``domainbed`` and the given submodules (e.g. ``"algorithms"``).

    A clear ImportError if DomainBed is missing, if one of its pip requirements is (saying what to
    install, with torch pinned), or if torchvision is installed but built for another torch.
    """
    try:
        importlib.import_module("domainbed")
    except ImportError as err:
        if getattr(err, "name", None) not in (None, "domainbed"):
            raise  # a package of that name is there but fails to import: its own message says why
        raise ImportError(MISSING_DOMAINBED) from err
    out = []
    for m in modules:
        try:
            out.append(importlib.import_module(f"domainbed.{m}"))
        except ImportError as err:
            top = (getattr(err, "name", None) or "").partition(".")[0]
            if top == "torchvision" or top in DOMAINBED_REQUIREMENTS:
                raise ImportError(missing_requirement_message(top), name=top) from err
            raise
        except RuntimeError as err:
            # a torchvision of another build fails at import on its operators (torchvision::nms)
            if "torchvision" not in str(err):
                raise
            raise ImportError(mismatched_torchvision_message(err), name="torchvision") from err
    return tuple(out)


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


__all__ = ["ALGORITHMS", "DOMAINBED_COMMIT", "register", "require_domainbed", *ALGORITHMS]
