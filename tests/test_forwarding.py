"""The internode forwarding plan (deepep_megatron/forwarding.py) against the oracle: each leg's
indices tile the receive tensors, the rows arrive in (source rank, source token) order equal to the
reference dispatch, the combine returns the reference's sums, and the legs carry the bytes that
deepep_megatron/traffic.py counts. Virtual nodes 2x1, 2x2, 4x1, 2x4, 4x2."""
from __future__ import annotations

import pytest
import torch

from deepep_megatron.forwarding import forwarded_combine, forwarded_dispatch, plan_forwarding
from deepep_megatron.traffic import link_bytes, node_limited_topk
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
    return Case(num_ranks, tokens=tokens, hidden=64, num_topk=4, num_experts=4 * num_ranks, seed=seed,
                starved_rank=num_ranks - 1, drop=0.2, empty_tokens=0.1)


def _plan(case: Case, ranks_per_node: int):
    inputs = [make_inputs(case, r) for r in range(case.world_size)]
    masks = [_is_token_in_rank(idx, case.num_experts, case.world_size) for _, idx, _ in inputs]
    return plan_forwarding(masks, ranks_per_node), inputs


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
