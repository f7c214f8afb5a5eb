"""The internode forwarding plan (deepep_megatron/forwarding.py) against the oracle: each leg's
indices tile the receive tensors, the rows arrive in (source rank, source token) order equal to the
reference dispatch, the combine returns the reference's sums, and the legs carry the bytes that
deepep_megatron/traffic.py counts (virtual nodes 2x1, 2x2, 4x1, 2x4, 4x2); and the forwarding backend,
which runs the scheme over the group's collectives, against the reference backend and the emulation."""
from __future__ import annotations

import time

import pytest
import torch

from deepep_megatron.forwarding import forwarded_combine, forwarded_dispatch, plan_forwarding
from deepep_megatron.traffic import link_bytes, node_limited_topk
from harness import run_ranks
from oracle import Case, expected_combine, expected_dispatch, expert_transform, make_inputs

#: (nodes, ranks per node) of the issue's test list
TOPOLOGIES = [(2, 1), (2, 2), (4, 1), (2, 4), (4, 2)]


def _is_token_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    owner = topk_idx // (num_experts // num_ranks)
    hits = torch.nn.functional.one_hot(owner.clamp(min=0), num_ranks).bool() & (topk_idx >= 0).unsqueeze(-1)
    return hits.any(dim=1)


def _case(num_ranks: int, seed: int) -> Case:
    # rank 1 sends nothing, the last rank's experts get no tokens (it receives nothing)
    tokens = tuple(0 if r == 1 else 37 + 11 * r for r in range(num_ranks))
    return Case(num_ranks, tokens=tokens, hidden=128, num_topk=4, num_experts=4 * num_ranks, seed=seed,
                starved_rank=num_ranks - 1, drop=0.2, empty_tokens=0.1)


def _plan(case: Case, ranks_per_node: int):
    inputs = [make_inputs(case, r) for r in range(case.world_size)]
    masks = [_is_token_in_rank(idx, case.num_experts, case.world_size) for _, idx, _ in inputs]
    return plan_forwarding(masks, ranks_per_node), inputs


def _dispatch_args(buf, topk_idx: torch.Tensor, num_experts: int, topk_weights=None) -> dict:
    """``buf.dispatch``'s layout keywords from ``buf.get_dispatch_layout`` (per-node counts included),
    and the top-k when ``topk_weights`` is given."""
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    args = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert)
    if topk_weights is not None:
        args.update(topk_idx=topk_idx, topk_weights=topk_weights)
    return args


@pytest.mark.parametrize("nodes,per_node", TOPOLOGIES, ids=[f"{n}x{l}" for n, l in TOPOLOGIES])
def test_forwarded_dispatch_and_combine_equal_the_reference(nodes: int, per_node: int) -> None:
    case = _case(nodes * per_node, seed=70 + nodes * 10 + per_node)
    plan, inputs = _plan(case, per_node)
    recv, legs = forwarded_dispatch(plan, [x for x, _, _ in inputs])
    for r in range(case.world_size):
        want = expected_dispatch(case, r).recv_x
        assert torch.equal(recv[r], want), f"rank {r}: forwarded rows differ from the reference dispatch"
    assert recv[-1].size(0) == 0  # the starved rank
    assert legs.rdma == int(plan.num_rdma_rows.sum())

    combined = forwarded_combine(plan, [expert_transform(recv[r], r) for r in range(case.world_size)])
    for r in range(case.world_size):
        want = expected_combine(case, r)
        if nodes == 1 or per_node == 1:  # no partial sums: the reference's order exactly
            assert torch.equal(combined[r], want), f"rank {r}: combine differs"
        else:  # one bf16 rounding per node partial, and another grouping of the fp32 adds
            torch.testing.assert_close(combined[r].float(), want.float(), rtol=2 ** -6, atol=2 ** -6,
                                       msg=lambda m: f"rank {r}: {m}")


