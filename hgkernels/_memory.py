"""Large CPU outputs reuse the previous call's memory once nothing else holds it.

Every training step returns a fresh d_features (N × D). For a big batch (Colored MNIST:
50 000 × 390, 78 MB) glibc hands out freshly mapped memory, and the first write into it
takes one page fault per 4 KiB page: about 20 ms on the 2-core CPU, more than the
kernels' own arithmetic. So the storage of the last large output of each dtype is kept,
and the next call writes into it again when its only owner is this module, i.e. every
tensor on it (the gradient, its views, a leaf's .grad) has been freed: the memory is
then invisible to anyone else, and reusing it is what a caching allocator does. While
any tensor still uses it, the call allocates fresh memory instead. CUDA tensors already
go through PyTorch's caching allocator and are not pooled.

The ownership test: no tensor on the storage (torch._C._storage_Use_Count, what torch's
CUDA-graph trees use for the same question) and no other reference to its Python object
(a storage has one Python object, so `t.untyped_storage()` held by a user shows up in its
reference count). Where the count is missing, outputs are plain torch.empty. The cost: one
retained block per dtype, of the largest recent output's size.
"""
from __future__ import annotations

import sys
import threading
from typing import Dict, Optional, Tuple

import torch

MIN_POOLED_BYTES = 4 << 20  # smaller outputs fault in quickly; pooling them would only hold memory
_use_count = getattr(torch._C, "_storage_Use_Count", None)
_lock = threading.Lock()
_pool: Dict[torch.dtype, torch.UntypedStorage] = {}


def _python_refs(pool: Dict, key) -> int:
    storage = pool.get(key)
    return sys.getrefcount(storage)


def _free_storage(key) -> Optional[torch.UntypedStorage]:
    """The pooled storage of `key` when only the pool holds it, else None."""
    if key not in _pool or _python_refs(_pool, key) != _REFS_WHEN_FREE:  # before taking a local reference
        return None
    storage = _pool[key]
    return storage if _use_count(storage._cdata) == 1 else None


# References to a pooled storage's Python object when only the pool holds it, measured the same way.
_REFS_WHEN_FREE = _python_refs({None: torch.empty(1).untyped_storage()}, None)


def empty_output(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor; large CPU ones on the pooled storage when it is free."""
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or _use_count is None or nbytes < MIN_POOLED_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    with _lock:  # two threads must not both find the storage free
        storage = _free_storage(dtype)
        if storage is None or not nbytes <= storage.nbytes() <= 2 * nbytes:  # in use, too small, or twice too big
            storage = torch.empty(numel, dtype=dtype).untyped_storage()
            _pool[dtype] = storage
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)  # contiguous strides


def release() -> None:
    """Drop the retained storages (tensors still using them keep theirs)."""
    with _lock:
        _pool.clear()

