"""``EventOverlap``: the handle a communication call returns so compute can overlap with it."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class EventOverlap:
    """A CUDA event recorded on the communication stream (None on CPU, where calls are synchronous).

    ``current_stream_wait()`` makes the caller's current stream wait for the communication; used as
    a context manager (``with event: ...``), the enclosed compute runs while the communication is in
    flight and the current stream waits for it on exit. ``extra_tensors`` are kept alive until then.
    """

    def __init__(self, event: Optional["torch.cuda.Event"] = None, extra_tensors: Optional[Sequence[torch.Tensor]] = None) -> None:
        self.event = event
        self.extra_tensors = tuple(extra_tensors) if extra_tensors else ()

    def current_stream_wait(self) -> None:
        """Block the current CUDA stream (not the host) until the communication has finished."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap(event={'cuda' if self.event is not None else None})"
