"""The internode byte counts (deepep_megatron.traffic) on routings small enough to count by hand."""
from __future__ import annotations

import pytest
import torch

from deepep_megatron.traffic import link_bytes, node_limited_topk


def test_link_bytes_counted_by_hand() -> None:
    # 2 nodes x 2 ranks, 2 experts per rank; every token starts on rank 0 (node 0, local index 0).
    topk_idx = torch.tensor([
        [0, 1, -1],   # rank 0 only: nothing crosses a link
        [2, 4, -1],   # rank 1 (own node) and rank 2 (node 1's rank of local index 0: the RDMA copy lands there)
        [6, 7, 4],    # ranks 3 and 2 of node 1: one RDMA copy to rank 2, which forwards to rank 3
        [6, -1, -1],  # rank 3 only: the RDMA copy lands on rank 2, which needs none, and forwards it
    ])
    counts = link_bytes(topk_idx, num_experts=8, ranks_per_node=2, num_ranks=4, message_bytes=10,
                        source_rank=torch.zeros(4, dtype=torch.long))
    assert (counts.forwarded_rdma, counts.forwarded_nvlink) == (30, 30)
    assert (counts.direct_rdma, counts.direct_nvlink) == (40, 10)
    assert counts.rdma_saving == pytest.approx(4 / 3)


def test_link_bytes_of_one_node_cross_no_rdma() -> None:
    topk_idx = torch.tensor([[0, 3], [1, 2]])  # 2 ranks of one node, tokens on ranks 0 and 1
    counts = link_bytes(topk_idx, num_experts=4, ranks_per_node=2, num_ranks=2, message_bytes=1)
    assert counts.forwarded_rdma == counts.direct_rdma == 0
    assert counts.forwarded_nvlink == counts.direct_nvlink == 2  # each token to the other rank once
    assert counts.rdma_saving == float("inf")


def test_node_limited_topk_stays_within_its_nodes() -> None:
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(512, 64, generator=generator)
    num_nodes, per_node = 8, 8
    for limit in (1, 2, 4):
        topk_idx = node_limited_topk(scores, 8, num_nodes, limit)
        assert topk_idx.shape == (512, 8)
        nodes_reached = torch.stack([(topk_idx // per_node == n).any(dim=1) for n in range(num_nodes)], dim=1).sum(dim=1)
        assert int(nodes_reached.max()) <= limit
        assert int(nodes_reached.max()) == limit  # 512 tokens: some reach every allowed node
    assert torch.equal(node_limited_topk(scores, 8, num_nodes, None), scores.topk(8, dim=1).indices)
    with pytest.raises(ValueError, match="cannot hold top-8"):
        node_limited_topk(scores, 8, num_nodes, 0)
    with pytest.raises(ValueError, match="split evenly"):
        node_limited_topk(scores[:, :60], 8, num_nodes, 2)


def test_forwarding_never_puts_more_on_the_rdma_leg() -> None:
    generator = torch.Generator().manual_seed(4)
    for nodes, per_node in ((2, 2), (4, 2), (2, 4)):
        ranks = nodes * per_node
        scores = torch.randn(64 * ranks, 32, generator=generator)
        counts = link_bytes(node_limited_topk(scores, 6, nodes, None), 32, per_node, ranks, message_bytes=3)
        assert 0 < counts.forwarded_rdma <= counts.direct_rdma
        assert counts.forwarded_nvlink >= counts.direct_nvlink
