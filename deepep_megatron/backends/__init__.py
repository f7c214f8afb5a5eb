"""The one place that decides which backend a ``Buffer`` runs on."""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from ..config import SUPPORTED_NVL_RANK_COUNTS
from .base import Backend, DispatchLayout, DispatchOutput, LowLatencyDispatchOutput, LowLatencyLayout
from .reference import ReferenceBackend

BACKEND_NAMES = ("auto", "reference", "cuda", "forwarding")


def cuda_backend_available() -> bool:
    """True when the compiled extension imports and a CUDA device is visible."""
    try:
        from .cuda import is_available
    except ImportError:
        return False
    return is_available()


def _low_latency_kernels_fit(num_rdma_bytes: int, low_latency_mode: bool) -> bool:
    """True when the NVSHMEM low-latency kernels can serve a Buffer (built, a GPU, the mode and bytes)."""
    if not (low_latency_mode and num_rdma_bytes > 0 and cuda_backend_available()):
        return False
    from .low_latency import unavailable_reason

    return unavailable_reason(num_rdma_bytes, low_latency_mode) is None


def create_backend(
    name: str,
    group: dist.ProcessGroup,
    num_nvl_bytes: int,
    num_rdma_bytes: int,
    low_latency_mode: bool,
    num_qps_per_rank: int,
    num_nodes: int = 1,
    timeout_s: Optional[float] = None,
) -> Backend:
    """Build backend ``name`` for a group over ``num_nodes`` nodes of equal size. Collective: every
    rank of ``group`` must call it.

    * One node: ``"auto"`` is ``"cuda"`` (the intranode kernels) when :func:`cuda_backend_available`,
      the buffer has NVLink bytes and the group has 2, 4 or 8 ranks, else ``"reference"`` (so an EP1
      group, e.g. a one-GPU run of the Megatron dispatcher, still works).
    * Several nodes: ``"cuda"`` and ``"forwarding"`` are issue [5/8]'s node forwarding
      (backends/forwarding.py: each token crosses to each destination node once, to the rank with its
      local index, which forwards it inside the node), with the intranode kernels or the reference
      backend inside each node; ``"auto"`` is ``"cuda"`` when those kernels fit (built, NVLink bytes,
      2, 4 or 8 ranks per node), else ``"reference"``.
    * A low-latency Buffer without NVLink bytes (DeepEP's ``Buffer(group, 0, num_rdma_bytes,
      low_latency_mode=True)``), on one node or several, gets the NVSHMEM low-latency kernels under
      ``"auto"`` and ``"cuda"`` when they are built (backends/low_latency.py), the reference backend
      otherwise. Over several nodes the cuda and forwarding backends run the low-latency calls on
      those kernels too when they are built.

    ``timeout_s`` bounds the cuda kernels' waits on peers (None: env or 100 s)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if timeout_s is not None:  # checked on every backend, so a bad value never passes unnoticed on CPU
        from .cuda import resolve_timeout

        resolve_timeout(timeout_s)
    if num_nvl_bytes == 0 and name in ("auto", "cuda") and _low_latency_kernels_fit(num_rdma_bytes, low_latency_mode):
        # DeepEP's low-latency Buffer (no NVLink buffer): the NVSHMEM kernels for the low-latency calls.
        from .cuda import resolve_timeout
        from .low_latency import LowLatencyBackend

        return LowLatencyBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
                                 resolve_timeout(timeout_s))
    world = dist.get_world_size(group)
    if num_nodes > 1 or name == "forwarding":
        return _internode_backend(name, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
                                  world // num_nodes, timeout_s)
    if name == "auto":
        kernels_fit = num_nvl_bytes > 0 and world in SUPPORTED_NVL_RANK_COUNTS
        name = "cuda" if kernels_fit and cuda_backend_available() else "reference"
    if name == "cuda":
        _require_cuda_backend()
        from .cuda import CudaBackend

        return CudaBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank, timeout_s)
    return ReferenceBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)


def _require_cuda_backend() -> None:
    if not cuda_backend_available():
        raise RuntimeError(
            "backend='cuda' needs the compiled extension deepep_megatron._C and a CUDA device; build it with "
            "`DEEPEP_MEGATRON_BUILD_CUDA=1 pip install -e .` on a machine with nvcc and a CUDA torch, "
            "or use backend='reference'"
        )


def _internode_backend(name, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
                       ranks_per_node: int, timeout_s: Optional[float]) -> Backend:
    """The backend of a group over several nodes of ``ranks_per_node`` ranks: node forwarding
    (backends/forwarding.py) with the intranode kernels as its NVLink leg under ``"cuda"`` (and under
    ``"auto"`` when they are built, the buffer has NVLink bytes and a node holds 2, 4 or 8 ranks),
    the reference backend as its NVLink leg under ``"forwarding"``; ``"auto"`` otherwise gives the
    plain reference backend (one all-to-all of the whole group). ``DEEPEP_MEGATRON_RDMA_LEG`` picks the
    RDMA leg (backends/rail.py)."""
    if name == "reference":
        return ReferenceBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)
    kernels_fit = num_nvl_bytes > 0 and ranks_per_node in SUPPORTED_NVL_RANK_COUNTS
    if name == "auto":
        if not (kernels_fit and cuda_backend_available()):
            return ReferenceBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)
        name = "cuda"
    if name == "cuda":
        _require_cuda_backend()
        if ranks_per_node > 1 and not kernels_fit:
            raise ValueError(
                f"backend='cuda' over several nodes runs the intranode kernels inside each node, which need "
                f"num_nvl_bytes > 0 (got {num_nvl_bytes}) and 2, 4 or 8 ranks per node (got {ranks_per_node}); "
                "size num_nvl_bytes with Buffer.get_nvl_size_hint, or use backend='forwarding'"
            )
    from .forwarding import ForwardingBackend
    from .rail import rdma_leg_choice

    return ForwardingBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
                             ranks_per_node=ranks_per_node, node_leg="cuda" if name == "cuda" else "reference",
                             timeout_s=timeout_s, rdma_leg=rdma_leg_choice())


__all__ = [
    "Backend",
    "BACKEND_NAMES",
    "DispatchLayout",
    "DispatchOutput",
    "LowLatencyDispatchOutput",
    "LowLatencyLayout",
    "ReferenceBackend",
    "create_backend",
    "cuda_backend_available",
]