@pytest.mark.parametrize("max_nodes", [None, 1, 2])
def test_legs_carry_what_the_traffic_model_counts(max_nodes) -> None:
    """DeepSeek-V3-like routing on 4 nodes of 2: the rows each leg moves equal link_bytes' counts
    (message_bytes 1: rows); node-limited routing reaches at most max_nodes nodes per token."""
    num_nodes, per_node, num_topk, num_experts, tokens = 4, 2, 8, 64, 96
    num_ranks = num_nodes * per_node
    g = torch.Generator().manual_seed(5)
    topk = [node_limited_topk(torch.rand(tokens, num_experts, generator=g), num_topk, num_nodes, max_nodes)
            for _ in range(num_ranks)]
    masks = [_is_token_in_rank(idx, num_experts, num_ranks) for idx in topk]
    plan = plan_forwarding(masks, per_node)
    _, legs = forwarded_dispatch(plan, [torch.randn(tokens, 8, generator=g) for _ in range(num_ranks)])
    model = link_bytes(torch.cat(topk), num_experts, per_node, num_ranks, message_bytes=1)
    assert (legs.rdma, legs.nvlink) == (model.forwarded_rdma, model.forwarded_nvlink)
    assert legs.nvlink + legs.local == int(plan.num_recv_rows.sum())  # every received row written once
    assert model.direct_rdma >= legs.rdma  # forwarding never puts more on the RDMA leg
    if max_nodes is not None:
        per_token_nodes = torch.stack([m.view(tokens, num_nodes, per_node).any(2).sum(1) for m in masks])
        assert int(per_token_nodes.max()) <= max_nodes
        assert legs.rdma <= tokens * num_ranks * max_nodes


def test_a_plan_that_does_not_tile_the_receive_rows_is_caught() -> None:
    case = _case(4, seed=3)
    plan, inputs = _plan(case, 2)
    plan.rank_prefix[2, 0] += 1  # source 2's rows on rank 0 shifted by one: one row twice, one never
    with pytest.raises(RuntimeError, match="rank 0's rows"):
        forwarded_dispatch(plan, [x for x, _, _ in inputs])


def test_bad_plan_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="do not split into nodes of 3"):
        plan_forwarding([torch.zeros(2, 4, dtype=torch.bool)] * 4, 3)
    with pytest.raises(ValueError, match=r"is_token_in_rank\[1\] must be a \[T, 2\] bool tensor"):
        plan_forwarding([torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.int32)], 1)


