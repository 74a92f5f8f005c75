"""Large CPU outputs on transparent huge pages.

Every training step returns a fresh d_features (N × D). For a big batch (Colored MNIST:
50 000 × 390, 78 MB) glibc hands out freshly mapped memory, and the first write into it
takes one page fault per 4 KiB page: measured 20 ms for 78 MB on the 2-core CPU, more
than the kernels' own arithmetic. Where the kernel keeps transparent huge pages on
request (/sys/kernel/mm/transparent_hugepage/enabled = madvise or always), asking for them
before the first write cuts that to 4 ms (one fault per 2 MiB). This is the same hint
PyTorch's THP_MEM_ALLOC_ENABLE sets for every allocation; here it applies only to the
library's own large outputs, and like PyTorch's it is opt-in: set HGK_HUGE_PAGES=1.
Why not by default: inside a VM that reports freed memory to its host (virtio free page
reporting, as on this project's Firecracker machines), a freed huge page goes back to the
host and the next one faults in from the host: every few steps one call took 80–100 ms
instead of 20 (benchmarks/RESULTS.md). Anywhere the hint is unavailable it is skipped.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional, Tuple

import torch

HUGE_PAGE = 2 << 20
MIN_HUGE_BYTES = 4 << 20  # smaller outputs gain little and would waste part of a huge page
_MADV_HUGEPAGE = 14  # linux/mman.h
ENABLED = os.environ.get("HGK_HUGE_PAGES", "0") == "1"


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def empty_output(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty(shape), on huge pages when enabled, large, on CPU, and the OS takes the hint.

    The tensor starts at the first 2 MiB boundary of a slightly larger storage (at most one
    huge page more), so whole huge pages cover it; it is contiguous and owns that storage."""
    numel = 1
    for size in shape:
        numel *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    if not ENABLED or device.type != "cpu" or _madvise is None or nbytes < MIN_HUGE_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.empty(numel + HUGE_PAGE // itemsize, dtype=dtype)
    begin = raw.data_ptr()
    start = -(-begin // HUGE_PAGE) * HUGE_PAGE
    whole_pages = (begin + raw.numel() * itemsize - start) // HUGE_PAGE * HUGE_PAGE
    _madvise(start, whole_pages, _MADV_HUGEPAGE)  # a hint: failure leaves ordinary pages
    out = torch.empty(0, dtype=dtype)
    out.set_(raw.untyped_storage(), (start - begin) // itemsize, shape, _contiguous_strides(shape))
    return out


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def huge_pages_available() -> Optional[str]:
    """The THP mode in use ("always", "madvise", "never"), or None when it cannot be read."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return None
