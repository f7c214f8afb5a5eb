"""``Buffer``: the public, DeepEP-compatible API of expert-parallel dispatch and combine.

This module checks every argument (so a backend only ever sees valid input), owns the handles,
the communication stream and the events, and sizes the communication buffers. It never knows which
backend runs: ``backends.create_backend`` decides that once, at construction.

Shapes: ``T`` tokens on this rank, ``H`` hidden, ``K`` top-k, ``E`` experts in all, ``R`` ranks,
``N`` rows received by this rank. ``x`` may be bf16/fp32 [T, H] or an FP8 pair
``(x_e4m3 [T, H], scales fp32 [T, H/128])``.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .backends import create_backend
from .backends.base import DispatchLayout, LowLatencyLayout, topk_range_error
from .config import (
    FP8_BLOCK,
    MAX_TOPK,
    Config,
    default_combine_config,
    default_dispatch_config,
    get_low_latency_rdma_size_hint,
)
from .events import EventOverlap
from .fp8 import FP8_DTYPE
from .profiling import nvtx_range

TensorOrFP8 = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
_HIGH_PRECISION_DTYPES = (torch.bfloat16, torch.float32)
_buffer_ids = itertools.count()


class DispatchHandle:
    """Opaque result of a normal dispatch, needed by ``combine`` and by a cached ``dispatch``.

    It remembers which buffer and which shapes it belongs to, so that a handle passed to the wrong
    buffer or with tensors of the wrong shape is refused with a clear error.
    """

    __slots__ = ("buffer_id", "num_tokens", "hidden", "num_topk", "layout")

    def __init__(self, buffer_id: int, num_tokens: int, hidden: int, num_topk: int, layout: DispatchLayout) -> None:
        self.buffer_id = buffer_id
        self.num_tokens = num_tokens
        self.hidden = hidden
        self.num_topk = num_topk
        self.layout = layout

    @property
    def num_recv_tokens(self) -> int:
        return self.layout.num_recv_tokens

    @property
    def is_token_in_rank(self) -> torch.Tensor:
        return self.layout.is_token_in_rank

    @property
    def recv_src_idx(self) -> torch.Tensor:
        return self.layout.recv_src_idx

    def __repr__(self) -> str:
        return f"DispatchHandle(tokens={self.num_tokens}, hidden={self.hidden}, received={self.num_recv_tokens})"


class LowLatencyHandle:
    """Opaque result of ``low_latency_dispatch``, needed by ``low_latency_combine``."""

    __slots__ = ("buffer_id", "num_tokens", "num_topk", "layout")

    def __init__(self, buffer_id: int, num_tokens: int, num_topk: int, layout: LowLatencyLayout) -> None:
        self.buffer_id = buffer_id
        self.num_tokens = num_tokens
        self.num_topk = num_topk
        self.layout = layout

    def __repr__(self) -> str:
        lay = self.layout
        return f"LowLatencyHandle(tokens={self.num_tokens}, max_tokens={lay.num_max_dispatch_tokens_per_rank}, experts={lay.num_experts})"


# ---------------------------------------------------------------------------- argument checks
def _check_tensor(
    value: Any,
    name: str,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[Optional[int]],
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Raise TypeError/ValueError naming ``name`` unless ``value`` is a tensor of one of ``dtypes``,
    of ``shape`` (None = any size) and on ``device``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {str(value.dtype).replace('torch.', '')}")
    if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but x is on {device}; move all inputs to one device")
    return value


def _check_topk_idx(
    topk_idx: Any, num_experts: int, num_tokens: Optional[int], device: Optional[torch.device], values: bool = True
) -> torch.Tensor:
    """Dtype/shape/top-k checks; with ``values`` also the value range (one host sync). A backend whose
    dispatch checks the range on the device (``checks_topk_range_in_dispatch``) is called with
    ``values=False`` and raises :func:`topk_range_error` itself."""
    _check_tensor(topk_idx, "topk_idx", (torch.int64,), (num_tokens, None), device)
    if not 1 <= topk_idx.size(1) <= MAX_TOPK:
        raise ValueError(f"topk_idx.size(1) (top-k) must be in 1..{MAX_TOPK}, got {topk_idx.size(1)}")
    if values and topk_idx.numel() > 0:
        low, high = torch.stack(torch.aminmax(topk_idx)).tolist()  # one host sync
        if low < -1 or high >= num_experts:
            raise topk_range_error(num_experts, low, high)
    return topk_idx


def _check_num_experts(num_experts: Any, num_ranks: int) -> int:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % num_ranks != 0:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by the number of ranks ({num_ranks}): "
            "every rank holds num_experts / num_ranks experts"
        )
    return num_experts


def _split_x(x: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate ``x`` (tensor or FP8 pair) and return ``(data, scales or None)``."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"an FP8 x must be a pair (x_e4m3 [T, H], scales [T, H/128]), got {len(x)} items")
        data, scales = x
        _check_tensor(data, "x[0]", (FP8_DTYPE,), (None, None))
        if data.size(1) % FP8_BLOCK != 0:
            raise ValueError(f"x[0].size(1) (hidden={data.size(1)}) must be divisible by {FP8_BLOCK} for FP8")
        _check_tensor(scales, "x[1] (FP8 scales)", (torch.float32,), (data.size(0), data.size(1) // FP8_BLOCK), data.device)
        return data.contiguous(), scales.contiguous()
    _check_tensor(x, "x", _HIGH_PRECISION_DTYPES, (None, None))
    return x.contiguous(), None


def _check_event(previous_event: Any) -> None:
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event must be an EventOverlap or None, got {type(previous_event).__name__}")


def _check_config(config: Any, default: Config) -> Config:
    if config is None:
        return default
    if not isinstance(config, Config):
        raise TypeError(f"config must be a deepep_megatron.Config or None, got {type(config).__name__}")
    return config


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a (nested) tuple/list result."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []


class Buffer:
    """Communication buffer of one expert-parallel group (DeepEP-compatible).

    Args:
        group: the expert-parallel process group (NCCL for one rank per GPU, gloo on CPU or for
            several ranks sharing one GPU).
        num_nvl_bytes: bytes of the NVLink (CUDA IPC) buffer of the normal kernels; size it with
            ``Buffer.get_nvl_size_hint`` or ``Config.get_nvl_buffer_size_hint``. When non-zero it is
            checked on every call, on every backend, so code sized on CPU also fits on GPU.
        num_rdma_bytes: bytes of the RDMA (NVSHMEM) buffer: internode and low-latency kernels.
        low_latency_mode: enable ``low_latency_dispatch``/``low_latency_combine``.
        num_qps_per_rank: RDMA queue pairs per peer (internode/low-latency kernels).
        backend: ``"reference"`` (torch.distributed collectives), ``"cuda"`` (compiled kernels) or
            ``"auto"`` (cuda when the extension is built, a GPU is visible and num_nvl_bytes > 0).
    """

    #: SMs the normal kernels use unless a config says otherwise (``set_num_sms``).
    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        backend: str = "auto",
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
        if group is None:
            group = dist.group.WORLD
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not isinstance(num_qps_per_rank, int) or num_qps_per_rank <= 0:
            raise ValueError(f"num_qps_per_rank must be a positive int, got {num_qps_per_rank!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = num_qps_per_rank
        self.runtime = create_backend(backend, group, num_nvl_bytes, num_rdma_bytes, self.low_latency_mode, num_qps_per_rank)
        self._id = next(_buffer_ids)
        self._comm_streams: dict[int, torch.cuda.Stream] = {}
        self._destroyed = False

    # ------------------------------------------------------------------ configuration
    @property
    def backend_name(self) -> str:
        return self.runtime.name

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SM count of the default configs (even: two SMs per channel)."""
        if not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2 != 0:
            raise ValueError(f"num_sms must be a positive even int (two SMs per channel), got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """Recommended dispatch config for ``num_ranks`` ranks (with ``Buffer.num_sms`` SMs)."""
        return default_dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """Recommended combine config for ``num_ranks`` ranks (with ``Buffer.num_sms`` SMs)."""
        return default_combine_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_nvl_size_hint(hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer that both default configs need (``hidden_bytes`` = H * max(elem, 2))."""
        return max(
            Buffer.get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(hidden_bytes, num_ranks),
            Buffer.get_combine_config(num_ranks).get_nvl_buffer_size_hint(hidden_bytes, num_ranks),
        )

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Bytes of RDMA buffer the low-latency kernels need."""
        return get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def destroy(self) -> None:
        """Release the communication resources (collective). The buffer is unusable afterwards."""
        if not self._destroyed:
            self.runtime.destroy()
            self._destroyed = True

    # ------------------------------------------------------------------ internals
    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed; create a new one")

    def _check_handle(self, handle: Any, kind: type, name: str = "handle") -> None:
        if not isinstance(handle, kind):
            raise TypeError(f"{name} must be the {kind.__name__} returned by this buffer, got {type(handle).__name__}")
        if handle.buffer_id != self._id:
            raise ValueError(f"{name} was produced by another Buffer; pass the handle from this buffer's own dispatch")

    def _check_nvl_size(self, config: Config, hidden: int, element_size: int, what: str) -> None:
        if not (self.runtime.needs_nvl_buffer or self.num_nvl_bytes > 0):
            return
        hidden_bytes = hidden * max(element_size, 2)
        needed = config.get_nvl_buffer_size_hint(hidden_bytes, self.group_size)
        if needed > self.num_nvl_bytes:
            raise RuntimeError(
                f"{what} needs {needed} bytes of NVLink buffer (hidden={hidden}, {self.group_size} ranks, "
                f"{config.num_sms} SMs) but the Buffer has num_nvl_bytes={self.num_nvl_bytes}; create it with "
                f"num_nvl_bytes >= {needed} (see Buffer.get_nvl_size_hint)"
            )

    def _comm_stream(self, device: torch.device) -> "torch.cuda.Stream":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._comm_streams:
            self._comm_streams[index] = torch.cuda.Stream(device=index)
        return self._comm_streams[index]

    def _run(
        self,
        fn: Callable[[], Any],
        inputs: Sequence[Optional[torch.Tensor]],
        device: torch.device,
        previous_event: Optional[EventOverlap],
        async_finish: bool,
    ) -> tuple[Any, EventOverlap]:
        """Run ``fn`` on the communication stream, ordered after ``previous_event`` (or the current
        stream). With ``async_finish`` return an event to wait on; otherwise the current stream waits."""
        _check_event(previous_event)
        if device.type != "cuda":
            return fn(), EventOverlap()
        compute = torch.cuda.current_stream(device)
        comm = self._comm_stream(device)
        if previous_event is not None and previous_event.event is not None:
            comm.wait_event(previous_event.event)
        else:
            comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            result = fn()
        inputs = [t for t in inputs if t is not None]
        outputs = _tensors_in(result)
        for t in inputs:  # keep inputs alive for the comm stream
            t.record_stream(comm)
        for t in outputs:  # outputs were allocated on the comm stream and are used on compute
            t.record_stream(compute)
        if async_finish:
            event = torch.cuda.Event()
            event.record(comm)
            return result, EventOverlap(event, inputs + outputs)
        compute.wait_stream(comm)
        return result, EventOverlap()

    # ------------------------------------------------------------------ normal kernels
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Count where each token goes.

        Args:
            topk_idx: [T, K] int64 expert ids, -1 = no expert. An id outside [-1, E) raises ValueError
                here on the reference backend; the cuda backend skips it in the counts (no host sync)
                and the dispatch that uses this layout raises the ValueError on every rank.
            num_experts: E, divisible by the number of ranks.
        Returns:
            ``num_tokens_per_rank`` [R] int32, ``num_tokens_per_rdma_rank`` (None: intranode),
            ``num_tokens_per_expert`` [E] int32, ``is_token_in_rank`` [T, R] bool, event.
        """
        self._check_alive()
        _check_num_experts(num_experts, self.group_size)
        # A backend that range-checks in dispatch counts only valid ids here and leaves the error to
        # the dispatch that uses this layout: no host sync per MoE layer.
        _check_topk_idx(topk_idx, num_experts, None, None, values=not self.runtime.checks_topk_range_in_dispatch)
        with nvtx_range("deepep/layout"):
            (per_rank, per_expert, in_rank), event = self._run(
                lambda: self.runtime.get_dispatch_layout(topk_idx, num_experts),
                [topk_idx],
                topk_idx.device,
                previous_event,
                async_finish,
            )
        return per_rank, None, per_expert, in_rank, event

    def dispatch(
        self,
        x: TensorOrFP8,
        handle: Optional[DispatchHandle] = None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[TensorOrFP8, Optional[torch.Tensor], Optional[torch.Tensor], Optional[list[int]], Optional[DispatchHandle], EventOverlap]:
        """Send each token to every rank that holds one of its experts (once per rank).

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle,
        event)``: ``recv_x`` [N, H] (an FP8 pair if ``x`` was one), rows ordered by (source rank,
        source token); ``recv_topk_idx`` [N, K] int64 local expert ids (-1 = not on this rank);
        ``recv_topk_weights`` [N, K] fp32 (0 where -1); per local expert received counts, each
        rounded up to ``expert_alignment``. With ``handle`` (cached dispatch: the backward of
        combine) only ``x`` moves and the result is ``(recv_x, None, None, None, None, event)``.
        """
        self._check_alive()
        data, scales = _split_x(x)
        num_tokens, hidden = data.shape
        device = data.device
        config = _check_config(config, Buffer.get_dispatch_config(self.group_size))
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise ValueError(f"expert_alignment must be an int >= 1, got {expert_alignment!r}")
        self._check_nvl_size(config, hidden, data.element_size(), "dispatch")

        if handle is not None:
            self._check_handle(handle, DispatchHandle)
            given = [n for n, v in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                                    ("num_tokens_per_expert", num_tokens_per_expert), ("topk_idx", topk_idx),
                                    ("topk_weights", topk_weights)) if v is not None]
            if given:
                raise ValueError(f"a cached dispatch (handle given) takes only x; also got {', '.join(given)}")
            if num_tokens != handle.num_tokens:
                raise ValueError(f"x has {num_tokens} tokens but the handle was made for {handle.num_tokens}")
            with nvtx_range("deepep/dispatch"):
                out, event = self._run(
                    lambda: self.runtime.dispatch(data, scales, None, None, None, None, None, 1, config, handle.layout),
                    [data, scales], device, previous_event, async_finish,
                )
            recv_x = (out.recv_x, out.recv_x_scales) if scales is not None else out.recv_x
            return recv_x, None, None, None, None, event

        if topk_idx is None or num_tokens_per_expert is None or is_token_in_rank is None or num_tokens_per_rank is None:
            raise ValueError(
                "dispatch without a handle needs topk_idx, num_tokens_per_rank, is_token_in_rank and "
                "num_tokens_per_expert (from get_dispatch_layout)"
            )
        R = self.group_size
        _check_tensor(num_tokens_per_expert, "num_tokens_per_expert", (torch.int32,), (None,), device)
        num_experts = _check_num_experts(num_tokens_per_expert.numel(), R)
        # The cuda backend checks the range inside its layout/notify kernels and raises the same
        # ValueError on every rank at its one host sync: no extra sync here.
        _check_topk_idx(topk_idx, num_experts, num_tokens, device,
                        values=not self.runtime.checks_topk_range_in_dispatch)
        num_topk = topk_idx.size(1)
        if topk_weights is not None:
            _check_tensor(topk_weights, "topk_weights", (torch.float32,), (num_tokens, num_topk), device)
        _check_tensor(num_tokens_per_rank, "num_tokens_per_rank", (torch.int32,), (R,), device)
        _check_tensor(is_token_in_rank, "is_token_in_rank", (torch.bool,), (num_tokens, R), device)
        if num_tokens_per_rdma_rank is not None:
            raise ValueError("num_tokens_per_rdma_rank must be None for intranode dispatch (all ranks share one node)")
        weights = topk_weights if topk_weights is not None else torch.ones(num_tokens, num_topk, dtype=torch.float32, device=device)

        with nvtx_range("deepep/dispatch"):
            out, event = self._run(
                lambda: self.runtime.dispatch(
                    data, scales, topk_idx, weights, num_tokens_per_rank, is_token_in_rank,
                    num_tokens_per_expert, expert_alignment, config, None,
                ),
                [data, scales, topk_idx, weights, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert],
                device, previous_event, async_finish,
            )
        new_handle = DispatchHandle(self._id, num_tokens, hidden, num_topk, out.layout)
        recv_x = (out.recv_x, out.recv_x_scales) if scales is not None else out.recv_x
        recv_weights = out.recv_topk_weights if topk_weights is not None else None
        return recv_x, out.recv_topk_idx, recv_weights, list(out.layout.num_recv_tokens_per_expert_list), new_handle, event

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: Optional[torch.Tensor] = None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Reverse a dispatch: send each received row back and sum per source token.

        Args:
            x: [N, H] bf16/fp32, rows in the order dispatch returned them.
            handle: from this buffer's dispatch.
            topk_weights: optional [N, K] fp32, summed the same way (the backward of dispatch's weights).
        Returns:
            ``combined_x`` [T, H] (x's dtype; summed over ranks in fp32, rank order), ``combined_topk_weights``
            [T, K] fp32 or None, event.
        """
        self._check_alive()
        self._check_handle(handle, DispatchHandle)
        _check_tensor(x, "x", _HIGH_PRECISION_DTYPES, (handle.num_recv_tokens, None))
        x = x.contiguous()
        if topk_weights is not None:
            _check_tensor(topk_weights, "topk_weights", (torch.float32,), (handle.num_recv_tokens, None), x.device)
        config = _check_config(config, Buffer.get_combine_config(self.group_size))
        self._check_nvl_size(config, x.size(1), x.element_size(), "combine")
        with nvtx_range("deepep/combine"):
            (combined, combined_weights), event = self._run(
                lambda: self.runtime.combine(x, topk_weights, handle.layout, config),
                [x, topk_weights], x.device, previous_event, async_finish,
            )
        return combined, combined_weights, event

    # ------------------------------------------------------------------ low-latency kernels
    def _check_low_latency(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        if not self.low_latency_mode:
            raise RuntimeError("low-latency calls need a Buffer created with low_latency_mode=True")
        needed = get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts)
        if needed > self.num_rdma_bytes:
            raise RuntimeError(
                f"low-latency dispatch/combine of up to {num_max_dispatch_tokens_per_rank} tokens (hidden={hidden}, "
                f"{num_experts} experts, {self.group_size} ranks) needs {needed} bytes of RDMA buffer but the Buffer has "
                f"num_rdma_bytes={self.num_rdma_bytes}; create it with num_rdma_bytes >= {needed} "
                "(see Buffer.get_low_latency_rdma_size_hint)"
            )

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[TensorOrFP8, torch.Tensor, LowLatencyHandle, EventOverlap, Callable[[], None]]:
        """Send one message per (token, expert) for decoding-sized batches.

        Args:
            x: [T, H] bf16, T <= num_max_dispatch_tokens_per_rank.
            topk_idx: [T, K] int64, -1 = no expert.
        Returns:
            ``recv_x`` [E_local, R * max_tokens, H] bf16, or with ``use_fp8`` the pair (e4m3 [..., H],
            fp32 scales [..., H/128]); the first ``recv_count[e]`` rows of ``recv_x[e]`` are local
            expert e's tokens grouped by source rank then source token. ``recv_count`` [E_local] int32,
            handle, event, hook. With ``return_recv_hook`` the outputs are filled only when ``hook()``
            is called (no SMs are held in between); otherwise ``hook`` does nothing.
        """
        self._check_alive()
        _check_tensor(x, "x", (torch.bfloat16,), (None, None))
        num_tokens, hidden = x.shape
        if not isinstance(num_max_dispatch_tokens_per_rank, int) or num_max_dispatch_tokens_per_rank <= 0:
            raise ValueError(f"num_max_dispatch_tokens_per_rank must be a positive int, got {num_max_dispatch_tokens_per_rank!r}")
        if num_tokens > num_max_dispatch_tokens_per_rank:
            raise ValueError(
                f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank={num_max_dispatch_tokens_per_rank}; "
                "raise num_max_dispatch_tokens_per_rank (and num_rdma_bytes) or split the batch"
            )
        if use_fp8 and hidden % FP8_BLOCK != 0:
            raise ValueError(f"x.size(1) (hidden={hidden}) must be divisible by {FP8_BLOCK} for use_fp8=True")
        _check_num_experts(num_experts, self.group_size)
        _check_topk_idx(topk_idx, num_experts, num_tokens, x.device)
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        x = x.contiguous()
        with nvtx_range("deepep/low_latency_dispatch"):
            (out, receive), event = self._run(
                lambda: self.runtime.low_latency_dispatch(
                    x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0, return_recv_hook
                ),
                [x, topk_idx], x.device, None, async_finish,
            )
        handle = LowLatencyHandle(self._id, num_tokens, topk_idx.size(1), out.layout)
        recv_x = (out.recv_x, out.recv_x_scales) if use_fp8 else out.recv_x
        return recv_x, out.recv_count, handle, event, self._hook(receive)

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None]]:
        """Send expert outputs back and reduce ``sum_k topk_weights[t, k] * y[t, k]`` (fp32, k order).

        Args:
            x: [E_local, R * max_tokens, H] bf16, laid out as ``low_latency_dispatch`` returned.
            topk_idx, topk_weights: [T, K] int64 / fp32, the same routing as the dispatch.
            out: optional [T, H] bf16 to write into.
        Returns ``(combined_x [T, H] bf16, event, hook)``.
        """
        self._check_alive()
        self._check_handle(handle, LowLatencyHandle)
        if use_logfmt:
            raise ValueError("use_logfmt=True is not supported; combine sends bf16")
        layout = handle.layout
        num_local_experts = layout.num_experts // self.group_size
        slots = self.group_size * layout.num_max_dispatch_tokens_per_rank
        _check_tensor(x, "x", (torch.bfloat16,), (num_local_experts, slots, layout.hidden))
        _check_topk_idx(topk_idx, layout.num_experts, handle.num_tokens, x.device)
        if topk_idx.size(1) != handle.num_topk:
            raise ValueError(f"topk_idx has top-k {topk_idx.size(1)} but the dispatch used {handle.num_topk}")
        _check_tensor(topk_weights, "topk_weights", (torch.float32,), tuple(topk_idx.shape), x.device)
        if out is not None:
            _check_tensor(out, "out", (torch.bfloat16,), (handle.num_tokens, layout.hidden), x.device)
        self._check_low_latency(layout.num_max_dispatch_tokens_per_rank, layout.hidden, layout.num_experts)
        with nvtx_range("deepep/low_latency_combine"):
            (combined, receive), event = self._run(
                lambda: self.runtime.low_latency_combine(x.contiguous(), topk_idx, topk_weights, layout, out, return_recv_hook),
                [x, topk_idx, topk_weights], x.device, None, async_finish,
            )
        return combined, event, self._hook(receive)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset the low-latency signalling region (needed when the normal and low-latency kernels share a buffer)."""
        self._check_alive()
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self.runtime.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    @staticmethod
    def _hook(receive: Optional[Callable[[], None]]) -> Callable[[], None]:
        """The hook returned to the caller: completes a deferred receive, at most once."""
        if receive is None:
            return lambda: None
        done = [False]

        def hook() -> None:
            if done[0]:
                raise RuntimeError("this receive hook was already called")
            done[0] = True
            with nvtx_range("deepep/low_latency_recv"):
                receive()

        return hook
