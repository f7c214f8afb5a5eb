"""Low-latency dispatch/combine with the NVSHMEM kernels (csrc/kernels/low_latency.cu).

:class:`LowLatencyKernels` owns one NVSHMEM heap of ``num_rdma_bytes`` per rank (bootstrapped from a
unique id over the process group: ``backends/nvshmem.py``) and calls ``_C.LowLatency`` once per
operation. The ``cuda`` backend uses it for ``low_latency_dispatch`` / ``low_latency_combine`` when
the extension was built with NVSHMEM (``DEEPEP_MEGATRON_NVSHMEM=1``); :func:`low_latency_engine` says
otherwise why not and hands the calls to the reference backend (same results, torch.distributed speed).
:class:`LowLatencyBackend` serves DeepEP's usual low-latency-only Buffer (``num_nvl_bytes=0``): the
kernels for the low-latency calls, the reference backend for the normal ones.

Semantics are the reference backend's (backends/base.py); what the kernels add:

* Consecutive calls (dispatch or combine) alternate the two halves of the heap region (double
  buffering), so two micro-batches can be in flight: send(n), send(n+1), hook(n), hook(n+1).
  A third call may only start once every rank received the call two before it.
* ``return_recv_hook=True`` launches a send-only kernel and returns; the hook launches the receive
  kernel on the then-current stream. Nothing holds SMs in between.
* No host sync and static shapes: a decode step's dispatch + combine can be captured in a CUDA graph
  and replayed with new data (an even number of calls per replay keeps the halves in step).
* Wait-cost statistics are measured on the device: nanoseconds of ``%globaltimer`` each receiving
  block waited for each rank, summed over the blocks (DeepEP counts clock cycles).
* Every wait is bounded (the Buffer's ``timeout_s``); a timeout fills a diagnostic that the next call
  raises; ``clean_low_latency_buffer`` (collective) clears it with the whole region.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from ..profiling import ranks_share_a_host
from . import nvshmem
from .base import LowLatencyDispatchOutput, LowLatencyLayout
from .reference import ReferenceBackend

try:
    from .. import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - CPU-only install
    _C = None

#: Blocks per rank for the low-latency kernels (low_latency_blocks: else the SMs of the GPU over the ranks sharing
#: it, less a margin of 2, at most 64).
SMS_ENV = "DEEPEP_MEGATRON_LL_SMS"
MAX_DEFAULT_BLOCKS = 64
_TAG = "cuda-low-latency"
_ERRORS = {
    9: "low-latency dispatch (receiver waiting for a source rank's count signal: that rank never sent this call)",
    10: "low-latency combine (receiver waiting for an expert rank's flag: that rank never sent this call)",
    11: "low-latency dispatch (more than num_max_dispatch_tokens_per_rank pairs of one rank for one expert: a token "
        "listed the same expert twice in topk_idx)",
}
_BAD_EXPERT_IDS = 12


def unavailable_reason(num_rdma_bytes: int, low_latency_mode: bool) -> Optional[str]:
    """Why the low-latency kernels cannot serve a Buffer (None when they can)."""
    if not low_latency_mode:
        return "the Buffer was created with low_latency_mode=False"
    if num_rdma_bytes <= 0:
        return "num_rdma_bytes is 0 (size it with Buffer.get_low_latency_rdma_size_hint)"
    if not nvshmem.is_available():
        return ("deepep_megatron._C was built without NVSHMEM (install nvidia-nvshmem-cu13 and rebuild with "
                "DEEPEP_MEGATRON_BUILD_CUDA=1 DEEPEP_MEGATRON_NVSHMEM=1)")
    if nvshmem.heap_in_use():
        return "NVSHMEM is initialized once per process and another Buffer of this process holds its heap"
    return None


def low_latency_blocks(override: Optional[str], num_sms: int, ranks_sharing_gpu: int) -> int:
    """Blocks per rank of every low-latency kernel: ``override`` (the value of $DEEPEP_MEGATRON_LL_SMS,
    None/empty for the default), else the GPU's SMs over the ranks sharing it less a margin of 2, at
    most :data:`MAX_DEFAULT_BLOCKS`. The blocks of all ranks sharing a GPU must fit on it at once (a
    receive block spins for senders that could otherwise never be scheduled), so a larger override
    raises ValueError instead of hanging until the kernels' timeout."""
    sharing = max(1, ranks_sharing_gpu)
    fit = num_sms // sharing
    if not override:
        return max(1, min(MAX_DEFAULT_BLOCKS, fit - 2))
    try:
        blocks = int(override)
    except ValueError:
        raise ValueError(f"{SMS_ENV}={override!r} must be a positive integer (blocks per rank)") from None
    if blocks < 1 or blocks > fit:
        raise ValueError(
            f"{SMS_ENV}={blocks}: the low-latency kernels of the {sharing} rank(s) sharing this GPU must fit on its "
            f"{num_sms} SMs at once, so use 1..{fit} blocks per rank (or unset it for the default)"
        )
    return blocks


