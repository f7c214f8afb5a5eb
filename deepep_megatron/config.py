"""Tuning knobs of the normal (high-throughput) kernels and the buffer sizes they need.

A :class:`Config` says how many SMs a dispatch/combine kernel may occupy and how the per-(channel,
peer) ring buffers in the NVLink buffer are chunked. The size hints turn a config into the number of
bytes a :class:`~deepep_megatron.Buffer` must be created with, so callers can size buffers up front
and a too-small buffer is reported before any kernel runs.

This module is pure arithmetic over the kernels' layout (``layout.py``, read from their header).
"""
from __future__ import annotations

from dataclasses import dataclass

from .layout import CONTROL_BYTES, FP8_BLOCK, MAX_TOPK, align_up, ll_message_bytes, low_latency_layout, token_slot_bytes  # noqa: F401 - re-exported

# FP8_BLOCK, MAX_TOPK and token_slot_bytes are re-exported: callers import them from here.
#: Rank counts the intranode kernels accept (ranks of one NVLink domain).
SUPPORTED_NVL_RANK_COUNTS = (2, 4, 8)
#: GPUs of one node that DeepEP's size hints assume (its NUM_MAX_NVL_PEERS).
RANKS_PER_NODE = 8
#: Alignment (bytes) of every region in the communication buffers.
BUFFER_ALIGN = 128
#: Bytes of the control region at the start of every NVLink buffer (the layout header's kControlBytes).
NVL_CONTROL_BYTES = CONTROL_BYTES


def nvl_buffer_bytes(num_channels: int, num_ranks: int, num_slots: int, hidden_bytes: int) -> int:
    """Bytes of one rank's NVLink buffer (deepep_megatron_layout.h): the control region of
    :data:`NVL_CONTROL_BYTES`, then ``num_channels x num_ranks`` rings of ``num_slots`` slots of
    :func:`token_slot_bytes`."""
    return NVL_CONTROL_BYTES + num_channels * num_ranks * num_slots * token_slot_bytes(hidden_bytes)


@dataclass(frozen=True)
class Config:
    """Kernel configuration for one dispatch or combine (DeepEP-compatible field names).

    Attributes:
        num_sms: SMs (thread blocks) the kernel occupies; two blocks form one channel, so this
            must be even. Each channel moves one contiguous slice of the tokens.
        num_max_nvl_chunked_send_tokens: tokens a sender moves per step into a peer's ring.
        num_max_nvl_chunked_recv_tokens: slots in each per-(channel, peer) ring buffer.
        num_max_rdma_chunked_send_tokens / num_max_rdma_chunked_recv_tokens: the same for the
            RDMA leg of the internode kernels.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 128

    def __post_init__(self) -> None:
        if self.num_sms <= 0 or self.num_sms % 2 != 0:
            raise ValueError(f"Config.num_sms must be a positive even number (two SMs per channel), got {self.num_sms}")
        if not 0 < self.num_max_nvl_chunked_send_tokens < self.num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                "Config needs 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, got "
                f"{self.num_max_nvl_chunked_send_tokens} and {self.num_max_nvl_chunked_recv_tokens}"
            )
        if not 0 < self.num_max_rdma_chunked_send_tokens <= self.num_max_rdma_chunked_recv_tokens:
            raise ValueError(
                "Config needs 0 < num_max_rdma_chunked_send_tokens <= num_max_rdma_chunked_recv_tokens, got "
                f"{self.num_max_rdma_chunked_send_tokens} and {self.num_max_rdma_chunked_recv_tokens}"
            )

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer one rank needs for this config (the ``cuda`` backend's exact layout).

        Layout per rank (include/deepep_megatron_layout.h): a fixed control region of :data:`NVL_CONTROL_BYTES`
        (barrier signals, notify counts, per channel/peer head and tail counters) followed by
        ``num_channels x num_ranks`` rings of ``num_max_nvl_chunked_recv_tokens`` slots of
        :func:`token_slot_bytes`. Combine reuses the same rings (its slots are smaller).
        """
        if hidden_bytes <= 0:
            raise ValueError(f"hidden_bytes must be positive, got {hidden_bytes}")
        if num_ranks <= 0:
            raise ValueError(f"num_ranks must be positive, got {num_ranks}")
        needed = nvl_buffer_bytes(self.num_channels, num_ranks, self.num_max_nvl_chunked_recv_tokens, hidden_bytes)
        return align_up(needed, BUFFER_ALIGN)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, ranks_per_node: int = RANKS_PER_NODE) -> int:
        """DeepEP's sizing of the RDMA (NVSHMEM) buffer for its chunked internode rings, for a group of
        ``num_ranks`` ranks in all, ``ranks_per_node`` to a node (0 when the group fits in one node);
        kept so that code written for DeepEP sizes its Buffer the same way. Node forwarding here needs
        no RDMA buffer with its default RDMA leg (the rail's collective); its NVSHMEM leg
        (``DEEPEP_MEGATRON_RDMA_LEG=nvshmem``) holds a whole call's rows per node and needs
        ``deepep_megatron.layout.rail_bytes_needed(nodes, tokens, row bytes)``, which its error names
        when the Buffer has less."""
        if num_ranks <= 0 or ranks_per_node <= 0:
            raise ValueError(f"num_ranks and ranks_per_node must be positive, got {num_ranks} and {ranks_per_node}")
        if num_ranks <= ranks_per_node:
            return 0
        if num_ranks % ranks_per_node != 0:
            raise ValueError(f"num_ranks={num_ranks} must be a multiple of ranks_per_node={ranks_per_node} (whole nodes)")
        num_rdma_ranks = num_ranks // ranks_per_node
        slots = self.num_channels * num_rdma_ranks * self.num_max_rdma_chunked_recv_tokens * 2  # send + recv
        return align_up(slots * token_slot_bytes(hidden_bytes) + BUFFER_ALIGN * num_rdma_ranks, BUFFER_ALIGN)


