"""The NVSHMEM heap of a process group: the room the low-latency and internode kernels stand on.

Built only with DEEPEP_MEGATRON_NVSHMEM=1 (csrc/build.py). The low-latency kernels
(backends/low_latency.py) stand on it.

:func:`open_heap` bootstraps NVSHMEM from a unique id that rank 0 draws and the group broadcasts
(no MPI or PMI needed, so torchrun, srun and the tests' own spawn all work), with every rank of
``group`` as one PE, then allocates ``num_rdma_bytes`` of symmetric memory per PE. Ranks that share
a GPU (under MPS) need no NIC: the defaults below keep NVSHMEM on its P2P transport there, which
is also what carries NVLink traffic between GPUs of one node. On an InfiniBand cluster set
``NVSHMEM_REMOTE_TRANSPORT`` (and ``NVSHMEM_IB_ENABLE_IBGDA=1``) before the first Buffer.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

try:
    from .. import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - CPU-only install
    _C = None

#: Set unless the caller chose otherwise: no NVLink multicast (never on these machines), no remote
#: transport when every PE is on this node, bootstrap sockets on loopback for one node.
SINGLE_NODE_ENV = {"NVSHMEM_DISABLE_NVLS": "1", "NVSHMEM_REMOTE_TRANSPORT": "none",
                   "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo"}


#: Bytes NVSHMEM reserves beyond the heap a Buffer asks for (its own signals, barriers, teams).
SYMMETRIC_SLACK = 256 << 20
_open_heaps: list = []  # NVSHMEM is initialized once per process: at most one heap lives


def heap_in_use() -> bool:
    """True while a heap of this process is open (a second one cannot be opened)."""
    return bool(_open_heaps)


def close_heap(heap) -> None:
    """Collective: free ``heap`` and finalize NVSHMEM."""
    heap.destroy()
    if heap in _open_heaps:
        _open_heaps.remove(heap)


def is_available() -> bool:
    """True when the extension was built with NVSHMEM (the nvidia-nvshmem-cu13 wheel) and a GPU is visible."""
    return _C is not None and bool(getattr(_C, "HAS_NVSHMEM", False)) and torch.cuda.is_available()


def open_heap(group: dist.ProcessGroup, num_rdma_bytes: int, single_node: bool = True):
    """Collective: one ``_C.NvshmemHeap`` of ``num_rdma_bytes`` per rank of ``group`` (PE = group rank).

    NVSHMEM can be initialized once per process: one heap per process, shared by the Buffers of
    that process."""
    if not is_available():
        raise RuntimeError(
            "NVSHMEM is not built into deepep_megatron._C: install the nvidia-nvshmem-cu13 wheel, then rebuild with "
            "`DEEPEP_MEGATRON_BUILD_CUDA=1 DEEPEP_MEGATRON_NVSHMEM=1 python setup.py build_ext --inplace`"
        )
    if not isinstance(num_rdma_bytes, int) or num_rdma_bytes <= 0:
        raise ValueError(f"num_rdma_bytes must be a positive int, got {num_rdma_bytes!r}")
    if heap_in_use():
        raise RuntimeError("an NVSHMEM heap is already open in this process (NVSHMEM is initialized once per process); "
                           "destroy the Buffer that holds it first")
    if single_node:
        for key, value in SINGLE_NODE_ENV.items():
            os.environ.setdefault(key, value)
    # NVSHMEM's default symmetric size (1 GiB) must hold the heap: ask for what this Buffer needs.
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(max(1 << 30, num_rdma_bytes + SYMMETRIC_SLACK)))
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    unique_id = [_C.nvshmem_unique_id() if rank == 0 else None]
    dist.broadcast_object_list(unique_id, src=dist.get_global_rank(group, 0), group=group)
    heap = _C.NvshmemHeap(unique_id[0], rank, num_ranks, num_rdma_bytes, torch.cuda.current_device())
    _open_heaps.append(heap)
    return heap
