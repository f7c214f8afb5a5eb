"""Normal and low-latency dispatch/combine through the Buffer API, checked against the oracle.

Each test spawns its ranks once and runs several random cases in them (spawning costs seconds).
"""
from __future__ import annotations

import pytest
import torch

from harness import run_ranks
from oracle import (
    Case,
    expected_combine,
    expected_dispatch,
    expected_low_latency,
    expected_low_latency_combine,
    expert_transform,
    make_inputs,
)

POISON = float("nan")


def _cases(world_size: int) -> list[Case]:
    return [
        Case(world_size, tokens=tuple(17 + 5 * r for r in range(world_size)), hidden=256, num_topk=4, num_experts=8 * world_size // 2, seed=1),
        Case(world_size, tokens=(1,) * world_size, hidden=2048, num_topk=1, num_experts=world_size, seed=2),
        Case(world_size, tokens=tuple(64 for _ in range(world_size)), hidden=7168, num_topk=8, num_experts=32 * world_size, seed=3, dtype=torch.bfloat16),
        Case(world_size, tokens=tuple(40 + r for r in range(world_size)), hidden=384, num_topk=3, num_experts=4 * world_size, seed=4, starved_rank=world_size - 1, dtype=torch.float32),
        Case(world_size, tokens=(0,) + tuple(9 for _ in range(world_size - 1)), hidden=128, num_topk=2, num_experts=2 * world_size, seed=5, drop=0.5, empty_tokens=0.3),
        Case(world_size, tokens=tuple(300 for _ in range(world_size)), hidden=256, num_topk=8, num_experts=256, seed=6),
        Case(world_size, tokens=(4096,) + (1000,) * (world_size - 1), hidden=128, num_topk=6, num_experts=8 * world_size, seed=7),
    ]


def _dispatch_cases(rank: int, world_size: int) -> int:
    import torch.distributed as dist

    from deepep_megatron import Buffer, per_token_cast_to_fp8

    buffer = Buffer(dist.group.WORLD, backend="reference")
    checked = 0
    for case in _cases(world_size):
        x, topk_idx, topk_weights = make_inputs(case, rank)
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, case.num_experts)
        assert per_rdma is None
        owner = torch.where(topk_idx >= 0, topk_idx // case.num_local_experts, -1)
        for r in range(world_size):
            assert torch.equal(in_rank[:, r], (owner == r).any(dim=1))
        assert torch.equal(per_rank, in_rank.sum(0).int())
        assert torch.equal(per_expert, torch.bincount(topk_idx[topk_idx >= 0], minlength=case.num_experts).int())

        for alignment in (1, 4):
            exp = expected_dispatch(case, rank, alignment)
            recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=alignment,
            )
            assert torch.equal(recv_x, exp.recv_x), f"recv_x differs in {case}"
            assert torch.equal(recv_idx, exp.recv_topk_idx)
            assert torch.equal(recv_w, exp.recv_topk_weights)
            assert counts == exp.num_recv_tokens_per_expert
            assert torch.equal(handle.recv_src_idx.long(), exp.recv_src_idx)
            if case.starved_rank == rank:
                assert recv_x.size(0) == 0
            event.current_stream_wait()

        # combine: each rank transforms what it received; sum comes back in fp32 rank order
        y = expert_transform(recv_x, rank)
        combined, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w)
        assert torch.equal(combined, expected_combine(case, rank))
        # weights: the pieces of the original weights come back whole (0 where no expert)
        assert torch.allclose(combined_w, torch.where(topk_idx >= 0, topk_weights, 0.0))

        # cached dispatch with the handle moves x only, same rows
        again, none_idx, none_w, none_counts, none_handle, _ = buffer.dispatch(x, handle=handle)
        assert torch.equal(again, recv_x) and none_idx is None and none_handle is None

        # FP8 pair: data and scales arrive bit-exactly in the same order
        if case.hidden % 128 == 0:
            x_fp8, scales = per_token_cast_to_fp8(x)
            (rx, rs), *_ = buffer.dispatch(
                (x_fp8, scales), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
            )
            exp = expected_dispatch(case, rank)
            exp_fp8, exp_scales = per_token_cast_to_fp8(exp.recv_x) if exp.recv_x.numel() else (rx, rs)
            assert torch.equal(rx.view(torch.uint8), exp_fp8.view(torch.uint8)) and torch.equal(rs, exp_scales)
            (cx, cs), *_ = buffer.dispatch((x_fp8, scales), handle=handle)
            assert torch.equal(cx.view(torch.uint8), rx.view(torch.uint8)) and torch.equal(cs, rs)
        checked += 1
    return checked


