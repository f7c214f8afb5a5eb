"""Named ranges around each communication and MoE stage, visible to Nsight Systems and torch.profiler,
and :class:`StageClock`, the per-stage time that the pretraining log and the MoE-layer benchmark print.

``nvtx_range("deepep/dispatch")`` pushes an NVTX range when CUDA is available (what ``nsys`` shows)
and, while a torch.profiler is running, a ``torch.profiler.record_function`` of the same name (what a
torch.profiler / Chrome trace shows, on CPU too). With no profiler running only the NVTX push/pop is paid.
"""
from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    # Asked on first use, not at import (the check may initialize the driver, which a later fork
    # of the importing process would inherit).
    return torch.cuda.is_available()


class nvtx_range:  # noqa: N801 - used like the function it replaces: `with nvtx_range(name):`
    """Mark the enclosed code as ``name`` in NVTX (GPU builds) and in torch.profiler traces.

    A class rather than a generator context manager: it wraps every dispatch and combine, so its
    own host cost counts."""

    __slots__ = ("name", "use_nvtx", "record")

    def __init__(self, name: str) -> None:
        self.name = name
        self.use_nvtx = _cuda_available()
        self.record = None

    def __enter__(self) -> None:
        if self.use_nvtx:
            torch.cuda.nvtx.range_push(self.name)
        # record_function costs ~10 us of host time per call even with no profiler running: open
        # it only under an active torch.profiler (nsys sees the NVTX range either way).
        if torch._C._autograd._profiler_enabled():
            self.record = torch.profiler.record_function(self.name)
            self.record.__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.record is not None:
                self.record.__exit__(*exc)
        finally:
            if self.use_nvtx:
                torch.cuda.nvtx.range_pop()