def _ranks_sharing_my_gpu(group: dist.ProcessGroup) -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    me = (os.uname().nodename, str(getattr(props, "uuid", torch.cuda.current_device())))
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, me, group=group)
    return max(1, sum(1 for other in everyone if other == me))


class LowLatencyKernels:
    """The NVSHMEM low-latency kernels of one group (same interface as the reference backend's
    low-latency methods, plus ``wait_stats``)."""

    #: As the Backend attributes of these names: the kernels fill the wait statistics, and check
    #: topk_idx's value range on the device (reported at the next call), not on the host.
    low_latency_wait_stats_on_device = True
    low_latency_checks_topk_range = True

    def __init__(self, group: dist.ProcessGroup, num_rdma_bytes: int, timeout_s: float) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device())
        sharing = _ranks_sharing_my_gpu(group)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        #: Blocks of every low-latency kernel: all ranks sharing a GPU must fit on it at once (the receive spins).
        self.num_blocks = low_latency_blocks(os.environ.get(SMS_ENV), sms, sharing)
        # Ranks on several hosts: NVSHMEM's remote transport stays as the environment sets it.
        self.heap = nvshmem.open_heap(group, num_rdma_bytes, single_node=ranks_share_a_host(group))
        self._ll = _C.LowLatency(self.heap, self.rank, self.num_ranks, self.device.index, timeout_s)
        self._half = 0
        self._error: Optional[BaseException] = None

    # ------------------------------------------------------------------ health
    @property
    def timeout_s(self) -> float:
        return self._ll.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self._ll.timeout_s = value

    def _device_error(self) -> BaseException:
        _, code, rank, peer, expert, block, expected, seen = self._ll.diagnostic()
        if code == _BAD_EXPERT_IDS:
            return ValueError(
                f"deepep_megatron low-latency kernels, rank {rank}: topk_idx values must be in [-1, num_experts="
                f"{expected}) (-1 = no expert); token {expert} of a low-latency dispatch held {seen} (its pairs were "
                "dropped). Call buffer.clean_low_latency_buffer(...) on every rank to use the Buffer again."
            )
        where = _ERRORS.get(code, f"wait code {code}")
        what = "" if expert < 0 else f", expert {expert}"
        return RuntimeError(
            f"deepep_megatron low-latency kernels, rank {rank}: {where}: rank {peer}{what} (block {block}; expected "
            f"{expected}, seen {seen}) after at most {self.timeout_s:g} s. Every rank must make the same sequence of "
            "low-latency calls. Call buffer.clean_low_latency_buffer(...) on every rank to use the Buffer again."
        )

    def check_errors(self) -> None:
        if self._error is None and self._ll.has_error():
            self._error = self._device_error()
        if self._error is not None:
            raise self._error

    def _call(self, op, *args, **kwargs):
        self.check_errors()
        try:
            return op(*args, **kwargs)
        except _C.LowLatencyError:
            self.check_errors()
            raise

    def _take_half(self) -> int:
        half, self._half = self._half, self._half ^ 1
        return half

    # ------------------------------------------------------------------ operations
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale,
                             use_ue8m0, return_recv_hook, wait_stats: Optional[torch.Tensor] = None):
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but this rank's NVSHMEM heap is on {self.device}")
        x, topk_idx = x.contiguous(), topk_idx.contiguous()
        half = self._take_half()
        phases = _C.LL_SEND if return_recv_hook else _C.LL_SEND | _C.LL_RECV
        args = (x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, bool(use_fp8), bool(round_scale),
                bool(use_ue8m0), half)
        result = self._call(self._ll.dispatch, *args, phases, self.num_blocks, wait_stats, None)
        recv_x, recv_x_scales, recv_count, recv_src_info, recv_layout_range, pair_slot = result
        layout = LowLatencyLayout(recv_src_info, recv_layout_range, num_max_dispatch_tokens_per_rank, x.size(1),
                                  num_experts, {"backend": _TAG, "pair_slot": pair_slot})
        output = LowLatencyDispatchOutput(recv_x, recv_x_scales, recv_count, layout)
        if not return_recv_hook:
            return output, None

        def receive() -> None:
            self._call(self._ll.dispatch, *args, _C.LL_RECV, self.num_blocks, wait_stats, result)

        return output, receive

    def low_latency_combine(self, x, topk_idx, topk_weights, layout: LowLatencyLayout, out, return_recv_hook,
                            wait_stats: Optional[torch.Tensor] = None):
        private = layout.private
        if private.get("backend") != _TAG:
            raise ValueError("this handle was made by another backend's low_latency_dispatch; pass the handle of this "
                             "Buffer's dispatch")
        topk_idx = topk_idx.contiguous()
        topk_weights = topk_weights.to(torch.float32).contiguous()
        half = self._take_half()
        phases = _C.LL_SEND if return_recv_hook else _C.LL_SEND | _C.LL_RECV
        args = (x, topk_idx, topk_weights, private["pair_slot"], layout.recv_layout_range,
                layout.num_max_dispatch_tokens_per_rank, layout.num_experts, half)
        combined = self._call(self._ll.combine, *args, phases, self.num_blocks, wait_stats, out)
        if not return_recv_hook:
            return combined, None

        def receive() -> None:
            self._call(self._ll.combine, *args, _C.LL_RECV, self.num_blocks, wait_stats, combined)

        return combined, receive

    def low_latency_combine_buffer(self, layout: LowLatencyLayout) -> torch.Tensor:
        """The send region of the half the next call uses, as bf16 [E_local, R * max_tokens, H]: a
        zero-copy combine sends straight from it."""
        return self._ll.combine_buffer(layout.num_max_dispatch_tokens_per_rank, layout.hidden, layout.num_experts,
                                       self._half)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: zero every rank's region (signals, counters, the diagnostic); both halves start fresh."""
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._ll.clean()
        dist.barrier(group=self.group)
        self._half = 0
        self._error = None

    def destroy(self) -> None:
        """Collective: free the heap and finalize NVSHMEM."""
        if self.heap is None:
            return
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._ll = None
        nvshmem.close_heap(self.heap)
        self.heap = None


