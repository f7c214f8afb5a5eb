"""The ``cuda`` backend: intranode normal dispatch/combine with the compiled kernels (csrc/).

One ``num_nvl_bytes`` buffer per rank is allocated on the current CUDA device and shared with every
peer by CUDA IPC handles, exchanged once over the process group (NCCL: one rank per GPU; gloo:
several ranks sharing one GPU under MPS). Every operation is ONE call into ``_C``
(csrc/runtime/intranode_ops.cpp), which checks the tensors against the buffers it writes,
allocates the outputs on ``torch.cuda.current_stream()`` (the Buffer's communication stream when
the call overlaps, else the caller's stream),
launches and, for a dispatch that must know its sizes, spins on host-mapped memory with the GIL
released.

* A normal dispatch is two launches: ``notify`` (its cross-rank barrier, per-channel counts, the
  topk_idx range check, the exchange with every peer) and ``dispatch`` (whose sender blocks also
  build their channel's streams), launched behind notify as a programmatic dependent launch: its
  senders start filling the peers' rings as soon as notify's barrier has passed, its receivers wait
  for notify's offsets. Host-waited, it writes into receive tensors sized from the most rows recent
  calls received, then one host wait reads the receive sizes (when some rank's rows do not fit,
  every rank's kernel drains the rings without writing and every rank launches an exact
  ``dispatch``; ``DEEPEP_MEGATRON_PDL=0`` turns the early start off). A cached dispatch and a
  combine are one launch each: the kernel runs its own barrier (block 0) before any block touches
  a peer. ``get_dispatch_layout`` is one kernel.
  With a receive arena (``DEEPEP_MEGATRON_RECV_ARENA_BYTES``, :func:`resolve_recv_arena_bytes`)
  a dispatch's recv_x lives in this rank's IPC buffer and the peers write each row straight into
  it: with every rank's block published, a direct kernel moves rows and metadata without the
  rings; else the ring kernel carries only the metadata to ranks that have a block.
  With ``num_worst_tokens`` > 0 nothing waits on the host: the outputs have that many rows,
  padding rows get top-k -1 / weight 0 / source -1, and the counts stay on the device. That
  dispatch, a cached dispatch and a combine can be captured in a CUDA graph (their barrier's epoch
  lives on the device); capturing a dispatch without ``num_worst_tokens`` raises ValueError.
* Every barrier carries the operation's fingerprint (operation, row bytes, scales, top-k, channels,
  ring slots and chunk, buffer generation): ranks in different operations or geometries stop there
  on every rank, with a diagnostic, before any data moves.
* Every wait on a peer is bounded by ``timeout_s`` (the Buffer's ``timeout_s``, else env
  ``DEEPEP_MEGATRON_TIMEOUT_S``, default 100 s). A device-detected error (timeout, fingerprint
  mismatch, bad expert ids or an overflow under ``num_worst_tokens``) fills a host-mapped diagnostic
  and aborts this rank's kernels; the last block of the failed data kernel overwrites its outputs
  with 0xFF bytes (NaN / -1), so nothing downstream is silently wrong. The error is raised by the
  next call of this backend (for a dispatch without ``num_worst_tokens``: by the same call, at its
  host wait) and by ``synchronize``; the Buffer then refuses work until ``reset()`` (collective),
  after which it is as new.

Low-latency dispatch/combine run on the NVSHMEM kernels (backends/low_latency.py,
csrc/kernels/low_latency.cu) when the extension was built with NVSHMEM and the Buffer has
``low_latency_mode`` and ``num_rdma_bytes``; otherwise this backend delegates them to a
:class:`~deepep_megatron.backends.reference.ReferenceBackend` over the same group (same results,
torch.distributed speed; a RuntimeWarning names the reason), so that the API is complete.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from ..config import NVL_CONTROL_BYTES, SUPPORTED_NVL_RANK_COUNTS, Config
from ..layout import MAX_COMBINE_TOPK, MAX_LOCAL_EXPERTS, MAX_SEND_CHUNK, MAX_TOPK, WARPS_PER_BLOCK
from .base import Backend, DispatchLayout, DispatchOutput, topk_range_error
from .low_latency import LowLatencyDelegate, low_latency_engine

try:  # the extension is optional: CPU-only installs never build it
    from .. import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as error:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = error

TIMEOUT_ENV = "DEEPEP_MEGATRON_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 100.0
#: Bytes of the receive arena each rank's IPC buffer carries (direct-write dispatch; 0: none).
RECV_ARENA_ENV = "DEEPEP_MEGATRON_RECV_ARENA_BYTES"

#: What each ErrorCode of the layout header means (Diagnostic::code).
_ERRORS = {
    1: "the cross-rank barrier (waiting for the peer's barrier signal; the peer never reached this call)",
    2: "dispatch (sender waiting for free ring slots, i.e. for the peer's receiver to consume)",
    3: "dispatch (receiver waiting for tokens from the peer's sender)",
    4: "combine (sender waiting for free ring slots, i.e. for the peer's receiver to consume)",
    5: "combine (receiver waiting for rows from the peer's sender)",
}
_RECEIVE_BLOCK_OVERFLOW = 13
_FINGERPRINT_MISMATCH, _BAD_EXPERT_IDS, _WORST_TOKENS_EXCEEDED = 6, 7, 8
#: Names of the fingerprint words (FingerprintWord) and of the operations (Operation).
_FINGERPRINT_FIELDS = ("operation", "row bytes", "FP8 scales per row", "top-k", "channels (num_sms / 2)", "ring slots",
                       "send chunk", "buffer generation")
_OPERATIONS = {1: "dispatch", 2: "cached dispatch", 3: "combine", 4: "barrier"}
_RESET_HINT = ("This Buffer refuses work until every rank calls buffer.reset() (collective), or it is destroyed and "
               "created again.")


def is_available() -> bool:
    """True when the compiled extension ``deepep_megatron._C`` imports and a CUDA device is visible."""
    return _C is not None and torch.cuda.is_available()


def resolve_timeout(timeout_s: Optional[float]) -> float:
    """The wait bound in seconds: ``timeout_s`` if given, else env ``DEEPEP_MEGATRON_TIMEOUT_S``, else 100."""
    source = "timeout_s"
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None:
            return DEFAULT_TIMEOUT_S
        source = TIMEOUT_ENV
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 1e6:
        raise ValueError(f"{source} must be a number of seconds in (0, 1e6], got {timeout_s!r}")
    return float(timeout_s)


def resolve_recv_arena_bytes(environ: Optional[dict] = None) -> int:
    """Bytes of the receive arena (env ``DEEPEP_MEGATRON_RECV_ARENA_BYTES``, default 0 = none).

    With an arena, a dispatch takes recv_x (and its FP8 scales) as one block of it when the block
    fits, and the peers write every row straight there instead of through the rings (no copy-out
    pass); a block goes back when the last tensor viewing it dies. A dispatch whose block does not
    fit, or one under CUDA graph capture, takes the rings. Size it to the recv_x bytes alive at once
    (e.g. 2 x num_tokens * num_ranks * hidden * 2 for bf16 when each layer's recv_x dies after permute).
    """
    env = os.environ if environ is None else environ
    raw = env.get(RECV_ARENA_ENV, "0")
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{RECV_ARENA_ENV} must be a number of bytes >= 0 (0: no receive arena), got {raw!r}")
    return value


def _peer_topk_range_error(num_experts: int, bad_mask: int, num_ranks: int, context: str = "") -> ValueError:
    """The error every rank raises when the ranks in ``bad_mask`` (bit r = rank r) passed topk_idx
    values outside ``[-1, num_experts)`` (host-synced and num_worst_tokens dispatches alike)."""
    bad = [r for r in range(num_ranks) if bad_mask >> r & 1]
    return ValueError(
        f"topk_idx values must be in [-1, num_experts={num_experts}) (-1 = no expert) on every rank: rank(s) "
        f"{bad} passed values outside it{context}, so every rank of the group refuses this dispatch"
    )


def _describe_fingerprint(words: list[int]) -> str:
    parts = []
    for name, value in zip(_FINGERPRINT_FIELDS, words):
        parts.append(f"{name}={_OPERATIONS.get(value, value) if name == 'operation' else value}")
    return ", ".join(parts)


class CudaBackend(LowLatencyDelegate, Backend):
    """Intranode normal dispatch/combine over CUDA IPC with persistent channel kernels.

    Args (as :class:`~deepep_megatron.backends.base.Backend`): ``num_nvl_bytes`` must be positive
    (see ``Config.get_nvl_buffer_size_hint``); the group must have 2, 4 or 8 ranks, all on one node.
    ``timeout_s``: bound of every wait on a peer (None: env ``DEEPEP_MEGATRON_TIMEOUT_S`` or 100 s).

    Attributes:
        device: the CUDA device that holds this rank's buffer; every tensor must be on it.
    """

    name = "cuda"
    needs_nvl_buffer = True
    checks_topk_range_in_dispatch = True
    native_worst_tokens = True

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        low_latency_mode: bool,
        num_qps_per_rank: int,
        timeout_s: Optional[float] = None,
    ) -> None:
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)
        if _C is None:
            raise RuntimeError(
                f"the cuda backend needs the compiled extension deepep_megatron._C ({_IMPORT_ERROR}); build it with "
                "`DEEPEP_MEGATRON_BUILD_CUDA=1 python setup.py build_ext --inplace` or use backend='reference'"
            )
        if not torch.cuda.is_available():
            raise RuntimeError("the cuda backend needs a CUDA device; use backend='reference' on CPU")
        if _C.CONTROL_BYTES != NVL_CONTROL_BYTES or _C.MAX_TOPK != MAX_TOPK:  # built from another header
            raise RuntimeError(
                f"deepep_megatron._C was built from another layout header (control region {_C.CONTROL_BYTES} bytes, "
                f"top-k limit {_C.MAX_TOPK}; this package's header says {NVL_CONTROL_BYTES} and {MAX_TOPK}); rebuild it "
                "with `DEEPEP_MEGATRON_BUILD_CUDA=1 python setup.py build_ext --inplace`"
            )
        if self.num_ranks not in SUPPORTED_NVL_RANK_COUNTS:
            raise ValueError(
                f"the cuda backend supports groups of {SUPPORTED_NVL_RANK_COUNTS} ranks (one NVLink domain), got "
                f"{self.num_ranks}; use backend='reference' for other sizes"
            )
        if not isinstance(num_nvl_bytes, int) or num_nvl_bytes < NVL_CONTROL_BYTES:
            raise ValueError(
                f"the cuda backend needs num_nvl_bytes >= {NVL_CONTROL_BYTES} (its IPC buffer), got {num_nvl_bytes!r}; "
                "size it with Buffer.get_nvl_size_hint(hidden_bytes, num_ranks)"
            )
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._runtime = _C.Runtime(self.rank, self.num_ranks, num_nvl_bytes, self.device.index, resolve_timeout(timeout_s),
                                   resolve_recv_arena_bytes())
        peers: list = [None] * self.num_ranks
        dist.all_gather_object(peers, (self._runtime.ipc_handle(), num_nvl_bytes), group=group)
        self._runtime.open_peers([handle for handle, _ in peers], [size for _, size in peers])
        self._error: Optional[BaseException] = None
        self._low_latency = low_latency_engine(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
                                               resolve_timeout(timeout_s))

    @property
    def timeout_s(self) -> float:
        """Bound of every wait on a peer, in seconds (settable; takes effect from the next call)."""
        return self._runtime.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self._runtime.timeout_s = resolve_timeout(value)

    # ------------------------------------------------------------------ health
    def _device_error(self) -> BaseException:
        """The exception for this rank's recorded device error (ValueError for bad input)."""
        words = self._runtime.diagnostic()
        _, code, rank, peer, channel, block, expected, seen = words[:8]
        mine, theirs = words[8 : 8 + _C.FINGERPRINT_WORDS], words[8 + _C.FINGERPRINT_WORDS :]
        prefix = f"deepep_megatron cuda backend, rank {rank}: "
        if code == _BAD_EXPERT_IDS:
            error = _peer_topk_range_error(seen, expected, self.num_ranks, " in a num_worst_tokens dispatch")
            return ValueError(f"{prefix}{error} (its outputs are NaN / -1). {_RESET_HINT}")
        if code == _WORST_TOKENS_EXCEEDED:
            return RuntimeError(
                f"{prefix}rank {peer} would receive {seen} rows but num_worst_tokens={expected}; every rank refused the "
                f"dispatch (its outputs are NaN / -1). Raise num_worst_tokens (num_tokens * num_ranks bounds any "
                f"routing). {_RESET_HINT}"
            )
        if code == _RECEIVE_BLOCK_OVERFLOW:
            return RuntimeError(
                f"{prefix}a dispatch row for rank {peer} (channel {channel}) fell past the {expected} rows of that "
                f"rank's receive block (row {seen}); no row was written there. The ranks' layouts disagree: every "
                f"rank must dispatch with the handle (cached layout) of the same dispatch. {_RESET_HINT}"
            )
        if code == _FINGERPRINT_MISMATCH:
            first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), 0)
            return RuntimeError(
                f"{prefix}ranks disagree on the operation (first difference: {_FINGERPRINT_FIELDS[first]} "
                f"{mine[first]} here vs {theirs[first]} on rank {peer}): this rank is in ({_describe_fingerprint(mine)}) "
                f"but rank {peer} is in ({_describe_fingerprint(theirs)}). Every rank must make the same sequence of "
                f"dispatch/combine calls with the same hidden size, dtype, top-k and config. {_RESET_HINT}"
            )
        where = _ERRORS.get(code, f"wait code {code}")
        chan = "" if channel < 0 else f", channel {channel} (block {block})"
        return RuntimeError(
            f"{prefix}timed out after {self.timeout_s:g} s in {where}: waited for rank {peer}{chan}, counter target "
            f"{expected}, last seen {seen}. Every rank of the group must make the same sequence of dispatch/combine "
            f"calls; if ranks are merely slow, raise timeout_s or {TIMEOUT_ENV}. {_RESET_HINT}"
        )

    def record_stream(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """A tensor viewing a receive block (``Tensor.record_stream`` does nothing for those): the
        block's release waits for ``stream``'s work too; any other tensor: ``Tensor.record_stream``."""
        if not self._runtime.arena_record_stream(tensor.data_ptr(), stream.cuda_stream):
            tensor.record_stream(stream)

    def arena_stats(self) -> dict:
        """The receive arena: ``bytes`` (0 without one), ``bytes_in_use``, ``blocks`` (receive blocks
        that tensors still view) and ``misses`` (blocks refused for want of space since the Buffer
        was made: each of those operations went through the rings)."""
        size, in_use, blocks, misses = self._runtime.arena_stats()
        return {"bytes": size, "bytes_in_use": in_use, "blocks": blocks, "misses": misses}

    def host_timing(self) -> list:
        """``[(stage, microseconds)]`` of this rank's last dispatch, cached dispatch or combine inside
        ``_C`` (checks, output tensors, each launch, the notify wait), when the process runs with
        ``DEEPEP_MEGATRON_HOST_TIMING=1``; empty otherwise (csrc/runtime/host_timing.h)."""
        return self._runtime.host_timing()

    def check_errors(self) -> None:
        """Raise the recorded error if a kernel of this rank failed (no sync)."""
        if self._error is None and self._runtime.has_error():
            self._error = self._device_error()
        if self._error is not None:
            raise self._error

    def _call(self, op, *args):
        """One operation of ``_C``; its DeviceError becomes the diagnostic's exception."""
        if self._error is not None:
            raise self._error
        try:
            return op(*args)
        except _C.DeviceError:
            self.check_errors()
            raise

    def synchronize(self) -> None:
        """Wait for this rank's kernels, then :meth:`check_errors`."""
        torch.cuda.synchronize(self.device)
        self.check_errors()

    def reset(self) -> None:
        """Collective: after every rank's kernels stopped, clear the control region (epochs, ring
        counters, abort word) and the diagnostic on every rank; the buffer is then as new."""
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)  # no rank's kernel touches a peer's buffer from here on
        self._runtime.reset()
        dist.barrier(group=self.group)  # no rank starts a new operation before every buffer is clear
        self._error = None

    # ------------------------------------------------------------------ checks
    def _check_device(self, tensor: Optional[torch.Tensor], name: str) -> None:
        if tensor is not None and tensor.device != self.device:
            raise ValueError(
                f"{name} is on {tensor.device} but this rank's cuda buffer is on {self.device}; "
                "call torch.cuda.set_device before creating the Buffer and keep inputs on that device"
            )

    @staticmethod
    def _ring(config: Config, num_channels: int) -> tuple[int, int, int]:
        """(channels, ring slots, send chunk) for one call; ValueError when ``config`` breaks a kernel limit."""
        slots = config.num_max_nvl_chunked_recv_tokens
        chunk = config.num_max_nvl_chunked_send_tokens
        if chunk > MAX_SEND_CHUNK or chunk + WARPS_PER_BLOCK > slots:
            raise ValueError(
                f"the cuda backend needs num_max_nvl_chunked_send_tokens <= {MAX_SEND_CHUNK} and "
                f"num_max_nvl_chunked_send_tokens + {WARPS_PER_BLOCK} <= num_max_nvl_chunked_recv_tokens, got "
                f"{chunk} and {slots}"
            )
        return num_channels, slots, chunk

    @staticmethod
    def _check_row(x: torch.Tensor) -> None:
        if x.size(1) * x.element_size() % 16 != 0:
            raise ValueError(
                f"the cuda backend moves rows in 16-byte vectors: hidden={x.size(1)} x {x.element_size()} bytes "
                f"({x.dtype}) is not a multiple of 16; pad hidden to a multiple of {16 // x.element_size()}"
            )

    # ------------------------------------------------------------------ normal path
    def get_dispatch_layout(self, topk_idx, num_experts):
        """``topk_idx`` [T, K] int64 -> (``num_tokens_per_rank`` [R] int32, ``num_tokens_per_expert`` [E]
        int32, ``is_token_in_rank`` [T, R] bool), computed by one kernel."""
        self._check_device(topk_idx, "topk_idx")
        return self._call(self._runtime.get_dispatch_layout, topk_idx.contiguous(), num_experts)

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
        num_worst_tokens: int = 0,
    ) -> DispatchOutput:
        """Dispatch ``x`` [T, H] (bf16/fp32, or e4m3 with ``x_scales`` [T, H/128] fp32).

        Without ``cached_layout``: one ``_C.dispatch`` (notify and the dispatch kernel behind it;
        unless ``num_worst_tokens``, into tensors sized from recent calls, then the host wait for the
        sizes, then the exact kernel only if some rank's rows did not fit); returns
        ``recv_topk_idx`` [N, K] int64 and ``recv_topk_weights`` [N, K] fp32 too. With it: one
        kernel (its own barrier, then x only) on the channels of the dispatch that made the layout
        (``config.num_sms`` is not used then).
        """
        self._check_device(x, "x")
        if x_scales is not None and x_scales.dtype != torch.float32:
            raise ValueError(
                f"the cuda kernels carry fp32 FP8 scales [T, H/128], got {x_scales.dtype} (packed UE8M0); unpack them "
                "with deepep_megatron.fp8.unpack_ue8m0 or use backend='reference'"
            )
        self._check_row(x)
        x = x.contiguous()
        x_scales = x_scales.contiguous() if x_scales is not None else None
        if cached_layout is not None:
            private = self._private(cached_layout)
            if cached_layout.is_token_in_rank.size(0) != x.size(0):
                raise ValueError(
                    f"x has {x.size(0)} tokens but the cached layout was made for {cached_layout.is_token_in_rank.size(0)}"
                )
            recv_x, recv_x_scales = self._call(
                self._runtime.cached_dispatch, x, x_scales, private["send_tokens"], private["channel_count"],
                private["recv_channel_offset"], cached_layout.recv_src_idx, cached_layout.rank_prefix_matrix,
                private["send_position"],
                *self._ring(config, cached_layout.num_channels),
            )
            return DispatchOutput(recv_x, recv_x_scales, None, None, cached_layout)

        # The Buffer put the layout tensors on x's device and _C checks every tensor again.
        R = self.num_ranks
        num_local_experts = num_tokens_per_expert.numel() // R
        if num_local_experts > MAX_LOCAL_EXPERTS:
            raise ValueError(f"the cuda backend supports at most {MAX_LOCAL_EXPERTS} experts per rank, got {num_local_experts}")
        if topk_idx is not None and topk_idx.size(1) > MAX_TOPK:
            raise ValueError(f"top-k must be at most {MAX_TOPK}, got {topk_idx.size(1)}")
        result = self._call(
            self._runtime.dispatch, x, x_scales,
            topk_idx.contiguous() if topk_idx is not None else None,
            topk_weights.contiguous() if topk_weights is not None else None,
            is_token_in_rank.contiguous(), num_tokens_per_expert.contiguous(), expert_alignment,
            *self._ring(config, config.num_channels), num_worst_tokens,
        )
        if len(result) == 3:  # some rank's topk_idx is out of range: every rank refuses, no data moved
            bad_ranks, low, high = result
            num_experts = num_tokens_per_expert.numel()
            if bad_ranks >> self.rank & 1:
                raise topk_range_error(num_experts, low, high)
            raise _peer_topk_range_error(num_experts, bad_ranks, R)
        (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, send_position, send_tokens,
         channel_count, recv_channel_offset, send_counts, rank_prefix_matrix, recv_counts, host_counts,
         num_recv_tokens_per_rank, recv_channel_prefix_matrix) = result
        layout = DispatchLayout(
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_rank=send_counts,
            # on the host when the dispatch waited for its sizes; on the device under num_worst_tokens
            num_recv_tokens_per_rank=num_recv_tokens_per_rank,
            recv_src_idx=recv_src_idx,
            num_recv_tokens_per_expert_list=host_counts[R:],
            num_channels=config.num_channels,
            rank_prefix_matrix=rank_prefix_matrix,
            recv_channel_prefix_matrix=recv_channel_prefix_matrix,
            private={
                "backend": self.name,
                "send_position": send_position,
                "send_tokens": send_tokens,
                "channel_count": channel_count,
                "recv_channel_offset": recv_channel_offset,
                "recv_counts": recv_counts,
            },
        )
        return DispatchOutput(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, layout)

    @staticmethod
    def _private(layout: DispatchLayout) -> dict:
        private = layout.private
        if private.get("backend") != "cuda":
            raise ValueError("this handle was made by another backend's dispatch; pass the handle of a cuda-backend dispatch")
        return private

    def combine(self, x, topk_weights, layout: DispatchLayout, config: Config):
        """``x`` [N, H] bf16/fp32 (+ ``topk_weights`` [N, K] fp32) -> ``combined`` [T, H] x.dtype (fp32 sum in
        rank order 0..R-1 from zero, one rounding) and ``combined_topk_weights`` [T, K] fp32 or None.
        Runs on the channels of the dispatch that made ``layout``; padding rows of a ``num_worst_tokens``
        dispatch are not read."""
        self._check_device(x, "x")
        self._check_device(topk_weights, "topk_weights")
        private = self._private(layout)
        if x.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"the cuda combine supports bf16 and fp32 x, got {x.dtype}")
        if x.size(0) != layout.num_recv_tokens:
            raise ValueError(f"x has {x.size(0)} rows but the dispatch received {layout.num_recv_tokens}")
        self._check_row(x)
        if topk_weights is not None:
            topk_weights = topk_weights.to(torch.float32).contiguous()
            if topk_weights.size(1) > MAX_COMBINE_TOPK:
                raise ValueError(f"combine's topk_weights may have at most {MAX_COMBINE_TOPK} columns, got {topk_weights.size(1)}")
        return self._call(
            self._runtime.combine, x.contiguous(), topk_weights, private["recv_channel_offset"], private["send_position"],
            layout.recv_src_idx, layout.rank_prefix_matrix, private["channel_count"], *self._ring(config, layout.num_channels),
        )

    # ------------------------------------------------------------------ low-latency path
    def _before_low_latency(self) -> None:
        """The low-latency calls (LowLatencyDelegate) first raise this rank's recorded error."""
        self.check_errors()

    def destroy(self) -> None:
        """Collective: wait for this rank's kernels, unmap the peers' buffers, then free this rank's.
        Works after a device error too (the kernels of an aborted rank have exited)."""
        self._low_latency.destroy()
        if not self._runtime.is_open():
            return
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._runtime.close_peers()
        dist.barrier(group=self.group)
        self._runtime.free_local()
