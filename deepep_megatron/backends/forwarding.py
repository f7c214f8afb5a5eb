"""Internode dispatch and combine by node forwarding (issue [5/8]), on two legs.

deepep_megatron/forwarding.py has the indices and a one-process emulation; this backend runs them.
Ranks sit in nodes of L consecutive ranks; rank (n, l) = n * L + l.

* **RDMA leg** (between nodes): rank (n, l) sends each of its tokens once to each other node m that
  holds a destination rank of it, to its proxy there, the rank (m, l) with the same local index.
  Only same-local-index ranks (a "rail") exchange here, so on a cluster this is the traffic that
  crosses the network, deduplicated per node. It runs as one all-to-all of the rail's process group,
  or (``rdma_leg="nvshmem"``, env ``DEEPEP_MEGATRON_RDMA_LEG=nvshmem``) as NVSHMEM puts with signals
  into the peers' receive slabs (backends/rail.py, csrc/kernels/rail.cu).
* **NVLink leg** (inside a node): every rank dispatches its *node token list* to its node's ranks
  with a backend over the node's process group: the intranode CUDA kernels (``node_leg="cuda"``) or
  the reference backend. A rank's node token list is, in node order, the tokens it received from
  node n's rank on its rail (its own tokens at its own node's place). The receiver reorders the
  rows from (local source, source node) blocks into (source rank, source token) order, so the
  dispatch is bit-identical to the reference backend's (rows, FP8 scales, top-k, per-expert counts).
* **Combine**, the reverse: the NVLink leg's combine sums each node-token-list row over the node's
  ranks (fp32 in local rank order, one rounding to the rows' dtype); each proxy sends the partial row
  of every forwarded token back over its rail (one row per token and node); the source adds its
  nodes' partials in node order in fp32 (its own node's partial too) and rounds once. With one rank
  per node that is the reference's rank-order sum exactly; otherwise it differs by at most one
  rounding per node partial (the result of ``forwarding.forwarded_combine``).

The RDMA leg's rows are packed bytes: the token row, its FP8 scales, its index, 16-byte padding (the
part the NVLink leg carries on), then its top-k ids and weights and its ``is_token_in_rank`` row,
which the proxy reads to route it inside its node. Every wait is bounded by ``timeout_s``: the
backend's own collectives (the agreement check, notify, the rail's all-to-all, a reference node leg)
run on groups it opens with that timeout, the cuda node leg's kernels and the NVSHMEM rail bound
their waits themselves; an error names this rank and the leg (and, where the kernels know it, the
rank waited for), and ``reset`` (collective) opens fresh groups. The low-latency calls go to the
NVSHMEM low-latency kernels over the whole group when they are built (their puts reach ranks of
other nodes), else to the reference backend.
"""
from __future__ import annotations

import datetime
import math
from typing import Optional

import torch
import torch.distributed as dist

from ..config import Config
from ..forwarding import rdma_slots
from ..layout import align_up
from ..profiling import HostStages
from ..topology import Topology
from .base import Backend, DispatchLayout, DispatchOutput, channel_prefix_matrix
from .low_latency import LowLatencyDelegate, low_latency_engine
from .rail import RDMA_LEGS, CollectiveRail, NvshmemRail
from .reference import (
    ReferenceBackend,
    _row_fields,
    _spec,
    as_words,
    cat_rows,
    deepep_prefix_matrices,
    layout_problem,
    pack_rows,
    received_per_expert,
    refuse_bad_layouts,
    routed_per_expert,
    take_rows,
    unpack_rows,
)

#: The NVLink leg's rows are a multiple of this many bytes (the cuda kernels move 16-byte vectors).
NODE_ROW_ALIGN = 16
#: Node legs a ForwardingBackend can run on.
NODE_LEGS = ("reference", "cuda")


def _subgroup(ranks: list[int], timeout_s: float) -> dist.ProcessGroup:
    """A process group of ``ranks`` (global ranks) that only its members create, whose collectives
    give up after ``timeout_s`` seconds."""
    return dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s), use_local_synchronization=True)


def _padding(rows: int, row_bytes: int, device: torch.device) -> torch.Tensor:
    """[rows, P] uint8 zeros that round ``row_bytes`` up to a multiple of :data:`NODE_ROW_ALIGN`."""
    return torch.zeros(rows, align_up(row_bytes, NODE_ROW_ALIGN) - row_bytes, dtype=torch.uint8, device=device)


