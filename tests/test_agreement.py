"""Ranks that call different operations, or the same one on different shapes, get the same clear
ValueError on every rank from the reference backend (its fingerprint exchange), never a hang or a
misread exchange, and the group stays usable."""
from __future__ import annotations

import pytest
import torch

from harness import run_ranks
from oracle import Case, expected_dispatch, make_inputs


def _disagree(rank: int, world_size: int) -> int:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    buffer = Buffer(dist.group.WORLD, backend="reference")
    case = Case(world_size, tokens=(12, 9), hidden=128, num_topk=2, num_experts=4, seed=41)
    x, topk_idx, topk_weights = make_inputs(case, rank)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, case.num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, **layout)
    refused = 0

    # one rank dispatches while the other combines
    with pytest.raises(ValueError, match=r"rank 0: dispatch\(hidden=128.*; rank 1: combine\(hidden=128"):
        if rank == 0:
            buffer.dispatch(x, topk_idx=topk_idx, **layout)
        else:
            buffer.combine(recv_x, handle)
    refused += 1
    # same operation, another hidden size on rank 1
    wide = torch.cat([x, x], dim=1)
    with pytest.raises(ValueError, match=r"rank 0: dispatch\(hidden=128.*; rank 1: dispatch\(hidden=256"):
        buffer.dispatch(x if rank == 0 else wide, topk_idx=topk_idx, **layout)
    refused += 1
    # cached dispatch of bf16 on one rank, of fp32 on the other (row bytes differ)
    with pytest.raises(ValueError, match=r"cached dispatch\(hidden=128, row_bytes=256.*cached dispatch\(hidden=128, row_bytes=512"):
        buffer.dispatch(x if rank == 0 else x.float(), handle=handle)
    refused += 1
    # low-latency calls with different max-token bounds
    ll = Buffer(dist.group.WORLD, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(32, 128, world_size, 4),
                low_latency_mode=True, backend="reference")
    with pytest.raises(ValueError, match=r"low-latency dispatch\(.*max_tokens=16.*max_tokens=32"):
        ll.low_latency_dispatch(x, topk_idx, 16 if rank == 0 else 32, case.num_experts, use_fp8=False)
    refused += 1
    # and the group is still in step: a matching round moves the right rows
    again, *_ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout)
    assert torch.equal(again, expected_dispatch(case, rank).recv_x)
    return refused


def test_mismatched_calls_are_refused_on_every_rank() -> None:
    assert run_ranks(_disagree, 2) == [4, 4]
