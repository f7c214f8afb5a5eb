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
    low_latency_expert,
    make_inputs,
    reference_cast_back,
    reference_cast_to_fp8,
    reference_pack_ue8m0,
    reference_unpack_ue8m0,
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

    from deepep_megatron import Buffer

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
        # weights: each slot's weight comes back from the one rank that holds its expert, plus exact
        # zeros from the others, so the fp32 sum is the original weight bit for bit (0 where no expert)
        assert torch.equal(combined_w, torch.where(topk_idx >= 0, topk_weights, 0.0))

        # cached dispatch with the handle moves x only, same rows; the other outputs are None
        again, none_idx, none_w, none_counts, none_handle, _ = buffer.dispatch(x, handle=handle)
        assert torch.equal(again, recv_x)
        assert (none_idx, none_w, none_counts, none_handle) == (None, None, None, None)

        # FP8 pair (quantized by the oracle, not by the code under test): data and scales arrive
        # bit-exactly in the same order, also on a rank that receives nothing (0 rows, right widths)
        if case.hidden % 128 == 0:
            x_fp8, scales = reference_cast_to_fp8(x)
            (rx, rs), *_ = buffer.dispatch(
                (x_fp8, scales), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
            )
            exp_fp8, exp_scales = reference_cast_to_fp8(expected_dispatch(case, rank).recv_x)
            assert rx.shape == exp_fp8.shape and rs.shape == exp_scales.shape == (exp_fp8.size(0), case.hidden // 128)
            assert torch.equal(rx.view(torch.uint8), exp_fp8.view(torch.uint8)) and torch.equal(rs, exp_scales)
            (cx, cs), *_ = buffer.dispatch((x_fp8, scales), handle=handle)
            assert torch.equal(cx.view(torch.uint8), rx.view(torch.uint8)) and torch.equal(cs, rs)
        checked += 1
    return checked


@pytest.mark.parametrize("world_size", [2, 4])
def test_dispatch_combine_matches_oracle(world_size: int) -> None:
    assert run_ranks(_dispatch_cases, world_size) == [len(_cases(world_size))] * world_size


#: Low-latency wire formats: (use_fp8, round_scale, use_ue8m0).
LL_WIRES = [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]


def _check_low_latency_receive(case: Case, rank: int, recv_x, recv_count, handle, max_tokens: int, wire) -> torch.Tensor:
    """Check one low-latency dispatch against the oracle; return the bf16 expert outputs [E_local,
    slots, H] that the stand-in experts compute from what arrived (dequantized by the oracle)."""
    use_fp8, round_scale, use_ue8m0 = wire
    world_size, hidden, num_local = case.world_size, case.hidden, case.num_local_experts
    exp = expected_low_latency(case, rank)
    data = recv_x[0] if use_fp8 else recv_x
    assert data.shape == (num_local, world_size * max_tokens, hidden)
    if use_fp8:
        words = -(-hidden // 128 // 4)
        assert recv_x[1].shape == ((num_local, world_size * max_tokens, words) if use_ue8m0 else
                                   (num_local, world_size * max_tokens, hidden // 128))
        assert recv_x[1].dtype == (torch.int32 if use_ue8m0 else torch.float32)
    expert_out = torch.full(data.shape, POISON, dtype=torch.bfloat16)
    for e in range(num_local):
        n = int(recv_count[e])
        assert n == exp.rows[e].size(0), f"expert {e}: {n} rows, want {exp.rows[e].size(0)} ({wire})"
        if use_fp8:
            want_data, want_scales = reference_cast_to_fp8(exp.rows[e], round_scale)
            got_scales = recv_x[1][e, :n]
            assert torch.equal(data[e, :n].view(torch.uint8), want_data.view(torch.uint8)), f"expert {e} e4m3 ({wire})"
            assert torch.equal(got_scales, reference_pack_ue8m0(want_scales) if use_ue8m0 else want_scales), \
                f"expert {e} scales ({wire})"
            fp32_scales = reference_unpack_ue8m0(got_scales, hidden // 128) if use_ue8m0 else got_scales
            seen = reference_cast_back(data[e, :n], fp32_scales)
        else:
            assert torch.equal(data[e, :n], exp.rows[e]), f"expert {e} rows differ"
            seen = data[e, :n]
        expert_out[e, :n] = low_latency_expert(seen, e)
        assert torch.equal(handle.layout.recv_src_info[e, :n].long(), exp.src_tokens[e])
        # (offset << 32) | count per source rank: rank r's rows start after those of ranks < r
        rng = handle.layout.recv_layout_range[e]
        assert torch.equal(rng & 0xFFFFFFFF, exp.per_rank[e]), f"expert {e} counts {rng & 0xFFFFFFFF}"
        assert torch.equal(rng >> 32, torch.cumsum(exp.per_rank[e], 0) - exp.per_rank[e]), f"expert {e} offsets {rng >> 32}"
    return expert_out


def _low_latency_cases(rank: int, world_size: int) -> int:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    cases = [
        (Case(world_size, tokens=tuple(5 + 3 * r for r in range(world_size)), hidden=256, num_topk=4, num_experts=4 * world_size, seed=11), 16),
        (Case(world_size, tokens=(128,) * world_size, hidden=7168, num_topk=8, num_experts=8 * world_size, seed=12, starved_rank=0), 128),
        (Case(world_size, tokens=(0,) + (3,) * (world_size - 1), hidden=128, num_topk=2, num_experts=2 * world_size, seed=13), 4),
        # hidden/128 = 5 scale groups: the packed UE8M0 words end in a partly filled one
        (Case(world_size, tokens=tuple(7 + r for r in range(world_size)), hidden=640, num_topk=3, num_experts=2 * world_size, seed=14), 16),
    ]
    hint = max(Buffer.get_low_latency_rdma_size_hint(m, c.hidden, world_size, c.num_experts) for c, m in cases)
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, backend="reference")
    gen = torch.Generator().manual_seed(100 + rank)
    for case, max_tokens in cases:
        x, topk_idx, topk_weights = make_inputs(case, rank)
        for wire in LL_WIRES:
            use_fp8, round_scale, use_ue8m0 = wire
            for use_hook in (False, True):
                # random starting statistics: the dispatch must add its counts to them, not overwrite
                stats = torch.randint(0, 1000, (case.num_local_experts,), generator=gen, dtype=torch.int32)
                stats_before = stats.clone()
                recv_x, recv_count, handle, _, hook = buffer.low_latency_dispatch(
                    x, topk_idx, max_tokens, case.num_experts, cumulative_local_expert_recv_stats=stats,
                    use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0, return_recv_hook=use_hook,
                )
                if use_hook:  # nothing is received (nor counted) before the hook runs
                    assert torch.equal(stats, stats_before)
                hook()
                assert torch.equal(stats, stats_before + recv_count)
                expert_out = _check_low_latency_receive(case, rank, recv_x, recv_count, handle, max_tokens, wire)

                out = torch.full((x.size(0), case.hidden), POISON, dtype=torch.bfloat16)
                combined, _, chook = buffer.low_latency_combine(
                    expert_out, topk_idx, topk_weights, handle, out=out, return_recv_hook=use_hook
                )
                if use_hook:  # the combine's output stays unfilled (poisoned) until its hook runs
                    assert torch.isnan(out).all() or out.numel() == 0
                chook()
                assert combined.data_ptr() == out.data_ptr()
                assert torch.equal(combined, expected_low_latency_combine(case, rank, use_fp8, round_scale)), wire
    return len(cases)


@pytest.mark.parametrize("world_size", [2, 4])
def test_low_latency_matches_oracle(world_size: int) -> None:
    assert run_ranks(_low_latency_cases, world_size) == [4] * world_size


def test_hook_runs_once_and_event_is_cpu_noop() -> None:
    run_ranks(_hook_once, 2)


def _hook_once(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from deepep_megatron import Buffer, EventOverlap

    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=1 << 24, low_latency_mode=True)
    assert buffer.backend_name == "reference"
    case = Case(world_size, tokens=(4, 4), hidden=128, num_topk=2, num_experts=4)
    x, topk_idx, _ = make_inputs(case, rank)
    stats = torch.zeros(2, dtype=torch.int32)
    _, recv_count, _, event, hook = buffer.low_latency_dispatch(
        x, topk_idx, 8, 4, cumulative_local_expert_recv_stats=stats, return_recv_hook=True, async_finish=True
    )
    assert isinstance(event, EventOverlap)
    with event as entered:  # the context manager hands back the event itself ...
        assert entered is event
    # ... and leaving it waits for the send only: the receive is still the hook's to do
    assert int(stats.sum()) == 0
    hook()
    want = [r.size(0) for r in expected_low_latency(case, rank).rows]
    assert recv_count.tolist() == want and stats.tolist() == want and sum(want) > 0
    with pytest.raises(RuntimeError, match="already called"):
        hook()
    assert stats.tolist() == want  # the refused second call counted nothing


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


def test_async_outputs_found_for_record_stream() -> None:
    """Buffer._run records the compute stream for every tensor of a result (so that neither the
    caching allocator nor the receive arena hands its memory to the communication stream while the
    compute stream still reads it): a DispatchOutput and its layout are dataclasses, the layout's
    backend state a dict, and their tensors must all be found (the fifth session's runs missed them)."""
    from deepep_megatron.backends.base import DispatchLayout, DispatchOutput
    from deepep_megatron.buffer import _tensors_in

    recv_x, scales, ids, weights = (torch.randn(3, 8), torch.rand(3, 1), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2))
    in_rank, per_rank, recv_per_rank, src = (torch.ones(4, 2, dtype=torch.bool), torch.tensor([3, 1]),
                                             torch.tensor([2, 1]), torch.arange(3, dtype=torch.int32))
    send_position = torch.zeros(4, 2, dtype=torch.int32)
    layout = DispatchLayout(in_rank, per_rank, recv_per_rank, src, [3], private={"send_position": send_position, "n": 2})
    found = _tensors_in((DispatchOutput(recv_x, scales, ids, weights, layout), torch.ones(1)))
    want = [recv_x, scales, ids, weights, in_rank, per_rank, recv_per_rank, src, send_position]
    assert len(found) == len(want) + 1
    for tensor in want:
        assert any(t is tensor for t in found), f"a tensor of shape {list(tensor.shape)} was not found"
