"""Nodes of an EP group (deepep_megatron.topology) and the multi-node Buffer API on the reference
backend: virtual nodes from DEEPEP_MEGATRON_RANKS_PER_NODE, ``num_tokens_per_rdma_rank`` from the
layout, and dispatch/combine with the same results as within one node."""
from __future__ import annotations

import pytest
import torch

from harness import run_ranks
from oracle import Case, expected_combine, expected_dispatch, expert_transform, make_inputs


def test_ranks_per_node_from_the_environment() -> None:
    from deepep_megatron.topology import Topology, world_ranks_per_node

    assert world_ranks_per_node(8, {}) == 8  # nothing set: one node
    assert world_ranks_per_node(8, {"LOCAL_WORLD_SIZE": "4"}) == 4
    assert world_ranks_per_node(16, {"SLURM_NTASKS_PER_NODE": "8(x2)"}) == 8
    assert world_ranks_per_node(8, {"DEEPEP_MEGATRON_RANKS_PER_NODE": "2", "LOCAL_WORLD_SIZE": "8"}) == 2  # override wins
    with pytest.raises(ValueError, match="must be one of"):
        world_ranks_per_node(6, {"DEEPEP_MEGATRON_RANKS_PER_NODE": "3"})
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        world_ranks_per_node(6, {"LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="positive number"):
        world_ranks_per_node(4, {"LOCAL_WORLD_SIZE": "four"})
    assert Topology(8, 2).num_nodes == 4 and Topology(8, 2).node_of(5) == 2
    with pytest.raises(ValueError, match="do not split into nodes of 3"):
        Topology(8, 3)


def _multi_node(rank: int, world_size: int, per_node: int) -> int:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    nodes = world_size // per_node
    nvl = Buffer.get_nvl_size_hint(128 * 2, world_size)
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=nvl)  # "auto": the reference serves several nodes
    assert (buffer.num_rdma_ranks, buffer.num_nvl_ranks, buffer.backend_name) == (nodes, per_node, "reference")
    case = Case(world_size, tokens=tuple(19 + 5 * r for r in range(world_size)), hidden=128, num_topk=3,
                num_experts=2 * world_size, seed=31, starved_rank=world_size - 1)
    x, topk_idx, topk_weights = make_inputs(case, rank)
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, case.num_experts)
    owner_node = torch.where(topk_idx >= 0, topk_idx // case.num_local_experts // per_node, -1)
    want_rdma = [int((owner_node == n).any(dim=1).sum()) for n in range(nodes)]
    if nodes == 1:
        assert per_rdma is None
    else:
        assert per_rdma.dtype == torch.int32 and per_rdma.tolist() == want_rdma
    layout = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                  num_tokens_per_expert=per_expert)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout)
    want = expected_dispatch(case, rank)
    assert torch.equal(recv_x, want.recv_x) and torch.equal(recv_idx, want.recv_topk_idx) and counts == want.num_recv_tokens_per_expert
    combined, _, _ = buffer.combine(expert_transform(recv_x, rank), handle)
    assert torch.equal(combined, expected_combine(case, rank))
    # the differentiable pair (what the Megatron dispatcher calls) passes the per-node counts on
    from deepep_megatron import autograd

    a_recv, _, _, _, a_handle = autograd.dispatch(buffer, x, topk_idx, topk_weights, case.num_experts)
    assert torch.equal(a_recv, want.recv_x)
    assert torch.equal(autograd.combine(buffer, expert_transform(a_recv, rank), a_handle), expected_combine(case, rank))
    if nodes > 1:
        with pytest.raises(ValueError, match=f"spans {nodes} nodes: dispatch needs num_tokens_per_rdma_rank"):
            buffer.dispatch(x, topk_idx=topk_idx, **dict(layout, num_tokens_per_rdma_rank=None))
        with pytest.raises(ValueError, match="num_tokens_per_rdma_rank disagrees"):
            buffer.dispatch(x, topk_idx=topk_idx, **dict(layout, num_tokens_per_rdma_rank=per_rdma + 1))
        worst = sum(case.tokens)  # num_worst_tokens across nodes too (DeepEP allows it intranode only)
        padded = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=worst, **layout)
        assert padded[0].size(0) == worst and torch.equal(padded[0][:recv_x.size(0)], recv_x)
        assert bool((padded[1][recv_x.size(0):] == -1).all())
        with pytest.raises(RuntimeError, match="needs the compiled extension"):  # no kernels on this machine
            Buffer(dist.group.WORLD, num_nvl_bytes=nvl, backend="cuda")
    return int(recv_x.size(0))


@pytest.mark.parametrize("world_size,per_node", [(2, 1), (4, 2), (4, 1)])
def test_virtual_nodes_match_one_node(world_size: int, per_node: int) -> None:
    received = run_ranks(_multi_node, world_size, per_node, env={"DEEPEP_MEGATRON_RANKS_PER_NODE": str(per_node)})
    assert received[-1] == 0 and sum(received) > 0


def _subgroups(rank: int, world_size: int) -> tuple[int, int]:
    import torch.distributed as dist

    from deepep_megatron.topology import group_topology

    same_node = dist.new_group([0, 1])  # nodes of 2: ranks 0 and 1 share node 0
    across = dist.new_group([0, 2])  # ranks 0 and 2 are on nodes 0 and 1
    result = (0, 0)
    if rank in (0, 1):
        result = (group_topology(same_node).num_nodes, result[1])
    if rank in (0, 2):
        result = (result[0], group_topology(across).num_nodes)
    return result


def test_subgroup_nodes_follow_global_ranks() -> None:
    results = run_ranks(_subgroups, 4, env={"DEEPEP_MEGATRON_RANKS_PER_NODE": "2"})
    assert results[0] == (1, 2) and results[1] == (1, 0) and results[2] == (0, 2)


@pytest.mark.parametrize("backend", ["auto", "forwarding"])
def test_pretraining_on_virtual_nodes_equals_one_node(backend: str) -> None:
    """The Megatron dispatcher over 2 virtual nodes x 1 rank (the per-node counts flow through the
    autograd pair) trains exactly as over one node of 2 ranks, on the reference backend ("auto") and
    with node forwarding (one rank per node: no node partial, so the same sums)."""
    pytest.importorskip("megatron.core")
    from test_megatron_equivalence import TINY, train_and_collect

    argv = TINY + ["--expert-model-parallel-size", "2", "--num-experts", "4", "--moe-router-topk", "2",
                   "--train-iters", "2", "--moe-token-dispatcher", "deepep"]
    one_node = run_ranks(train_and_collect, 2, argv)
    two_nodes = run_ranks(train_and_collect, 2, argv + ["--moe-deepep-backend", backend],
                          env={"DEEPEP_MEGATRON_RANKS_PER_NODE": "1"})
    want_backend = "reference" if backend == "auto" else backend
    assert f"Buffer backend {want_backend}" in two_nodes[0]["buffers"], two_nodes[0]["buffers"]
    for rank in range(2):
        assert two_nodes[rank]["losses"] == one_node[rank]["losses"]
        for name, grad in one_node[rank]["grads"][-1].items():
            assert (two_nodes[rank]["grads"][-1][name] == grad).all(), f"rank {rank}: grad of {name}"
