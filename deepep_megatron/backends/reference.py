"""Pure-PyTorch backend over torch.distributed: the test oracle and the CPU path.

Every exchange is one ``all_to_all_single`` of packed byte rows (so any dtype, FP8 included, moves
bit-exactly) preceded, where the receiver cannot know the sizes, by one ``all_to_all_single`` of
counts. Works on gloo (CPU tensors) and NCCL (CUDA tensors); with a gloo group and CUDA tensors
(several ranks sharing one GPU) the rows are staged through host memory.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import Config
from ..fp8 import pack_ue8m0, per_token_cast_to_fp8
from .base import (
    Backend,
    DispatchLayout,
    DispatchOutput,
    LowLatencyDispatchOutput,
    LowLatencyLayout,
    channel_prefix_matrix,
)


#: Packed rows are copied in words of this many bytes where their widths and offsets allow: a CUDA
#: gather, concatenation or strided copy runs one thread iteration per element, so byte rows cost
#: 8x the iterations of the same bytes as int64.
ROW_WORD = torch.int64
ROW_WORD_BYTES = 8


def word_view(rows: torch.Tensor) -> Optional[torch.Tensor]:
    """``rows`` [N, B] uint8 viewed as [N, B / 8] int64, or None where the width, strides or offset
    do not allow a view (or there are no rows)."""
    if rows.size(0) == 0 or rows.size(1) == 0 or rows.size(1) % ROW_WORD_BYTES or rows.stride(1) != 1:
        return None
    if rows.size(0) == 1:  # a size-1 dim may carry any stride, which a dtype view still checks
        rows = rows.view(-1).view(1, -1)
    if rows.stride(0) % ROW_WORD_BYTES or rows.storage_offset() % ROW_WORD_BYTES:
        return None
    return rows.view(ROW_WORD)


def as_words(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` [N, B] uint8 with B a multiple of :data:`ROW_WORD_BYTES` as [N, B / 8] int64 (a view
    when the rows' storage allows it, else a contiguous copy); any other width as it is."""
    if rows.size(0) == 0 or rows.size(1) == 0 or rows.size(1) % ROW_WORD_BYTES:
        return rows
    words = word_view(rows)
    # a fresh copy, not .contiguous(): that returns contiguous rows at an odd storage offset as they are
    return words if words is not None else rows.clone(memory_format=torch.contiguous_format).view(ROW_WORD)


def as_bytes(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`as_words`: [N, W] int64 (or uint8, returned as it is) -> [N, 8 W] uint8."""
    return words if words.dtype == torch.uint8 else words.view(torch.uint8)


def take_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows[index]`` for [N, B] uint8 rows, gathered as words where B allows (same bytes)."""
    return as_bytes(as_words(rows).index_select(0, index))


def cat_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` of [n_i, B] uint8 rows, as words where B allows (same bytes)."""
    width = parts[0].size(1)
    if width == 0 or width % ROW_WORD_BYTES:
        return torch.cat(parts)
    words = [as_words(p) if p.size(0) else p.new_empty(0, width // ROW_WORD_BYTES, dtype=ROW_WORD) for p in parts]
    return torch.cat(words).view(torch.uint8)


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for [N, B] uint8 rows, as words where both allow a view."""
    dst_words, src_words = word_view(dst), word_view(src)
    if dst_words is not None and src_words is not None:
        dst_words.copy_(src_words)
    else:
        dst.copy_(src)


def pack_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the bytes of each row of ``tensors`` (all [N, ...]) into one uint8 [N, B]."""
    num_rows = tensors[0].size(0)
    parts = []
    for t in tensors:
        row_numel = 1
        for s in t.shape[1:]:
            row_numel *= s
        if num_rows == 0:  # an empty tensor may carry strides (e.g. 0) that a dtype view refuses
            parts.append(torch.empty(0, row_numel * t.element_size(), dtype=torch.uint8, device=t.device))
            continue
        parts.append(t.contiguous().view(num_rows, row_numel).view(torch.uint8))
    if len(parts) == 1:
        return parts[0]
    widths = [p.size(1) for p in parts]
    out = torch.empty(num_rows, sum(widths), dtype=torch.uint8, device=parts[0].device)
    if num_rows == 0:
        return out
    words = word_view(out)
    offset = 0
    for part, width in zip(parts, widths):
        if width == 0:
            continue
        if words is not None and offset % ROW_WORD_BYTES == 0 and width % ROW_WORD_BYTES == 0:
            words[:, offset // ROW_WORD_BYTES:(offset + width) // ROW_WORD_BYTES].copy_(as_words(part))
        else:
            out[:, offset:offset + width].copy_(part)
        offset += width
    return out


def unpack_rows(rows: torch.Tensor, like: Sequence[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_rows`: ``like`` lists (dtype, per-row shape) of each packed tensor."""
    out, offset, num_rows = [], 0, rows.size(0)
    words = word_view(rows)  # no copy: a row slice that cannot be viewed is read bytewise
    for dtype, shape in like:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        # A fresh tensor: a slice may keep a stride (or offset) that a dtype view cannot reinterpret.
        chunk = torch.empty(num_rows, nbytes, dtype=torch.uint8, device=rows.device)
        if words is not None and offset % ROW_WORD_BYTES == 0 and nbytes % ROW_WORD_BYTES == 0:
            chunk.view(ROW_WORD).copy_(words[:, offset // ROW_WORD_BYTES:(offset + nbytes) // ROW_WORD_BYTES])
        else:
            chunk.copy_(rows[:, offset : offset + nbytes])
        out.append(chunk.view(dtype).view(num_rows, *shape))
        offset += nbytes
    return out


def _spec(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
    return t.dtype, tuple(t.shape[1:])


def routed_per_expert(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: the (token, k) slots of ``topk_idx`` [T, K] routed to each expert (-1 slots count
    nowhere), on ``topk_idx``'s device with no host sync."""
    valid = topk_idx >= 0
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_idx.device)
    counts.scatter_add_(0, torch.where(valid, topk_idx, num_experts).flatten(), valid.flatten().to(torch.int64))
    return counts[:num_experts]


