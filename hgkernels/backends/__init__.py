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


def _instantiate(name: str) -> Union[Backend, str]:
    module, attr = _FACTORIES[name].split(":")
    try:
        return getattr(importlib.import_module(module), attr)()
    except (ImportError, RuntimeError) as err:
        # Only the reason is kept: a stored exception raised again on every call would chain each
        # caller's frame (and the inputs it holds) onto its traceback, for the life of the process.
        return f"{type(err).__name__}: {err}"


# name -> the backend, or the reason it is unavailable
_INSTANCES: Dict[str, Union[Backend, str]] = {name: _instantiate(name) for name in _FACTORIES}


def available(name: str) -> bool:
    """Whether the registered backend `name` could be loaded in this process."""
    return isinstance(_INSTANCES[name], Backend)


def unavailable_reason(name: str) -> Optional[str]:
    """Why the registered backend `name` is unavailable, or None when it is available."""
    backend = _INSTANCES[name]
    return None if isinstance(backend, Backend) else backend


def load(name: str) -> Backend:
    """A registered backend; raises a fresh ImportError saying why it is unavailable."""
    backend = _INSTANCES[name]
    if not isinstance(backend, Backend):
        raise ImportError(f"backend {name!r} is unavailable ({backend})")
    return backend


def select(name: str, problem: HeadProblem) -> Backend:
    """Resolve `backend=` for `problem`; raises ValueError naming the reason a backend can't run."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = _INSTANCES[candidate]
            if isinstance(backend, Backend) and backend.unsupported_reason(problem, auto=True) is None:
                return backend
        raise ValueError("no backend supports these inputs")  # torch supports everything; kept for safety
    if name not in _FACTORIES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}; got {name!r}")
    why = unavailable_reason(name)
    if why is not None:
        raise ValueError(f"backend={name!r} is not available: {why}")
    backend = _INSTANCES[name]
    reason: Optional[str] = backend.unsupported_reason(problem)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run these inputs: {reason}")
    return backend


__all__ = ["Backend", "HeadStats", "available", "load", "select", "unavailable_reason", "AUTO_ORDER", "BACKEND_NAMES"]
