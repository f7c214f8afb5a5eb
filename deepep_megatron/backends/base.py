"""The small interface every backend implements, and the layout objects they return.

``Buffer`` checks arguments, owns handles, streams and events; a backend only moves data. Every
backend must produce exactly the same results (see ``reference.py``, the oracle):

* normal dispatch: a token goes to each destination rank once; received rows are ordered by
  (source rank, source token index); ``recv_topk_idx`` holds local expert ids (-1 elsewhere) and
  ``recv_topk_weights`` is 0 where ``recv_topk_idx`` is -1.
* normal combine: for each source token, the sum over destination ranks, in rank order, in fp32.
* low-latency dispatch: one message per (token, top-k slot); for local expert ``e`` the first
  ``recv_count[e]`` rows of ``recv_x[e]`` are its tokens grouped by source rank (ascending) and,
  within a rank, by source token index.
* low-latency combine: ``sum_k w[t, k] * y_k`` in fp32, k ascending, cast to the input dtype.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..config import Config


def topk_range_error(num_experts: int, low: int, high: int) -> ValueError:
    """The error for ``topk_idx`` values outside ``[-1, num_experts)`` (host and device checks alike)."""
    return ValueError(
        f"topk_idx values must be in [-1, num_experts={num_experts}) (-1 = no expert), got values in [{low}, {high}]"
    )


def channel_token_range(num_tokens: int, num_channels: int, channel: int) -> tuple[int, int]:
    """Tokens ``[start, end)`` that channel ``channel`` of ``num_channels`` moves: DeepEP's split into
    contiguous slices of ``ceil(num_tokens / num_channels)`` tokens (the last ones may be short or empty)."""
    per_channel = (num_tokens + num_channels - 1) // num_channels
    start = min(per_channel * channel, num_tokens)
    return start, min(start + per_channel, num_tokens)


def _running_counts(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """[T + 1, R] int32: row ``t`` counts the tokens before token ``t`` that go to each rank."""
    num_tokens, num_ranks = is_token_in_rank.shape
    running = torch.zeros(num_tokens + 1, num_ranks, dtype=torch.int32, device=is_token_in_rank.device)
    running[1:] = is_token_in_rank.to(torch.int32).cumsum(0)
    return running


def channel_prefix_matrix(is_token_in_rank: torch.Tensor, num_channels: int) -> torch.Tensor:
    """[R, C] int32: entry ``[r, c]`` counts the tokens of channels ``0..c`` that go to rank ``r``
    (DeepEP's ``channel_prefix_matrix``, the sender's view), for ``is_token_in_rank`` [T, R] bool."""
    num_tokens = is_token_in_rank.size(0)
    ends = [channel_token_range(num_tokens, num_channels, c)[1] for c in range(num_channels)]
    return _running_counts(is_token_in_rank)[ends].t().contiguous()


def channel_send_head(is_token_in_rank: torch.Tensor, num_channels: int) -> torch.Tensor:
    """[T, R] int32: the position of token ``t`` among the tokens its channel sends to rank ``r``,
    or -1 where it is not sent there (DeepEP's ``send_head``)."""
    num_tokens = is_token_in_rank.size(0)
    running = _running_counts(is_token_in_rank)
    channel_start = torch.empty(num_tokens, dtype=torch.long, device=is_token_in_rank.device)
    for c in range(num_channels):
        start, end = channel_token_range(num_tokens, num_channels, c)
        channel_start[start:end] = start
    position = running[1:] - running[channel_start] - 1
    return torch.where(is_token_in_rank, position, torch.full_like(position, -1))


@dataclass
class DispatchLayout:
    """What a backend needs to repeat (cached dispatch) or reverse (combine) one normal dispatch.

    Attributes:
        is_token_in_rank: [T, R] bool, token t was sent to rank r.
        num_tokens_per_rank: [R] int32, rows this rank sent to each rank.
        num_recv_tokens_per_rank: [R] int32, rows received from each rank: on the host, except
            after a ``num_worst_tokens`` dispatch of a backend with ``native_worst_tokens`` (then
            on the device: no host sync).
        recv_src_idx: [N_recv] int32, source token index of each received row (N_recv =
            ``num_worst_tokens`` rows after such a dispatch, -1 past the real ones).
        num_recv_tokens_per_expert_list: per local expert, received count (aligned); empty after
            such a dispatch.
        num_channels: channels (``config.num_sms // 2``) of the dispatch that made this layout;
            each moves one contiguous slice of the tokens (DeepEP's split, see ``channel_token_range``).
        rank_prefix_matrix: [R, R] int32 or None, DeepEP's ``handle[0]``: entry ``[i, j]`` counts the
            tokens that ranks ``0..i`` send to rank ``j`` (the same on every rank). None where the
            backend does not gather the whole matrix.
        recv_channel_prefix_matrix: [R, C] int32 or None, DeepEP's ``handle[2]``: row of
            ``recv_x`` where the tokens from source rank ``s``, channel ``c`` start.
        private: backend-specific state (prefix matrices per channel, send heads, ...).
    """

    is_token_in_rank: torch.Tensor
    num_tokens_per_rank: torch.Tensor
    num_recv_tokens_per_rank: torch.Tensor
    recv_src_idx: torch.Tensor
    num_recv_tokens_per_expert_list: list[int]
    private: dict[str, Any] = field(default_factory=dict)
    num_channels: int = 0
    rank_prefix_matrix: Optional[torch.Tensor] = None
    recv_channel_prefix_matrix: Optional[torch.Tensor] = None

    @property
    def num_recv_tokens(self) -> int:
        return int(self.recv_src_idx.numel())


@dataclass
class DispatchOutput:
    """Result of a normal dispatch. The topk fields are None for a cached dispatch."""

    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    layout: DispatchLayout


@dataclass
class LowLatencyLayout:
    """What low-latency combine needs from the dispatch it reverses.

    Attributes:
        recv_src_info: [E_local, R * max_tokens] int32, source token index of each received slot
            (-1 past ``recv_count``).
        recv_layout_range: [E_local, R] int64, ``(offset << 32) | count`` of each source rank's
            slots inside ``recv_x[e]`` (DeepEP's packing).
        num_max_dispatch_tokens_per_rank, hidden, num_experts: the shapes it was made for.
        private: backend-specific state.
    """

    recv_src_info: torch.Tensor
    recv_layout_range: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    private: dict[str, Any] = field(default_factory=dict)


@dataclass
class LowLatencyDispatchOutput:
    recv_x: torch.Tensor  # [E_local, R * max_tokens, H] bf16, or e4m3 when use_fp8
    recv_x_scales: Optional[torch.Tensor]  # [E_local, R * max_tokens, H / 128] fp32 when use_fp8
    recv_count: torch.Tensor  # [E_local] int32
    layout: LowLatencyLayout


#: A receive hook: completes the receive of a low-latency call that was issued with
#: ``return_recv_hook=True``. It holds no SMs until called.
RecvHook = Callable[[], None]


class Backend(ABC):
    """One way of moving tokens between the ranks of ``group``."""

    name: str = "abstract"
    #: Whether dispatch/combine need the NVLink buffer (num_nvl_bytes > 0).
    needs_nvl_buffer: bool = False
    #: Whether the backend's normal (non-cached) dispatch checks that every ``topk_idx`` value is in
    #: ``[-1, num_experts)`` itself, on the device, and raises the same ValueError as the Buffer's
    #: host check (which then skips its own host sync for that check).
    checks_topk_range_in_dispatch: bool = False
    #: Whether ``dispatch(num_worst_tokens=N)`` returns N-row outputs itself with no host sync (the
    #: Buffer pads the exact-size outputs of the others, which know their sizes on the host anyway).
    native_worst_tokens: bool = False
    #: Whether the low-latency calls check ``topk_idx``'s values on the device (the Buffer then skips
    #: its host-synced range check; an error surfaces at the next call).
    low_latency_checks_topk_range: bool = False
    #: Whether the low-latency calls fill DeepEP's wait-cost statistics themselves (``wait_stats=``);
    #: else the Buffer's hook adds host nanoseconds.
    low_latency_wait_stats_on_device: bool = False

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        low_latency_mode: bool,
        num_qps_per_rank: int,
    ) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank

    @abstractmethod
    def get_dispatch_layout(
        self, topk_idx: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool)`` for ``topk_idx`` [T, K] int64 (-1 = no expert)."""

    @abstractmethod
    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: Optional[torch.Tensor],
        topk_idx: Optional[torch.Tensor],
        topk_weights: Optional[torch.Tensor],
        num_tokens_per_rank: Optional[torch.Tensor],
        is_token_in_rank: Optional[torch.Tensor],
        num_tokens_per_expert: Optional[torch.Tensor],
        expert_alignment: int,
        config: Config,
        cached_layout: Optional[DispatchLayout],
        num_worst_tokens: int = 0,
    ) -> DispatchOutput:
        """Send each token [T, H] to the ranks that hold its experts.

        With ``cached_layout`` the layout arguments are None and only ``x`` (and its scales) move.
        ``num_worst_tokens`` is honoured only by a backend with ``native_worst_tokens``.
        """

    @abstractmethod
    def combine(
        self,
        x: torch.Tensor,
        topk_weights: Optional[torch.Tensor],
        layout: DispatchLayout,
        config: Config,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reverse a dispatch: ``x`` [N_recv, H] -> ``combined_x`` [T, H] (sum over ranks, fp32)."""

    @abstractmethod
    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        return_recv_hook: bool,
    ) -> tuple[LowLatencyDispatchOutput, Optional[RecvHook]]:
        """Send one message per (token, expert). With ``return_recv_hook`` the outputs are
        allocated but filled only when the returned hook is called."""

    @abstractmethod
    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        layout: LowLatencyLayout,
        out: Optional[torch.Tensor],
        return_recv_hook: bool,
    ) -> tuple[torch.Tensor, Optional[RecvHook]]:
        """Send each expert output back and reduce ``sum_k w[t, k] * y_k`` -> [T, H]."""

    def low_latency_combine_buffer(self, layout: LowLatencyLayout) -> Optional[torch.Tensor]:
        """The tensor a zero-copy low-latency combine sends from, where the backend owns it (a
        communication heap); None: the Buffer allocates one."""
        return None

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset low-latency signalling state (nothing to do for stateless backends)."""

    def record_stream(self, tensor: torch.Tensor, stream: "torch.cuda.Stream") -> None:
        """``tensor`` (an input or output of an operation that ran on another stream) is used by work
        on ``stream``: its memory must not be reused before that work ends. Tensors of PyTorch's
        caching allocator: ``Tensor.record_stream``; a backend whose outputs view memory of its own
        orders that memory's reuse itself."""
        tensor.record_stream(stream)

    def reset(self) -> None:
        """Collective: bring the backend back to its initial state after an error (nothing to do for
        a backend that keeps no state between calls)."""

    def destroy(self) -> None:
        """Release communication resources (collective: every rank calls it)."""
