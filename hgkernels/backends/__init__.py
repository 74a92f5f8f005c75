"""Backend registry: closed-form implementations of the two primitives of `base.Backend`.

Every backend is instantiated once, when this package is imported, so that `select` only
reads a table (torch.compile cannot trace imports). That imports the compiled native
module when it was built, but never triton: the Triton backend imports its kernels on
first use.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Union

from .._inputs import HeadProblem
from .base import Backend, HeadStats

# name -> "module:attribute" of a zero-argument factory returning a Backend, or
# raising ImportError with the reason the backend is unavailable.
_FACTORIES: Dict[str, str] = {
    "torch": "hgkernels.backends.torch_backend:TorchBackend",
    "triton": "hgkernels.backends.triton_backend:TritonBackend",
    "native": "hgkernels.backends.native:NativeBackend",
}
# Preference order of backend="auto": first that is available and supports the inputs
# (each backend's unsupported_reason states its own limits: device, dtype, build).
AUTO_ORDER: List[str] = ["triton", "native", "torch"]
BACKEND_NAMES = ("auto", "reference", *_FACTORIES)


def _instantiate(name: str) -> Union[Backend, Exception]:
    module, attr = _FACTORIES[name].split(":")
    try:
        return getattr(importlib.import_module(module), attr)()
    except (ImportError, RuntimeError) as err:
        return err


# name -> the backend, or the ImportError/RuntimeError saying why it is unavailable
_INSTANCES: Dict[str, Union[Backend, Exception]] = {name: _instantiate(name) for name in _FACTORIES}


def load(name: str) -> Backend:
    """A registered backend; raises the ImportError/RuntimeError that says why it is unavailable."""
    backend = _INSTANCES[name]
    if isinstance(backend, Exception):
        raise backend
    return backend


def select(name: str, problem: HeadProblem) -> Backend:
    """Resolve `backend=` for `problem`; raises ValueError naming the reason a backend can't run."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            try:
                backend = load(candidate)
            except (ImportError, RuntimeError):
                continue
            if backend.unsupported_reason(problem, auto=True) is None:
                return backend
        raise ValueError("no backend supports these inputs")  # torch supports everything; kept for safety
    if name not in _FACTORIES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}; got {name!r}")
    try:
        backend = load(name)
    except (ImportError, RuntimeError) as err:
        raise ValueError(f"backend={name!r} is not available: {err}") from err
    reason: Optional[str] = backend.unsupported_reason(problem)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run these inputs: {reason}")
    return backend


__all__ = ["Backend", "HeadStats", "load", "select", "AUTO_ORDER", "BACKEND_NAMES"]