# Defaults per rank count: (send chunk, ring slots). A dispatch or combine sender block splits its 24
# warps over the R-1 peers (24, 8, 3 warps per peer for R = 2, 4, 8) and moves a chunk one token per
# warp, so chunks are multiples of those group sizes. For 2 ranks: combine 24 was tuned on H200 x2
# with scripts/bench_intranode.py; dispatch 48 was picked on one H100 with 2 ranks under MPS (24 and
# 48 within noise; docs/perf.md), not yet over NVLink. For 4 and 8 ranks they are near DeepEP's
# published intranode defaults, not yet tuned here. The SM count is what ``Buffer.set_num_sms`` last set (20
# unless changed).
_DISPATCH_CHUNKS = {2: (48, 256), 4: (8, 256), 8: (6, 256)}
_COMBINE_CHUNKS = {2: (24, 256), 4: (8, 256), 8: (6, 256)}


def _default_config(table: dict[int, tuple[int, int]], num_ranks: int, num_sms: int) -> Config:
    send, recv = table.get(num_ranks, (6, 256))
    return Config(num_sms, send, recv, 6, 128)


def default_dispatch_config(num_ranks: int, num_sms: int = 20) -> Config:
    """Recommended dispatch config for ``num_ranks`` ranks."""
    return _default_config(_DISPATCH_CHUNKS, num_ranks, num_sms)


def default_combine_config(num_ranks: int, num_sms: int = 20) -> Config:
    """Recommended combine config for ``num_ranks`` ranks."""
    return _default_config(_COMBINE_CHUNKS, num_ranks, num_sms)


def low_latency_message_bytes(hidden: int, use_fp8: bool) -> int:
    """Bytes of one token message of the low-latency kernels: a 16-byte header (source token
    index) then the row, bf16 or e4m3 with its per-128-channel fp32 scales (the layout header's
    ``ll_message_bytes``)."""
    return ll_message_bytes(hidden, use_fp8)


def get_low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Bytes of RDMA (NVSHMEM) buffer one rank needs for low-latency dispatch + combine: the layout
    header's ``ll_layout(...).total_bytes``.

    A control block, then two halves (double buffering, so consecutive calls never overwrite data a
    peer is still reading), each with a send region (this rank's cast tokens, or the combine rows
    ``[E_local, R * max_tokens, H]`` bf16 that a zero-copy combine sends from), a receive region of
    ``num_experts x max_tokens`` messages (one slot per (local expert, source rank, token); combine's
    rows back alias it) and the signals. Sized for the larger of the bf16 dispatch and the combine.
    """
    for name, value in (
        ("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
        ("hidden", hidden),
        ("num_ranks", num_ranks),
        ("num_experts", num_experts),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    return low_latency_layout(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)["total_bytes"]
