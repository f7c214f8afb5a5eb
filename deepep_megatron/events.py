"""Events that let compute overlap with communication (DeepEP's ``EventHandle`` / ``EventOverlap``).

* :class:`EventHandle` marks a point on a CUDA stream (DeepEP's C++ ``EventHandle``): created, it
  records an event on the current stream (or the stream given); ``current_stream_wait()`` makes
  the caller's current stream wait for that point. Where CUDA is not in use (CPU tensors, no GPU)
  every call is synchronous, so a handle marks nothing and waiting is a no-op.
* :class:`EventOverlap` is what communication calls return: an ``EventHandle`` (or None when the
  call was not ``async_finish``) plus tensors to keep alive until the wait.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def cuda_in_use() -> bool:
    """True when this process has initialized CUDA (so there are streams to order)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class EventHandle:
    """A CUDA event recorded on ``stream`` (default: the current stream) at construction.

    Attributes:
        event: the recorded ``torch.cuda.Event``, or None where CUDA is not in use (then every
            communication call has already finished when it returns).
    """

    __slots__ = ("event",)

    def __init__(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        self.event: Optional[torch.cuda.Event] = None
        if stream is not None or cuda_in_use():
            self.event = torch.cuda.Event()
            self.event.record(stream if stream is not None else torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream (not the host) wait until the recorded point."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __repr__(self) -> str:
        return f"EventHandle({'cuda' if self.event is not None else 'synchronous'})"


def cuda_event_of(event: Optional["EventOverlap"]) -> Optional["torch.cuda.Event"]:
    """The ``torch.cuda.Event`` inside an :class:`EventOverlap` (None when it holds none)."""
    if event is None or event.event is None:
        return None
    return event.event.event


class EventOverlap:
    """The handle a communication call returns so compute can overlap with it (DeepEP's class).

    ``current_stream_wait()`` makes the caller's current stream wait for the communication; used as
    a context manager (``with event: ...``), the enclosed compute runs while the communication is in
    flight and the current stream waits for it on exit. ``extra_tensors`` are kept alive until then
    (a stand-in for ``record_stream`` that CUDA graphs accept).

    Args:
        event: the :class:`EventHandle` recorded after the communication, or None (not async).
        extra_tensors: tensors the communication still uses.
    """

    def __init__(self, event: Optional[EventHandle] = None, extra_tensors: Optional[Sequence[torch.Tensor]] = None) -> None:
        if event is not None and not isinstance(event, EventHandle):
            raise TypeError(f"EventOverlap takes an EventHandle or None, got {type(event).__name__}")
        self.event = event
        self.extra_tensors = tuple(extra_tensors) if extra_tensors else ()

    def current_stream_wait(self) -> None:
        """Block the current CUDA stream (not the host) until the communication has finished."""
        if self.event is not None:
            self.event.current_stream_wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap(event={self.event!r})"
