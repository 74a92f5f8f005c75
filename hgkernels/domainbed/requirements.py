"""What hgkernels.domainbed needs of DomainBed, and the messages that say how to get it.

`require_domainbed` imports DomainBed's modules or raises an ImportError naming what to install (with
torch pinned, so that pip cannot replace it). Kept apart from the package's ``__init__`` so that the
algorithm classes import it without importing the package that imports them.
"""
from __future__ import annotations

import importlib

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
