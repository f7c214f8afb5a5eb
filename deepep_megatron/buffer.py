"""``Buffer``: the public, DeepEP-compatible API of expert-parallel dispatch and combine.

This module checks every argument (so a backend only ever sees valid input), owns the handles,
the communication stream and the events, and sizes the communication buffers. It never knows which
backend runs: ``backends.create_backend`` decides that once, at construction.

Shapes: ``T`` tokens on this rank, ``H`` hidden, ``K`` top-k, ``E`` experts in all, ``R`` ranks,
``N`` rows received by this rank. ``x`` may be bf16/fp32 [T, H] or an FP8 pair
``(x_e4m3 [T, H], scales fp32 [T, H/128])``.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

from .backends import create_backend
from .backends.base import (
    DispatchLayout,
    DispatchOutput,
    LowLatencyLayout,
    channel_prefix_matrix,
    channel_send_head,
    topk_range_error,
)
from .config import (
    FP8_BLOCK,
    MAX_TOPK,
    Config,
    default_combine_config,
    default_dispatch_config,
    get_low_latency_rdma_size_hint,
)
from .events import EventHandle, EventOverlap, cuda_event_of, cuda_in_use
from .fp8 import FP8_DTYPE, UE8M0_PER_INT32
from .profiling import nvtx_range
from .topology import group_topology

TensorOrFP8 = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
_HIGH_PRECISION_DTYPES = (torch.bfloat16, torch.float32)
_buffer_ids = itertools.count()


class DispatchHandle(Sequence):
    """Result of a normal dispatch, needed by ``combine`` and by a cached ``dispatch``.

    It remembers which buffer and which shapes it belongs to, so that a handle passed to the wrong
    buffer or with tensors of the wrong shape is refused with a clear error. Like DeepEP's intranode
    handle it is also a 6-sequence (``handle[0]``, ``a, b, c, d, e, f = handle``)::

        (rank_prefix_matrix [R, R] int32, channel_prefix_matrix [R, C] int32,
         recv_channel_prefix_matrix [R, C] int32, recv_src_idx [N] int32,
         is_token_in_rank [T, R] bool, send_head [T, R] int32)

    with DeepEP's meanings (see ``backends.base.DispatchLayout``); ``C`` is the dispatch's channel
    count and ``N`` the received rows (``num_worst_tokens`` when it was given: rows past the real
    ones have ``recv_src_idx`` -1). The items are built on first access.
    """

    __slots__ = ("buffer_id", "num_tokens", "hidden", "num_topk", "layout", "num_worst_tokens", "_items")

    def __init__(
        self, buffer_id: int, num_tokens: int, hidden: int, num_topk: int, layout: DispatchLayout, num_worst_tokens: int = 0
    ) -> None:
        self.buffer_id = buffer_id
        self.num_tokens = num_tokens
        self.hidden = hidden
        self.num_topk = num_topk
        self.layout = layout
        self.num_worst_tokens = num_worst_tokens
        self._items: Optional[tuple] = None

    @property
    def num_recv_tokens(self) -> int:
        """Rows of the dispatch's layout: the real count, except on a backend with
        ``native_worst_tokens`` (cuda), whose ``num_worst_tokens`` layout holds every row (the
        padding ones with ``recv_src_idx`` -1; real counts: ``layout.num_recv_tokens_per_rank``)."""
        return self.layout.num_recv_tokens

    @property
    def num_recv_rows(self) -> int:
        """Rows of the received tensors: ``num_worst_tokens`` when it was given, else the real count."""
        return self.num_worst_tokens or self.layout.num_recv_tokens

    @property
    def is_token_in_rank(self) -> torch.Tensor:
        return self.layout.is_token_in_rank

    @property
    def recv_src_idx(self) -> torch.Tensor:
        return self.layout.recv_src_idx

    def _deepep_items(self) -> tuple:
        if self._items is None:
            lay = self.layout
            missing = [n for n, v in (("rank_prefix_matrix", lay.rank_prefix_matrix),
                                      ("recv_channel_prefix_matrix", lay.recv_channel_prefix_matrix)) if v is None]
            if missing:
                raise RuntimeError(
                    f"this handle's backend does not provide DeepEP's {' and '.join(missing)} (the cuda kernels keep "
                    "only this rank's counts); index the handle of a backend='reference' Buffer, or use "
                    "handle.layout.num_recv_tokens_per_rank / handle.recv_src_idx"
                )
            self._items = (
                lay.rank_prefix_matrix,
                channel_prefix_matrix(lay.is_token_in_rank, lay.num_channels),
                lay.recv_channel_prefix_matrix,
                _pad_rows(lay.recv_src_idx, self.num_recv_rows, -1),
                lay.is_token_in_rank,
                channel_send_head(lay.is_token_in_rank, lay.num_channels),
            )
        return self._items

    def __getitem__(self, index):
        return self._deepep_items()[index]

    def __len__(self) -> int:
        return 6

    def __repr__(self) -> str:
        worst = f", worst={self.num_worst_tokens}" if self.num_worst_tokens else ""
        return f"DispatchHandle(tokens={self.num_tokens}, hidden={self.hidden}, received={self.num_recv_tokens}{worst})"


class LowLatencyHandle(Sequence):
    """Result of ``low_latency_dispatch``, needed by ``low_latency_combine``. Like DeepEP's, also the
    5-sequence ``(recv_src_info [E_local, R * max_tokens] int32, recv_layout_range [E_local, R] int64,
    num_max_dispatch_tokens_per_rank, hidden, num_experts)``."""

    __slots__ = ("buffer_id", "num_tokens", "num_topk", "layout")

    def __init__(self, buffer_id: int, num_tokens: int, num_topk: int, layout: LowLatencyLayout) -> None:
        self.buffer_id = buffer_id
        self.num_tokens = num_tokens
        self.num_topk = num_topk
        self.layout = layout

    def __getitem__(self, index):
        lay = self.layout
        return (lay.recv_src_info, lay.recv_layout_range, lay.num_max_dispatch_tokens_per_rank, lay.hidden, lay.num_experts)[index]

    def __len__(self) -> int:
        return 5

    def __repr__(self) -> str:
        lay = self.layout
        return f"LowLatencyHandle(tokens={self.num_tokens}, max_tokens={lay.num_max_dispatch_tokens_per_rank}, experts={lay.num_experts})"


def _received_payload(out: DispatchOutput, with_scales: bool, num_rows: int) -> TensorOrFP8:
    """What a dispatch returns as ``recv_x``: the received rows (an FP8 pair when ``with_scales``)
    extended with zero rows to ``num_rows`` (the ``num_worst_tokens`` bound; no copy without it)."""
    recv_x = _pad_rows(out.recv_x, num_rows, 0)
    return (recv_x, _pad_rows(out.recv_x_scales, num_rows, 0)) if with_scales else recv_x


def _pad_rows(tensor: Optional[torch.Tensor], num_rows: int, fill: float) -> Optional[torch.Tensor]:
    """``tensor`` [N, ...] extended to ``num_rows`` >= N rows of ``fill`` (itself when N == num_rows)."""
    if tensor is None or tensor.size(0) == num_rows:
        return tensor
    padded = torch.full((num_rows, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.size(0)] = tensor
    return padded


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
    # The passing case is tested first with as few tensor attribute reads as possible (this runs
    # several times per dispatch); the failing case then finds what is wrong.
    if isinstance(value, torch.Tensor) and value.dtype in dtypes:
        sizes = value.shape
        if len(sizes) == len(shape):
            for want_size, size in zip(shape, sizes):
                if want_size is not None and want_size != size:
                    break
            else:
                if device is None or value.device == device:
                    return value
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {str(value.dtype).replace('torch.', '')}")
    if device is None or value.device == device:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(value.shape)}")
    raise ValueError(f"{name} is on {value.device} but x is on {device}; move all inputs to one device")


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
    """Validate ``x`` (tensor or FP8 pair) and return ``(data, scales or None)``. The scales of an FP8
    pair are fp32 [T, H/128], or UE8M0 exponents packed four to an int32 [T, ceil(H/512)]
    (``fp8.pack_ue8m0``), in any memory layout (DeepEP's tests pass them column-major)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"an FP8 x must be a pair (x_e4m3 [T, H], scales [T, H/128]), got {len(x)} items")
        data, scales = x
        _check_tensor(data, "x[0]", (FP8_DTYPE,), (None, None))
        if data.size(1) % FP8_BLOCK != 0:
            raise ValueError(f"x[0].size(1) (hidden={data.size(1)}) must be divisible by {FP8_BLOCK} for FP8")
        groups = data.size(1) // FP8_BLOCK
        _check_tensor(scales, "x[1] (FP8 scales)", (torch.float32, torch.int32), (data.size(0), None), data.device)
        want = groups if scales.dtype == torch.float32 else -(-groups // UE8M0_PER_INT32)
        if scales.size(1) != want:
            raise ValueError(
                f"x[1] (FP8 scales, {str(scales.dtype).replace('torch.', '')}) must have shape [{data.size(0)}, {want}] "
                f"for hidden={data.size(1)} (fp32: one scale per {FP8_BLOCK} channels; int32: {UE8M0_PER_INT32} packed "
                f"UE8M0 scales each), got {list(scales.shape)}"
            )
        return data.contiguous(), scales.contiguous()
    _check_tensor(x, "x", _HIGH_PRECISION_DTYPES, (None, None))
    return x.contiguous(), None


def _check_event(previous_event: Any) -> None:
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event must be an EventOverlap or None, got {type(previous_event).__name__}")


def _check_config(config: Any, default: Callable[[int], Config], num_ranks: int) -> Config:
    """``config``, or ``default(num_ranks)`` when it is None (built only then: this runs every call)."""
    if config is None:
        return default(num_ranks)
    if not isinstance(config, Config):
        raise TypeError(f"config must be a deepep_megatron.Config or None, got {type(config).__name__}")
    return config


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a (nested) tuple/list/dict/dataclass result (a backend's DispatchOutput
    and its DispatchLayout, with its ``private`` dict, are what the compute stream goes on to use)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors_in(getattr(value, f.name))]
    return []


class Buffer:
    """Communication buffer of one expert-parallel group (DeepEP v1.2.1-compatible arguments).

    Args:
        group: the expert-parallel process group (NCCL for one rank per GPU, gloo on CPU or for
            several ranks sharing one GPU). None with ``comm``: see ``comm``.
        num_nvl_bytes: bytes of the NVLink (CUDA IPC) buffer of the normal kernels; size it with
            ``Buffer.get_nvl_size_hint`` or ``Config.get_nvl_buffer_size_hint``. When non-zero it is
            checked on every call, on every backend, so code sized on CPU also fits on GPU.
        num_rdma_bytes: bytes of the RDMA (NVSHMEM) buffer: internode and low-latency kernels.
        low_latency_mode: enable ``low_latency_dispatch``/``low_latency_combine``.
        num_qps_per_rank: RDMA queue pairs per peer (internode/low-latency kernels).
        allow_nvlink_for_low_latency_mode: DeepEP's switch for NVLink traffic in low-latency mode.
            Accepted and recorded; it changes nothing: the NVSHMEM low-latency kernels always use
            loads and stores where NVSHMEM reaches a peer that way (NVLink, the same GPU), puts elsewhere.
        allow_mnnvl: DeepEP's multi-node NVLink switch. Accepted and recorded; MNNVL is not supported
            here, so it changes nothing.
        explicitly_destroy: as DeepEP: when True you must call :meth:`destroy` (collective) to release
            the buffer, and a Buffer collected without it warns; when False (the default) its memory
            is released when it is garbage-collected and :meth:`destroy` refuses.
        comm: an ``mpi4py.MPI.Comm`` to use when ``group`` is None: its ranks must be the ranks of an
            initialized ``torch.distributed`` world (the backends communicate through torch.distributed),
            in the same order.
        enable_shrink: newer DeepEP's fault-tolerant rank masking (vLLM passes it); only False.
        backend: ``"reference"`` (torch.distributed collectives), ``"cuda"`` (compiled kernels),
            ``"forwarding"`` (the reference's collectives with node forwarding, for a group over
            several nodes: each token crosses to each node once) or ``"auto"`` (cuda when the
            extension is built, a GPU is visible and num_nvl_bytes > 0).
        timeout_s: how long a kernel waits for a peer before it stops with a diagnostic (which rank,
            channel and counter) that the Buffer raises; None: env ``DEEPEP_MEGATRON_TIMEOUT_S`` or
            100 s. After such an error every rank calls :meth:`reset` to use the Buffer again.
    """

    #: SMs the normal kernels use unless a config says otherwise (``set_num_sms``).
    num_sms: int = 20

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        comm: Optional[Any] = None,
        *,
        enable_shrink: bool = False,
        backend: str = "auto",
        timeout_s: Optional[float] = None,
    ) -> None:
        self._destroyed = True  # until the backend exists (so __del__ of a half-built Buffer is quiet)
        if enable_shrink:
            raise ValueError(
                "enable_shrink=True (DeepEP's post-1.2.1 rank-masking for fault tolerance) is not supported; pass "
                "enable_shrink=False"
            )
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
        group = _group_of(group, comm)
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
        #: (max tokens, hidden, experts) shapes already found to fit num_rdma_bytes: a decode loop
        #: repeats one shape, so each call skips recomputing the layout.
        self._low_latency_shapes_that_fit: set[tuple[int, int, int]] = set()
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = bool(allow_nvlink_for_low_latency_mode)
        self.allow_mnnvl = bool(allow_mnnvl)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.topology = group_topology(group)
        #: Nodes the group spans (DeepEP's RDMA ranks) and ranks on each (its NVLink ranks).
        self.num_rdma_ranks = self.topology.num_nodes
        self.num_nvl_ranks = self.topology.ranks_per_node
        self.runtime = create_backend(backend, group, num_nvl_bytes, num_rdma_bytes, self.low_latency_mode, num_qps_per_rank,
                                      self.num_rdma_ranks, timeout_s)
        self._id = next(_buffer_ids)
        self._comm_streams: dict[int, torch.cuda.Stream] = {}
        #: (num_sms, ring slots, hidden, element size) of calls known to fit num_nvl_bytes
        self._nvl_fits: set[tuple[int, int, int, int]] = set()
        self._next_combine_buffer: Optional[torch.Tensor] = None
        self._destroyed = False

    # ------------------------------------------------------------------ configuration
    @property
    def backend_name(self) -> str:
        return self.runtime.name

    @staticmethod
    def is_sm90_compiled() -> bool:
        """DeepEP's "are the SM90-only features (FP8 dispatch) built in?". Always True here: the
        reference backend casts FP8 in PyTorch on any device, and the CUDA kernels, when built, are
        built for sm_90 only (csrc/build.py)."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SM count of the default configs (even: two SMs per channel)."""
        if not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2 != 0:
            raise ValueError(f"num_sms must be a positive even int (two SMs per channel), got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream (DeepEP's ``Buffer.capture``), e.g. as ``previous_event``.
        Where CUDA is not in use the event marks nothing (every call is synchronous there)."""
        return EventOverlap(EventHandle())

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

    def get_comm_stream(self) -> "torch.cuda.Stream":
        """The communication stream of the current CUDA device, on which dispatch/combine run when
        given ``previous_event`` or ``async_finish`` (without either they run on the current stream)."""
        self._check_alive()
        if not cuda_in_use():
            raise RuntimeError(
                "there is no communication stream without CUDA: on CPU tensors every call runs synchronously "
                "on the calling thread"
            )
        return self._comm_stream(torch.device("cuda", torch.cuda.current_device()))

    def destroy(self) -> None:
        """Release the communication resources (collective: every rank calls it). Needs a Buffer made
        with ``explicitly_destroy=True`` (DeepEP's rule); the buffer is unusable afterwards."""
        if not self.explicitly_destroy:
            raise RuntimeError(
                "Buffer.destroy() needs a Buffer created with explicitly_destroy=True; this one releases its "
                "resources when it is garbage-collected (drop every reference to it instead)"
            )
        self._check_alive()
        self.runtime.destroy()
        self._destroyed = True

    def reset(self) -> None:
        """Collective (every rank calls it): after a device-detected error (a timeout, ranks in
        different operations, bad expert ids or an overflow under ``num_worst_tokens``), wait for this
        rank's kernels and clear every rank's signalling state, so the next operations run as on a new
        Buffer. Handles made before the reset stay valid (they hold only layout tensors)."""
        self._check_alive()
        self.runtime.reset()

    def __del__(self) -> None:
        # Without explicitly_destroy the backend's own objects free their memory when collected
        # (nothing collective may run here); with it, forgetting destroy() is worth a warning.
        if getattr(self, "explicitly_destroy", False) and not self._destroyed:
            warnings.warn(
                "a deepep_megatron Buffer created with explicitly_destroy=True was garbage-collected without "
                "destroy(); call buffer.destroy() on every rank first",
                ResourceWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ internals
    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed; create a new one")

    def _check_handle(self, handle: Any, kind: type, name: str = "handle") -> None:
        if not isinstance(handle, kind):
            raise TypeError(f"{name} must be the {kind.__name__} returned by this buffer, got {type(handle).__name__}")
        if handle.buffer_id != self._id:
            raise ValueError(f"{name} was produced by another Buffer; pass the handle from this buffer's own dispatch")

    def _nvl_bytes_needed(self, config: Config, hidden: int, element_size: int) -> int:
        """NVLink-buffer bytes a normal call of ``hidden`` x ``element_size`` rows needs; 0 when the
        buffer is not checked (a backend without one, created with ``num_nvl_bytes=0``)."""
        if not (self.runtime.needs_nvl_buffer or self.num_nvl_bytes > 0):
            return 0
        return config.get_nvl_buffer_size_hint(hidden * max(element_size, 2), self.group_size)

    def _check_nvl_size(self, config: Config, hidden: int, element_size: int, what: str) -> None:
        # Every dispatch and combine asks this with the same few geometries: remember the ones that fit.
        key = (config.num_sms, config.num_max_nvl_chunked_recv_tokens, hidden, element_size)
        if key in self._nvl_fits:
            return
        needed = self._nvl_bytes_needed(config, hidden, element_size)
        if needed > self.num_nvl_bytes:
            raise RuntimeError(
                f"{what} needs {needed} bytes of NVLink buffer (hidden={hidden}, {self.group_size} ranks, "
                f"{config.num_sms} SMs) but the Buffer has num_nvl_bytes={self.num_nvl_bytes}; create it with "
                f"num_nvl_bytes >= {needed} (see Buffer.get_nvl_size_hint)"
            )
        self._nvl_fits.add(key)

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
        stream). With ``async_finish`` return an event to wait on; otherwise the current stream waits.
        With neither (or off CUDA) ``fn`` runs on the current stream itself."""
        _check_event(previous_event)
        if device.type != "cuda" or (previous_event is None and not async_finish):
            # Nothing to overlap: the current stream would wait for the communication stream right
            # after, so the call runs on the current stream itself (no events, no record_stream).
            return fn(), EventOverlap()
        compute = torch.cuda.current_stream(device)
        comm = self._comm_stream(device)
        after = cuda_event_of(previous_event)
        if after is not None:
            comm.wait_event(after)
        else:
            comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            result = fn()
        inputs = [t for t in inputs if t is not None]
        outputs = [t for t in _tensors_in(result) if t.is_cuda]  # a layout also carries host-side counts
        for t in inputs:  # keep inputs alive for the comm stream
            self.runtime.record_stream(t, comm)
        for t in outputs:  # outputs were allocated on the comm stream and are used on compute
            self.runtime.record_stream(t, compute)
        if async_finish:
            return result, EventOverlap(EventHandle(comm), inputs + outputs)
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
            ``num_tokens_per_rank`` [R] int32, ``num_tokens_per_rdma_rank`` [nodes] int32 (tokens
            sent to each node, once per node; None when the group is one node),
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
        return per_rank, self._tokens_per_node(in_rank), per_expert, in_rank, event

    def _tokens_per_node(self, is_token_in_rank: torch.Tensor) -> Optional[torch.Tensor]:
        """[nodes] int32: tokens that go to each node (a token counts once per node); None for one node."""
        if self.num_rdma_ranks == 1:
            return None
        by_node = is_token_in_rank.view(is_token_in_rank.size(0), self.num_rdma_ranks, self.num_nvl_ranks)
        return by_node.any(dim=2).sum(dim=0).to(torch.int32)

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
        num_worst_tokens: int = 0,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[TensorOrFP8, Optional[torch.Tensor], Optional[torch.Tensor], Optional[list[int]], Optional[DispatchHandle], EventOverlap]:
        """Send each token to every rank that holds one of its experts (once per rank).

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle,
        event)``: ``recv_x`` [N, H] (an FP8 pair if ``x`` was one), rows ordered by (source rank,
        source token); ``recv_topk_idx`` [N, K] int64 local expert ids (-1 = not on this rank);
        ``recv_topk_weights`` [N, K] fp32 (0 where -1); per local expert received counts (from
        ``num_tokens_per_expert`` of every rank), each rounded up to ``expert_alignment``.

        * Without ``topk_idx`` (and ``topk_weights``): a layout-only dispatch, tokens go to the ranks
          ``is_token_in_rank`` names and ``recv_topk_idx``/``recv_topk_weights`` are None.
        * ``num_worst_tokens`` > 0 (needs ``topk_idx``): every received tensor has exactly that many
          rows, the real ones first; past them ``recv_topk_idx`` is -1 and the weights are 0 (the
          reference backend also zeroes ``recv_x`` there; the cuda backend leaves those rows as they
          are, DeepEP's semantics: no expert reads them); the per-expert list is empty (DeepEP's
          static-shape mode). On the cuda backend this makes no host sync and can be captured in a
          CUDA graph; the real counts stay on the device (``handle.layout.num_recv_tokens_per_rank``).
          A rank that receives more rows raises RuntimeError naming ``num_worst_tokens`` (on the cuda
          backend: every rank, at its next call; then :meth:`reset`).
        * With ``handle`` (cached dispatch: the backward of combine) only ``x`` moves and the result is
          ``(recv_x, None, None, None, None, event)``, with the handle's row count.
        """
        self._check_alive()
        data, scales = _split_x(x)
        num_tokens, hidden = data.shape
        device = data.device
        config = _check_config(config, Buffer.get_dispatch_config, self.group_size)
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise ValueError(f"expert_alignment must be an int >= 1, got {expert_alignment!r}")
        if not isinstance(num_worst_tokens, int) or isinstance(num_worst_tokens, bool) or num_worst_tokens < 0:
            raise ValueError(f"num_worst_tokens must be an int >= 0 (0 = exact sizes), got {num_worst_tokens!r}")
        if self.num_rdma_ranks == 1 and num_tokens_per_rdma_rank is not None:
            raise ValueError("num_tokens_per_rdma_rank must be None for intranode dispatch (all ranks share one node)")
        self._check_nvl_size(config, hidden, data.element_size(), "dispatch")

        if handle is not None:
            self._check_handle(handle, DispatchHandle)
            if not (num_tokens_per_rank is None and is_token_in_rank is None and num_tokens_per_expert is None
                    and topk_idx is None and topk_weights is None):
                given = [n for n, v in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                                        ("num_tokens_per_expert", num_tokens_per_expert), ("topk_idx", topk_idx),
                                        ("topk_weights", topk_weights)) if v is not None]
                raise ValueError(f"a cached dispatch (handle given) takes only x; also got {', '.join(given)}")
            if num_tokens != handle.num_tokens:
                raise ValueError(f"x has {num_tokens} tokens but the handle was made for {handle.num_tokens}")
            with nvtx_range("deepep/dispatch"):
                out, event = self._run(
                    lambda: self.runtime.dispatch(data, scales, None, None, None, None, None, 1, config, handle.layout),
                    [data, scales], device, previous_event, async_finish,
                )
            return _received_payload(out, scales is not None, handle.num_recv_rows), None, None, None, None, event

        if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
            missing = [n for n, v in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                                      ("num_tokens_per_expert", num_tokens_per_expert)) if v is None]
            raise ValueError(
                f"dispatch without a handle needs num_tokens_per_rank, is_token_in_rank and num_tokens_per_expert "
                f"(from get_dispatch_layout); missing {', '.join(missing)}"
            )
        R = self.group_size
        _check_tensor(num_tokens_per_expert, "num_tokens_per_expert", (torch.int32,), (None,), device)
        num_experts = _check_num_experts(num_tokens_per_expert.numel(), R)
        _check_tensor(num_tokens_per_rank, "num_tokens_per_rank", (torch.int32,), (R,), device)
        _check_tensor(is_token_in_rank, "is_token_in_rank", (torch.bool,), (num_tokens, R), device)
        if self.num_rdma_ranks > 1:
            if num_tokens_per_rdma_rank is None:
                raise ValueError(
                    f"this group spans {self.num_rdma_ranks} nodes: dispatch needs num_tokens_per_rdma_rank (from get_dispatch_layout)"
                )
            _check_tensor(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", (torch.int32,), (self.num_rdma_ranks,), device)
            # Only the reference backend runs groups over several nodes, and it syncs the host anyway.
            if not torch.equal(num_tokens_per_rdma_rank, self._tokens_per_node(is_token_in_rank)):
                raise ValueError("num_tokens_per_rdma_rank disagrees with is_token_in_rank; pass both from the same get_dispatch_layout")
        if topk_idx is None:
            if topk_weights is not None:
                raise ValueError("topk_weights was given without topk_idx; pass both, or neither for a layout-only dispatch")
            if num_worst_tokens:
                raise ValueError("num_worst_tokens needs topk_idx (DeepEP's rule: a static-shape dispatch carries top-k)")
            weights = None
        else:
            # The cuda backend checks the range inside its layout/notify kernels and raises the same
            # ValueError on every rank at its one host sync: no extra sync here.
            _check_topk_idx(topk_idx, num_experts, num_tokens, device,
                            values=not self.runtime.checks_topk_range_in_dispatch)
            if topk_weights is not None:
                _check_tensor(topk_weights, "topk_weights", (torch.float32,), (num_tokens, topk_idx.size(1)), device)
            weights = topk_weights if topk_weights is not None else torch.ones(topk_idx.shape, dtype=torch.float32, device=device)
        num_topk = topk_idx.size(1) if topk_idx is not None else 0

        with nvtx_range("deepep/dispatch"):
            out, event = self._run(
                lambda: self.runtime.dispatch(
                    data, scales, topk_idx, weights, num_tokens_per_rank, is_token_in_rank,
                    num_tokens_per_expert, expert_alignment, config, None, num_worst_tokens=num_worst_tokens,
                ),
                [data, scales, topk_idx, weights, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert],
                device, previous_event, async_finish,
            )
        if num_worst_tokens and out.layout.num_recv_tokens > num_worst_tokens:
            raise RuntimeError(
                f"rank {self.rank} received {out.layout.num_recv_tokens} rows but num_worst_tokens={num_worst_tokens}; "
                f"raise num_worst_tokens to at least num_tokens * num_ranks = {num_tokens * R} for any routing"
            )
        new_handle = DispatchHandle(self._id, num_tokens, hidden, num_topk, out.layout, num_worst_tokens)
        rows = new_handle.num_recv_rows
        recv_topk_idx = _pad_rows(out.recv_topk_idx, rows, -1)
        # without topk_weights, ones were sent in their place: nothing to return
        recv_weights = _pad_rows(out.recv_topk_weights, rows, 0) if topk_weights is not None else None
        per_expert = [] if num_worst_tokens else list(out.layout.num_recv_tokens_per_expert_list)
        return _received_payload(out, scales is not None, rows), recv_topk_idx, recv_weights, per_expert, new_handle, event

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: Optional[torch.Tensor] = None,
        bias: Optional[Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Reverse a dispatch: send each received row back and sum per source token.

        Args:
            x: [N, H] bf16/fp32, rows in the order dispatch returned them (N = the handle's rows,
                ``num_worst_tokens`` when the dispatch had it; padding rows are ignored).
            handle: from this buffer's dispatch.
            topk_weights: optional [N, K] fp32, summed the same way (the backward of dispatch's weights).
            bias: optional [T, H] tensor of x's dtype, or a pair of them, added to the output: the rank
                sum and the biases are added in fp32 and rounded once.
        Returns:
            ``combined_x`` [T, H] (x's dtype; summed over ranks in fp32, rank order), ``combined_topk_weights``
            [T, K] fp32 or None, event.
        """
        self._check_alive()
        self._check_handle(handle, DispatchHandle)
        _check_tensor(x, "x", _HIGH_PRECISION_DTYPES, (handle.num_recv_rows, None))
        num_rows = handle.num_recv_tokens  # fewer than x's rows only after a padded (reference) dispatch
        x = (x if x.size(0) == num_rows else x[:num_rows]).contiguous()
        if topk_weights is not None:
            _check_tensor(topk_weights, "topk_weights", (torch.float32,), (handle.num_recv_rows, handle.num_topk or None), x.device)
            if topk_weights.size(0) != num_rows:
                topk_weights = topk_weights[:num_rows]
        biases = _split_bias(bias, (handle.num_tokens, x.size(1)), x.dtype, x.device)
        config = _check_config(config, Buffer.get_combine_config, self.group_size)
        self._check_nvl_size(config, x.size(1), x.element_size(), "combine")
        if biases:
            run = lambda: self._combine_with_bias(x, topk_weights, biases, handle.layout, config)  # noqa: E731
        else:
            run = lambda: self.runtime.combine(x, topk_weights, handle.layout, config)  # noqa: E731
        with nvtx_range("deepep/combine"):
            (combined, combined_weights), event = self._run(run, [x, topk_weights, *biases], x.device, previous_event, async_finish)
        return combined, combined_weights, event

    def _combine_with_bias(
        self, x: torch.Tensor, topk_weights: Optional[torch.Tensor], biases: list[torch.Tensor], layout: DispatchLayout, config: Config
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Combine ``x`` in fp32, add ``biases`` in fp32, round once to x's dtype. The fp32 rows are
        moved in column slices no wider in bytes than x's rows, so they fit the same NVLink buffer."""
        wide = x.float()
        slices = 1 if self._nvl_bytes_needed(config, x.size(1), 4) <= self.num_nvl_bytes else 4 // max(x.element_size(), 2)
        parts, combined_weights = [], None
        for i, part in enumerate(torch.tensor_split(wide, slices, dim=1)):
            combined, weights = self.runtime.combine(part.contiguous(), topk_weights if i == 0 else None, layout, config)
            parts.append(combined)
            combined_weights = weights if i == 0 else combined_weights
        total = torch.cat(parts, dim=1) if slices > 1 else parts[0]
        for b in biases:
            total = total + b.float()
        return total.to(x.dtype), combined_weights

    # ------------------------------------------------------------------ low-latency kernels
    def _check_low_latency(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        if not self.low_latency_mode:
            raise RuntimeError("low-latency calls need a Buffer created with low_latency_mode=True")
        shape = (num_max_dispatch_tokens_per_rank, hidden, num_experts)
        if shape in self._low_latency_shapes_that_fit:
            return
        needed = get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts)
        if needed > self.num_rdma_bytes:
            raise RuntimeError(
                f"low-latency dispatch/combine of up to {num_max_dispatch_tokens_per_rank} tokens (hidden={hidden}, "
                f"{num_experts} experts, {self.group_size} ranks) needs {needed} bytes of RDMA buffer but the Buffer has "
                f"num_rdma_bytes={self.num_rdma_bytes}; create it with num_rdma_bytes >= {needed} "
                "(see Buffer.get_low_latency_rdma_size_hint)"
            )
        self._low_latency_shapes_that_fit.add(shape)

    def _check_wait_stats(self, stats: Optional[torch.Tensor], name: str) -> Optional[torch.Tensor]:
        """A wait-cost statistics tensor: int64 with R (or R x R, DeepEP's documented shape) entries;
        entry ``r`` of its flat view accumulates the time spent waiting for rank ``r``."""
        if stats is None:
            return None
        if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int64 or stats.numel() not in (self.group_size, self.group_size ** 2):
            raise ValueError(f"{name} must be an int64 tensor of shape [{self.group_size}] (or [R, R]), got {_describe(stats)}")
        if not stats.is_contiguous():
            raise ValueError(f"{name} must be contiguous (entries are accumulated in place)")
        return stats

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
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
            cumulative_local_expert_recv_stats: optional [E_local] int32; each expert's received
                count is added to it (load-balance monitoring).
            dispatch_wait_recv_cost_stats: optional int64 [R]: the time (ns of host wall clock on the
                reference backend; DeepEP counts GPU cycles) spent waiting for each source rank is added.
            use_fp8, round_scale, use_ue8m0: FP8 cast of the sent rows; ``round_scale`` rounds scales
                to powers of two, ``use_ue8m0`` (needs ``round_scale``) returns them packed as DeepEP:
                int32 [..., H/512], four UE8M0 exponent bytes each, column-major in the last two dims.
        Returns:
            ``recv_x`` [E_local, R * max_tokens, H] bf16, or with ``use_fp8`` the pair (e4m3 [..., H],
            fp32 scales [..., H/128] or the packed UE8M0 int32); the first ``recv_count[e]`` rows of
            ``recv_x[e]`` are local expert e's tokens grouped by source rank then source token.
            ``recv_count`` [E_local] int32, handle, event, hook. With ``return_recv_hook`` the outputs
            (and the statistics) are filled only when ``hook()`` is called (no SMs are held in
            between); otherwise ``hook`` does nothing.
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
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError("use_ue8m0=True needs use_fp8=True and round_scale=True (UE8M0 scales are powers of two)")
        _check_num_experts(num_experts, self.group_size)
        # The value range costs a host sync, which a CUDA graph capture cannot hold; the NVSHMEM
        # kernels check it on the device instead (an error at the next call; ids outside are dropped).
        _check_topk_idx(topk_idx, num_experts, num_tokens, x.device, values=self._host_checks_topk_range())
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        if cumulative_local_expert_recv_stats is not None:
            _check_tensor(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats", (torch.int32,),
                          (num_experts // self.group_size,), x.device)
        wait_stats = self._check_wait_stats(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats")
        extra, wait_stats = self._device_wait_stats(wait_stats)
        x = x.contiguous()
        started = time.perf_counter_ns()
        with nvtx_range("deepep/low_latency_dispatch"):
            (out, receive), event = self._run(
                lambda: self.runtime.low_latency_dispatch(
                    x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0, return_recv_hook,
                    **extra,
                ),
                [x, topk_idx], x.device, None, async_finish,
            )
        handle = LowLatencyHandle(self._id, num_tokens, topk_idx.size(1), out.layout)
        recv_x = (out.recv_x, out.recv_x_scales) if use_fp8 else out.recv_x

        def account() -> None:
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(out.recv_count)

        return recv_x, out.recv_count, handle, event, self._hook(receive, account, wait_stats, started)

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
        combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None]]:
        """Send expert outputs back and reduce ``sum_k topk_weights[t, k] * y[t, k]`` (fp32, k order).

        Args:
            x: [E_local, R * max_tokens, H] bf16, laid out as ``low_latency_dispatch`` returned.
                With ``zero_copy`` the rows are taken from the tensor that
                :meth:`get_next_low_latency_combine_buffer` returned instead (x is only shape-checked).
            topk_idx, topk_weights: [T, K] int64 / fp32, the same routing as the dispatch.
            out: optional [T, H] bf16 to write into.
            combine_wait_recv_cost_stats: as ``dispatch_wait_recv_cost_stats`` of the dispatch.
        Returns ``(combined_x [T, H] bf16, event, hook)``.
        """
        self._check_alive()
        self._check_handle(handle, LowLatencyHandle)
        if use_logfmt:
            raise ValueError("use_logfmt=True is not supported; combine sends bf16 (pass use_logfmt=False)")
        layout = handle.layout
        num_local_experts = layout.num_experts // self.group_size
        slots = self.group_size * layout.num_max_dispatch_tokens_per_rank
        _check_tensor(x, "x", (torch.bfloat16,), (num_local_experts, slots, layout.hidden))
        _check_topk_idx(topk_idx, layout.num_experts, handle.num_tokens, x.device, values=self._host_checks_topk_range())
        if topk_idx.size(1) != handle.num_topk:
            raise ValueError(f"topk_idx has top-k {topk_idx.size(1)} but the dispatch used {handle.num_topk}")
        _check_tensor(topk_weights, "topk_weights", (torch.float32,), tuple(topk_idx.shape), x.device)
        if out is not None:
            _check_tensor(out, "out", (torch.bfloat16,), (handle.num_tokens, layout.hidden), x.device)
        wait_stats = self._check_wait_stats(combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats")
        extra, wait_stats = self._device_wait_stats(wait_stats)
        self._check_low_latency(layout.num_max_dispatch_tokens_per_rank, layout.hidden, layout.num_experts)
        if zero_copy:
            staged = self._next_combine_buffer
            if staged is None or staged.shape != x.shape or staged.device != x.device:
                raise ValueError(
                    "zero_copy=True combines the rows written into get_next_low_latency_combine_buffer(handle); "
                    "call it (and fill the tensor it returns) before this combine"
                )
            x = staged
        started = time.perf_counter_ns()
        with nvtx_range("deepep/low_latency_combine"):
            (combined, receive), event = self._run(
                lambda: self.runtime.low_latency_combine(x.contiguous(), topk_idx, topk_weights, layout, out, return_recv_hook,
                                                         **extra),
                [x, topk_idx, topk_weights], x.device, None, async_finish,
            )
        return combined, event, self._hook(receive, None, wait_stats, started)

    def _host_checks_topk_range(self) -> bool:
        """Whether a low-latency call checks topk_idx's values on the host (a sync): not under graph
        capture, and not when the backend's kernels check them."""
        return not (self.runtime.low_latency_checks_topk_range or _capturing())

    def _device_wait_stats(self, wait_stats: Optional[torch.Tensor]) -> tuple[dict, Optional[torch.Tensor]]:
        """(keyword arguments for the backend, what the hook accounts on the host): a backend whose
        kernels measure their waits (the NVSHMEM low-latency kernels) gets the statistics tensor."""
        if wait_stats is not None and self.runtime.low_latency_wait_stats_on_device:
            return {"wait_stats": wait_stats}, None
        return {}, wait_stats

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The bf16 tensor [E_local, R * max_tokens, H] that the next ``low_latency_combine(...,
        zero_copy=True)`` of ``handle``'s shapes sends from: experts write their outputs straight into
        it (DeepEP's zero-copy combine). With the NVSHMEM kernels it is the send region of the heap
        half the next low-latency call uses (so fill it and combine before any other low-latency
        call); otherwise the same tensor is returned until its shape changes."""
        self._check_alive()
        self._check_handle(handle, LowLatencyHandle)
        layout = handle.layout
        staged = self.runtime.low_latency_combine_buffer(layout)
        if staged is not None:
            self._next_combine_buffer = staged
            return staged
        shape = (layout.num_experts // self.group_size, self.group_size * layout.num_max_dispatch_tokens_per_rank, layout.hidden)
        device = layout.recv_src_info.device
        staged = self._next_combine_buffer
        if staged is None or tuple(staged.shape) != shape or staged.device != device:
            staged = torch.empty(shape, dtype=torch.bfloat16, device=device)
            self._next_combine_buffer = staged
        return staged

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset the low-latency signalling region (needed when the normal and low-latency kernels share a buffer)."""
        self._check_alive()
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self.runtime.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def _hook(
        self,
        receive: Optional[Callable[[], None]],
        account: Optional[Callable[[], None]],
        wait_stats: Optional[torch.Tensor],
        started_ns: int,
    ) -> Callable[[], None]:
        """The hook returned to the caller. It completes a deferred receive (at most once), then adds
        to the statistics: ``account()``, and to ``wait_stats`` the nanoseconds the receive took. A call
        without a deferred receive has received already (since ``started_ns``): the statistics are
        added now and the hook does nothing."""

        def record(since_ns: int) -> None:
            if wait_stats is not None:
                wait_stats.view(-1)[: self.group_size] += time.perf_counter_ns() - since_ns
            if account is not None:
                account()

        if receive is None:
            record(started_ns)
            return lambda: None
        done = [False]

        def hook() -> None:
            if done[0]:
                raise RuntimeError("this receive hook was already called")
            done[0] = True
            since = time.perf_counter_ns()
            with nvtx_range("deepep/low_latency_recv"):
                receive()
            record(since)

        return hook


def _capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph (no host syncs then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _group_of(group: Any, comm: Any) -> dist.ProcessGroup:
    """The process group a Buffer uses: ``group``, or the world whose ranks ``comm`` (mpi4py) has."""
    if group is None and comm is not None:
        if comm.Get_size() != dist.get_world_size() or comm.Get_rank() != dist.get_rank():
            raise ValueError(
                f"comm (rank {comm.Get_rank()} of {comm.Get_size()}) is not the torch.distributed world (rank "
                f"{dist.get_rank()} of {dist.get_world_size()}); pass group= the process group of the EP ranks"
            )
        return dist.group.WORLD
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return group


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')} {list(value.shape)}"
    return type(value).__name__


def _split_bias(bias: Any, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Validate combine's ``bias`` (None, a tensor, or a pair) and return it as a list of tensors."""
    if bias is None:
        return []
    parts = list(bias) if isinstance(bias, (tuple, list)) else [bias]
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"bias must be a tensor or a pair of tensors, got {len(parts)} items")
    names = ["bias"] if len(parts) == 1 and not isinstance(bias, (tuple, list)) else [f"bias[{i}]" for i in range(len(parts))]
    return [_check_tensor(b, n, (dtype,), shape, device).contiguous() for b, n in zip(parts, names)]
