"""deepep_megatron.Buffer against DeepEP v1.2.1's documented semantics (its README and docstrings),
on the reference backend: indexable handles, layout-only dispatch, ``num_worst_tokens``,
``combine(bias=)``, ``capture``/``previous_event``, ``explicitly_destroy``, ``comm``, the size hints,
and the low-latency statistics, zero-copy combine and UE8M0 scales.

Every expectation is computed here from every rank's inputs (tests/oracle.py regenerates them), by
plain loops that share no code with the package.
"""
from __future__ import annotations

import gc
import warnings

import pytest
import torch

from harness import run_ranks
from oracle import Case, expected_dispatch, make_inputs

POISON = -7.0


def _routing_counts(case: Case) -> torch.Tensor:
    """[R, R]: tokens rank s sends to rank d (a token goes to a rank once, whatever its top-k)."""
    counts = torch.zeros(case.world_size, case.world_size, dtype=torch.int64)
    for s in range(case.world_size):
        _, topk_idx, _ = make_inputs(case, s)
        for t in range(topk_idx.size(0)):
            for d in {int(e) // case.num_local_experts for e in topk_idx[t].tolist() if e >= 0}:
                counts[s, d] += 1
    return counts


def _in_rank(case: Case, rank: int) -> torch.Tensor:
    _, topk_idx, _ = make_inputs(case, rank)
    owner = torch.where(topk_idx >= 0, topk_idx // case.num_local_experts, -1)
    return torch.stack([(owner == d).any(dim=1) for d in range(case.world_size)], dim=1)


def _channel_bounds(num_tokens: int, num_channels: int) -> list[tuple[int, int]]:
    """DeepEP's channel split: ceil(T / C) tokens a channel, the last ones short or empty."""
    per = -(-num_tokens // num_channels)
    return [(min(per * c, num_tokens), min(per * c + per, num_tokens)) for c in range(num_channels)]


def _layout(buffer, topk_idx, num_experts):
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    return {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}


# ---------------------------------------------------------------------------------------- handles
def _handle_items(rank: int, world_size: int) -> int:
    import torch.distributed as dist

    from deepep_megatron import Buffer, Config

    case = Case(world_size, tokens=tuple(37 + 11 * r for r in range(world_size)), hidden=128, num_topk=3,
                num_experts=4 * world_size, seed=5, starved_rank=world_size - 1)
    buffer = Buffer(dist.group.WORLD, backend="reference")
    x, topk_idx, topk_weights = make_inputs(case, rank)
    num_channels = 3
    config = Config(2 * num_channels, 6, 256)
    _, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, config=config,
                                            **_layout(buffer, topk_idx, case.num_experts))
    assert len(handle) == 6
    rank_prefix, channel_prefix, recv_channel_prefix, recv_src_idx, in_rank, send_head = handle  # unpackable
    assert handle[0] is rank_prefix and handle[-1] is send_head

    counts = _routing_counts(case)
    assert rank_prefix.dtype == torch.int32 and torch.equal(rank_prefix.long(), counts.cumsum(0))
    assert torch.equal(in_rank, _in_rank(case, rank))
    assert torch.equal(recv_src_idx.long(), expected_dispatch(case, rank).recv_src_idx)

    # channel_prefix_matrix[r, c]: my tokens of channels 0..c that go to rank r; send_head[t, r]: t's
    # position among its channel's tokens to r (-1: not sent there).
    bounds = _channel_bounds(x.size(0), num_channels)
    want_prefix = torch.zeros(world_size, num_channels, dtype=torch.int64)
    want_head = torch.full((x.size(0), world_size), -1, dtype=torch.int64)
    for r in range(world_size):
        total = 0
        for c, (start, end) in enumerate(bounds):
            position = 0
            for t in range(start, end):
                if in_rank[t, r]:
                    want_head[t, r] = position
                    position += 1
            total += position
            want_prefix[r, c] = total
    assert torch.equal(channel_prefix.long(), want_prefix)
    assert torch.equal(send_head.long(), want_head)

    # recv_channel_prefix_matrix[s, c]: the row of recv_x where source s's channel c starts.
    want_recv = torch.zeros(world_size, num_channels, dtype=torch.int64)
    row = 0
    for s in range(world_size):
        src_in_rank = _in_rank(case, s)[:, rank]
        for c, (start, end) in enumerate(_channel_bounds(case.tokens[s], num_channels)):
            want_recv[s, c] = row
            row += int(src_in_rank[start:end].sum())
    assert torch.equal(recv_channel_prefix.long(), want_recv)
    return int(counts[:, rank].sum())


@pytest.mark.parametrize("world_size", [2, 4])
def test_dispatch_handle_indexes_as_deepep(world_size: int) -> None:
    received = run_ranks(_handle_items, world_size)
    assert received[-1] == 0 and sum(received) > 0  # the starved rank received nothing, the others did


# ------------------------------------------------------------ layout-only, num_worst_tokens, bias
def _normal_modes(rank: int, world_size: int) -> int:
    import torch.distributed as dist

    from deepep_megatron import Buffer, per_token_cast_to_fp8
    from deepep_megatron.fp8 import pack_ue8m0

    case = Case(world_size, tokens=(29, 41), hidden=256, num_topk=4, num_experts=8, seed=9)
    buffer = Buffer(dist.group.WORLD, backend="reference")
    x, topk_idx, topk_weights = make_inputs(case, rank)
    layout = _layout(buffer, topk_idx, case.num_experts)
    want = expected_dispatch(case, rank)
    n = want.recv_x.size(0)

    # Layout-only: no expert ids; rows and per-expert counts as with them.
    for payload in (x, per_token_cast_to_fp8(x)):
        recv_x, recv_idx, recv_w, per_expert, handle, _ = buffer.dispatch(payload, **layout)
        assert recv_idx is None and recv_w is None and per_expert == want.num_recv_tokens_per_expert
        got = recv_x[0] if isinstance(recv_x, tuple) else recv_x
        ref = per_token_cast_to_fp8(want.recv_x)[0] if isinstance(recv_x, tuple) else want.recv_x
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    # FP8 with UE8M0 scales packed four to an int32, passed column-major as DeepEP's tests do
    x_q, x_s = per_token_cast_to_fp8(x, use_ue8m0=True)
    packed = pack_ue8m0(x_s)
    (recv_q, recv_s), *_ = buffer.dispatch((x_q, packed.t().contiguous().t()), topk_idx=topk_idx, **layout)
    want_q, want_s = per_token_cast_to_fp8(want.recv_x, use_ue8m0=True)
    assert recv_s.dtype == torch.int32 and torch.equal(recv_s, pack_ue8m0(want_s))
    assert torch.equal(recv_q.view(torch.uint8), want_q.view(torch.uint8))
    with pytest.raises(ValueError, match=r"must have shape \[\d+, 1\] for hidden=256"):
        buffer.dispatch((x_q, torch.cat([packed, packed], dim=1)), topk_idx=topk_idx, **layout)
    with pytest.raises(ValueError, match="topk_weights was given without topk_idx"):
        buffer.dispatch(x, topk_weights=topk_weights, **layout)

    # num_worst_tokens: static row count, real rows first, idx -1 past them, empty per-expert list.
    worst = sum(case.tokens)
    recv_x, recv_idx, recv_w, per_expert, worst_handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=worst, **layout)
    assert per_expert == [] and recv_x.shape == (worst, case.hidden) and recv_idx.shape == (worst, case.num_topk)
    assert torch.equal(recv_x[:n], want.recv_x) and torch.equal(recv_idx[:n], want.recv_topk_idx)
    assert torch.equal(recv_w[:n], want.recv_topk_weights) and bool((recv_idx[n:] == -1).all())
    assert worst_handle[3].shape == (worst,) and bool((worst_handle[3][n:] == -1).all())
    cached, *rest = buffer.dispatch(x, handle=worst_handle)
    assert rest[:4] == [None, None, None, None] and cached.shape == (worst, case.hidden) and torch.equal(cached[:n], want.recv_x)
    # combine of a worst-size handle reads the real rows only: poisoned padding changes nothing
    expert_out = torch.cat([want.recv_x, torch.full((worst - n, case.hidden), POISON, dtype=x.dtype)])
    combined, _, _ = buffer.combine(expert_out, worst_handle)
    exact, _, _ = buffer.combine(want.recv_x, buffer.dispatch(x, topk_idx=topk_idx, **layout)[4])
    assert torch.equal(combined, exact)
    assert n > 1  # so one worst-case row is too few on every rank
    with pytest.raises(RuntimeError, match=f"rank {rank} received {n} rows but num_worst_tokens=1"):
        buffer.dispatch(x, topk_idx=topk_idx, num_worst_tokens=1, **layout)
    with pytest.raises(ValueError, match="num_worst_tokens needs topk_idx"):
        buffer.dispatch(x, num_worst_tokens=worst, **layout)

    # bias: rank sum and biases added in fp32, rounded once. The experts return their rows as they
    # came, so each token's rank sum is (ranks it went to) * x, exact in fp32.
    sent_to = layout["is_token_in_rank"].sum(dim=1, keepdim=True).float()
    g = torch.Generator().manual_seed(100 + rank)
    b0, b1 = (torch.randn(x.shape, generator=g).to(x.dtype) for _ in range(2))
    _, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, **layout)
    for bias, terms in ((b0, [b0]), ((b0, b1), [b0, b1])):
        want_sum = sent_to * x.float()
        for b in terms:
            want_sum = want_sum + b.float()
        combined, _, _ = buffer.combine(want.recv_x, handle, bias=bias)
        assert combined.dtype == x.dtype and torch.equal(combined, want_sum.to(x.dtype))
    # the same through a Buffer sized for bf16 rows (the fp32 sum then moves in column slices)
    sized = Buffer(dist.group.WORLD, num_nvl_bytes=Buffer.get_nvl_size_hint(case.hidden * 2, world_size), backend="reference")
    _, _, _, _, sized_handle, _ = sized.dispatch(x, topk_idx=topk_idx, **layout)
    combined, _, _ = sized.combine(want.recv_x, sized_handle, bias=(b0, b1))
    assert torch.equal(combined, ((sent_to * x.float() + b0.float()) + b1.float()).to(x.dtype))
    with pytest.raises(ValueError, match=r"bias\[1\] must have shape"):
        buffer.combine(want.recv_x, handle, bias=(b0, b1[:3]))
    with pytest.raises(TypeError, match="bias must have dtype bfloat16"):
        buffer.combine(want.recv_x, handle, bias=b0.float())

    # previous_event / async_finish / capture(): on CPU the calls are synchronous and the events inert
    _, _, _, _, _, event = buffer.dispatch(x, topk_idx=topk_idx, previous_event=Buffer.capture(), async_finish=True, **layout)
    event.current_stream_wait()
    return n