def _row_bytes(columns: list[torch.Tensor]) -> int:
    """Bytes of one row of ``columns`` (each [N, ...]) packed by :func:`pack_rows`."""
    return sum(math.prod(c.shape[1:]) * c.element_size() for c in columns)


def _slot_tokens(slots: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Per node m, the tokens (ascending) that cross to it: ``slots`` [T, N] (-1: not sent there),
    ``counts[m]`` of them (known on the host from notify), found with no host sync."""
    return [torch.argsort((slots[:, m] < 0).to(torch.int8), stable=True)[:count] for m, count in enumerate(counts)]


def _as_node_rows(rows: torch.Tensor, width: int) -> torch.Tensor:
    """The first ``width`` bytes (a multiple of 16) of packed byte rows [N, B] as the NVLink leg's x:
    int16 [N, width / 2], contiguous, so the cuda kernels size their ring slots for ``width`` bytes
    (they size one-byte rows as FP8, at twice that). Copied as words."""
    words = as_words(rows)
    if words.dtype == torch.uint8:  # no rows
        return rows[:, :width].contiguous().view(torch.int16)
    return words[:, :width // 8].contiguous().view(torch.int16)


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along dim 0 for any [N, ...] tensor, its rows gathered as packed words."""
    if t.dim() < 2 or t.size(0) == 0:
        return t[index]
    rows = t.contiguous().view(t.size(0), -1).view(torch.uint8)
    return take_rows(rows, index).view(t.dtype).view(index.numel(), *t.shape[1:])


class ForwardingBackend(LowLatencyDelegate, Backend):
    """Dispatch/combine for an EP group over several nodes: an RDMA leg between same-local-index
    ranks, then an NVLink leg inside each node (see the module docstring).

    Args (beyond :class:`Backend`'s):
        ranks_per_node: L, ranks of one node (the group splits into consecutive nodes of L).
        node_leg: ``"cuda"`` (the intranode kernels; needs L in 2, 4, 8 and ``num_nvl_bytes`` > 0)
            or ``"reference"``. With L = 1 there is no NVLink peer and the reference moves the rows.
        timeout_s: the bound of every wait of both legs (None: env ``DEEPEP_MEGATRON_TIMEOUT_S`` or 100 s).
        rdma_leg: ``"collective"`` (the rail's process-group all-to-all) or ``"nvshmem"`` (puts into
            the NVSHMEM heap of ``num_rdma_bytes``; backends/rail.py).
    """

    def __init__(self, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank, ranks_per_node: int,
                 node_leg: str = "reference", timeout_s: Optional[float] = None, rdma_leg: str = "collective") -> None:
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)
        if node_leg not in NODE_LEGS:
            raise ValueError(f"node_leg must be one of {NODE_LEGS}, got {node_leg!r}")
        if rdma_leg not in RDMA_LEGS:
            raise ValueError(f"rdma_leg must be one of {RDMA_LEGS}, got {rdma_leg!r}")
        from .cuda import resolve_timeout  # importable without the extension

        self.topology = Topology(self.num_ranks, ranks_per_node)
        self.timeout_s = resolve_timeout(timeout_s)
        L = ranks_per_node
        self.home, self.local = divmod(self.rank, L)
        self._members = dist.get_process_group_ranks(group)
        self._kernels_inside = node_leg == "cuda" and L > 1
        self._rdma_leg = rdma_leg
        self.rail_group: Optional[dist.ProcessGroup] = None  # the collective RDMA leg's group
        self.name = "cuda" if self._kernels_inside else "forwarding"
        if self._kernels_inside:  # the kernels bound their own waits; their group only starts and stops them
            from .cuda import CudaBackend

            self.node_group = _subgroup(self._node_members(), self.timeout_s)
            self.node: Backend = CudaBackend(self.node_group, num_nvl_bytes, 0, False, num_qps_per_rank, self.timeout_s)
        self._open_collectives()
        self._stages = HostStages()
        if rdma_leg == "nvshmem":  # kept across resets: its own reset zeroes its signals
            self._rail = NvshmemRail(self.control_group, self.topology, num_rdma_bytes, self.timeout_s)
        # The low-latency calls: the NVSHMEM kernels when built (they reach every rank, NVLink or not;
        # not while the rail holds the process's heap), else the reference backend over the group.
        self._low_latency = low_latency_engine(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
                                               self.timeout_s)
        self.needs_nvl_buffer = self.node.needs_nvl_buffer

    def _node_members(self) -> list[int]:
        L = self.topology.ranks_per_node
        return self._members[self.home * L:(self.home + 1) * L]

    def _open_collectives(self) -> None:
        """The groups whose collectives this backend runs itself, each bounded by ``timeout_s``: the
        whole group (agreement checks, the counts gather, the low-latency calls), this rank's rail
        (the collective RDMA leg; rail rank n = node n) and, with the reference inside nodes, this
        node. A collective that timed out may leave messages behind, so :meth:`reset` opens new ones."""
        L = self.topology.ranks_per_node
        self.control_group = _subgroup(self._members, self.timeout_s)
        self.flat = ReferenceBackend(self.control_group, self.num_nvl_bytes, self.num_rdma_bytes, self.low_latency_mode,
                                     self.num_qps_per_rank)
        if self._rdma_leg == "collective":
            self.rail_group = _subgroup(self._members[self.local::L], self.timeout_s)
            self._rail: CollectiveRail | NvshmemRail = CollectiveRail(self.rail_group)
        if not self._kernels_inside:
            self.node_group = _subgroup(self._node_members(), self.timeout_s)
            self.node = ReferenceBackend(self.node_group, self.num_nvl_bytes, 0, False, self.num_qps_per_rank)

    # ------------------------------------------------------------------ legs
    def _leg(self, where: str, op, *args):
        """Run one step of an operation; its errors say which step and leg, and how to go on."""
        try:
            return op(*args)
        except ValueError as error:
            raise ValueError(f"rank {self.rank}, {where}: {error}") from error
        except RuntimeError as error:
            raise RuntimeError(
                f"rank {self.rank}, {where}: {error}. A collective here gives up after timeout_s={self.timeout_s:g} s "
                "when a rank of it does not take part: every rank must make the same dispatch/combine calls; after "
                "this error every rank calls Buffer.reset()"
            ) from error

    def _agree(self, operation: str, **fields: int) -> None:
        self._leg("the group's agreement check (every rank, before any data moves)",
                  lambda: self.flat._agree(operation, **fields))

    def _from_nodes(self, rdma_rows: torch.Tensor) -> list[int]:
        """Rows node n's rank of this rail puts here, per node n (0 for this node), from notify's
        [source, node] slot counts."""
        return rdma_rows[self.local::self.topology.ranks_per_node, self.home].tolist()

    def _across_nodes(self, send: list[torch.Tensor], recv_counts: list[int], num_sms: int) -> list[torch.Tensor]:
        """RDMA leg: ``send[m]`` [n_m, B] uint8 rows to this rank's proxy on node m -> the rows from
        each node's rank on this rail (``recv_counts[n]`` of them; the caller copies them before
        the next exchange). ``num_sms``: the operation's SM count, the same on every rank."""
        L = self.topology.ranks_per_node
        rail = ", ".join(str(r) for r in range(self.local, self.num_ranks, L))
        where = f"RDMA leg of rail {self.local} (EP ranks {rail}, one per node)"
        return self._leg(where, self._rail.exchange, send, recv_counts, num_sms)

    def _node_call(self, op, *args):
        """One operation of the NVLink leg; its errors name this node."""
        L = self.topology.ranks_per_node
        return self._leg(f"NVLink leg of node {self.home} (EP ranks {self.home * L}..{self.home * L + L - 1})", op, *args)

    def _node_order(self, counts: torch.Tensor, device: torch.device) -> torch.Tensor:
        """[N_recv] int64: row i of the (source rank, source token)-ordered receive tensor is row
        ``order[i]`` of what the NVLink leg delivered, which comes in (local source q, source node n)
        blocks; ``counts`` [R, R] (source, destination) on the host."""
        L, N = self.topology.ranks_per_node, self.topology.num_nodes
        sizes = counts[:, self.rank].view(N, L)  # [n, q]: rows from source (n, q)
        starts = (torch.cumsum(sizes.t().reshape(-1), 0) - sizes.t().reshape(-1)).view(L, N).t()  # delivered order q, n
        sizes, starts = sizes.reshape(-1), starts.reshape(-1)  # final order: n, then q
        first = torch.cumsum(sizes, 0) - sizes
        total = int(sizes.sum())
        within = torch.arange(total) - torch.repeat_interleave(first, sizes)
        return (torch.repeat_interleave(starts, sizes) + within).to(device)

    def _node_token_list(self, own: torch.Tensor, regions: list[torch.Tensor]) -> torch.Tensor:
        """This rank's node token list: per node in order, its own rows or the rows from that node."""
        return cat_rows([own if n == self.home else regions[n] for n in range(self.topology.num_nodes)])

    # ------------------------------------------------------------------ normal path
    def get_dispatch_layout(self, topk_idx, num_experts):
        return self.flat.get_dispatch_layout(topk_idx, num_experts)

    def dispatch(self, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                 expert_alignment, config: Config, cached_layout: Optional[DispatchLayout],
                 num_worst_tokens: int = 0) -> DispatchOutput:
        """See :class:`Backend`; exact sizes (the Buffer pads a ``num_worst_tokens`` dispatch)."""
        payload = [x] if x_scales is None else [x, x_scales]
        stages = self._stages
        stages.start()
        if cached_layout is not None:
            return self._cached_dispatch(payload, cached_layout, config)
        R, N, L = self.num_ranks, self.topology.num_nodes, self.topology.ranks_per_node
        num_experts, num_channels, num_tokens = num_tokens_per_expert.numel(), config.num_channels, x.size(0)
        self._agree("dispatch", topk=0 if topk_idx is None else topk_idx.size(1), experts=num_experts,
                         channels=num_channels, **_row_fields(x, x_scales))
        stages.mark("agreement")
        # notify: every rank's rows per destination rank and per node, per expert, per (rank, channel);
        # this rank's counts come to the host in one copy
        slots = rdma_slots(is_token_in_rank, L, self.rank)  # [T, N]
        send_counts = is_token_in_rank.sum(dim=0)
        mine = torch.cat([
            num_tokens_per_rank.to(torch.int64), (slots >= 0).sum(dim=0), num_tokens_per_expert.to(torch.int64),
            channel_prefix_matrix(is_token_in_rank, num_channels).to(torch.int64).reshape(-1), send_counts,
            routed_per_expert(topk_idx, num_experts) if topk_idx is not None else send_counts[:0],
        ]).cpu()
        stages.mark("notify: this rank's counts to the host")
        sizes = [R, N, num_experts, R * num_channels, R, num_experts if topk_idx is not None else 0]
        per_rank_sent, slots_sent, per_expert_sent, channel_sent, sent, routed = mine.split(sizes)
        problem = layout_problem(per_rank_sent, sent, per_expert_sent, routed if topk_idx is not None else None)
        everyone = self._leg("notify (the counts gather of every rank)", self.flat._gather_rows, torch.cat([
            per_rank_sent, slots_sent, per_expert_sent, channel_sent, torch.tensor([int(bool(problem))]),
        ]))
        refuse_bad_layouts(problem, everyone[:, -1])
        counts = everyone[:, :R]  # [source, destination]
        rdma_rows = everyone[:, R:R + N]  # [source, node]: slots a source fills there
        per_expert = received_per_expert(everyone[:, R + N:R + N + num_experts], self.rank, expert_alignment)
        source_channels = everyone[:, R + N + num_experts:-1].view(R, R, num_channels)[:, self.rank]
        # The indices built on the host go to the device now, while its stream is idle: a copy from
        # pageable host memory synchronizes the stream, which after the legs' launches would hold the
        # host until their kernels end.
        order = self._node_order(counts, x.device)
        rank_prefix, recv_channel_prefix = deepep_prefix_matrices(counts, source_channels, self.rank, x.device)
        stages.mark("notify: every rank's counts")

        # RDMA leg: [x, scales, token index, padding | top-k ids, weights, is_token_in_rank row]
        carried = payload + [torch.arange(num_tokens, device=x.device)]
        carried.append(_padding(num_tokens, _row_bytes(carried), x.device))
        routing = [] if topk_idx is None else [topk_idx.to(torch.int64), topk_weights.to(torch.float32)]
        routing.append(is_token_in_rank.to(torch.uint8))
        # whole rows of 16-byte multiples: every copy of them below moves words, the slabs' rows unpadded
        rows = pack_rows(carried + routing + [_padding(num_tokens, _row_bytes(carried + routing), x.device)])
        slot_tokens = _slot_tokens(slots, rdma_rows[self.rank].tolist())
        send = [take_rows(rows, tokens) for tokens in slot_tokens]
        stages.mark("RDMA leg: rows packed")
        regions = self._across_nodes(send, self._from_nodes(rdma_rows), config.num_sms)
        stages.mark("RDMA leg: exchange")
        node_rows = self._node_token_list(rows, regions)

        # NVLink leg: the node token list to this node's ranks, routed by the rows' own routing columns
        carried_bytes = _row_bytes(carried)
        route = unpack_rows(node_rows[:, carried_bytes:], [_spec(t) for t in routing])
        node_in_rank = route[-1][:, self.home * L:(self.home + 1) * L].bool()
        node_topk = node_weights = None
        node_experts = L * (num_experts // R)
        node_per_expert = torch.zeros(node_experts, dtype=torch.int32, device=x.device)
        if topk_idx is not None:
            global_topk, node_weights = route[0], route[1]
            first = self.home * node_experts
            on_node = (global_topk >= first) & (global_topk < first + node_experts)
            node_topk = torch.where(on_node, global_topk - first, torch.full_like(global_topk, -1))
            node_per_expert = routed_per_expert(node_topk, node_experts).to(torch.int32)
        node_x = _as_node_rows(node_rows, carried_bytes)
        stages.mark("NVLink leg: node token list and its routing")
        node_out = self._node_call(
            self.node.dispatch, node_x, None, node_topk, node_weights,
            node_in_rank.sum(dim=0).to(torch.int32), node_in_rank, node_per_expert, 1, config, None,
        )
        self._rail.check_errors()  # the NVLink leg's host wait came after the exchange on the stream
        stages.mark("NVLink leg: dispatch")
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        received = unpack_rows(take_rows(node_out.recv_x.view(torch.uint8), order), [_spec(t) for t in carried[:-1]])
        layout = DispatchLayout(
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_rank=send_counts.to(torch.int32),
            num_recv_tokens_per_rank=counts[:, self.rank].to(torch.int32),
            recv_src_idx=received[-1].to(torch.int32),
            num_recv_tokens_per_expert_list=per_expert,
            private={"backend": "forwarding", "node_layout": node_out.layout, "slot_tokens": slot_tokens,
                     "rdma_rows": rdma_rows, "order": order, "inverse": inverse},
            num_channels=num_channels,
            rank_prefix_matrix=rank_prefix,
            recv_channel_prefix_matrix=recv_channel_prefix,
        )
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_topk_idx, recv_topk_weights = _take(node_out.recv_topk_idx, order), _take(node_out.recv_topk_weights, order)
        stages.mark("outputs in (source rank, source token) order")
        return DispatchOutput(received[0], received[1] if x_scales is not None else None, recv_topk_idx,
                              recv_topk_weights, layout)

    @staticmethod
    def _private(layout: DispatchLayout) -> dict:
        if layout.private.get("backend") != "forwarding":
            raise ValueError("this handle was made by another backend's dispatch; pass the handle of this Buffer's dispatch")
        return layout.private

    def _cached_dispatch(self, payload: list[torch.Tensor], layout: DispatchLayout, config: Config) -> DispatchOutput:
        """Repeat ``layout``'s dispatch for new rows: the same slots on the RDMA leg, the NVLink leg's
        cached dispatch, the same reordering."""
        private = self._private(layout)
        x = payload[0]
        self._agree("cached dispatch", channels=layout.num_channels, **_row_fields(*payload))
        stages = self._stages
        stages.mark("agreement")
        if layout.is_token_in_rank.size(0) != x.size(0):
            raise ValueError(f"x has {x.size(0)} tokens but the cached layout was made for {layout.is_token_in_rank.size(0)}")
        slot_tokens, rdma_rows = private["slot_tokens"], private["rdma_rows"]
        carried = payload + [_padding(x.size(0), _row_bytes(payload), x.device)]
        rows = pack_rows(carried)
        send = [take_rows(rows, tokens) for tokens in slot_tokens]
        stages.mark("RDMA leg: rows packed")
        regions = self._across_nodes(send, self._from_nodes(rdma_rows), 2 * layout.num_channels)
        stages.mark("RDMA leg: exchange")
        node_x = _as_node_rows(self._node_token_list(rows, regions), rows.size(1))
        stages.mark("NVLink leg: node token list")
        node_out = self._node_call(self.node.dispatch, node_x, None, None, None, None, None, None, 1, config,
                                   private["node_layout"])
        self._rail.check_errors()  # the NVLink leg's host wait came after the exchange on the stream
        stages.mark("NVLink leg: cached dispatch")
        received = unpack_rows(take_rows(node_out.recv_x.view(torch.uint8), private["order"]), [_spec(t) for t in payload])
        stages.mark("outputs in (source rank, source token) order")
        return DispatchOutput(received[0], received[1] if len(payload) > 1 else None, None, None, layout)

    def combine(self, x, topk_weights, layout: DispatchLayout, config: Config):
        """``x`` [N_recv, H] (the dispatch's row order) -> [T, H] x.dtype, and the summed
        ``topk_weights`` [T, K] fp32 or None: node partials from the NVLink leg, summed in node order."""
        private = self._private(layout)
        stages = self._stages
        stages.start()
        self._agree("combine", topk=0 if topk_weights is None else topk_weights.size(1), channels=layout.num_channels,
                         **_row_fields(x, None))
        stages.mark("agreement")
        N = self.topology.num_nodes
        slot_tokens, rdma_rows, inverse = private["slot_tokens"], private["rdma_rows"], private["inverse"]
        weights = None if topk_weights is None else _take(topk_weights.to(torch.float32), inverse)
        node_x = _take(x, inverse)
        stages.mark("NVLink leg: rows in node token list order")
        partial, partial_weights = self._node_call(self.node.combine, node_x, weights, private["node_layout"], config)
        stages.mark("NVLink leg: combine")
        num_tokens = layout.is_token_in_rank.size(0)
        sizes = self._from_nodes(rdma_rows)
        sizes[self.home] = num_tokens
        columns = [partial] if partial_weights is None else [partial, partial_weights]
        specs = [_spec(t) for t in columns]
        by_node = [c.split(sizes) for c in columns]  # [column][node]
        nothing = torch.empty(0, _row_bytes(columns), dtype=torch.uint8, device=x.device)
        send = [pack_rows([c[n] for c in by_node]) if n != self.home else nothing for n in range(N)]
        stages.mark("RDMA leg: partials packed")
        back = self._across_nodes(  # RDMA leg back: each forwarded token's node partial to its source
            send, rdma_rows[self.rank].tolist(), 2 * layout.num_channels)
        stages.mark("RDMA leg: exchange")
        sums = [torch.zeros(num_tokens, *shape, dtype=torch.float32, device=x.device) for _, shape in specs]
        for m in range(N):  # node order, this rank's own node at its place
            if m == self.home:
                for total, rows in zip(sums, (c[m] for c in by_node)):
                    total += rows.float()
                continue
            for total, rows in zip(sums, unpack_rows(back[m], specs)):
                total.index_add_(0, slot_tokens[m], rows.float())  # one row per token: a single add each
        self._rail.check_errors(wait=True)  # nothing else waits for the exchange: never return rows it missed
        out = sums[0].to(x.dtype), sums[1] if partial_weights is not None else None
        stages.mark("node partials summed")
        return out

    def host_timing(self) -> list[tuple[str, float]]:
        """``[(stage, us)]`` of this rank's last dispatch, cached dispatch or combine when the process
        runs with ``DEEPEP_MEGATRON_HOST_TIMING=1`` (empty otherwise): this backend's stages (with
        ``DEEPEP_MEGATRON_HOST_TIMING_SYNC=1`` each includes its GPU work), then those of a cuda
        NVLink leg inside its dispatch / combine, named ``"NVLink leg/<stage>"``."""
        inner = getattr(self.node, "host_timing", None)
        nested = inner() if inner is not None and self._stages.enabled else []
        return self._stages.stages() + [(f"NVLink leg/{stage}", us) for stage, us in nested]

    # ------------------------------------------------------------------ lifecycle
    def synchronize(self) -> None:
        """Wait for this rank's NVLink-leg kernels and raise an error they recorded (cuda node leg)."""
        wait = getattr(self.node, "synchronize", None)
        if wait is not None:
            self._node_call(wait)

    def reset(self) -> None:
        """Collective: new groups for this backend's own collectives (one that timed out may hold
        stale messages), then the NVLink leg's and the NVSHMEM RDMA leg's resets."""
        self._open_collectives()
        self.node.reset()
        self._rail.reset(self.control_group)
        dist.barrier(group=self.control_group)

    def destroy(self) -> None:
        self.node.destroy()
        self._low_latency.destroy()
        self._rail.destroy()
        dist.barrier(group=self.control_group)
        for group in (self.node_group, self.rail_group, self.control_group):
            if group is not None:
                dist.destroy_process_group(group)


__all__ = ["ForwardingBackend", "NODE_LEGS", "NODE_ROW_ALIGN"]