def _forwarding_backend_round(rank: int, world_size: int, per_node: int) -> int:
    import torch.distributed as dist

    from deepep_megatron import Buffer, per_token_cast_to_fp8
    from deepep_megatron import autograd as deepep_autograd

    fast, ref = Buffer(dist.group.WORLD, backend="forwarding"), Buffer(dist.group.WORLD, backend="reference")
    assert fast.backend_name == "forwarding" and fast.num_rdma_ranks == world_size // per_node
    checked = 0
    for seed in (81, 82):
        case = _case(world_size, seed)
        x, topk_idx, topk_weights = make_inputs(case, rank)
        outs = []
        for buf in (fast, ref):
            layout = _dispatch_args(buf, topk_idx, case.num_experts, topk_weights)
            recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(x, **layout)
            (fp8_x, fp8_scales), *_ = buf.dispatch(per_token_cast_to_fp8(x), **layout)
            cached = buf.dispatch(x * 2, handle=handle)[0]
            combined, combined_w, _ = buf.combine(expert_transform(recv_x, rank), handle, topk_weights=recv_w)
            outs.append((recv_x, recv_idx, recv_w, counts, fp8_x.view(torch.uint8), fp8_scales, cached, combined, combined_w))
        (f_x, f_idx, f_w, f_counts, f_fp8, f_scales, f_cached, f_comb, f_comb_w), ref_out = outs
        r_x, r_idx, r_w, r_counts, r_fp8, r_scales, r_cached, r_comb, r_comb_w = ref_out
        assert torch.equal(f_x, r_x) and torch.equal(f_x, expected_dispatch(case, rank).recv_x), f"rank {rank}: recv_x"
        assert torch.equal(f_idx, r_idx) and torch.equal(f_w, r_w) and f_counts == r_counts, f"rank {rank}: top-k"
        assert torch.equal(f_fp8, r_fp8) and torch.equal(f_scales, r_scales), f"rank {rank}: FP8 rows"
        assert torch.equal(f_cached, r_cached), f"rank {rank}: cached dispatch"
        # the combine is the emulation's, node partials and all; and the reference's within their rounding
        plan, inputs = _plan(case, per_node)
        recv_all, _ = forwarded_dispatch(plan, [xi for xi, _, _ in inputs])
        emulated = forwarded_combine(plan, [expert_transform(recv_all[r], r) for r in range(world_size)])[rank]
        assert torch.equal(f_comb, emulated), f"rank {rank}: combine differs from the forwarding emulation"
        torch.testing.assert_close(f_comb.float(), r_comb.float(), rtol=2 ** -6, atol=2 ** -6)
        torch.testing.assert_close(f_comb_w, r_comb_w, rtol=1e-6, atol=1e-6)
        checked += 1
    # DeepEP's handle items, a layout-only dispatch (no top-k), aligned expert counts and
    # num_worst_tokens padding: as the reference's
    case = _case(world_size, 83)
    x, topk_idx, topk_weights = make_inputs(case, rank)
    num_experts = case.num_experts
    outs = []
    for buf in (fast, ref):
        layout = _dispatch_args(buf, topk_idx, num_experts)
        recv_x, _, _, counts, handle, _ = buf.dispatch(x, **layout, expert_alignment=4)
        worst = buf.dispatch(x, **layout, topk_idx=topk_idx, topk_weights=topk_weights,
                             num_worst_tokens=sum(case.tokens) + 3)
        outs.append((recv_x, counts, [handle[i] for i in range(6)], worst[0], worst[1], worst[2]))
    (f_x, f_counts, f_items, *f_worst), (r_x, r_counts, r_items, *r_worst) = outs
    assert torch.equal(f_x, r_x) and f_counts == r_counts, f"rank {rank}: layout-only dispatch"
    for i, (a, b) in enumerate(zip(f_items, r_items)):
        assert torch.equal(a, b), f"rank {rank}: handle item {i} differs from the reference's"
    for a, b in zip(f_worst, r_worst):
        assert torch.equal(a, b), f"rank {rank}: num_worst_tokens outputs differ"
    # the differentiable pair runs on it unchanged (the Megatron dispatcher's path)
    xg = x.clone().requires_grad_(True)
    recv, _, _, _, handle = deepep_autograd.dispatch(fast, xg, topk_idx, topk_weights, case.num_experts)
    deepep_autograd.combine(fast, expert_transform(recv, rank), handle).float().sum().backward()
    assert xg.grad is not None and bool(torch.isfinite(xg.grad).all())
    return checked


@pytest.mark.parametrize("world_size,per_node", [(4, 2), (4, 1), (8, 2), (8, 4)], ids=["2x2", "4x1", "4x2", "2x4"])
def test_forwarding_backend_equals_the_reference(world_size: int, per_node: int) -> None:
    results = run_ranks(_forwarding_backend_round, world_size, per_node,
                        env={"DEEPEP_MEGATRON_RANKS_PER_NODE": str(per_node)})
    assert results == [2] * world_size


def _refusals_round(rank: int, world_size: int) -> list[str]:
    """A bad layout on one rank, and ranks that call different operations: every rank raises."""
    import torch.distributed as dist

    from deepep_megatron import Buffer

    buf = Buffer(dist.group.WORLD, backend="forwarding")
    case = _case(world_size, 90)
    x, topk_idx, topk_weights = make_inputs(case, rank)
    args = _dispatch_args(buf, topk_idx, case.num_experts, topk_weights)
    seen = []
    bad = args["num_tokens_per_rank"].clone()
    if rank == 2:
        bad[0] += 1
    try:
        buf.dispatch(x, **dict(args, num_tokens_per_rank=bad))
    except ValueError as error:
        seen.append("layout" if ("rank(s) [2]" in str(error) or "disagrees" in str(error)) else str(error))
    recv_x, _, _, _, handle, _ = buf.dispatch(x, **args)
    try:
        if rank == 3:  # a dispatch while the others combine
            buf.dispatch(x, handle=handle)
        else:
            buf.combine(recv_x, handle)
    except ValueError as error:
        seen.append("operations" if "called different operations" in str(error) else str(error))
    buf.combine(recv_x, handle)  # the buffer works after both refusals
    return seen


