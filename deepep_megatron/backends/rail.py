"""The RDMA leg of node forwarding (backends/forwarding.py): how rows cross between the ranks of a
rail (the same local index on every node).

Two implementations of one interface, ``exchange(send, recv_counts, num_blocks) -> received``:

* :class:`CollectiveRail`: one all-to-all of the rail's process group (NCCL on a cluster, gloo here,
  which stages CUDA tensors through host memory). The default.
* :class:`NvshmemRail`: NVSHMEM puts with signals into the peers' receive slabs of the symmetric heap
  (csrc/kernels/rail.cu; the layout and the signalling are in deepep_megatron_layout.h), the
  NVSHMEM transport (IBGDA / IBRC on a cluster, P2P on one node) carrying them. Chosen with
  ``DEEPEP_MEGATRON_RDMA_LEG=nvshmem`` and a Buffer with ``num_rdma_bytes`` (2 x nodes x tokens x
  row bytes + 4 KiB covers any routing); it needs the extension built with NVSHMEM and takes the
  process's one NVSHMEM heap (a low-latency Buffer cannot live next to it in the same process).
  Opt-in: its GPU tests pass on one GPU over the P2P transport (2026-12-04), but it has not had its
  10^4-round soak nor run over a NIC.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from ..layout import RAIL_CONTROL_BYTES, RAIL_ROW_ALIGN, align_up, rail_bytes_needed
from ..topology import Topology
from .reference import ReferenceBackend, copy_rows

RDMA_LEG_ENV = "DEEPEP_MEGATRON_RDMA_LEG"
RDMA_LEGS = ("collective", "nvshmem")
#: Blocks of one NVSHMEM rail exchange per rank, at most: enough to keep a NIC's queues full (the
#: puts are the NIC's work there), and few enough to be scheduled beside the NVLink leg's persistent
#: kernels of other ranks when ranks share a GPU (virtual nodes), which spin until their peers arrive.
RAIL_BLOCKS = 8
#: What a rail exchange's wait codes (layout header: kWaitRailAck, kWaitRailData) waited for.
_WAITS = {
    14: "for EP rank {peer} (node {node}) to take the previous rows out of its receive slab (it has not started this "
        "exchange)",
    15: "for the rows of EP rank {peer} (node {node}) (it has not sent this exchange)",
}


def rdma_leg_choice(environ: Optional[Mapping[str, str]] = None) -> str:
    """The RDMA leg the environment asks for (``DEEPEP_MEGATRON_RDMA_LEG``, default ``collective``)."""
    choice = (os.environ if environ is None else environ).get(RDMA_LEG_ENV, "collective")
    if choice not in RDMA_LEGS:
        raise ValueError(f"{RDMA_LEG_ENV}={choice!r} must be one of {RDMA_LEGS}")
    return choice


class CollectiveRail:
    """The rail's rows moved by one all-to-all of its process group (rail rank n = node n)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self._exchanger = ReferenceBackend(group, 0, 0, False, 1)

    def exchange(self, send: list[torch.Tensor], recv_counts: list[int], num_blocks: int) -> list[torch.Tensor]:
        """``send[m]`` [n_m, B] uint8 rows for node m's rank -> [recv_counts[n], B] from each node's."""
        rows = torch.cat(send)
        received = self._exchanger._exchange_rows(rows, [s.size(0) for s in send], recv_counts)
        return list(received.split(recv_counts))

    def check_errors(self, wait: bool = False) -> None:
        """Nothing to check: a collective raises by itself."""

    def reset(self, group: dist.ProcessGroup) -> None:
        """Nothing kept between calls."""

    def destroy(self) -> None:
        """Nothing to release."""


