"""What an internode dispatch puts on each link, computed from the routing (no GPU, no network).

Issue [5/8]'s forwarding: a token crosses to each destination *node* once (an RDMA put to the rank
with the same local index there), and that rank forwards it over NVLink to every other rank of its
node that needs it; ranks of the token's own node get it over NVLink straight from its rank. Sending
every token directly to every destination rank instead puts one copy per off-node destination rank
on the RDMA leg. :func:`link_bytes` counts both for a routing, and :func:`node_limited_topk` makes
DeepSeek-V3's node-limited routing (each token to experts on at most ``max_nodes`` nodes), so the
saving can be read for the routing a model actually uses. These are byte counts of the scheme, not
measurements: nothing here says how fast an RDMA link carries them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def node_limited_topk(scores: torch.Tensor, num_topk: int, num_nodes: int, max_nodes: Optional[int],
                      experts_per_group_score: int = 2) -> torch.Tensor:
    """Top-k experts per token, restricted to the ``max_nodes`` best nodes (None: unrestricted).

    Args:
        scores: [T, E] router affinities (larger is better); experts are split evenly over the nodes
            in order (node n holds experts [n * E / N, (n + 1) * E / N)), as an EP group places them.
        num_topk: experts per token.
        num_nodes: nodes of the EP group.
        max_nodes: the most nodes a token may reach (DeepSeek-V3: 4), or None.
        experts_per_group_score: a node's score is the sum of its best this-many experts' scores
            (DeepSeek-V3 sums the top 2 of each group).

    Returns:
        [T, K] int64 expert ids, each row's ids on at most ``max_nodes`` nodes.
    """
    num_tokens, num_experts = scores.shape
    if num_experts % num_nodes != 0:
        raise ValueError(f"num_experts={num_experts} must split evenly over num_nodes={num_nodes}")
    if max_nodes is None or max_nodes >= num_nodes:
        return scores.topk(num_topk, dim=1).indices
    per_node = num_experts // num_nodes
    if max_nodes < 1 or max_nodes * per_node < num_topk:
        raise ValueError(f"max_nodes={max_nodes} nodes of {per_node} experts cannot hold top-{num_topk}")
    by_node = scores.view(num_tokens, num_nodes, per_node)
    node_score = by_node.topk(min(experts_per_group_score, per_node), dim=2).values.sum(dim=2)  # [T, N]
    chosen = node_score.topk(max_nodes, dim=1).indices
    allowed = torch.zeros(num_tokens, num_nodes, dtype=torch.bool, device=scores.device)
    allowed.scatter_(1, chosen, True)
    masked = scores.masked_fill(~allowed.repeat_interleave(per_node, dim=1), float("-inf"))
    return masked.topk(num_topk, dim=1).indices


@dataclass(frozen=True)
class LinkBytes:
    """Bytes one dispatch puts on each link, summed over every source rank's tokens."""

    tokens: int
    forwarded_rdma: int     # one copy per (token, destination node other than its own)
    forwarded_nvlink: int   # own node's destination ranks + at each destination node, every
                            # destination rank other than the one the RDMA copy landed on
    direct_rdma: int        # one copy per (token, off-node destination rank)
    direct_nvlink: int      # one copy per (token, other destination rank of its own node)

    @property
    def rdma_saving(self) -> float:
        """How many times fewer bytes cross the RDMA leg with forwarding (inf: none cross either way)."""
        return self.direct_rdma / self.forwarded_rdma if self.forwarded_rdma else float("inf")


def link_bytes(topk_idx: torch.Tensor, num_experts: int, ranks_per_node: int, num_ranks: int, message_bytes: int,
               source_rank: Optional[torch.Tensor] = None) -> LinkBytes:
    """Count each scheme's bytes for one dispatch.

    Args:
        topk_idx: [T, K] int64 expert ids (-1: none) of every token of every rank, stacked.
        num_experts: experts of the group (num_experts / num_ranks on each rank, in rank order).
        ranks_per_node: ranks of a node (consecutive ranks share one).
        num_ranks: ranks of the EP group.
        message_bytes: bytes one token carries on a link (its row, FP8 scales, top-k, source index).
        source_rank: [T] the rank each token starts on (None: token t on rank t // (T / num_ranks)).

    Returns:
        :class:`LinkBytes`.
    """
    if num_ranks % ranks_per_node != 0 or num_experts % num_ranks != 0:
        raise ValueError(f"{num_ranks} ranks must split into nodes of {ranks_per_node} and hold {num_experts} experts evenly")
    num_tokens = topk_idx.size(0)
    if source_rank is None:
        if num_tokens % num_ranks != 0:
            raise ValueError(f"{num_tokens} tokens do not split evenly over {num_ranks} ranks; pass source_rank")
        source_rank = torch.arange(num_tokens, device=topk_idx.device) // (num_tokens // num_ranks)
    num_nodes = num_ranks // ranks_per_node
    experts_per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    dest_rank = torch.where(valid, topk_idx // experts_per_rank, torch.zeros_like(topk_idx))
    to_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=topk_idx.device)
    to_rank.scatter_(1, dest_rank, valid)                                # [T, R]: the token goes to rank r
    to_rank_by_node = to_rank.view(num_tokens, num_nodes, ranks_per_node)
    to_node = to_rank_by_node.any(dim=2)                                 # [T, N]
    src_node = source_rank // ranks_per_node
    src_local = source_rank % ranks_per_node
    own_node = torch.nn.functional.one_hot(src_node, num_nodes).bool()   # [T, N]
    off_node_ranks = (to_rank_by_node & ~own_node.unsqueeze(2)).sum(dim=(1, 2))
    own_node_peers = (to_rank_by_node & own_node.unsqueeze(2)).sum(dim=(1, 2)) - to_rank[
        torch.arange(num_tokens), source_rank].long()
    remote_nodes = (to_node & ~own_node).sum(dim=1)
    # At a destination node the RDMA copy lands on the rank with the source's local index: it
    # forwards to the node's other destination ranks (itself needs no NVLink copy).
    proxy_needs = to_rank_by_node.gather(2, src_local.view(-1, 1, 1).expand(-1, num_nodes, 1)).squeeze(2)  # [T, N]
    forwarded_at_remote = ((to_rank_by_node.sum(dim=2) - proxy_needs.long()) * (to_node & ~own_node)).sum(dim=1)
    return LinkBytes(
        tokens=num_tokens,
        forwarded_rdma=int(remote_nodes.sum()) * message_bytes,
        forwarded_nvlink=int((own_node_peers + forwarded_at_remote).sum()) * message_bytes,
        direct_rdma=int(off_node_ranks.sum()) * message_bytes,
        direct_nvlink=int(own_node_peers.sum()) * message_bytes,
    )