class StageClock:
    """Accumulated time per named stage: CUDA events on a CUDA device, the host clock on CPU.

    ``start(name, device)`` / ``stop(name)`` bracket one interval (or :meth:`measure` /
    :meth:`wrap`); intervals of one name add up until :meth:`pop_ms` reads and resets them. CUDA
    intervals are resolved only there (one synchronize per read, none on the hot path). A ``stop``
    without its ``start`` is ignored, so a backward mark whose forward partner did not run is harmless.

    Off until ``enabled`` is set: a clock nobody reads would keep every recorded event pair.
    """

    def __init__(self, names: Iterable[str], enabled: bool = False) -> None:
        self.enabled = enabled
        self._cpu_s: dict[str, float] = {name: 0.0 for name in names}
        self._cuda_events: dict[str, list[tuple[Any, Any]]] = {name: [] for name in self._cpu_s}
        self._open: dict[str, Any] = {}

    def start(self, name: str, device: torch.device) -> None:
        if not self.enabled:
            return
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open[name] = event
        else:
            self._open[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        begin = self._open.pop(name, None)
        if begin is None:
            return
        if isinstance(begin, float):
            self._cpu_s[name] += time.perf_counter() - begin
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._cuda_events[name].append((begin, end))

    @contextlib.contextmanager
    def measure(self, name: str, device: torch.device) -> Iterator[None]:
        self.start(name, device)
        try:
            yield
        finally:
            self.stop(name)

    def wrap(self, name: str, fn: Callable, device: torch.device) -> Callable:
        """``fn`` with each call timed as stage ``name``."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.measure(name, device):
                return fn(*args, **kwargs)

        return timed

    def pop_ms(self) -> dict[str, float]:
        """Milliseconds per name since the last call; resets the clock."""
        if any(self._cuda_events.values()):
            torch.cuda.synchronize()
        result = {}
        for name in self._cpu_s:
            result[name] = self._cpu_s[name] * 1e3 + sum(b.elapsed_time(e) for b, e in self._cuda_events[name])
            self._cpu_s[name] = 0.0
            self._cuda_events[name] = []
        return result


#: ``=1``: the backends record the host time of each stage of their last operation (``host_timing()``).
HOST_TIMING_ENV = "DEEPEP_MEGATRON_HOST_TIMING"
#: ``=1`` with :data:`HOST_TIMING_ENV`: synchronize the device before each stage mark, so a stage's
#: time includes the GPU work it queued (the operation gets slower; for a breakdown, not a timing).
HOST_TIMING_SYNC_ENV = "DEEPEP_MEGATRON_HOST_TIMING_SYNC"


class HostStages:
    """Host microseconds of the named stages of one operation, in order: :meth:`start` at the
    operation's beginning, :meth:`mark` at the end of each stage (the time since the previous mark).
    Off (every call returns at once) unless ``DEEPEP_MEGATRON_HOST_TIMING=1`` when it is made;
    ``DEEPEP_MEGATRON_HOST_TIMING_SYNC`` is read at each :meth:`start`."""

    def __init__(self) -> None:
        self.enabled = os.environ.get(HOST_TIMING_ENV) == "1"
        self._sync = False
        self._stages: list[tuple[str, float]] = []
        self._last = 0.0

    def start(self) -> None:
        if self.enabled:
            self._sync = os.environ.get(HOST_TIMING_SYNC_ENV) == "1" and _cuda_available()
            if self._sync:
                torch.cuda.synchronize()
            self._stages = []
            self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        if self.enabled:
            if self._sync:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self._stages.append((stage, (now - self._last) * 1e6))
            self._last = now

    def stages(self) -> list[tuple[str, float]]:
        """``[(stage, us)]`` of the last operation (empty when off)."""
        return list(self._stages)


#: How far ahead of now :func:`start_together` sets the common start (covers the broadcast's spread).
START_MARGIN_NS = 2_000_000


def start_together(group: Any = None) -> Optional[int]:
    """Return on every rank of ``group`` at (nearly) the same instant: after a barrier, rank 0
    broadcasts a deadline on the host's monotonic clock ``START_MARGIN_NS`` ahead and every rank
    spins until it. A barrier alone releases ranks tens of microseconds apart (its last message
    reaches them at different times), which a one-call timing then counts as the operation's time;
    the deadline leaves about a microsecond. Ranks must share one host (one clock); where they do
    not (several nodes), this is a plain barrier. Returns the deadline (``time.monotonic_ns``), or
    None after a plain barrier."""
    dist.barrier(group=group)
    if not ranks_share_a_host(group):
        return None
    deadline = [time.monotonic_ns() + START_MARGIN_NS]
    dist.broadcast_object_list(deadline, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    while time.monotonic_ns() < deadline[0]:
        pass
    return deadline[0]


@functools.lru_cache(maxsize=None)
def ranks_share_a_host(group: Any) -> bool:
    """Whether every rank of ``group`` (None: the world) runs on this host (asked once per group)."""
    import socket

    names: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, socket.gethostname(), group=group)
    return len(set(names)) == 1


def seconds_per_call(fn: Callable[[], Any], iters: int, repeats: int = 5, warmup: int = 3,
                     group: Any = None, sleep_cycles: int = 0, before: Optional[Callable[[], Any]] = None,
                     after: Optional[Callable[[], Any]] = None) -> float:
    """Seconds per call of ``iters`` calls of ``fn`` queued back to back between two CUDA events on
    the current stream, median over ``repeats`` (after ``warmup`` calls). With a process ``group``
    every repeat starts after a sync and :func:`start_together`, so the ranks start together.
    ``sleep_cycles`` > 0 queues a GPU sleep first, so the host enqueues the calls while the GPU
    sleeps and the events time the GPU work alone; ``before()`` / ``after()`` run untimed around
    each repeat."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        torch.cuda.synchronize()
        if group is not None:
            start_together(group)
        if sleep_cycles > 0:
            torch.cuda._sleep(sleep_cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters)
        if after is not None:
            after()
    return statistics.median(samples)


def one_call_seconds(op: Callable[[], Any], iters: int, warmup: int = 3, group: Any = None) -> tuple[float, float]:
    """Median seconds of (``op`` with the GPU work it queued, ``op``'s host time), one call at a time
    after a sync and :func:`start_together` (what a training step sees: nothing queued before it to
    hide the host behind, and every rank starts each call at the same instant)."""
    walls, hosts = [], []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        start_together(group)
        t0 = time.perf_counter()
        result = op()
        returned = time.perf_counter()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        del result
        if i >= warmup:
            walls.append(t1 - t0)
            hosts.append(returned - t0)
    return statistics.median(walls), statistics.median(hosts)


#: Bytes each copy of the roofline moves (large enough to leave the caches out).
ROOFLINE_BYTES = 1 << 30


def sm_copy_GBps(num_sms: int, nbytes: int = ROOFLINE_BYTES) -> float:
    """What a plain copy kernel on ``num_sms`` SMs drives on GPU 0, in GB/s (bytes read + written):
    one Triton program per SM, 1024 threads, each looping over 64 KiB tiles. The per-SM-count
    baseline of an EP kernel that occupies that many SMs (issue 13's SM efficiency)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src, dst, n, TILE: tl.constexpr):
        step = tl.num_programs(0) * TILE
        for start in range(tl.program_id(0) * TILE, n, step):
            offsets = start + tl.arange(0, TILE)
            mask = offsets < n
            tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)

    with torch.cuda.device(0):
        a = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda:0").fill_(1)
        b = torch.empty_like(a)
        run = lambda: _copy[(num_sms,)](a, b, a.numel(), TILE=16384, num_warps=32)  # noqa: E731
        seconds = seconds_per_call(run, 10, repeats=1)
        del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds / 1e9


def copy_roofline() -> dict[str, float]:
    """The copy rooflines a benchmark reports beside its kernels, in GB/s: ``hbm_copy_GBps`` (GPU 0,
    bytes read + written) and, with two GPUs, ``p2p_copy_GBps`` (GPU 0 -> GPU 1, one way)."""
    out = {}
    with torch.cuda.device(0):
        a = torch.empty(ROOFLINE_BYTES, dtype=torch.uint8, device="cuda:0").fill_(1)
        b = torch.empty_like(a)
        out["hbm_copy_GBps"] = 2 * ROOFLINE_BYTES / seconds_per_call(lambda: b.copy_(a), 10, repeats=1) / 1e9
        if torch.cuda.device_count() >= 2:
            c = torch.empty(ROOFLINE_BYTES, dtype=torch.uint8, device="cuda:1")
            out["p2p_copy_GBps"] = ROOFLINE_BYTES / seconds_per_call(lambda: c.copy_(a), 10, repeats=1) / 1e9
            del c
        del a, b
    torch.cuda.empty_cache()
    return out