def test_bad_layouts_and_mismatched_operations_are_refused_on_every_rank() -> None:
    results = run_ranks(_refusals_round, 4, env={"DEEPEP_MEGATRON_RANKS_PER_NODE": "2"})
    assert results == [["layout", "operations"]] * 4


def _selection_round(rank: int, world_size: int) -> tuple:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    auto = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20).backend_name  # no kernels here: one all-to-all
    errors = []
    try:
        Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, backend="cuda")
    except RuntimeError as error:
        errors.append("needs the compiled extension" in str(error))
    return auto, Buffer(dist.group.WORLD, backend="forwarding").num_rdma_ranks, errors


def test_backend_selection_over_nodes_without_kernels() -> None:
    results = run_ranks(_selection_round, 4, env={"DEEPEP_MEGATRON_RANKS_PER_NODE": "2"})
    assert results == [("reference", 2, [True])] * 4


STALL_TIMEOUT_S = 3.0


def _stall_round(rank: int, world_size: int) -> tuple:
    """Rank 3 (node 1) skips a dispatch: the others' collective gives up after timeout_s with an
    error naming where; after every rank's reset the Buffer dispatches as the reference does."""
    import time

    import torch.distributed as dist

    from deepep_megatron import Buffer

    buf = Buffer(dist.group.WORLD, backend="forwarding", timeout_s=STALL_TIMEOUT_S)
    ref = Buffer(dist.group.WORLD, backend="reference")
    case = _case(world_size, 95)
    x, topk_idx, topk_weights = make_inputs(case, rank)
    args = _dispatch_args(buf, topk_idx, case.num_experts, topk_weights)
    message, elapsed = "", 0.0
    if rank != 3:
        start = time.monotonic()
        try:
            buf.dispatch(x, **args)
        except RuntimeError as error:
            message = str(error)
        elapsed = time.monotonic() - start
    dist.barrier()  # rank 3 comes back once the others have given up
    buf.reset()
    got, want = buf.dispatch(x, **args)[0], ref.dispatch(x, **args)[0]
    return message, elapsed, bool(torch.equal(got, want))


def test_a_stalled_rank_times_out_and_the_buffer_recovers() -> None:
    results = run_ranks(_stall_round, 4, env={"DEEPEP_MEGATRON_RANKS_PER_NODE": "2"}, timeout_s=120)
    for rank, (message, elapsed, same) in enumerate(results):
        assert same, f"rank {rank}: the dispatch after reset differs from the reference"
        if rank == 3:
            continue
        assert f"rank {rank}, the group's agreement check" in message and "Buffer.reset()" in message, message
        assert STALL_TIMEOUT_S <= elapsed < STALL_TIMEOUT_S + 10, f"rank {rank} gave up after {elapsed:.1f} s"


def _node_limited_round(rank: int, world_size: int, per_node: int, max_nodes: int) -> int:
    """DeepSeek-V3-like node-limited routing (each token to at most ``max_nodes`` nodes): the
    forwarding backend's dispatch equals the reference's, its combine the emulation's."""
    import torch.distributed as dist

    from deepep_megatron import Buffer

    num_nodes, num_experts, num_topk, tokens, hidden = world_size // per_node, 8 * world_size, 6, 64, 64
    g = torch.Generator().manual_seed(300 + rank)
    topk_idx = node_limited_topk(torch.rand(tokens, num_experts, generator=g), num_topk, num_nodes, max_nodes)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    weights = torch.rand(tokens, num_topk, generator=g)
    outs = []
    for name in ("forwarding", "reference"):
        buf = Buffer(dist.group.WORLD, backend=name)
        args = _dispatch_args(buf, topk_idx, num_experts, weights)
        assert int(args["num_tokens_per_rdma_rank"].gt(0).sum()) <= num_nodes
        recv_x, recv_idx, _, counts, handle, _ = buf.dispatch(x, **args)
        outs.append((recv_x, recv_idx, counts, buf.combine(expert_transform(recv_x, rank), handle)[0]))
    (f_x, f_idx, f_counts, f_comb), (r_x, r_idx, r_counts, r_comb) = outs
    assert torch.equal(f_x, r_x) and torch.equal(f_idx, r_idx) and f_counts == r_counts, f"rank {rank}: dispatch"
    torch.testing.assert_close(f_comb.float(), r_comb.float(), rtol=2 ** -6, atol=2 ** -6)
    reach = args["is_token_in_rank"].view(tokens, num_nodes, per_node).any(dim=2).sum(dim=1)
    return int(reach.max())


