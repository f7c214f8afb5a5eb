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


def _align_slot(size: int) -> int:
    return (size + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN


def token_slot_bytes(hidden_bytes: int) -> int:
    """Bytes of one ring slot (the header's ``slot_bytes``) for rows of ``hidden_bytes`` =
    ``hidden * max(element_size, 2)``: the row, its FP8 scales, ``MAX_TOPK`` expert ids and weights
    and the source index, each region ``SLOT_ALIGN``-aligned. The GPU tests check it against
    ``_C.slot_bytes``."""
    scales = (hidden_bytes // 2 + FP8_BLOCK - 1) // FP8_BLOCK * 4
    return _align_slot(hidden_bytes) + _align_slot(scales) + 2 * _align_slot(MAX_TOPK * 4) + SOURCE_INDEX_BYTES
