"""Dispatch and combine over torch.distributed with node forwarding, for EP groups that span nodes.

Issue [5/8]'s scheme (deepep_megatron/forwarding.py has its indices and a one-process emulation),
run as two all-to-alls of the group instead of the flat one of the reference backend:

* **RDMA leg**: each rank sends a token once to each other node that holds a destination of it,
  to its proxy there (the rank with the same local index), with the token's destination bits over
  that node's ranks. Only same-local-index pairs exchange rows here, so on a cluster this traffic
  is what crosses the network, deduplicated per node.
* **NVLink leg**: each rank sends, to every rank of its own node, its own tokens for that rank and
  the forwarded slots whose bit is set for it, grouped by source node; the receiver puts them in
  (source rank, source token) order. Dispatch is bit-identical to the reference backend.
* **Combine** goes back the same way: each proxy sums, in fp32 and local rank order, the rows of
  its node's ranks for each forwarded token and returns one partial row (in the rows' dtype) per
  token and node; the source adds its own node's rows rank by rank and the other nodes' partials in
  node order. Equal to the reference's rank-order sum with one node or one rank per node, otherwise
  within one rounding per node partial (the same result as ``forwarding.forwarded_combine``).

The collectives are the group's (gloo or NCCL), so this runs wherever the reference backend runs;
it is the protocol the NVSHMEM internode kernels will implement on the device, not those kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..forwarding import rdma_slots
from ..topology import Topology
from .base import DispatchLayout
from .reference import ReferenceBackend, _spec, pack_rows, unpack_rows


@dataclass
class ForwardingState:
    """What a dispatch leaves for the combine that reverses it (the handle's ``private["moves"]``).

    Attributes:
        slots: [T, N] int64, this rank's tokens' slots on each node (-1: not sent there).
        rdma_rows: [R, N] int64 on the host, every rank's slot count per node.
        region_bits: per source rank (n, l) of another node (l: this rank's local index), the
            destination bits [S, L] bool of the slots this rank forwarded for it; others empty.
    """

    slots: torch.Tensor
    rdma_rows: torch.Tensor
    region_bits: list[torch.Tensor]


class ForwardingBackend(ReferenceBackend):
    """The reference backend's API and checks, with the rows moved by node forwarding."""

    name = "forwarding"

    def __init__(self, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank, ranks_per_node: int) -> None:
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)
        self.topology = Topology(self.num_ranks, ranks_per_node)

    def _all_to_all(self, chunks: list[torch.Tensor], recv_counts: list[int]) -> list[torch.Tensor]:
        """``chunks[r]`` [n_r, B] uint8 rows to rank r -> the rows from each rank (``recv_counts``)."""
        received = self._exchange_rows(torch.cat(chunks), [c.size(0) for c in chunks], recv_counts)
        return list(received.split(recv_counts))

    def _move_tokens(self, token_rows, is_token_in_rank, send_tokens, counts, moves=None):
        """:meth:`ReferenceBackend._move_tokens` by node forwarding: the RDMA leg, then the NVLink leg
        (which picks rows per node and rank from ``is_token_in_rank``: ``send_tokens`` is not needed).
        A cached dispatch (``moves``: the :class:`ForwardingState` of the dispatch it repeats) reuses
        its slots, slot counts and destination bits: no count gather, rows only on the RDMA leg."""
        L, N, me = self.topology.ranks_per_node, self.topology.num_nodes, self.rank
        home, local = divmod(me, L)
        num_tokens, row_bytes = token_rows.shape
        if moves is None:
            slots = rdma_slots(is_token_in_rank, L, me)
            rdma_rows = self._gather_rows((slots >= 0).sum(dim=0))  # notify: [R, N], every rank's
        else:
            slots, rdma_rows = moves.slots, moves.rdma_rows
        bits = is_token_in_rank.reshape(num_tokens, N, L)

        # RDMA leg: the row (with its destination bits, unless the proxies kept them) once per
        # (token, other node), to the proxy there.
        empty = token_rows.new_empty((0, row_bytes + (L if moves is None else 0)))
        send = [empty] * self.num_ranks
        recv_counts = [0] * self.num_ranks
        for m in range(N):
            if m == home:
                continue
            sent = slots[:, m] >= 0
            rows = token_rows[sent]
            send[m * L + local] = rows if moves is not None else torch.cat([rows, bits[sent, m].to(torch.uint8)], dim=1)
            recv_counts[m * L + local] = int(rdma_rows[m * L + local, home])
        regions = self._all_to_all(send, recv_counts)
        region_bits = [r[:, row_bytes:].bool() for r in regions] if moves is None else moves.region_bits

        # NVLink leg: to each rank of this node, by source node: own tokens, or region n's slots.
        send = [token_rows.new_empty((0, row_bytes))] * self.num_ranks
        for j in range(L):
            dest = home * L + j
            parts = []
            for n in range(N):
                if n == home:
                    parts.append(token_rows[is_token_in_rank[:, dest]])
                else:
                    source = n * L + local
                    parts.append(regions[source][region_bits[source][:, j], :row_bytes])
            send[dest] = torch.cat(parts)
        from_local = [self._by_source_node(counts, q, me) for q in range(L)]  # from rank (home, q)
        got = self._all_to_all(send, self._node_spread([sum(lengths) for lengths in from_local]))
        pieces = []
        for s in range(self.num_ranks):  # (source rank, source token) order
            n, q = divmod(s, L)
            start = sum(from_local[q][:n])
            pieces.append(got[home * L + q][start:start + from_local[q][n]])
        return torch.cat(pieces), ForwardingState(slots, rdma_rows, region_bits)

    def _by_source_node(self, counts: torch.Tensor, source_local: int, receiver: int) -> list[int]:
        """Rows ``receiver`` holds (or gets) of each source (n, ``source_local``), n in node order:
        what one rank hands another of its node on the NVLink leg, grouped by source node."""
        L = self.topology.ranks_per_node
        return [int(counts[n * L + source_local, receiver]) for n in range(self.topology.num_nodes)]

    def _node_spread(self, per_local_rank: list[int]) -> list[int]:
        """A count per rank of this node (by local index) -> a count per rank of the group (0 elsewhere)."""
        spread = [0] * self.num_ranks
        home = self.rank // self.topology.ranks_per_node
        for q, count in enumerate(per_local_rank):
            spread[home * self.topology.ranks_per_node + q] = count
        return spread

    def _combine_rows(self, columns: list[torch.Tensor], layout: DispatchLayout) -> list[torch.Tensor]:
        """:meth:`ReferenceBackend._combine_rows` back along the dispatch's legs, the proxies summing
        their node's rows (see the module docstring for the order)."""
        state: ForwardingState = layout.private["moves"]
        counts = layout.private["counts"]
        is_token_in_rank = layout.is_token_in_rank
        L, N, me = self.topology.ranks_per_node, self.topology.num_nodes, self.rank
        home, local = divmod(me, L)
        specs = [_spec(t) for t in columns]
        packed = pack_rows(columns)
        row_bytes = packed.size(1)

        # NVLink leg back: to each rank q of this node, what came from it (sources (n, q), node order).
        start = torch.cumsum(counts[:, me], 0) - counts[:, me]
        send = [packed.new_empty((0, row_bytes))] * self.num_ranks
        for q in range(L):
            sources = [n * L + q for n in range(N)]
            send[home * L + q] = torch.cat([packed[int(start[s]):int(start[s] + counts[s, me])] for s in sources])
        # From each rank j of this node: my tokens' rows there (own node) and, per other node n, the
        # rows of the slots this rank forwarded to j for source (n, local).
        to_me = [self._by_source_node(counts, local, home * L + j) for j in range(L)]  # from rank (home, j)
        back = self._all_to_all(send, self._node_spread([sum(lengths) for lengths in to_me]))

        def part(j: int, n: int) -> list[torch.Tensor]:
            begin = sum(to_me[j][:n])
            return unpack_rows(back[home * L + j][begin:begin + to_me[j][n]], specs)

        # The proxy's reduce, per region: fp32 in local rank order, one row per slot in the rows' dtype.
        send = [packed.new_empty((0, row_bytes))] * self.num_ranks
        recv_counts = [0] * self.num_ranks
        for n in range(N):
            if n == home:
                continue
            source = n * L + local
            bits = state.region_bits[source]
            partial = [torch.zeros(bits.size(0), *shape, dtype=torch.float32, device=packed.device) for _, shape in specs]
            for j in range(L):
                for total, rows in zip(partial, part(j, n)):
                    total[bits[:, j]] += rows.float()
            send[source] = pack_rows([p.to(dtype) for p, (dtype, _) in zip(partial, specs)])
            recv_counts[source] = int(state.rdma_rows[me, n])
        partials = self._all_to_all(send, recv_counts)  # RDMA leg back: from the proxy on each node

        sums = [torch.zeros(is_token_in_rank.size(0), *shape, dtype=torch.float32, device=packed.device)
                for _, shape in specs]
        for m in range(N):  # node order; inside this node, rank order
            if m == home:
                for j in range(L):
                    sel = is_token_in_rank[:, home * L + j]
                    for total, rows in zip(sums, part(j, home)):
                        total[sel] += rows.float()
            else:
                sel = state.slots[:, m] >= 0
                for total, rows in zip(sums, unpack_rows(partials[m * L + local], specs)):
                    total[sel] += rows.float()
        return sums


__all__ = ["ForwardingBackend", "ForwardingState"]
