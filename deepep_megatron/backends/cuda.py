"""The ``cuda`` backend: intranode normal dispatch/combine with the compiled kernels (csrc/).

One ``num_nvl_bytes`` buffer per rank is allocated on the current CUDA device and shared with every
peer by CUDA IPC handles, exchanged once over the process group (NCCL: one rank per GPU; gloo:
several ranks sharing one GPU under MPS). Kernels are launched on ``torch.cuda.current_stream()``,
which is the Buffer's communication stream when called through ``deepep_megatron.Buffer``.

A normal dispatch runs three kernels: ``channel_layout`` (per-channel counts, every token's
position in each destination stream and the inverse list the senders walk, and the min/max of ``topk_idx`` for the range check),
``notify`` (exchange counts and range-check verdicts, prefix matrices; it writes the receive sizes
into host-mapped memory), one host wait (a spin on that memory, no stream sync or copy), then
``dispatch``. The Buffer skips its own host-synced ``topk_idx`` range check for this backend: a bad
id on any rank makes every rank raise the same ValueError at that wait, before any data moves. A cached dispatch and a combine run a
cross-rank barrier then their kernel, with no host sync.

Every spin-wait on a peer is bounded by ``timeout_s`` (env ``DEEPEP_MEGATRON_TIMEOUT_S``, default
10 s). On expiry the kernel records who waited for what in a host-mapped diagnostic and exits; the
next call of this backend (for a non-cached dispatch: the same call, at its host sync) raises
``RuntimeError`` with that diagnostic. The buffer cannot be used after a timeout.

Low-latency dispatch/combine are NOT implemented by kernels here: this backend delegates them to a
:class:`~deepep_megatron.backends.reference.ReferenceBackend` over the same group (same results,
torch.distributed speed), so that the API is complete.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from ..config import (
    FP8_BLOCK,
    MAX_TOPK,
    NVL_CONTROL_BYTES,
    SUPPORTED_NVL_RANK_COUNTS,
    Config,
    align_up,
    nvl_buffer_bytes,
    token_slot_bytes,
)
from .base import Backend, DispatchLayout, DispatchOutput, topk_range_error
from .reference import ReferenceBackend

try:  # the extension is optional: CPU-only installs never build it
    from .. import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as error:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = error

TIMEOUT_ENV = "DEEPEP_MEGATRON_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 10.0
if _C is not None:
    # The kernels' limits (csrc/api.h), read from the extension so the checks here are theirs.
    #: Warps of one persistent block: a ring must hold a send chunk plus one combine round of this many tokens.
    WARPS_PER_BLOCK: int = _C.WARPS_PER_BLOCK
    MAX_SEND_CHUNK: int = _C.MAX_SEND_CHUNK
    MAX_CHANNELS: int = _C.MAX_CHANNELS
    MAX_LOCAL_EXPERTS: int = _C.MAX_LOCAL_EXPERTS

_WAITS = {
    1: "the cross-rank barrier (waiting for the peer's barrier signal; the peer never reached this call)",
    2: "dispatch (sender waiting for free ring slots, i.e. for the peer's receiver to consume)",
    3: "dispatch (receiver waiting for tokens from the peer's sender)",
    4: "combine (sender waiting for free ring slots, i.e. for the peer's receiver to consume)",
    5: "combine (receiver waiting for rows from the peer's sender)",
}


def is_available() -> bool:
    """True when the compiled extension ``deepep_megatron._C`` imports and a CUDA device is visible."""
    return _C is not None and torch.cuda.is_available()


def _timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return value


def _align16(value: int) -> int:
    return align_up(value, 16)


class CudaBackend(Backend):
    """Intranode normal dispatch/combine over CUDA IPC with persistent channel kernels.

    Args (as :class:`~deepep_megatron.backends.base.Backend`): ``num_nvl_bytes`` must be positive
    (see ``Config.get_nvl_buffer_size_hint``); the group must have 2, 4 or 8 ranks, all on one node.

    Attributes:
        timeout_s: bound of every wait on a peer, in seconds (env ``DEEPEP_MEGATRON_TIMEOUT_S``).
        device: the CUDA device that holds this rank's buffer; every tensor must be on it.
    """

    name = "cuda"
    needs_nvl_buffer = True
    checks_topk_range_in_dispatch = True

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        low_latency_mode: bool,
        num_qps_per_rank: int,
    ) -> None:
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)
        if _C is None:
            raise RuntimeError(
                f"the cuda backend needs the compiled extension deepep_megatron._C ({_IMPORT_ERROR}); build it with "
                "`DEEPEP_MEGATRON_BUILD_CUDA=1 python setup.py build_ext --inplace` or use backend='reference'"
            )
        if not torch.cuda.is_available():
            raise RuntimeError("the cuda backend needs a CUDA device; use backend='reference' on CPU")
        if _C.CONTROL_BYTES != NVL_CONTROL_BYTES:  # the size hints (config.py) assume the kernels' layout
            raise RuntimeError(
                f"deepep_megatron._C was built from other sources (control region {_C.CONTROL_BYTES} bytes, this "
                f"package expects {NVL_CONTROL_BYTES}); rebuild it with `DEEPEP_MEGATRON_BUILD_CUDA=1 python setup.py "
                "build_ext --inplace`"
            )
        if self.num_ranks not in SUPPORTED_NVL_RANK_COUNTS:
            raise ValueError(
                f"the cuda backend supports groups of {SUPPORTED_NVL_RANK_COUNTS} ranks (one NVLink domain), got "
                f"{self.num_ranks}; use backend='reference' for other sizes"
            )
        if not isinstance(num_nvl_bytes, int) or num_nvl_bytes <= 0:
            raise ValueError(
                f"the cuda backend needs num_nvl_bytes > 0 (its IPC buffer), got {num_nvl_bytes!r}; size it with "
                "Buffer.get_nvl_size_hint(hidden_bytes, num_ranks)"
            )
        if num_nvl_bytes < NVL_CONTROL_BYTES:
            raise ValueError(
                f"num_nvl_bytes={num_nvl_bytes} is smaller than the {NVL_CONTROL_BYTES}-byte control region; size it "
                "with Buffer.get_nvl_size_hint(hidden_bytes, num_ranks)"
            )
        self.timeout_s = _timeout_from_env()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._broken: Optional[str] = None
        self._runtime = _C.Runtime(self.rank, self.num_ranks, num_nvl_bytes, self.device.index)
        handles: list = [None] * self.num_ranks
        dist.all_gather_object(handles, self._runtime.ipc_handle(), group=group)
        self._runtime.open_peers(handles)
        self._low_latency = ReferenceBackend(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)

    # ------------------------------------------------------------------ health and checks
    def check_errors(self) -> None:
        """Raise RuntimeError if a kernel of this rank timed out waiting for a peer (no sync)."""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        flag, code, rank, peer, channel, block, expected, seen = self._runtime.diagnostic()
        if flag:
            where = _WAITS.get(code, f"wait code {code}")
            chan = "" if channel < 0 else f", channel {channel} (block {block})"
            self._broken = (
                f"deepep_megatron cuda backend: rank {rank} timed out after {self.timeout_s:g} s in {where}: waited for "
                f"rank {peer}{chan}, counter target {expected}, last seen {seen}. Every rank of the group must make the "
                f"same sequence of dispatch/combine calls; if ranks are merely slow, raise {TIMEOUT_ENV}. This buffer "
                "is unusable now: destroy it and create a new one."
            )
            raise RuntimeError(self._broken)

    def synchronize(self) -> None:
        """Wait for this rank's kernels, then :meth:`check_errors`."""
        torch.cuda.synchronize(self.device)
        self.check_errors()

    def _check_device(self, tensor: Optional[torch.Tensor], name: str) -> None:
        if tensor is not None and tensor.device != self.device:
            raise ValueError(
                f"{name} is on {tensor.device} but this rank's cuda buffer is on {self.device}; "
                "call torch.cuda.set_device before creating the Buffer and keep inputs on that device"
            )

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _ring(self, config: Config, num_channels: int, hidden_bytes: int) -> dict:
        """Ring geometry for one call; raise ValueError when ``config`` or the buffer does not fit."""
        slots = config.num_max_nvl_chunked_recv_tokens
        chunk = config.num_max_nvl_chunked_send_tokens
        if num_channels > MAX_CHANNELS:
            raise ValueError(f"config.num_sms={2 * num_channels} is above the kernel limit of {2 * MAX_CHANNELS}")
        if chunk > MAX_SEND_CHUNK or chunk + WARPS_PER_BLOCK > slots:
            raise ValueError(
                f"the cuda backend needs num_max_nvl_chunked_send_tokens <= {MAX_SEND_CHUNK} and "
                f"num_max_nvl_chunked_send_tokens + {WARPS_PER_BLOCK} <= num_max_nvl_chunked_recv_tokens, got "
                f"{chunk} and {slots}"
            )
        slot_bytes = token_slot_bytes(hidden_bytes)
        needed = nvl_buffer_bytes(num_channels, self.num_ranks, slots, hidden_bytes)
        if needed > self.num_nvl_bytes:
            raise ValueError(
                f"this call needs {needed} bytes of NVLink buffer ({num_channels} channels x {self.num_ranks} ranks x "
                f"{slots} slots x {slot_bytes} bytes + control) but the buffer has num_nvl_bytes={self.num_nvl_bytes}; "
                "create the Buffer with num_nvl_bytes >= Config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)"
            )
        return {"num_channels": num_channels, "num_slots": slots, "send_chunk": chunk, "slot_bytes": slot_bytes}

    @staticmethod
    def _row_bytes(x: torch.Tensor) -> int:
        row_bytes = x.size(1) * x.element_size()
        if row_bytes % 16 != 0:
            raise ValueError(
                f"the cuda backend moves rows in 16-byte vectors: hidden={x.size(1)} x {x.element_size()} bytes "
                f"({x.dtype}) is not a multiple of 16; pad hidden to a multiple of {16 // x.element_size()}"
            )
        return row_bytes

    # ------------------------------------------------------------------ normal path
    def get_dispatch_layout(self, topk_idx, num_experts):
        """``topk_idx`` [T, K] int64 -> (``num_tokens_per_rank`` [R] int32, ``num_tokens_per_expert`` [E]
        int32, ``is_token_in_rank`` [T, R] bool), computed by one kernel."""
        self.check_errors()
        self._check_device(topk_idx, "topk_idx")
        topk_idx = topk_idx.contiguous()
        num_tokens, num_topk = topk_idx.shape
        per_rank = torch.empty(self.num_ranks, dtype=torch.int32, device=self.device)
        per_expert = torch.empty(num_experts, dtype=torch.int32, device=self.device)
        in_rank = torch.empty(num_tokens, self.num_ranks, dtype=torch.bool, device=self.device)
        _C.get_dispatch_layout(
            topk_idx.data_ptr(), num_tokens, num_topk, num_experts, self.num_ranks,
            per_rank.data_ptr(), per_expert.data_ptr(), in_rank.data_ptr(), self._stream(),
        )
        return per_rank, per_expert, in_rank

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
    ) -> DispatchOutput:
        """Dispatch ``x`` [T, H] (bf16/fp32, or e4m3 with ``x_scales`` [T, H/128] fp32).

        Without ``cached_layout``: notify + one host sync + dispatch; returns ``recv_topk_idx`` [N, K]
        int64 and ``recv_topk_weights`` [N, K] fp32 too. With it: barrier + dispatch of x only, on the
        channels of the dispatch that made the layout (``config.num_sms`` is not used then).
        """
        self.check_errors()
        for tensor, name in ((x, "x"), (x_scales, "x_scales"), (topk_idx, "topk_idx"), (topk_weights, "topk_weights"),
                             (is_token_in_rank, "is_token_in_rank"), (num_tokens_per_expert, "num_tokens_per_expert")):
            self._check_device(tensor, name)
        if x_scales is not None and x_scales.dtype != torch.float32:
            raise ValueError(
                f"the cuda kernels carry fp32 FP8 scales [T, H/128], got {x_scales.dtype} (packed UE8M0); unpack them "
                "with deepep_megatron.fp8.unpack_ue8m0 or use backend='reference'"
            )
        x = x.contiguous()
        num_tokens, hidden = x.shape
        row_bytes = self._row_bytes(x)
        num_scales = hidden // FP8_BLOCK if x_scales is not None else 0
        if x_scales is not None:
            x_scales = x_scales.contiguous()
        R = self.num_ranks
        stream = self._stream()
        layout_only = cached_layout is None and topk_idx is None
        if layout_only:
            # A layout-only dispatch (no expert ids: tokens go where is_token_in_rank says). The
            # kernels always carry a top-k row, so send one "no expert" slot and drop it on arrival.
            topk_idx = torch.full((num_tokens, 1), -1, dtype=torch.int64, device=self.device)
            topk_weights = torch.zeros(num_tokens, 1, dtype=torch.float32, device=self.device)

        if cached_layout is not None:
            layout = cached_layout
            private = self._private(layout)
            num_channels = private["num_channels"]
            num_topk = 0
            num_local_experts = private["num_local_experts"]
            if layout.is_token_in_rank.size(0) != num_tokens:
                raise ValueError(f"x has {num_tokens} tokens but the cached layout was made for {layout.is_token_in_rank.size(0)}")
        else:
            num_channels = config.num_channels
            num_topk = topk_idx.size(1)
            if num_topk > MAX_TOPK:
                raise ValueError(f"top-k must be at most {MAX_TOPK}, got {num_topk}")
            num_local_experts = num_tokens_per_expert.numel() // R
            if num_local_experts > MAX_LOCAL_EXPERTS:
                raise ValueError(f"the cuda backend supports at most {MAX_LOCAL_EXPERTS} experts per rank, got {num_local_experts}")
        ring = self._ring(config, num_channels, hidden * max(x.element_size(), 2))

        off_scales = _align16(row_bytes)
        off_topk_idx = off_scales + _align16(num_scales * 4)
        off_topk_weights = off_topk_idx + _align16(MAX_TOPK * 4)
        off_src_idx = off_topk_weights + _align16(MAX_TOPK * 4)
        assert off_src_idx + 16 <= ring["slot_bytes"], "slot layout exceeds config.token_slot_bytes"
        args = {
            **ring,
            "x": x.data_ptr(),
            "x_scales": 0 if x_scales is None else x_scales.data_ptr(),
            "topk_idx": 0,
            "topk_weights": 0,
            "num_tokens": num_tokens,
            "x_row_bytes": row_bytes,
            "num_scales": num_scales,
            "num_topk": num_topk,
            "num_local_experts": num_local_experts,
            "off_scales": off_scales,
            "off_topk_idx": off_topk_idx,
            "off_topk_weights": off_topk_weights,
            "off_src_idx": off_src_idx,
        }

        if cached_layout is None:
            is_token_in_rank = is_token_in_rank.contiguous()
            topk_idx = topk_idx.contiguous()
            topk_weights = topk_weights.to(torch.float32).contiguous()
            num_experts = num_tokens_per_expert.numel()
            channel_count = torch.empty(R, num_channels, dtype=torch.int32, device=self.device)
            send_position = torch.empty(num_tokens, R, dtype=torch.int32, device=self.device)
            send_tokens = torch.empty(R, num_tokens, dtype=torch.int32, device=self.device)
            channel_topk_range = torch.empty(num_channels, 2, dtype=torch.int64, device=self.device)
            # channel_layout also takes the min/max of topk_idx per channel; notify reduces it and tells
            # every rank whose ids are out of range (this replaces the Buffer's host-synced check).
            _C.channel_layout(
                is_token_in_rank.data_ptr(), num_tokens, R, num_channels, channel_count.data_ptr(), send_position.data_ptr(),
                send_tokens.data_ptr(), topk_idx.data_ptr(), num_topk, channel_topk_range.data_ptr(), stream,
            )
            recv_channel_offset = torch.empty(R, num_channels + 1, dtype=torch.int32, device=self.device)
            send_counts = torch.empty(R, dtype=torch.int32, device=self.device)
            sequence = self._runtime.notify(
                self.timeout_s,
                {
                    "channel_count": channel_count.data_ptr(),
                    "num_tokens_per_expert": num_tokens_per_expert.contiguous().data_ptr(),
                    "num_channels": num_channels,
                    "num_local_experts": num_local_experts,
                    "expert_alignment": expert_alignment,
                    "channel_topk_range": channel_topk_range.data_ptr(),
                    "num_experts": num_experts,
                    "recv_channel_offset": recv_channel_offset.data_ptr(),
                    "send_counts": send_counts.data_ptr(),
                },
                stream,
            )
            args["topk_idx"] = topk_idx.data_ptr()
            args["topk_weights"] = topk_weights.data_ptr()
            args["send_tokens"] = send_tokens.data_ptr()
            args["channel_count"] = channel_count.data_ptr()
            args["recv_channel_offset"] = recv_channel_offset.data_ptr()
            # The one host wait: spin on the host-mapped result notify publishes (no stream sync, no copy).
            try:
                result = self._runtime.wait_notify(sequence, R + num_local_experts, max(60.0, 6 * self.timeout_s))
            except RuntimeError as error:  # the stream never reached notify: its state is unknown from here on
                self._broken = f"deepep_megatron cuda backend: {error}; this buffer is unusable now"
                raise RuntimeError(self._broken) from error
            if result is None:  # a kernel of this rank timed out: check_errors raises its diagnostic
                self.check_errors()
                raise RuntimeError("deepep_megatron cuda backend: notify did not finish (no diagnostic recorded)")
            counts, bad_ranks, low, high = result
            if bad_ranks:
                if bad_ranks >> self.rank & 1:
                    raise topk_range_error(num_experts, low, high)
                bad = [r for r in range(R) if bad_ranks >> r & 1]
                raise ValueError(
                    f"topk_idx values must be in [-1, num_experts={num_experts}) (-1 = no expert) on every rank: rank(s) "
                    f"{bad} passed values outside it, so every rank of the group refuses this dispatch"
                )
            num_recv = sum(counts[:R])
            recv_src_idx = torch.empty(num_recv, dtype=torch.int32, device=self.device)
            recv_x = torch.empty(num_recv, hidden, dtype=x.dtype, device=self.device)
            recv_x_scales = (
                torch.empty(num_recv, num_scales, dtype=torch.float32, device=self.device) if x_scales is not None else None
            )
            recv_topk_idx = torch.empty(num_recv, num_topk, dtype=torch.int64, device=self.device)
            recv_topk_weights = torch.empty(num_recv, num_topk, dtype=torch.float32, device=self.device)
            args["recv_x"] = recv_x.data_ptr()
            args["recv_x_scales"] = 0 if recv_x_scales is None else recv_x_scales.data_ptr()
            args["recv_topk_idx"] = recv_topk_idx.data_ptr()
            args["recv_topk_weights"] = recv_topk_weights.data_ptr()
            args["recv_src_idx"] = recv_src_idx.data_ptr()
            self._runtime.dispatch(self.timeout_s, args, stream)
            layout = DispatchLayout(
                is_token_in_rank=is_token_in_rank,
                num_tokens_per_rank=send_counts,
                num_recv_tokens_per_rank=torch.tensor(counts[:R], dtype=torch.int32),
                recv_src_idx=recv_src_idx,
                num_recv_tokens_per_expert_list=counts[R:],
                num_channels=num_channels,
                private={
                    "backend": self.name,
                    "num_channels": num_channels,
                    "num_local_experts": num_local_experts,
                    "send_position": send_position,
                    "send_tokens": send_tokens,
                    "channel_count": channel_count,
                    "recv_channel_offset": recv_channel_offset,
                },
            )
            if layout_only:
                recv_topk_idx = recv_topk_weights = None
            return DispatchOutput(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, layout)

        self._runtime.barrier(self.timeout_s, stream)
        num_recv = layout.num_recv_tokens
        recv_x = torch.empty(num_recv, hidden, dtype=x.dtype, device=self.device)
        recv_x_scales = (
            torch.empty(num_recv, num_scales, dtype=torch.float32, device=self.device) if x_scales is not None else None
        )
        args["send_tokens"] = private["send_tokens"].data_ptr()
        args["channel_count"] = private["channel_count"].data_ptr()
        args["recv_channel_offset"] = private["recv_channel_offset"].data_ptr()
        args["recv_x"] = recv_x.data_ptr()
        args["recv_x_scales"] = 0 if recv_x_scales is None else recv_x_scales.data_ptr()
        args["recv_topk_idx"] = 0
        args["recv_topk_weights"] = 0
        args["recv_src_idx"] = 0
        self._runtime.dispatch(self.timeout_s, args, stream)
        return DispatchOutput(recv_x, recv_x_scales, None, None, layout)

    @staticmethod
    def _private(layout: DispatchLayout) -> dict:
        private = layout.private
        if private.get("backend") != "cuda":
            raise ValueError("this handle was made by another backend's dispatch; pass the handle of a cuda-backend dispatch")
        return private

    def combine(self, x, topk_weights, layout: DispatchLayout, config: Config):
        """``x`` [N, H] bf16/fp32 (+ ``topk_weights`` [N, K] fp32) -> ``combined`` [T, H] x.dtype (fp32 sum in
        rank order 0..R-1 from zero, one rounding) and ``combined_topk_weights`` [T, K] fp32 or None.
        Runs on the channels of the dispatch that made ``layout``."""
        self.check_errors()
        self._check_device(x, "x")
        self._check_device(topk_weights, "topk_weights")
        private = self._private(layout)
        x = x.contiguous()
        num_recv, hidden = x.shape
        if num_recv != layout.num_recv_tokens:
            raise ValueError(f"x has {num_recv} rows but the dispatch received {layout.num_recv_tokens}")
        if x.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"the cuda combine supports bf16 and fp32 x, got {x.dtype}")
        row_bytes = self._row_bytes(x)
        num_topk = 0
        if topk_weights is not None:
            topk_weights = topk_weights.to(torch.float32).contiguous()
            num_topk = topk_weights.size(1)
            if num_topk > 32:
                raise ValueError(f"combine's topk_weights may have at most 32 columns, got {num_topk}")
        ring = self._ring(config, private["num_channels"], hidden * max(x.element_size(), 2))
        num_tokens = layout.is_token_in_rank.size(0)
        combined = torch.empty(num_tokens, hidden, dtype=x.dtype, device=self.device)
        combined_weights = (
            torch.empty(num_tokens, num_topk, dtype=torch.float32, device=self.device) if topk_weights is not None else None
        )
        off_weights = _align16(row_bytes)
        assert off_weights + _align16(num_topk * 4) <= ring["slot_bytes"]
        stream = self._stream()
        self._runtime.barrier(self.timeout_s, stream)
        self._runtime.combine(
            self.timeout_s,
            {
                **ring,
                "x": x.data_ptr(),
                "topk_weights": topk_weights.data_ptr() if topk_weights is not None else 0,
                "recv_channel_offset": private["recv_channel_offset"].data_ptr(),
                "send_position": private["send_position"].data_ptr(),
                "num_tokens": num_tokens,
                "combined_x": combined.data_ptr(),
                "combined_topk_weights": combined_weights.data_ptr() if combined_weights is not None else 0,
                "row_bytes": row_bytes,
                "num_topk": num_topk,
                "is_bf16": x.dtype == torch.bfloat16,
                "off_weights": off_weights,
            },
            stream,
        )
        return combined, combined_weights

    # ------------------------------------------------------------------ low-latency path (delegated)
    def low_latency_dispatch(
        self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0, return_recv_hook
    ):
        """Delegated to the reference backend (torch.distributed); no low-latency kernels in this backend."""
        self.check_errors()
        return self._low_latency.low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0, return_recv_hook
        )

    def low_latency_combine(self, x, topk_idx, topk_weights, layout, out, return_recv_hook):
        """Delegated to the reference backend (torch.distributed); no low-latency kernels in this backend."""
        self.check_errors()
        return self._low_latency.low_latency_combine(x, topk_idx, topk_weights, layout, out, return_recv_hook)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to reset: the delegated low-latency path keeps no signalling state."""

    def destroy(self) -> None:
        """Collective: wait for this rank's kernels, unmap the peers' buffers, then free this rank's."""
        if not self._runtime.is_open():
            return
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._runtime.close_peers()
        dist.barrier(group=self.group)
        self._runtime.free_local()