@pytest.mark.parametrize("world_size,per_node,max_nodes", [(8, 2, 2), (8, 4, 1)], ids=["4x2-two-nodes", "2x4-one-node"])
def test_node_limited_routing(world_size: int, per_node: int, max_nodes: int) -> None:
    reached = run_ranks(_node_limited_round, world_size, per_node, max_nodes,
                        env={"DEEPEP_MEGATRON_RANKS_PER_NODE": str(per_node)})
    assert max(reached) <= max_nodes


def _nvshmem_leg_without_the_build(rank: int, world_size: int) -> str:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    try:
        Buffer(dist.group.WORLD, num_rdma_bytes=1 << 20, backend="forwarding")
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_nvshmem_rdma_leg_asks_for_its_build() -> None:
    """DEEPEP_MEGATRON_RDMA_LEG=nvshmem where the extension has no NVSHMEM: a RuntimeError that says
    how to build it or how to keep the collective leg (and a bad value names the choices)."""
    for message in run_ranks(_nvshmem_leg_without_the_build, 4,
                             env={"DEEPEP_MEGATRON_RANKS_PER_NODE": "2", "DEEPEP_MEGATRON_RDMA_LEG": "nvshmem"}):
        assert "DEEPEP_MEGATRON_RDMA_LEG=nvshmem needs deepep_megatron._C built with NVSHMEM" in message, message
    from deepep_megatron.backends.rail import rdma_leg_choice

    assert rdma_leg_choice({}) == "collective"
    with pytest.raises(ValueError, match=r"DEEPEP_MEGATRON_RDMA_LEG='ib' must be one of \('collective', 'nvshmem'\)"):
        rdma_leg_choice({"DEEPEP_MEGATRON_RDMA_LEG": "ib"})


def _low_latency_over_nodes(rank: int, world_size: int) -> bool:
    """A low-latency Buffer over 2 virtual nodes: the calls run (the reference here, the NVSHMEM
    kernels where they are built) and equal the reference backend's."""
    import warnings

    import torch.distributed as dist

    from deepep_megatron import Buffer

    tokens, hidden, experts = 16, 128, 8
    hint = Buffer.get_low_latency_rdma_size_hint(tokens, hidden, world_size, experts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "low-latency calls run on the reference backend"
        fast = Buffer(dist.group.WORLD, 1 << 20, hint, low_latency_mode=True, backend="forwarding")
    ref = Buffer(dist.group.WORLD, 0, hint, low_latency_mode=True, backend="reference")
    g = torch.Generator().manual_seed(40 + rank)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    topk_idx = torch.rand(tokens, experts, generator=g).topk(2, dim=1).indices
    weights = torch.rand(tokens, 2, generator=g)
    outs = []
    for buf in (fast, ref):
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=False)
        combined, _, _ = buf.low_latency_combine(recv_x, topk_idx, weights, handle)
        valid = torch.cat([recv_x[e, :n] for e, n in enumerate(count.tolist())])  # rows past count[e] are unset
        outs.append((valid, count, combined))
    return all(torch.equal(a, b) for a, b in zip(*outs))


def test_low_latency_calls_over_virtual_nodes() -> None:
    assert run_ranks(_low_latency_over_nodes, 4, env={"DEEPEP_MEGATRON_RANKS_PER_NODE": "2"}) == [True] * 4