class NvshmemRail:
    """The rail's rows moved by NVSHMEM puts into the peers' receive slabs (see the module docstring).

    Collective to build (the whole EP ``group``: NVSHMEM's PEs are its ranks)."""

    def __init__(self, group: dist.ProcessGroup, topology: Topology, num_rdma_bytes: int, timeout_s: float) -> None:
        from ..profiling import ranks_share_a_host
        from .nvshmem import _C, is_available, open_heap

        if not is_available():
            raise RuntimeError(
                f"{RDMA_LEG_ENV}=nvshmem needs deepep_megatron._C built with NVSHMEM (the nvidia-nvshmem-cu13 wheel, "
                "`DEEPEP_MEGATRON_BUILD_CUDA=1 DEEPEP_MEGATRON_NVSHMEM=1 python setup.py build_ext --inplace`) and a GPU; "
                f"unset {RDMA_LEG_ENV} for the collective RDMA leg"
            )
        if num_rdma_bytes <= RAIL_CONTROL_BYTES:
            raise ValueError(
                f"{RDMA_LEG_ENV}=nvshmem needs a Buffer with num_rdma_bytes (2 x nodes x tokens x row bytes + "
                f"{RAIL_CONTROL_BYTES}: deepep_megatron.layout.rail_bytes_needed), got {num_rdma_bytes}"
            )
        self._C = _C
        self.timeout_s = timeout_s
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._heap = open_heap(group, num_rdma_bytes, single_node=ranks_share_a_host(group))
        self._rail = _C.Rail(self._heap, dist.get_rank(group), topology.num_ranks, topology.ranks_per_node,
                             self.device.index, timeout_s)
        self._error: Optional[BaseException] = None
        self._last_stream: Optional[torch.cuda.Stream] = None  # where the previous exchange ran

    def _device_error(self) -> BaseException:
        _, code, rank, peer, node, block, expected, seen = self._rail.diagnostic()
        waited = _WAITS.get(code, "wait code {code}").format(peer=peer, node=node, code=code)
        return RuntimeError(
            f"deepep_megatron RDMA leg (NVSHMEM), rank {rank}: timed out after {self.timeout_s:g} s waiting {waited} "
            f"(block {block}; signal target {expected}, seen {seen}). Every rank must make the same dispatch/combine "
            "calls; after this error every rank calls Buffer.reset()"
        )

    def check_errors(self, wait: bool = False) -> None:
        """Raise this rank's recorded rail error; ``wait``: after this rank's queued work ended."""
        if wait:
            torch.cuda.current_stream(self.device).synchronize()
        if self._error is None and self._rail.has_error():
            self._error = self._device_error()
        if self._error is not None:
            raise self._error

    def exchange(self, send: list[torch.Tensor], recv_counts: list[int], num_blocks: int) -> list[torch.Tensor]:
        """As :meth:`CollectiveRail.exchange`; the received rows view the receive slabs until the next
        exchange (the caller copies them out first). Rows travel padded to 16 bytes; the kernel runs
        min(``num_blocks``, :data:`RAIL_BLOCKS`) blocks (the same on every rank of the rail)."""
        self.check_errors()
        row_bytes = send[0].size(1)
        padded = align_up(row_bytes, RAIL_ROW_ALIGN)
        most = max([rows.size(0) for rows in send] + list(recv_counts))
        if most * padded > self._rail.slab_bytes:
            raise RuntimeError(
                f"the RDMA leg moves {most} rows of {padded} bytes between two nodes' ranks, more than the "
                f"{self._rail.slab_bytes} bytes of a slab of num_rdma_bytes={self._heap.num_bytes}: create the Buffer "
                f"with num_rdma_bytes >= {rail_bytes_needed(len(send), most, row_bytes)} "
                "(deepep_megatron.layout.rail_bytes_needed)"
            )
        # The kernel acks the previous exchange's rows at its start, so it must follow their copy-out,
        # which ran on the previous exchange's stream (an async Buffer call runs on the comm stream).
        stream = torch.cuda.current_stream(self.device)
        if self._last_stream is not None and self._last_stream != stream:
            stream.wait_stream(self._last_stream)
        self._last_stream = stream
        for node, rows in enumerate(send):
            if rows.size(0):
                copy_rows(self._rail.send_slab(node, rows.size(0) * padded).view(-1, padded)[:, :row_bytes], rows)
        try:
            views = self._rail.exchange([rows.size(0) * padded for rows in send], [c * padded for c in recv_counts],
                                        max(1, min(num_blocks, RAIL_BLOCKS)))
        except self._C.RailError:
            self.check_errors()
            raise
        return [view.view(-1, padded)[:, :row_bytes] for view in views]

    def reset(self, group: dist.ProcessGroup) -> None:
        """Collective: zero every rank's rail signals once every rank's kernels ended."""
        torch.cuda.synchronize(self.device)
        dist.barrier(group=group)
        self._rail.clean()
        dist.barrier(group=group)
        self._error = None

    def destroy(self) -> None:
        """Collective: free the heap and finalize NVSHMEM."""
        from .nvshmem import close_heap

        torch.cuda.synchronize(self.device)
        close_heap(self._heap)


__all__ = ["CollectiveRail", "NvshmemRail", "RDMA_LEG_ENV", "RDMA_LEGS", "rdma_leg_choice"]