def layout_problem(per_rank_sent: torch.Tensor, send_counts: torch.Tensor, per_expert_sent: torch.Tensor,
                   per_expert_routed: Optional[torch.Tensor]) -> str:
    """Why this rank's dispatch layout disagrees with its tokens ("" when it agrees), all on the host:
    ``per_rank_sent`` [R] and ``per_expert_sent`` [E] (the caller's num_tokens_per_rank and
    num_tokens_per_expert), ``send_counts`` [R] the tokens ``is_token_in_rank`` sends to each rank,
    ``per_expert_routed`` [E] what ``topk_idx`` routes to each expert (None: no top-k given)."""
    if not torch.equal(per_rank_sent, send_counts):
        return (f"num_tokens_per_rank {per_rank_sent.tolist()} disagrees with is_token_in_rank, which sends "
                f"{send_counts.tolist()} tokens to each rank")
    if per_expert_routed is not None and not torch.equal(per_expert_sent, per_expert_routed):
        return "num_tokens_per_expert disagrees with topk_idx (tokens routed to each expert)"
    return ""


def refuse_bad_layouts(problem: str, bad_flags: torch.Tensor) -> None:
    """After every rank gathered each rank's "my layout is bad" flag (``bad_flags`` [R]): raise on every
    rank when any layout is bad, so that no rank waits for a dispatch the others refused."""
    if problem:
        raise ValueError(f"{problem}; pass both from the same get_dispatch_layout")
    bad_ranks = bad_flags.nonzero().flatten().tolist()
    if bad_ranks:
        raise ValueError(
            f"rank(s) {bad_ranks} passed a layout that disagrees with their tokens, so every rank of the group "
            "refuses this dispatch"
        )


def received_per_expert(sent_per_expert: torch.Tensor, rank: int, expert_alignment: int) -> list[int]:
    """Rows ``rank``'s local experts receive, each rounded up to ``expert_alignment``, from every
    source rank's ``num_tokens_per_expert`` (``sent_per_expert`` [R, E] on the host, row = source)."""
    num_local_experts = sent_per_expert.size(1) // sent_per_expert.size(0)
    per_expert = sent_per_expert[:, rank * num_local_experts : (rank + 1) * num_local_experts].sum(0)
    return [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in per_expert.tolist()]