def _rdma_row_widths(rank: int, world_size: int) -> list[tuple[int, int]]:
    """(packed RDMA-leg row width of a dispatch, layout.rail_row_bytes of its shape) for bf16, fp32 and FP8 rows."""
    import torch.distributed as dist

    from deepep_megatron import Buffer, per_token_cast_to_fp8
    from deepep_megatron.backends.forwarding import ForwardingBackend
    from deepep_megatron.layout import FP8_BLOCK, rail_row_bytes

    widths: list[int] = []
    across = ForwardingBackend._across_nodes

    def recording(self, send, recv_counts, num_sms):
        widths.append(send[0].size(1))
        return across(self, send, recv_counts, num_sms)

    ForwardingBackend._across_nodes = recording
    buf = Buffer(dist.group.WORLD, backend="forwarding")
    case = _case(world_size, 97)
    x, topk_idx, topk_weights = make_inputs(case, rank)
    layout = _dispatch_args(buf, topk_idx, case.num_experts, topk_weights)
    pairs = []
    for rows, row_bytes, scales in ((x, case.hidden * 2, 0), (x.float(), case.hidden * 4, 0),
                                    (per_token_cast_to_fp8(x), case.hidden, case.hidden // FP8_BLOCK)):
        buf.dispatch(rows, **layout)
        pairs.append((widths[-1], rail_row_bytes(row_bytes, scales, case.num_topk, world_size)))
    return pairs


def test_rail_row_bytes_is_the_packed_row() -> None:
    """layout.rail_row_bytes (what NVSHMEM heaps are sized with) is the row the RDMA leg packs."""
    for pairs in run_ranks(_rdma_row_widths, 4, env={"DEEPEP_MEGATRON_RANKS_PER_NODE": "2"}):
        assert all(packed == formula for packed, formula in pairs), pairs


#: The stages ForwardingBackend.host_timing names, per operation, in order.
HOST_STAGES = {
    "dispatch": ["agreement", "notify: this rank's counts to the host", "notify: every rank's counts",
                 "RDMA leg: rows packed", "RDMA leg: exchange", "NVLink leg: node token list and its routing",
                 "NVLink leg: dispatch", "outputs in (source rank, source token) order"],
    "cached dispatch": ["agreement", "RDMA leg: rows packed", "RDMA leg: exchange", "NVLink leg: node token list",
                        "NVLink leg: cached dispatch", "outputs in (source rank, source token) order"],
    "combine": ["agreement", "NVLink leg: rows in node token list order", "NVLink leg: combine",
                "RDMA leg: partials packed", "RDMA leg: exchange", "node partials summed"],
}


def _host_stages_round(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    buf = Buffer(dist.group.WORLD, backend="forwarding")
    case = _case(world_size, 91)
    x, topk_idx, topk_weights = make_inputs(case, rank)
    seen = {}
    started = time.perf_counter()
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, **_dispatch_args(buf, topk_idx, case.num_experts, topk_weights))
    seen["dispatch"] = (buf.runtime.host_timing(), time.perf_counter() - started)
    started = time.perf_counter()
    buf.dispatch(x, handle=handle)
    seen["cached dispatch"] = (buf.runtime.host_timing(), time.perf_counter() - started)
    started = time.perf_counter()
    buf.combine(recv_x, handle, topk_weights=recv_w)
    seen["combine"] = (buf.runtime.host_timing(), time.perf_counter() - started)
    return seen


@pytest.mark.parametrize("enabled", [True, False], ids=["DEEPEP_MEGATRON_HOST_TIMING=1", "off"])
def test_host_timing_names_each_stage(enabled: bool) -> None:
    """With DEEPEP_MEGATRON_HOST_TIMING=1 each operation reports its stages in order, each time
    non-negative and together no more than the call took; without it, nothing."""
    env = {"DEEPEP_MEGATRON_RANKS_PER_NODE": "2", "DEEPEP_MEGATRON_HOST_TIMING": "1" if enabled else "0"}
    for rank, seen in enumerate(run_ranks(_host_stages_round, 4, env=env)):
        for operation, (stages, elapsed_s) in seen.items():
            if not enabled:
                assert stages == [], (rank, operation, stages)
                continue
            assert [name for name, _ in stages] == HOST_STAGES[operation], (rank, operation, stages)
            assert all(us >= 0 for _, us in stages) and sum(us for _, us in stages) <= elapsed_s * 1e6, stages