@pytest.mark.parametrize("world_size", [2, 4])
def test_dispatch_combine_matches_oracle(world_size: int) -> None:
    assert run_ranks(_dispatch_cases, world_size) == [len(_cases(world_size))] * world_size


def _low_latency_cases(rank: int, world_size: int) -> int:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    cases = [
        (Case(world_size, tokens=tuple(5 + 3 * r for r in range(world_size)), hidden=256, num_topk=4, num_experts=4 * world_size, seed=11), 16),
        (Case(world_size, tokens=(128,) * world_size, hidden=7168, num_topk=8, num_experts=8 * world_size, seed=12, starved_rank=0), 128),
        (Case(world_size, tokens=(0,) + (3,) * (world_size - 1), hidden=128, num_topk=2, num_experts=2 * world_size, seed=13), 4),
    ]
    hint = max(Buffer.get_low_latency_rdma_size_hint(m, c.hidden, world_size, c.num_experts) for c, m in cases)
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, backend="reference")
    for case, max_tokens in cases:
        x, topk_idx, topk_weights = make_inputs(case, rank)
        for use_fp8 in (False, True):
            for use_hook in (False, True):
                recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
                    x, topk_idx, max_tokens, case.num_experts, use_fp8=use_fp8, return_recv_hook=use_hook
                )
                hook()
                data = recv_x[0] if use_fp8 else recv_x
                assert data.shape == (case.num_local_experts, world_size * max_tokens, case.hidden)
                rows, srcs = expected_low_latency(case, rank, max_tokens, use_fp8)
                for e in range(case.num_local_experts):
                    n = int(recv_count[e])
                    assert n == rows[e].size(0)
                    got = data[e, :n].view(torch.uint8) if use_fp8 else data[e, :n]
                    want = rows[e].view(torch.uint8) if use_fp8 else rows[e]
                    assert torch.equal(got, want), f"expert {e} rows differ (fp8={use_fp8})"
                    assert torch.equal(handle.layout.recv_src_info[e, :n].long(), srcs[e])
                    rng = handle.layout.recv_layout_range[e]
                    assert int((rng & 0xFFFFFFFF).sum()) == n
                if use_fp8:
                    continue
                expert_out = torch.stack([(recv_x[e].float() * (e + 1)).to(torch.bfloat16) for e in range(case.num_local_experts)])
                out = torch.full((x.size(0), case.hidden), POISON, dtype=torch.bfloat16)
                combined, _, chook = buffer.low_latency_combine(
                    expert_out, topk_idx, topk_weights, handle, out=out, return_recv_hook=use_hook
                )
                chook()
                assert combined.data_ptr() == out.data_ptr()
                assert torch.equal(combined, expected_low_latency_combine(case, rank))
    return len(cases)


@pytest.mark.parametrize("world_size", [2, 4])
def test_low_latency_matches_oracle(world_size: int) -> None:
    assert run_ranks(_low_latency_cases, world_size) == [3] * world_size


def test_hook_runs_once_and_event_is_cpu_noop() -> None:
    run_ranks(_hook_once, 2)


def _hook_once(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from deepep_megatron import Buffer, EventOverlap

    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=1 << 24, low_latency_mode=True)
    assert buffer.backend_name == "reference"
    case = Case(world_size, tokens=(4, 4), hidden=128, num_topk=2, num_experts=4)
    x, topk_idx, _ = make_inputs(case, rank)
    _, _, _, event, hook = buffer.low_latency_dispatch(x, topk_idx, 8, 4, return_recv_hook=True, async_finish=True)
    assert isinstance(event, EventOverlap) and event.event is None
    with event:
        pass
    hook()
    with pytest.raises(RuntimeError, match="already called"):
        hook()


def _auto_backend_for_unsupported_rank_count(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from deepep_megatron import backends

    # Pretend the kernels are built: "auto" must still pick the reference backend for a rank count
    # the intranode kernels do not support (EP1 of a one-GPU run, 3 ranks).
    backends.cuda_backend_available = lambda: True
    runtime = backends.create_backend("auto", dist.group.WORLD, 1 << 20, 0, False, 24)
    assert runtime.name == "reference", runtime.name


@pytest.mark.parametrize("world_size", [1, 3])
def test_auto_backend_falls_back_for_unsupported_rank_counts(world_size: int) -> None:
    run_ranks(_auto_backend_for_unsupported_rank_count, world_size)
