"""The kernels' buffer layout and limits, read from their one definition.

``include/deepep_megatron_layout.h`` (shipped with the package) defines the NVLink buffer's control
region, the ring slots and the kernels' limits for csrc/. This module parses its
``constexpr <type> kName = <integer>;`` lines at import, so Python sizes buffers and checks limits
with the kernels' own numbers, on a CPU-only install too; nothing here repeats them.
"""
from __future__ import annotations

import os
import re

#: The header every kernel includes.
HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include", "deepep_megatron_layout.h")

_CONSTANT = re.compile(r"^constexpr\s+(?:int|size_t|int32_t|int64_t)\s+(k\w+)\s*=\s*(\d+)\s*;", re.MULTILINE)


def _read_constants(path: str) -> dict[str, int]:
    with open(path, encoding="utf-8") as header:
        found = {name: int(value) for name, value in _CONSTANT.findall(header.read())}
    if not found:
        raise RuntimeError(f"no integer constants found in {path}: the layout header is missing or malformed")
    return found


CONSTANTS: dict[str, int] = _read_constants(HEADER)


def _constant(name: str) -> int:
    try:
        return CONSTANTS[name]
    except KeyError:
        raise RuntimeError(f"{HEADER} does not define {name}; the package and its header are out of step") from None


MAX_RANKS = _constant("kMaxRanks")
MAX_CHANNELS = _constant("kMaxChannels")
MAX_LOCAL_EXPERTS = _constant("kMaxLocalExperts")
MAX_TOPK = _constant("kMaxTopk")
MAX_COMBINE_TOPK = _constant("kMaxCombineTopk")
MAX_SEND_CHUNK = _constant("kMaxSendChunk")
WARPS_PER_BLOCK = _constant("kWarpsPerBlock")
FP8_BLOCK = _constant("kFp8Block")
SLOT_ALIGN = _constant("kSlotAlign")
SOURCE_INDEX_BYTES = _constant("kSourceIndexBytes")
CONTROL_BYTES = _constant("kControlBytes")


def align_up(value: int, alignment: int) -> int:
    """Smallest multiple of ``alignment`` that is >= ``value``."""
    return (value + alignment - 1) // alignment * alignment


def _align_slot(size: int) -> int:
    return align_up(size, SLOT_ALIGN)


def token_slot_bytes(hidden_bytes: int) -> int:
    """Bytes of one ring slot (the header's ``slot_bytes``) for rows of ``hidden_bytes`` =
    ``hidden * max(element_size, 2)``: the row, its FP8 scales, ``MAX_TOPK`` expert ids and weights
    and the source index, each region ``SLOT_ALIGN``-aligned. The GPU tests check it against
    ``_C.slot_bytes``."""
    scales = (hidden_bytes // 2 + FP8_BLOCK - 1) // FP8_BLOCK * 4
    return _align_slot(hidden_bytes) + _align_slot(scales) + 2 * _align_slot(MAX_TOPK * 4) + SOURCE_INDEX_BYTES

# Low-latency (NVSHMEM) region: the header's ll_layout(), mirrored (the GPU tests compare the totals
# with _C.low_latency_layout_bytes).
LL_HEADER_BYTES = _constant("kLLHeaderBytes")
LL_CONTROL_BYTES = _constant("kLLControlBytes")
LL_SIGNAL_BYTES = _constant("kLLSignalBytes")
LL_REGION_ALIGN = _constant("kLLRegionAlign")
LL_MAX_TOKENS = _constant("kLLMaxTokens")
LL_MAX_LOCAL_EXPERTS = _constant("kLLMaxLocalExperts")
LL_MAX_RANKS = _constant("kLLMaxRanks")
LL_MAX_SMEM_TOPK_ENTRIES = _constant("kLLMaxSmemTopkEntries")


def ll_message_bytes(hidden: int, fp8: bool) -> int:
    """Bytes of one low-latency message: the header, the row (e4m3 + fp32 scales, or bf16), 16-aligned."""
    return align_up(LL_HEADER_BYTES + (hidden + hidden // FP8_BLOCK * 4 if fp8 else hidden * 2), 16)


def low_latency_layout(max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> dict[str, int]:
    """The header's ``ll_layout``: byte sizes and offsets of one PE's low-latency region."""
    message = ll_message_bytes(hidden, False)
    off_flags = num_experts * 8
    off_scratch = off_flags + align_up(num_ranks * 8, 16)
    signal = off_scratch + num_experts * 4
    off_data = LL_CONTROL_BYTES + 2 * LL_SIGNAL_BYTES
    combine_rows = num_experts * max_tokens * hidden * 2
    send = align_up(max(max_tokens * message, combine_rows), LL_REGION_ALIGN)
    recv = align_up(max(num_experts * max_tokens * message, combine_rows), LL_REGION_ALIGN)
    half = send + recv
    return {"message_bytes": message, "off_flags": off_flags, "off_scratch": off_scratch, "signal_bytes": signal,
            "off_data": off_data, "send_bytes": send, "recv_bytes": recv, "half_bytes": half,
            "total_bytes": off_data + 2 * half}


# The rail exchange's region (the RDMA leg of node forwarding over NVSHMEM): the header's rail_layout,
# mirrored (the GPU tests compare slab sizes with _C.rail_slab_bytes).
RAIL_CONTROL_BYTES = _constant("kRailControlBytes")
RAIL_SLAB_ALIGN = _constant("kRailSlabAlign")
RAIL_MAX_NODES = _constant("kRailMaxNodes")
#: rows cross the rail in 16-byte vectors: each row is padded to this many bytes
RAIL_ROW_ALIGN = 16


def rail_slab_bytes(num_bytes: int, num_nodes: int) -> int:
    """The header's ``rail_layout(num_bytes, num_nodes).slab_bytes``: one send or receive slab."""
    return (num_bytes - RAIL_CONTROL_BYTES) // (2 * num_nodes) // RAIL_SLAB_ALIGN * RAIL_SLAB_ALIGN


def rail_row_bytes(row_bytes: int, num_scales: int, num_topk: int, num_ranks: int) -> int:
    """Bytes of one row that node forwarding (backends/forwarding.py) puts on the RDMA leg: the
    token's ``row_bytes``, its ``num_scales`` fp32 FP8 scales and its int64 index, padded to 16 bytes
    (the part the NVLink leg carries on), then its ``num_topk`` int64 expert ids and fp32 weights and
    its ``num_ranks`` destination bytes, the whole row padded to 16 bytes."""
    return align_up(align_up(row_bytes + num_scales * 4 + 8, 16) + num_topk * 12 + num_ranks, 16)


def rail_bytes_needed(num_nodes: int, max_tokens: int, row_bytes: int) -> int:
    """NVSHMEM heap bytes the rail exchange needs for ``max_tokens`` tokens per rank of ``row_bytes``
    each, whatever the routing (every token may go to every other node)."""
    slab = align_up(max_tokens * align_up(row_bytes, RAIL_ROW_ALIGN), RAIL_SLAB_ALIGN)
    return RAIL_CONTROL_BYTES + 2 * num_nodes * slab
