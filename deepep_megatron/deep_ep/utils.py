"""``deep_ep.utils``: DeepEP's event helpers and its NVLink check, as DeepEP-style code imports them."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..events import EventHandle, EventOverlap

#: DeepEP refuses groups larger than this on PCIe GPUs, which pair their NVLinks two by two.
PCIE_MAX_NVLINK_GROUP = 2


def check_nvlink_connections(group: dist.ProcessGroup) -> None:
    """DeepEP's check before it opens NVLink buffers: on PCIe GPUs (NVLink bridges connect pairs
    only) a group may have at most two ranks. Raises RuntimeError naming the group size otherwise;
    nothing to check without CUDA."""
    if not torch.cuda.is_available() or "PCIE" not in torch.cuda.get_device_name().upper():
        return
    if group.size() > PCIE_MAX_NVLINK_GROUP:
        raise RuntimeError(
            f"{torch.cuda.get_device_name()} GPUs pair their NVLinks two by two, so an NVLink group may have at most "
            f"{PCIE_MAX_NVLINK_GROUP} ranks, got {group.size()}; use an EP group of 2 or backend='reference'"
        )


__all__ = ["EventHandle", "EventOverlap", "check_nvlink_connections"]