def deepep_prefix_matrices(counts: torch.Tensor, source_channels: torch.Tensor, rank: int,
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's ``rank_prefix_matrix`` [R, R] and ``recv_channel_prefix_matrix`` [R, C] (int32, on
    ``device``) of ``rank``'s handle from ``counts`` [R, R] (source, destination) and
    ``source_channels`` [R, C] (each source's channel prefix counts toward ``rank``), both on the host."""
    num_ranks = counts.size(0)
    source_start = torch.cumsum(counts[:, rank], 0) - counts[:, rank]
    channel_start = torch.cat([torch.zeros(num_ranks, 1, dtype=torch.int64), source_channels[:, :-1]], dim=1)
    return (torch.cumsum(counts, 0).to(torch.int32).to(device),
            (source_start.unsqueeze(1) + channel_start).to(torch.int32).to(device))


#: What a fingerprint names (index = code) and the fields it compares (-1 = not part of that operation).
OPERATIONS = ("dispatch", "cached dispatch", "combine", "low-latency dispatch", "low-latency combine")
FINGERPRINT_FIELDS = ("hidden", "row_bytes", "scales", "topk", "experts", "channels", "max_tokens")


def _row_fields(x: torch.Tensor, scales: Optional[torch.Tensor] = None) -> dict[str, int]:
    """Fingerprint fields of a payload ``x`` [..., H] (+ FP8 ``scales`` [..., S])."""
    return {"hidden": x.size(-1), "row_bytes": x.size(-1) * x.element_size(), "scales": 0 if scales is None else scales.size(-1)}


class ReferenceBackend(Backend):
    """Dispatch/combine with torch.distributed collectives. Same results as the kernels."""

    name = "reference"

    def __init__(self, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank) -> None:
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)
        self._uses_nccl = dist.get_backend(group) == "nccl"

    # ------------------------------------------------------------------ exchange primitives
    def _comm_device(self, like: torch.Tensor) -> torch.device:
        if self._uses_nccl:
            if like.device.type != "cuda":
                raise ValueError(
                    f"the process group uses NCCL, so tensors must be on a CUDA device, got {like.device}; "
                    "use a gloo group for CPU tensors"
                )
            return like.device
        return torch.device("cpu")

    def _exchange_counts(self, send_counts: torch.Tensor) -> list[int]:
        """``send_counts[r]`` rows go to rank r; return how many arrive from each rank."""
        send = send_counts.to(self._comm_device(send_counts), torch.int64)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.tolist()

    def _gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """All-gather one int64 row [B] of every rank -> [R, B] on the host (row r is rank r's)."""
        comm_device = torch.device("cuda", torch.cuda.current_device()) if self._uses_nccl else torch.device("cpu")
        gathered = [torch.empty(row.numel(), dtype=torch.int64, device=comm_device) for _ in range(self.num_ranks)]
        dist.all_gather(gathered, row.to(comm_device, torch.int64), group=self.group)
        return torch.stack(gathered).cpu()

    def _agree(self, operation: str, **fields: int) -> None:
        """Every rank must run the same operation on the same shapes. All-gather a fixed-size
        fingerprint (operation, :data:`FINGERPRINT_FIELDS`) before any data moves and raise the same
        ValueError on every rank when one differs, instead of a mismatched collective that fails
        obscurely or waits."""
        row = [OPERATIONS.index(operation)] + [int(fields.get(name, -1)) for name in FINGERPRINT_FIELDS]
        everyone = self._gather_rows(torch.tensor(row, dtype=torch.int64)).tolist()
        if any(other != everyone[0] for other in everyone):
            def describe(values: list[int]) -> str:
                shown = ", ".join(f"{n}={v}" for n, v in zip(FINGERPRINT_FIELDS, values[1:]) if v >= 0)
                return f"{OPERATIONS[values[0]]}({shown})"

            calls = "; ".join(f"rank {r}: {describe(values)}" for r, values in enumerate(everyone))
            raise ValueError(
                f"the ranks of this group called different operations or shapes ({calls}); every rank must make the "
                "same sequence of dispatch/combine calls with the same hidden size, dtype, top-k and config"
            )

    def _exchange_rows(self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Send ``rows`` [N, B] uint8, ``send_counts[r]`` of them to rank r, in order."""
        row_bytes = rows.size(1)
        comm_device = self._comm_device(rows)
        send = rows.to(comm_device).reshape(-1)
        recv = torch.empty(sum(recv_counts) * row_bytes, dtype=torch.uint8, device=comm_device)
        dist.all_to_all_single(
            recv,
            send,
            output_split_sizes=[c * row_bytes for c in recv_counts],
            input_split_sizes=[c * row_bytes for c in send_counts],
            group=self.group,
        )
        return recv.view(-1, row_bytes).to(rows.device)

    def _move_tokens(self, token_rows: torch.Tensor, is_token_in_rank: torch.Tensor, send_tokens: torch.Tensor,
                     counts: torch.Tensor, moves: Any = None) -> tuple[torch.Tensor, Any]:
        """This rank's token rows [T, B] uint8 to every rank of each token's ``is_token_in_rank`` row
        ([T, R] bool); ``send_tokens`` [sum of counts[rank]] the token of each (destination rank,
        token) pair in that order (the layout's); ``counts`` [R, R] (source, destination) on the
        host, every rank's; ``moves``: a cached dispatch's ``private["moves"]`` of the dispatch it
        repeats (None for a new one). Returns the received rows [N_recv, B] in (source rank, source
        token) order, and what the combine that reverses it (or a cached dispatch) needs beyond the
        layout (the handle keeps it as ``private["moves"]``). Here: one all-to-all, nothing kept."""
        rows = self._exchange_rows(token_rows[send_tokens], counts[self.rank].tolist(), counts[:, self.rank].tolist())
        return rows, None

    def _combine_rows(self, columns: list[torch.Tensor], layout: DispatchLayout) -> list[torch.Tensor]:
        """The reverse of :meth:`_move_tokens` with the sum: ``columns`` [N_recv, ...] (the received
        rows' order) -> per column [T, ...] fp32, the sum over the ranks each token went to, added
        rank by rank (a fixed fp32 order)."""
        recv = self._exchange_rows(
            pack_rows(columns), layout.num_recv_tokens_per_rank.tolist(), layout.num_tokens_per_rank.tolist()
        )
        back = unpack_rows(recv, [_spec(t) for t in columns])
        num_tokens = layout.is_token_in_rank.size(0)
        send_tokens = layout.private["send_tokens"]
        sums = [torch.zeros(num_tokens, *t.shape[1:], dtype=torch.float32, device=t.device) for t in columns]
        start = 0
        for count in layout.num_tokens_per_rank.tolist():  # a token appears at most once per rank
            tokens = send_tokens[start : start + count]
            for total, rows in zip(sums, back):
                total[tokens] += rows[start : start + count].float()
            start += count
        return sums

    # ------------------------------------------------------------------ normal path
    def get_dispatch_layout(self, topk_idx, num_experts):
        num_local_experts = num_experts // self.num_ranks
        valid = topk_idx >= 0
        experts = topk_idx[valid]
        num_tokens_per_expert = torch.bincount(experts, minlength=num_experts).to(torch.int32)
        ranks = torch.where(valid, topk_idx // num_local_experts, torch.zeros_like(topk_idx))
        hits = F.one_hot(ranks, self.num_ranks).bool() & valid.unsqueeze(-1)
        is_token_in_rank = hits.any(dim=1)
        num_tokens_per_rank = is_token_in_rank.sum(dim=0).to(torch.int32)
        return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank

    def dispatch(
        self,
        x,
        x_scales,
        topk_idx,
        topk_weights,
        num_tokens_per_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        expert_alignment,
        config: Config,
        cached_layout: Optional[DispatchLayout],
        num_worst_tokens: int = 0,  # exact sizes here: the Buffer pads them (native_worst_tokens is False)
    ) -> DispatchOutput:
        payload = [x] if x_scales is None else [x, x_scales]
        if cached_layout is not None:
            self._agree("cached dispatch", channels=cached_layout.num_channels, **_row_fields(x, x_scales))
            layout = cached_layout
            recv, _ = self._move_tokens(pack_rows(payload), layout.is_token_in_rank, layout.private["send_tokens"],
                                        layout.private["counts"], layout.private["moves"])
            recv_payload = unpack_rows(recv, [_spec(t) for t in payload])
            return DispatchOutput(recv_payload[0], recv_payload[1] if x_scales is not None else None, None, None, layout)

        self._agree("dispatch", topk=0 if topk_idx is None else topk_idx.size(1), experts=num_tokens_per_expert.numel(),
                    channels=config.num_channels, **_row_fields(x, x_scales))
        # (rank, token) pairs sorted by rank then token: the deterministic send order.
        dest_ranks, send_tokens = is_token_in_rank.t().nonzero(as_tuple=True)
        send_counts_t = torch.bincount(dest_ranks, minlength=self.num_ranks)
        R, num_channels = self.num_ranks, config.num_channels
        num_experts = num_tokens_per_expert.numel()
        num_local_experts = num_experts // R
        # One all-gather of every rank's counts (what DeepEP's notify exchanges): per destination
        # rank, per expert, per (destination rank, channel), and last whether this rank's layout
        # is consistent, so that a bad layout on one rank makes every rank refuse (none waits).
        per_rank_sent = num_tokens_per_rank.to(torch.int64).cpu()
        per_expert_sent = num_tokens_per_expert.to(torch.int64).cpu()
        routed = None if topk_idx is None else routed_per_expert(topk_idx, num_experts).cpu()
        problem = layout_problem(per_rank_sent, send_counts_t.cpu(), per_expert_sent, routed)
        mine = torch.cat([
            per_rank_sent,
            per_expert_sent,
            channel_prefix_matrix(is_token_in_rank, num_channels).to(torch.int64).cpu().reshape(-1),
            torch.tensor([int(bool(problem))]),
        ])
        everyone = self._gather_rows(mine)
        refuse_bad_layouts(problem, everyone[:, -1])
        counts = everyone[:, :R]  # [source, destination]
        recv_counts = counts[:, self.rank].tolist()
        per_expert = received_per_expert(everyone[:, R : R + num_experts], self.rank, expert_alignment)
        source_channels = everyone[:, R + num_experts : -1].view(R, R, num_channels)[:, self.rank]  # [source, channel]
        rank_prefix, recv_channel_prefix = deepep_prefix_matrices(counts, source_channels, self.rank, x.device)

        columns = list(payload)
        if topk_idx is not None:
            columns += [topk_idx.to(torch.int64), topk_weights.to(torch.float32)]
        columns.append(torch.arange(x.size(0), device=x.device))
        recv, moves = self._move_tokens(pack_rows(columns), is_token_in_rank, send_tokens, counts)
        recv_columns = unpack_rows(recv, [_spec(t) for t in columns])
        recv_x = recv_columns[0]
        recv_x_scales = recv_columns[1] if x_scales is not None else None
        recv_src_idx = recv_columns[-1]
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_global_idx, recv_topk_weights = recv_columns[-3:-1]
            local = recv_global_idx - self.rank * num_local_experts
            is_local = (recv_global_idx >= 0) & (local >= 0) & (local < num_local_experts)
            recv_topk_idx = torch.where(is_local, local, torch.full_like(local, -1))
            recv_topk_weights = torch.where(is_local, recv_topk_weights, torch.zeros_like(recv_topk_weights))

        layout = DispatchLayout(
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_rank=send_counts_t.to(torch.int32),
            num_recv_tokens_per_rank=torch.tensor(recv_counts, dtype=torch.int32),
            recv_src_idx=recv_src_idx.to(torch.int32),
            num_recv_tokens_per_expert_list=per_expert,
            private={"send_tokens": send_tokens, "counts": counts, "moves": moves},
            num_channels=num_channels,
            rank_prefix_matrix=rank_prefix,
            recv_channel_prefix_matrix=recv_channel_prefix,
        )
        return DispatchOutput(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, layout)

    def combine(self, x, topk_weights, layout: DispatchLayout, config: Config):
        self._agree("combine", topk=0 if topk_weights is None else topk_weights.size(1), channels=layout.num_channels,
                    **_row_fields(x, None))
        columns = [x] if topk_weights is None else [x, topk_weights.to(torch.float32)]
        sums = self._combine_rows(columns, layout)
        return sums[0].to(x.dtype), sums[1] if topk_weights is not None else None

    # ------------------------------------------------------------------ low-latency path
    def low_latency_dispatch(
        self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0, return_recv_hook
    ):
        num_tokens, hidden = x.shape
        num_local_experts = num_experts // self.num_ranks
        slots = self.num_ranks * num_max_dispatch_tokens_per_rank
        # One message per valid (token, k), sorted by (destination rank, local expert, token).
        pair_tokens, pair_k = (topk_idx >= 0).nonzero(as_tuple=True)
        experts = topk_idx[pair_tokens, pair_k]
        order = torch.sort(experts, stable=True).indices  # expert-major keeps rank-major order too
        pair_tokens, pair_k, experts = pair_tokens[order], pair_k[order], experts[order]
        send_counts_t = torch.bincount(experts // num_local_experts, minlength=self.num_ranks)

        if use_fp8:
            x_fp8, x_scales = per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0, round_scale=round_scale)
            if use_ue8m0:  # DeepEP's packed exponents, [E_local, slots, H/512] int32, column-major (slots fastest)
                x_scales = pack_ue8m0(x_scales)
            payload = [x_fp8, x_scales]
            recv_x = torch.empty(num_local_experts, slots, hidden, dtype=x_fp8.dtype, device=x.device)
            recv_x_scales = torch.empty(
                num_local_experts, x_scales.size(1), slots, dtype=x_scales.dtype, device=x.device
            ).transpose(1, 2)
        else:
            payload = [x]
            recv_x = torch.empty(num_local_experts, slots, hidden, dtype=x.dtype, device=x.device)
            recv_x_scales = None
        recv_count = torch.zeros(num_local_experts, dtype=torch.int32, device=x.device)
        recv_src_info = torch.full((num_local_experts, slots), -1, dtype=torch.int32, device=x.device)
        recv_layout_range = torch.zeros(num_local_experts, self.num_ranks, dtype=torch.int64, device=x.device)
        private: dict = {"pair_tokens": pair_tokens, "pair_k": pair_k, "send_counts": send_counts_t.tolist()}
        layout = LowLatencyLayout(recv_src_info, recv_layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts, private)
        output = LowLatencyDispatchOutput(recv_x, recv_x_scales, recv_count, layout)

        def receive() -> None:
            self._agree("low-latency dispatch", topk=topk_idx.size(1), experts=num_experts,
                        max_tokens=num_max_dispatch_tokens_per_rank, **_row_fields(*payload))
            recv_counts = self._exchange_counts(send_counts_t)
            header = torch.stack([pair_tokens, experts % num_local_experts], dim=1)
            columns = [header] + [t[pair_tokens] for t in payload]
            recv = self._exchange_rows(pack_rows(columns), private["send_counts"], recv_counts)
            recv_columns = unpack_rows(recv, [_spec(t) for t in columns])
            src_tokens, local_experts = recv_columns[0][:, 0], recv_columns[0][:, 1]
            src_ranks = torch.repeat_interleave(
                torch.arange(self.num_ranks, device=x.device), torch.tensor(recv_counts, device=x.device)
            )
            # Slot of each message inside its expert: position among that expert's messages,
            # which arrive grouped by source rank and, within a rank, by token.
            by_expert = torch.sort(local_experts, stable=True).indices
            counts = torch.bincount(local_experts, minlength=num_local_experts)
            starts = torch.cumsum(counts, 0) - counts
            slot_sorted = torch.arange(by_expert.numel(), device=x.device) - starts[local_experts[by_expert]]
            slot = torch.empty_like(slot_sorted)
            slot[by_expert] = slot_sorted
            recv_x[local_experts, slot] = recv_columns[1]
            if recv_x_scales is not None:
                recv_x_scales[local_experts, slot] = recv_columns[2]
            recv_count.copy_(counts.to(torch.int32))
            recv_src_info[local_experts, slot] = src_tokens.to(torch.int32)
            per_rank = torch.zeros(num_local_experts, self.num_ranks, dtype=torch.int64, device=x.device)
            per_rank.index_put_((local_experts, src_ranks), torch.ones_like(local_experts), accumulate=True)
            offsets = torch.cumsum(per_rank, 1) - per_rank
            recv_layout_range.copy_((offsets << 32) | per_rank)
            private.update(recv_counts=recv_counts, recv_local_experts=local_experts, recv_slots=slot)

        if return_recv_hook:
            return output, receive
        receive()
        return output, None

    def low_latency_combine(self, x, topk_idx, topk_weights, layout: LowLatencyLayout, out, return_recv_hook):
        num_tokens, hidden = topk_idx.size(0), x.size(2)
        private = layout.private
        combined = out if out is not None else torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)

        def receive() -> None:
            self._agree("low-latency combine", topk=topk_idx.size(1), experts=layout.num_experts,
                        max_tokens=layout.num_max_dispatch_tokens_per_rank, **_row_fields(x, None))
            rows = x[private["recv_local_experts"], private["recv_slots"]]
            back = self._exchange_rows(pack_rows([rows]), private["recv_counts"], private["send_counts"])
            expert_out = unpack_rows(back, [_spec(rows)])[0].float()
            pair_tokens, pair_k = private["pair_tokens"], private["pair_k"]
            acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
            for k in range(topk_idx.size(1)):  # k ascending: a fixed fp32 order
                sel = pair_k == k
                tokens = pair_tokens[sel]
                acc[tokens] += topk_weights[tokens, k].float().unsqueeze(1) * expert_out[sel]
            combined.copy_(acc.to(combined.dtype))

        if return_recv_hook:
            return combined, receive
        receive()
        return combined, None
