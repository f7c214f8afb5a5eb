"""The NVSHMEM heap of a process group: the room the low-latency and internode kernels stand on.

Not yet run on a GPU (issues 14/15): built only with DEEPEP_MEGATRON_NVSHMEM=1 (csrc/build.py), and
no Buffer uses it yet.

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
    if single_node:
        for key, value in SINGLE_NODE_ENV.items():
            os.environ.setdefault(key, value)
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    unique_id = [_C.nvshmem_unique_id() if rank == 0 else None]
    dist.broadcast_object_list(unique_id, src=dist.get_global_rank(group, 0), group=group)
    return _C.NvshmemHeap(unique_id[0], rank, num_ranks, num_rdma_bytes, torch.cuda.current_device())
