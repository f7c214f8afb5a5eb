"""Named ranges around each communication and MoE stage, visible to Nsight Systems and torch.profiler.

``nvtx_range("deepep/dispatch")`` pushes an NVTX range when CUDA is available (what ``nsys`` shows)
and, while a torch.profiler is running, a ``torch.profiler.record_function`` of the same name (what a
torch.profiler / Chrome trace shows, on CPU too). With no profiler running only the NVTX push/pop is paid.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    # Asked on first use, not at import (the check may initialize the driver, which a later fork
    # of the importing process would inherit).
    return torch.cuda.is_available()


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Mark the enclosed code as ``name`` in NVTX (GPU builds) and in torch.profiler traces."""
    use_nvtx = _cuda_available()
    if use_nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        # record_function costs ~10 us of host time per call even with no profiler running: open
        # it only under an active torch.profiler (nsys sees the NVTX range either way).
        if torch._C._autograd._profiler_enabled():
            with torch.profiler.record_function(name):
                yield
        else:
            yield
    finally:
        if use_nvtx:
            torch.cuda.nvtx.range_pop()