def low_latency_engine(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank, timeout_s: float):
    """The kernels when they can serve this Buffer, else the reference backend (with a warning
    naming the reason when low_latency_mode asked for low-latency calls)."""
    reason = unavailable_reason(num_rdma_bytes, low_latency_mode)
    if reason is None:
        return LowLatencyKernels(group, num_rdma_bytes, timeout_s)
    if low_latency_mode:
        warnings.warn(f"low-latency calls run on the reference backend (torch.distributed): {reason}", RuntimeWarning,
                      stacklevel=3)
    return ReferenceBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)


class LowLatencyDelegate:
    """The low-latency part of a backend that hands it to ``self._low_latency`` (the kernels, or a
    reference backend): one set of forwards for the cuda backend and :class:`LowLatencyBackend`.
    ``_before_low_latency`` runs before each call (the cuda backend raises its recorded errors there)."""

    _low_latency: "LowLatencyKernels | ReferenceBackend"

    def _before_low_latency(self) -> None:
        """Nothing by default."""

    @property
    def low_latency_wait_stats_on_device(self) -> bool:
        """Whether the low-latency calls measure wait costs themselves (the NVSHMEM kernels do)."""
        return self._low_latency.low_latency_wait_stats_on_device

    @property
    def low_latency_checks_topk_range(self) -> bool:
        """Whether the low-latency kernels check topk_idx's range themselves (no host sync)."""
        return self._low_latency.low_latency_checks_topk_range

    def low_latency_dispatch(self, *args, **kwargs):
        """The NVSHMEM kernels, or the reference backend when they are not built."""
        self._before_low_latency()
        return self._low_latency.low_latency_dispatch(*args, **kwargs)

    def low_latency_combine(self, *args, **kwargs):
        """The NVSHMEM kernels, or the reference backend when they are not built."""
        self._before_low_latency()
        return self._low_latency.low_latency_combine(*args, **kwargs)

    def low_latency_combine_buffer(self, layout: LowLatencyLayout) -> Optional[torch.Tensor]:
        """Zero-copy combine rows in the NVSHMEM heap (None: the Buffer allocates them)."""
        return self._low_latency.low_latency_combine_buffer(layout)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: zero the low-latency region of every rank (nothing to do for the reference path)."""
        self._low_latency.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)


class LowLatencyBackend(LowLatencyDelegate, ReferenceBackend):
    """``backend='cuda'`` for a low-latency Buffer without an NVLink buffer (DeepEP's
    ``Buffer(group, 0, num_rdma_bytes, low_latency_mode=True)``): the NVSHMEM kernels for the
    low-latency calls; normal dispatch/combine on the reference backend."""

    name = "cuda"

    def __init__(self, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank, timeout_s: float) -> None:
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)
        self._low_latency = LowLatencyKernels(group, num_rdma_bytes, timeout_s)

    def reset(self) -> None:
        self._low_latency.clean_low_latency_buffer(0, 0, 0)

    def destroy(self) -> None:
        self._low_latency.destroy()
