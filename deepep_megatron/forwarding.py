"""Issue [5/8]'s internode dispatch and combine as index arithmetic over every rank's routing (no GPU,
no network): which node a token crosses to, which rank forwards it there, and the row it lands in.

The internode kernels must compute these same indices on the device. This module is their
specification and, in the tests, an oracle for each leg on its own (the reference backend gives
only the end result, so a kernel that misplaces a row on the RDMA leg and again on the NVLink leg
would show there only as a wrong row, not as the leg at fault).

Ranks sit in nodes of L consecutive ranks (node n holds ranks n*L .. n*L + L - 1); rank s is
(n_s, l_s) = (s // L, s % L).

* **Dispatch.** A token of s that goes to ranks of its own node is written there directly (NVLink).
  For every other node m that holds one of its destination ranks, s puts the token *once* (RDMA)
  into the region for node n_s of its **proxy** on m, the rank (m, l_s) with the same local index,
  at slot ``rdma_slot[s][t, m]``: s's tokens for node m, numbered in source token order. With the
  row travels the token's destination bits over node m's L ranks. The proxy forwards each slot to
  every local rank j whose bit is set (NVLink; j = l_s is its own receive tensor), at row
  ``rank_prefix[s, (m, j)]`` + the number of earlier slots of that region with bit j: source s's
  rows on a rank start at notify's prefix-matrix entry, and slots keep source token order, so every
  receive tensor stays in (source rank, source token) order, as on every other path.
* **Combine**, the reverse. The proxy reads each slot's expert-output rows back from the local ranks
  that received it, sums them in fp32 in local rank order, and puts one row per slot (the node's
  partial sum, rounded to the rows' dtype: one RDMA row per token and node, as in dispatch) into
  s's region for node m. Its own node's rows s sums the same way (the NVLink leg's combine, rounded
  to the rows' dtype too). Rank s then adds the nodes' partials in fp32 and node order and rounds
  once. With one node, or one rank per node, that is exactly the reference's rank-order sum;
  otherwise it differs by the partials' rounding (at most one bf16 rounding per node partial) and
  the grouping of the additions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .topology import Topology


@dataclass
class ForwardingPlan:
    """Where every copy of one internode dispatch goes (all ranks' routing known).

    Attributes:
        topology: the ranks' node split.
        is_token_in_rank: per source rank s, [T_s, R] bool: token t goes to rank r.
        rank_prefix: [R, R] int64, entry [s, r]: rows rank r receives from ranks 0..s-1 (where source
            s's rows start on r; notify's prefix matrix, exclusive).
        num_recv_rows: [R] int64, rows each rank receives.
        rdma_slot: per source rank s, [T_s, N] int64: slot of token t in its proxy's region on node m,
            -1 where the token does not cross to m (no destination there, or m is s's own node).
        num_rdma_rows: [R, N] int64, entry [s, m]: slots s fills on node m (0 for its own node); DeepEP's
            ``num_tokens_per_rdma_rank`` minus the own-node entry.
    """

    topology: Topology
    is_token_in_rank: list[torch.Tensor]
    rank_prefix: torch.Tensor
    num_recv_rows: torch.Tensor
    rdma_slot: list[torch.Tensor]
    num_rdma_rows: torch.Tensor

    def proxy_of(self, source: int, node: int) -> int:
        """The rank on ``node`` that receives ``source``'s RDMA puts: the same local index."""
        return node * self.topology.ranks_per_node + source % self.topology.ranks_per_node

    def direct_rows(self, source: int, rank: int) -> torch.Tensor:
        """Rows on ``rank`` (of ``source``'s own node) of the tokens ``source`` writes there directly,
        in token order: where source's rows start on it, and on."""
        count = int(self.is_token_in_rank[source][:, rank].sum())
        return self.rank_prefix[source, rank] + torch.arange(count)

    def forward_rows(self, source: int, node: int) -> torch.Tensor:
        """[num_rdma_rows[source, node], L] int64: for each slot of ``source``'s region on ``node``, its
        row on each local rank j of that node (-1: bit j clear), computed from what the proxy holds
        (the slots' destination bits, in slot order, and the prefix matrix)."""
        L = self.topology.ranks_per_node
        sent = self.rdma_slot[source][:, node] >= 0
        bits = self.is_token_in_rank[source][sent][:, node * L:(node + 1) * L]  # travels with each slot
        return proxy_rows(bits, self.rank_prefix[source, node * L:(node + 1) * L])


def rdma_slots(is_token_in_rank: torch.Tensor, ranks_per_node: int, rank: int) -> torch.Tensor:
    """[T, N] int64 for ``rank``'s tokens (``is_token_in_rank`` [T, R] bool): each token's slot in its
    proxy's region on node m, numbered in token order; -1 where it does not cross to m (no
    destination rank there, or m is this rank's own node). What a source computes alone."""
    num_tokens, num_ranks = is_token_in_rank.shape
    to_node = is_token_in_rank.reshape(num_tokens, num_ranks // ranks_per_node, ranks_per_node).any(dim=2)
    to_node[:, rank // ranks_per_node] = False  # own node: straight over NVLink, no RDMA slot
    slot = to_node.long().cumsum(dim=0) - 1
    return torch.where(to_node, slot, torch.full_like(slot, -1))


def proxy_rows(bits: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """[S, L] int64 rows a proxy forwards one region's slots to: ``bits`` [S, L] bool, the slots'
    destination bits over its node's L ranks in slot order; ``base`` [L], where the region's
    source's rows start on each local rank (notify's prefix matrix). -1 where the bit is clear.
    What a proxy computes alone, from what arrived."""
    running = bits.long().cumsum(dim=0) - 1
    return torch.where(bits, base.to(running.device) + running, torch.full_like(running, -1))


@dataclass
class LegRows:
    """Rows one emulated dispatch moved on each leg (a combine moves the same counts back)."""

    rdma: int    # puts to a proxy on another node
    nvlink: int  # writes into another rank of the same node (by the source, or by a proxy)
    local: int   # writes into the writer's own receive tensor


def plan_forwarding(is_token_in_rank: Sequence[torch.Tensor], ranks_per_node: int) -> ForwardingPlan:
    """The plan of one dispatch from every source rank's ``is_token_in_rank`` ([T_s, R] bool, as
    ``get_dispatch_layout`` returns it on rank s)."""
    num_ranks = len(is_token_in_rank)
    topology = Topology(num_ranks, ranks_per_node)
    N, L = topology.num_nodes, ranks_per_node
    for s, mask in enumerate(is_token_in_rank):
        if mask.dtype != torch.bool or mask.dim() != 2 or mask.size(1) != num_ranks:
            raise ValueError(f"is_token_in_rank[{s}] must be a [T, {num_ranks}] bool tensor, got "
                             f"{mask.dtype}{list(mask.shape)}")
    counts = torch.stack([mask.sum(dim=0) for mask in is_token_in_rank])  # [S, R]
    rdma_slot = []
    num_rdma_rows = torch.zeros(num_ranks, N, dtype=torch.long)
    for s, mask in enumerate(is_token_in_rank):
        rdma_slot.append(rdma_slots(mask, L, s))
        num_rdma_rows[s] = (rdma_slot[-1] >= 0).sum(dim=0)
    return ForwardingPlan(topology, list(is_token_in_rank), counts.cumsum(dim=0) - counts, counts.sum(dim=0),
                          rdma_slot, num_rdma_rows)


def forwarded_dispatch(plan: ForwardingPlan, xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], LegRows]:
    """Move every source rank's rows ``xs[s]`` ([T_s, ...]) along the plan's two legs.

    Returns:
        Each rank's received rows ([num_recv_rows[r], ...], (source rank, source token) order) and
        the rows moved on each leg. Raises RuntimeError when a row is written twice or never (a plan
        whose indices do not tile the receive tensors).
    """
    topology = plan.topology
    L, N = topology.ranks_per_node, topology.num_nodes
    recv = [xs[0].new_empty((int(n), *xs[0].shape[1:])) for n in plan.num_recv_rows.tolist()]
    writes = [torch.zeros(int(n), dtype=torch.long) for n in plan.num_recv_rows.tolist()]
    legs = LegRows(0, 0, 0)

    def write(writer: int, rank: int, rows: torch.Tensor, data: torch.Tensor) -> None:
        recv[rank][rows] = data
        writes[rank].index_add_(0, rows, torch.ones_like(rows))
        if writer == rank:
            legs.local += rows.numel()
        else:
            legs.nvlink += rows.numel()

    for s, mask in enumerate(plan.is_token_in_rank):
        home = topology.node_of(s)
        for r in range(home * L, (home + 1) * L):  # own node: direct
            sel = mask[:, r]
            write(s, r, plan.direct_rows(s, r), xs[s][sel])
        for m in range(N):  # other nodes: one put per slot, then the proxy forwards
            if m == home:
                continue
            slots = xs[s][plan.rdma_slot[s][:, m] >= 0]
            legs.rdma += slots.size(0)
            proxy, rows = plan.proxy_of(s, m), plan.forward_rows(s, m)
            for j in range(L):
                has = rows[:, j] >= 0
                write(proxy, m * L + j, rows[has, j], slots[has])
    for r, count in enumerate(writes):
        if not bool((count == 1).all()):
            bad = torch.nonzero(count != 1).flatten()[:8].tolist()
            raise RuntimeError(f"forwarded_dispatch: rank {r}'s rows {bad} were written {count[bad].tolist()} times")
    return recv, legs


def forwarded_combine(plan: ForwardingPlan, ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Send every rank's expert-output rows ``ys[r]`` ([num_recv_rows[r], H], dispatch's row order)
    back along the plan: per source rank its [T_s, H] sums, in ``ys``' dtype (fp32 accumulation)."""
    topology = plan.topology
    L, N = topology.ranks_per_node, topology.num_nodes
    dtype = ys[0].dtype
    out = []
    for s, mask in enumerate(plan.is_token_in_rank):
        home = topology.node_of(s)
        acc = torch.zeros((mask.size(0), *ys[0].shape[1:]), dtype=torch.float32)
        for m in range(N):
            if m == home:  # own node: its ranks' rows in rank order, rounded like every node partial
                partial = torch.zeros_like(acc)
                for r in range(home * L, (home + 1) * L):
                    sel = mask[:, r]
                    partial[sel] += ys[r][plan.direct_rows(s, r)].float()
                acc += partial.to(dtype).float()
                continue
            rows = plan.forward_rows(s, m)  # the proxy's reduce, in local rank order
            partial = torch.zeros((rows.size(0), *ys[0].shape[1:]), dtype=torch.float32)
            for j in range(L):
                has = rows[:, j] >= 0
                partial[has] += ys[m * L + j][rows[has, j]].float()
            acc[plan.rdma_slot[s][:, m] >= 0] += partial.to(dtype).float()  # one RDMA row per slot
        out.append(acc.to(dtype))
    return out


__all__ = ["ForwardingPlan", "LegRows", "plan_forwarding", "forwarded_dispatch", "forwarded_combine", "rdma_slots",
           "proxy_rows"]
