"""CPU checks of what runtime v2 put on the Python side: the layout header is the one source of the
buffer geometry, the timeout setting, and reset() on a backend with no device state."""
from __future__ import annotations

import re

import pytest

from deepep_megatron import config, layout
from deepep_megatron.backends.cuda import (DEFAULT_TIMEOUT_S, RECV_ARENA_ENV, TIMEOUT_ENV, resolve_recv_arena_bytes,
                                           resolve_timeout)
from harness import run_ranks


def test_every_integer_constant_of_the_header_is_read() -> None:
    with open(layout.HEADER, encoding="utf-8") as header:
        text = header.read()
    declared = re.findall(r"^constexpr\s+\w+\s+(k\w+)\s*=\s*(\d+)\s*;", text, re.MULTILINE)
    assert declared, "the header declares no integer constants"
    assert {name: int(value) for name, value in declared} == layout.CONSTANTS


def test_config_sizes_buffers_from_the_header() -> None:
    assert config.NVL_CONTROL_BYTES == layout.CONTROL_BYTES == layout.CONSTANTS["kControlBytes"]
    assert config.MAX_TOPK == layout.MAX_TOPK and config.FP8_BLOCK == layout.FP8_BLOCK
    # DeepSeek-V3 rows (hidden 7168 bf16): row + 56 fp32 scales + 16 ids + 16 weights + source index
    assert layout.token_slot_bytes(7168 * 2) == 14336 + 224 + 64 + 64 + 16
    assert layout.token_slot_bytes(256 * 2) == 512 + 16 + 64 + 64 + 16  # 2 scales padded to 16 bytes
    hint = config.Config(24, 48, 256).get_nvl_buffer_size_hint(7168 * 2, 2)
    assert hint >= layout.CONTROL_BYTES + 12 * 2 * 256 * layout.token_slot_bytes(7168 * 2)


def test_timeout_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert resolve_timeout(None) == DEFAULT_TIMEOUT_S == 100.0
    assert resolve_timeout(2) == 2.0
    monkeypatch.setenv(TIMEOUT_ENV, "7.5")
    assert resolve_timeout(None) == 7.5
    assert resolve_timeout(3.0) == 3.0  # the Buffer's argument wins over the environment
    for bad in (0, -1, float("nan"), True, "5"):
        with pytest.raises(ValueError, match="timeout_s"):
            resolve_timeout(bad)
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=TIMEOUT_ENV):
        resolve_timeout(None)


def test_receive_arena_setting() -> None:
    assert resolve_recv_arena_bytes({}) == 0  # no arena unless asked for
    assert resolve_recv_arena_bytes({RECV_ARENA_ENV: str(1 << 30)}) == 1 << 30
    for bad in ("-1", "1GiB", "", "1.5"):
        with pytest.raises(ValueError, match=RECV_ARENA_ENV):
            resolve_recv_arena_bytes({RECV_ARENA_ENV: bad})


def _reference_reset(rank: int, world_size: int) -> bool:
    import torch
    import torch.distributed as dist

    from deepep_megatron import Buffer

    buffer = Buffer(dist.group.WORLD, backend="reference", timeout_s=5.0)
    x = torch.randn(16, 64)
    topk_idx = torch.randint(0, 4, (16, 2))
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 4)
    buffer.reset()  # nothing to clear on the reference backend, and it stays usable
    recv = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                           topk_idx=topk_idx, topk_weights=torch.rand(16, 2))
    return recv[4].num_recv_tokens > 0


def test_reset_and_timeout_on_the_reference_backend() -> None:
    assert run_ranks(_reference_reset, 2) == [True, True]


def _bad_timeout(rank: int, world_size: int) -> str:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    with pytest.raises(ValueError, match="timeout_s") as info:
        Buffer(dist.group.WORLD, backend="reference", timeout_s=-1)
    return str(info.value)


def test_bad_timeout_refused_on_every_backend() -> None:
    assert all("(0, 1e6]" in message for message in run_ranks(_bad_timeout, 2))
