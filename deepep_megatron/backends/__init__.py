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
    """Build backend ``name``; ``"auto"`` is ``"cuda"`` when :func:`cuda_backend_available`, the buffer
    has NVLink bytes and the group is one node with a rank count the kernels support (2, 4, 8), else
    ``"reference"`` (so an EP1 group, e.g. a one-GPU run of the Megatron dispatcher, still works, and
    so does a group over ``num_nodes`` > 1 nodes, which only the reference backend serves so far).
    A low-latency Buffer without NVLink bytes (DeepEP's ``Buffer(group, 0, num_rdma_bytes,
    low_latency_mode=True)``) gets the NVSHMEM low-latency kernels under ``"auto"`` and ``"cuda"`` when
    they are built (backends/low_latency.py), the reference backend otherwise.
    ``"forwarding"`` is the reference backend's collectives with issue [5/8]'s node forwarding (each
    token crosses to each destination node once, to the rank with its local index, which forwards
    it inside the node: backends/forwarding.py), for groups over ``num_nodes`` nodes of equal size.
    ``timeout_s`` bounds the cuda kernels' waits on peers (None: env or 100 s). Collective: every
    rank of ``group`` must call it."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if timeout_s is not None:  # checked on every backend, so a bad value never passes unnoticed on CPU
        from .cuda import resolve_timeout

        resolve_timeout(timeout_s)
    if num_nvl_bytes == 0 and num_nodes == 1 and name in ("auto", "cuda") and _low_latency_kernels_fit(num_rdma_bytes, low_latency_mode):
        # DeepEP's low-latency Buffer (no NVLink buffer): the NVSHMEM kernels for the low-latency calls.
        from .cuda import resolve_timeout
        from .low_latency import LowLatencyBackend

        return LowLatencyBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
                                 resolve_timeout(timeout_s))
    if name == "auto":
        kernels_fit = num_nvl_bytes > 0 and num_nodes == 1 and dist.get_world_size(group) in SUPPORTED_NVL_RANK_COUNTS
        name = "cuda" if kernels_fit and cuda_backend_available() else "reference"
    if name == "cuda" and num_nodes > 1:
        raise ValueError(
            f"backend='cuda' has intranode kernels only, and this group spans {num_nodes} nodes; use backend='reference' "
            "(or 'auto') until the internode kernels exist, or one node per EP group"
        )
    if name == "cuda":
        if not cuda_backend_available():
            raise RuntimeError(
                "backend='cuda' needs the compiled extension deepep_megatron._C and a CUDA device; build it with "
                "`DEEPEP_MEGATRON_BUILD_CUDA=1 pip install -e .` on a machine with nvcc and a CUDA torch, "
                "or use backend='reference'"
            )
        from .cuda import CudaBackend

        return CudaBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank, timeout_s)
    if name == "forwarding":
        from .forwarding import ForwardingBackend

        return ForwardingBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
                                 ranks_per_node=dist.get_world_size(group) // num_nodes)
    return ReferenceBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)


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
