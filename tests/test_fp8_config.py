"""FP8 cast round trip, UE8M0 scales, Config checks and size hints (single process)."""
from __future__ import annotations

import re

import pytest
import torch

from deepep_megatron import Buffer, Config, per_token_cast_back, per_token_cast_to_fp8
from deepep_megatron.config import get_low_latency_rdma_size_hint
from deepep_megatron.fp8 import pack_ue8m0, unpack_ue8m0
from harness import run_ranks
from oracle import reference_cast_back, reference_cast_to_fp8, reference_pack_ue8m0


@pytest.mark.parametrize("hidden", [128, 2048, 7168])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_fp8_round_trip_error_is_bounded(hidden: int, use_ue8m0: bool) -> None:
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(64, hidden, generator=g) * torch.logspace(-3, 3, 64).unsqueeze(1)).to(torch.bfloat16)
    x_fp8, scales = per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    assert x_fp8.dtype == torch.float8_e4m3fn and scales.shape == (64, hidden // 128)
    back = per_token_cast_back(x_fp8, scales, torch.float32)
    blocks = x.float().view(64, -1, 128)
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 of the block max (plus bf16 rounding),
    # doubled with power-of-two scales that leave up to one binade unused.
    bound = blocks.abs().amax(-1, keepdim=True) * (2**-4) * (2 if use_ue8m0 else 1) * 1.01
    assert ((back.view(64, -1, 128) - blocks).abs() <= bound).all()
    if use_ue8m0:
        assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)


@pytest.mark.parametrize("num_tokens", [0, 1, 37])
@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_cast_equals_the_oracle(num_tokens: int, round_scale: bool) -> None:
    """per_token_cast_to_fp8 / cast_back / pack_ue8m0 / unpack_ue8m0 against the oracle's own
    implementation of the format, bit for bit (0 tokens included: a rank may have none)."""
    g = torch.Generator().manual_seed(7 + num_tokens)
    x = (torch.randn(num_tokens, 640, generator=g) * torch.logspace(-4, 4, 640).flip(0)).to(torch.bfloat16)
    data, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    want_data, want_scales = reference_cast_to_fp8(x, round_scale)
    assert torch.equal(data.view(torch.uint8), want_data.view(torch.uint8)) and torch.equal(scales, want_scales)
    # fp32 back: one product per element on both sides, so equal bit for bit
    assert torch.equal(per_token_cast_back(data, scales, torch.float32), reference_cast_back(want_data, want_scales))
    if round_scale:  # 640 / 128 = 5 groups: the second packed word is partly padding
        packed = pack_ue8m0(scales)
        assert torch.equal(packed, reference_pack_ue8m0(want_scales)) and packed.shape == (num_tokens, 2)
        assert torch.equal(unpack_ue8m0(packed, 5), want_scales)


def test_fp8_all_zero_block_stays_finite() -> None:
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    x[1, 128:] = 3.0
    x_fp8, scales = per_token_cast_to_fp8(x)
    back = per_token_cast_back(x_fp8, scales)
    assert torch.isfinite(scales).all() and torch.equal(back, x)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: per_token_cast_to_fp8(torch.randn(4, 100)), ValueError, "divisible by 128"),
        (lambda: per_token_cast_to_fp8(torch.randn(4, 2, 128)), ValueError, "2-D"),
        (lambda: per_token_cast_to_fp8(torch.ones(4, 128, dtype=torch.int32)), TypeError, "bf16/fp16/fp32"),
        (lambda: per_token_cast_back(torch.randn(4, 128), torch.ones(4, 1)), TypeError, "x_fp8"),
        (lambda: per_token_cast_back(torch.randn(4, 128).to(torch.float8_e4m3fn), torch.ones(4, 2)), ValueError, "scales must have shape"),
        (lambda: Config(num_sms=7), ValueError, "even"),
        (lambda: Config(num_sms=20, num_max_nvl_chunked_send_tokens=300), ValueError, "num_max_nvl_chunked_send_tokens"),
        (lambda: Buffer.set_num_sms(3), ValueError, "even"),
        (lambda: get_low_latency_rdma_size_hint(0, 7168, 8, 256), ValueError, "num_max_dispatch_tokens_per_rank"),
    ],
)
def test_bad_single_process_input(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_size_hints_grow_with_what_they_carry() -> None:
    config = Buffer.get_dispatch_config(8)
    small = config.get_nvl_buffer_size_hint(2048 * 2, 8)
    assert small < config.get_nvl_buffer_size_hint(7168 * 2, 8)
    assert small < Config(num_sms=40).get_nvl_buffer_size_hint(2048 * 2, 8)
    assert get_low_latency_rdma_size_hint(128, 7168, 8, 256) > get_low_latency_rdma_size_hint(64, 7168, 8, 256)


def _hint_is_the_minimum(rank: int, world_size: int, hidden: int) -> None:
    import torch.distributed as dist

    hint = Buffer.get_nvl_size_hint(hidden * 2, world_size)
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    topk_idx = torch.tensor([[0, 3], [1, -1], [2, 0], [-1, -1], [3, 1]])
    ok, short = Buffer(dist.group.WORLD, num_nvl_bytes=hint), Buffer(dist.group.WORLD, num_nvl_bytes=hint - 1)
    per_rank, _, per_expert, in_rank, _ = ok.get_dispatch_layout(topk_idx, 4)
    layout = dict(topk_idx=topk_idx, topk_weights=torch.rand(5, 2), num_tokens_per_rank=per_rank,
                  is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, _, _, handle, _ = ok.dispatch(x, **layout)  # the hint is enough for both directions
    ok.combine(recv_x, handle)
    # one byte less is refused (by the dispatch, or else by its combine), naming the hint as needed
    with pytest.raises(RuntimeError, match=r"needs \d+ bytes of NVLink buffer") as refused:
        short_recv_x, _, _, _, short_handle, _ = short.dispatch(x, **layout)
        short.combine(short_recv_x, short_handle)
    assert int(re.search(r"needs (\d+) bytes", str(refused.value)).group(1)) == hint


@pytest.mark.parametrize("hidden", [256, 7168])
def test_nvl_size_hint_is_the_minimum_the_checks_accept(hidden: int) -> None:
    run_ranks(_hint_is_the_minimum, 2, hidden)


def test_set_num_sms_changes_default_configs() -> None:
    before = Buffer.num_sms
    try:
        Buffer.set_num_sms(24)
        assert Buffer.get_dispatch_config(2).num_sms == 24 and Buffer.get_combine_config(4).num_sms == 24
    finally:
        Buffer.set_num_sms(before)


def test_power_of_two_scales_round_up_exactly() -> None:
    """round_scale / UE8M0: the smallest power of two >= the scale, also one ulp above a power of two
    (where exp2(ceil(log2(s))) in fp32 rounds down, which lets the block's max overflow e4m3)."""
    from deepep_megatron.fp8 import round_up_to_power_of_two

    powers = torch.exp2(torch.arange(-30, 30, dtype=torch.float32))
    above = torch.nextafter(powers, torch.full_like(powers, float("inf")))
    below = torch.nextafter(powers, torch.zeros_like(powers))
    assert torch.equal(round_up_to_power_of_two(powers), powers)
    assert torch.equal(round_up_to_power_of_two(above), powers * 2)
    assert torch.equal(round_up_to_power_of_two(below), powers)
