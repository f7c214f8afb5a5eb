"""The low-latency region's layout (the header's ll_layout, mirrored by layout.low_latency_layout) and
the choice between the NVSHMEM kernels and the reference backend, on CPU."""
from __future__ import annotations

import pytest

from deepep_megatron import Buffer
from deepep_megatron.backends.low_latency import MAX_DEFAULT_BLOCKS, low_latency_blocks, unavailable_reason
from deepep_megatron.layout import LL_CONTROL_BYTES, LL_SIGNAL_BYTES, ll_message_bytes, low_latency_layout


@pytest.mark.parametrize("shape", [(128, 7168, 2, 64), (8, 256, 4, 8), (3, 136, 8, 16), (1024, 4096, 8, 288)])
def test_hint_is_the_layout_total(shape) -> None:
    layout = low_latency_layout(*shape)
    assert Buffer.get_low_latency_rdma_size_hint(*shape) == layout["total_bytes"]
    max_tokens, hidden, num_ranks, num_experts = shape
    # signals at fixed offsets, before the data; both halves of data after them
    assert layout["off_data"] == LL_CONTROL_BYTES + 2 * LL_SIGNAL_BYTES
    assert layout["signal_bytes"] <= LL_SIGNAL_BYTES
    assert layout["total_bytes"] == layout["off_data"] + 2 * (layout["send_bytes"] + layout["recv_bytes"])
    # the send region holds the dispatch staging and the zero-copy combine rows; recv the slots and the rows back
    assert layout["send_bytes"] >= max(max_tokens * layout["message_bytes"], num_experts * max_tokens * hidden * 2)
    assert layout["recv_bytes"] >= num_experts * max_tokens * layout["message_bytes"]
    assert all(layout[k] % 128 == 0 for k in ("send_bytes", "recv_bytes", "off_data"))


def test_message_bytes() -> None:
    assert ll_message_bytes(7168, True) == 16 + 7168 + 56 * 4
    assert ll_message_bytes(7168, False) == 16 + 7168 * 2
    assert ll_message_bytes(136, False) % 16 == 0


def test_reference_serves_low_latency_without_nvshmem() -> None:
    assert unavailable_reason(1 << 20, False) == "the Buffer was created with low_latency_mode=False"
    assert "num_rdma_bytes" in unavailable_reason(0, True)
    reason = unavailable_reason(1 << 20, True)
    assert reason is None or "NVSHMEM" in reason  # a CPU-only install has no NVSHMEM build


def test_low_latency_blocks_default_and_override() -> None:
    # default: the GPU's SMs over the ranks sharing it, less 2, at most MAX_DEFAULT_BLOCKS
    assert low_latency_blocks(None, 132, 1) == MAX_DEFAULT_BLOCKS
    assert low_latency_blocks("", 132, 2) == min(MAX_DEFAULT_BLOCKS, 132 // 2 - 2)
    assert low_latency_blocks(None, 132, 8) == 132 // 8 - 2
    assert low_latency_blocks(None, 132, 200) == 1
    assert low_latency_blocks("32", 132, 2) == 32
    assert low_latency_blocks("66", 132, 2) == 66  # every rank's blocks fit exactly


@pytest.mark.parametrize("override", ["128", "67", "0", "-3", "many"])
def test_low_latency_blocks_override_that_cannot_fit_is_refused(override: str) -> None:
    # 2 ranks on a 132-SM GPU: 67+ blocks each would leave some receive block spinning for senders
    # that can never be scheduled (a hang until the kernel timeout), so it is refused up front
    with pytest.raises(ValueError, match="DEEPEP_MEGATRON_LL_SMS"):
        low_latency_blocks(override, 132, 2)