def test_layout_only_worst_tokens_and_bias() -> None:
    assert sum(run_ranks(_normal_modes, 2)) > 0


def _num_tokens_per_rank_checked(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    case = Case(world_size, tokens=(16, 16), hidden=128, num_topk=2, num_experts=4, seed=3)
    buffer = Buffer(dist.group.WORLD, backend="reference")
    x, topk_idx, _ = make_inputs(case, rank)
    layout = _layout(buffer, topk_idx, case.num_experts)
    # Only rank 0 passes inconsistent counts: it says what is wrong, the others name rank 0, nobody waits.
    others = r"rank\(s\) \[0\] passed a layout that disagrees"
    bad = dict(layout, num_tokens_per_expert=layout["num_tokens_per_expert"].flip(0).contiguous()) if rank == 0 else layout
    with pytest.raises(ValueError, match="num_tokens_per_expert disagrees with topk_idx" if rank == 0 else others):
        buffer.dispatch(x, topk_idx=topk_idx, **bad)
    bad = dict(layout, num_tokens_per_rank=layout["num_tokens_per_rank"] + 1) if rank == 0 else layout
    with pytest.raises(ValueError, match=r"num_tokens_per_rank .* disagrees with is_token_in_rank" if rank == 0 else others):
        buffer.dispatch(x, topk_idx=topk_idx, **bad)
    recv_x, *_ = buffer.dispatch(x, topk_idx=topk_idx, **layout)  # still in step afterwards
    assert torch.equal(recv_x, expected_dispatch(case, rank).recv_x)


def test_inconsistent_layout_is_refused() -> None:
    run_ranks(_num_tokens_per_rank_checked, 2)


# ------------------------------------------------------------------ construction and lifetime
class _StubComm:
    """What a Buffer reads of an ``mpi4py.MPI.Comm``: its rank and size."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's name
        return self._rank

    def Get_size(self) -> int:  # noqa: N802
        return self._size


def _lifetime(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    group = dist.group.WORLD
    buffer = Buffer(group, 0, 0, False, 24, True, True, False, None)  # DeepEP's positional order
    assert buffer.allow_mnnvl and not buffer.explicitly_destroy
    assert Buffer.is_sm90_compiled() is True
    with pytest.raises(RuntimeError, match="explicitly_destroy=True"):
        buffer.destroy()
    with pytest.raises(RuntimeError, match="no communication stream without CUDA"):
        buffer.get_comm_stream()
    explicit = Buffer(group, explicitly_destroy=True)
    explicit.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        explicit.destroy()
    forgotten = Buffer(group, explicitly_destroy=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del forgotten
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) and "without destroy()" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del buffer
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]

    # the keyword sets vLLM's high-throughput and low-latency DeepEP managers pass
    Buffer(group=group, num_nvl_bytes=1 << 20, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=1,
           explicitly_destroy=True).destroy()
    Buffer(group=group, num_nvl_bytes=1 << 20, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(8, 256, world_size, 4),
           low_latency_mode=True, num_qps_per_rank=2, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
           explicitly_destroy=True, enable_shrink=False).destroy()
    with pytest.raises(ValueError, match="enable_shrink=True .* is not supported"):
        Buffer(group, enable_shrink=True)

    via_comm = Buffer(None, comm=_StubComm(rank, world_size))
    assert via_comm.group is dist.group.WORLD and via_comm.rank == rank
    with pytest.raises(ValueError, match="is not the torch.distributed world"):
        Buffer(None, comm=_StubComm(rank, world_size + 1))


def test_constructor_and_lifetime_follow_deepep() -> None:
    run_ranks(_lifetime, 2)


def test_rdma_size_hint_takes_the_total_rank_count() -> None:
    from deepep_megatron import Config

    config = Config(24, 6, 256, 6, 128)
    assert config.get_rdma_buffer_size_hint(7168 * 2, 8) == 0  # one node: no RDMA buffer
    two_nodes, four_nodes = config.get_rdma_buffer_size_hint(7168 * 2, 16), config.get_rdma_buffer_size_hint(7168 * 2, 32)
    assert 0 < two_nodes < four_nodes
    assert config.get_rdma_buffer_size_hint(7168 * 2, 8, ranks_per_node=4) == two_nodes
    with pytest.raises(ValueError, match="multiple of ranks_per_node=8"):
        config.get_rdma_buffer_size_hint(7168 * 2, 12)


# ----------------------------------------------------------------------------------- low latency
def _low_latency_extras(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from deepep_megatron import Buffer
    from deepep_megatron.fp8 import unpack_ue8m0

    case = Case(world_size, tokens=(9, 13), hidden=1024, num_topk=3, num_experts=8, seed=21)
    max_tokens = 16
    hint = Buffer.get_low_latency_rdma_size_hint(max_tokens, case.hidden, world_size, case.num_experts)
    buffer = Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, backend="reference")
    x, topk_idx, topk_weights = make_inputs(case, rank)
    num_local = case.num_local_experts

    # statistics: receive counts accumulate (in the hook when the receive is deferred), waits too
    stats = torch.zeros(num_local, dtype=torch.int32)
    waits = torch.zeros(world_size, dtype=torch.int64)
    _, count, handle, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, max_tokens, case.num_experts, cumulative_local_expert_recv_stats=stats,
        dispatch_wait_recv_cost_stats=waits, use_fp8=False, return_recv_hook=True)
    assert int(stats.sum()) == 0 and int(waits.sum()) == 0  # nothing before the hook
    hook()
    assert torch.equal(stats, count) and bool((waits > 0).all())
    buffer.low_latency_dispatch(x, topk_idx, max_tokens, case.num_experts, cumulative_local_expert_recv_stats=stats, use_fp8=False)
    assert torch.equal(stats, 2 * count)
    with pytest.raises(TypeError, match="cumulative_local_expert_recv_stats must have dtype int32"):
        buffer.low_latency_dispatch(x, topk_idx, max_tokens, case.num_experts, cumulative_local_expert_recv_stats=stats.long())
    with pytest.raises(ValueError, match=r"dispatch_wait_recv_cost_stats must be an int64 tensor of shape \[2\]"):
        buffer.low_latency_dispatch(x, topk_idx, max_tokens, case.num_experts, dispatch_wait_recv_cost_stats=waits.int())

    # the handle indexes as DeepEP's 5-tuple
    recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, max_tokens, case.num_experts, use_fp8=False)
    src_info, layout_range, max_t, hidden, num_experts = handle
    assert (max_t, hidden, num_experts) == (max_tokens, case.hidden, case.num_experts) and len(handle) == 5
    assert src_info is handle.layout.recv_src_info and layout_range is handle.layout.recv_layout_range

    # zero-copy combine: rows written into get_next_low_latency_combine_buffer are what is sent
    expert_out = (recv_x.float() * 1.5).to(torch.bfloat16)
    want, _, _ = buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle)
    staged = buffer.get_next_low_latency_combine_buffer(handle)
    assert staged.shape == expert_out.shape and staged.dtype == torch.bfloat16
    staged.copy_(expert_out)
    poisoned = torch.full_like(expert_out, POISON)
    got, _, _ = buffer.low_latency_combine(poisoned, topk_idx, topk_weights, handle, zero_copy=True)
    assert torch.equal(got, want)
    fresh = Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, backend="reference")
    _, _, fresh_handle, _, _ = fresh.low_latency_dispatch(x, topk_idx, max_tokens, case.num_experts, use_fp8=False)
    with pytest.raises(ValueError, match="get_next_low_latency_combine_buffer"):
        fresh.low_latency_combine(expert_out, topk_idx, topk_weights, fresh_handle, zero_copy=True)

    # UE8M0: DeepEP's packed int32 [E_local, slots, H/512], column-major, the exponents of round_scale's scales
    (_, scales), count, _, _, _ = buffer.low_latency_dispatch(x, topk_idx, max_tokens, case.num_experts, round_scale=True)
    (_, packed), count_ue8m0, _, _, _ = buffer.low_latency_dispatch(
        x, topk_idx, max_tokens, case.num_experts, round_scale=True, use_ue8m0=True)
    assert packed.dtype == torch.int32 and packed.shape == (num_local, world_size * max_tokens, case.hidden // 512)
    assert packed.stride(1) == 1  # slots fastest: column-major in the last two dimensions
    assert torch.equal(count, count_ue8m0)
    for e in range(num_local):
        n = int(count[e])
        assert torch.equal(unpack_ue8m0(packed[e, :n].contiguous(), case.hidden // 128), scales[e, :n])
    with pytest.raises(ValueError, match="use_ue8m0=True needs use_fp8=True and round_scale=True"):
        buffer.low_latency_dispatch(x, topk_idx, max_tokens, case.num_experts, use_ue8m0=True)


def test_low_latency_statistics_zero_copy_and_ue8m0() -> None:
    run_ranks(_low_latency_extras, 2)


def test_ue8m0_packing_round_trips_every_exponent() -> None:
    from deepep_megatron.fp8 import pack_ue8m0, unpack_ue8m0

    exponents = torch.arange(1, 255, dtype=torch.int32)  # every normal fp32 exponent, sign bit of byte 3 included
    scales = torch.exp2(exponents.float() - 127).view(2, 127)
    packed = pack_ue8m0(scales)
    assert packed.shape == (2, 32)
    assert int(packed[0, 0]) & 0xFF == 1 and (int(packed[0, 0]) >> 8) & 0xFF == 2  # byte i holds scale 4j + i
    assert torch.equal(unpack_ue8m0(packed, 127), scales)
    with pytest.raises(ValueError, match="power-of-two"):
        pack_ue8m0(torch.tensor([[0.3]]))
