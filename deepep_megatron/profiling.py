"""Named ranges around each communication and MoE stage, visible to Nsight Systems and torch.profiler.

``nvtx_range("deepep/dispatch")`` pushes an NVTX range when CUDA is available (what ``nsys`` shows)
and always opens a ``torch.profiler.record_function`` of the same name (what a torch.profiler /
Chrome trace shows, on CPU too). Both cost next to nothing when no profiler is running.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Mark the enclosed code as ``name`` in NVTX (GPU builds) and in torch.profiler traces."""
    use_nvtx = torch.cuda.is_available()
    if use_nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if use_nvtx:
            torch.cuda.nvtx.range_pop()
