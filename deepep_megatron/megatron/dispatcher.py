"""megatron-core token dispatcher on top of deepep_megatron's differentiable dispatch/combine.

Path of one MoE layer's tokens (T local tokens, H hidden, K top-k, E experts, R = EP ranks,
N rows received by this rank, M = rows handed to the local experts):

1. ``dispatch_preprocess``: routing_map [T, E] bool + probs [T, E] -> ``topk_idx`` [T, K] int64
   (global expert ids ascending, -1 for dropped/absent) and ``topk_weights`` [T, K] fp32 (the
   router probabilities of those experts).
2. ``token_dispatch``: ``deepep_megatron.autograd.dispatch`` over the EP group: each token goes
   once to every rank holding one of its experts -> [N, H] rows ordered by (source rank, token),
   with local expert ids and weights.
3. ``dispatch_postprocess``: the rows sorted by local expert (a row that feeds two local experts is
   duplicated) -> [M, H], ``tokens_per_expert`` [E_local] (CPU int64), permuted probs [M]. The
   experts apply the probs, as with megatron's alltoall dispatcher.
4. ``combine_preprocess``: each received row's local expert outputs summed -> [N, H].
5. ``token_combine``: ``deepep_megatron.autograd.combine`` sums over ranks in fp32 -> [T, H].
6. ``combine_postprocess``: back to the input shape [S, B, H].

Two layouts of steps 2-4:

* Exact sizes (dropless, or ``--moe-expert-capacity-factor`` without padding): N and M are what
  the routing needs, known only after the dispatch. Not free of host syncs: ``Buffer.dispatch``
  returns N and the per-expert counts on the host (one sync in the Buffer), megatron's ``permute``
  selects rows with a boolean mask, and ``tokens_per_expert`` comes from those counts.
* Static shapes (``--moe-expert-capacity-factor`` with ``--moe-pad-expert-input-to-capacity``):
  every size follows from T and the config (:class:`CapacityLayout`). The dispatch passes
  ``num_worst_tokens`` (N = that bound; rows past the real ones have no expert and nothing reads
  them), each local expert gets exactly R * capacity rows (real rows in received order, then zero
  rows), and the permutation is index arithmetic (:func:`capacity_slots`, ``index_select``,
  megatron's ``unpermute``). The dispatcher itself makes no host sync in this layer's forward or
  backward (no ``.item()``, ``.tolist()``, ``nonzero``, boolean-mask indexing or device-sized
  allocation; tests/test_megatron_static_shape.py guards it), so with a backend whose dispatch and
  combine do not sync either (the cuda backend) the layer can be captured in a CUDA graph
  (tests/gpu/test_moe_graph.py). The reference backend syncs inside the Buffer: its collectives
  run on the host.

Expert ``e`` therefore sees the rows the alltoall dispatcher would give it, in the same order
(with capacity padding: the same real rows; alltoall pads with tokens of probability 0, this
dispatcher with zero rows, and both add exactly nothing), so both dispatchers compute the same
losses and gradients.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_capacity, unpermute
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import autograd as deepep_autograd
from ..backends import BACKEND_NAMES as BACKENDS
from ..buffer import Buffer, DispatchHandle
from ..config import FP8_BLOCK
from ..profiling import StageClock, nvtx_range
from . import compat
from .te_fp8 import fp8_dispatch


@dataclass(frozen=True)
class DeepEPOptions:
    """Settings of the deepep dispatcher that megatron's TransformerConfig has no field for.

    The SM count is not here: it is megatron's own config field (:func:`compat.dispatcher_num_sms`).

    Attributes:
        use_fp8_dispatch: send activations as e4m3 with one fp32 scale per 128 channels and
            dequantize on arrival (needs hidden % 128 == 0); gradients travel in full precision.
        backend: ``Buffer`` backend: "auto" (CUDA kernels when built and on GPU, else reference),
            "reference" (torch.distributed collectives), "cuda" or "forwarding" (node forwarding over the collectives).
    """

    use_fp8_dispatch: bool = False
    backend: str = "auto"

    @classmethod
    def from_flags(cls, args: Any, fp8_training: bool, fp8_recipe: Optional[str]) -> "DeepEPOptions":
        """From ``--moe-deepep-fp8-dispatch`` and ``--moe-deepep-backend``; whether FP8 dispatch is on
        also depends on the model's FP8 training and recipe (:func:`te_fp8.fp8_dispatch`)."""
        use_fp8 = fp8_dispatch(args.moe_deepep_fp8_dispatch, fp8_training, fp8_recipe)
        return cls(use_fp8_dispatch=use_fp8, backend=args.moe_deepep_backend)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"DeepEPOptions.backend must be one of {BACKENDS}, got {self.backend!r}")


# ---------------------------------------------------------------------------------------------
# One Buffer per (EP group, backend), shared by every MoE layer (as DeepEP recommends).
_BUFFERS: dict[tuple[Any, str], Buffer] = {}


def get_buffer(group: torch.distributed.ProcessGroup, hidden_bytes: int, backend: str) -> Buffer:
    """The shared Buffer of ``group``, (re)created when it is missing or too small for
    ``hidden_bytes`` (= hidden * max(element size, 2)) with the current SM count."""
    num_ranks = torch.distributed.get_world_size(group)
    num_nvl_bytes = Buffer.get_nvl_size_hint(hidden_bytes, num_ranks)
    key = (group, backend)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.num_nvl_bytes < num_nvl_bytes:
        if buffer is not None:
            buffer.destroy()
        buffer = Buffer(group, num_nvl_bytes=num_nvl_bytes, explicitly_destroy=True, backend=backend)
        _BUFFERS[key] = buffer
    return buffer


def describe_buffers() -> str:
    """Which backend each shared Buffer runs on (the pretraining log says so after the first step)."""
    if not _BUFFERS:
        return "no Buffer created yet"
    return "; ".join(f"Buffer backend {b.backend_name} over {b.group_size} EP ranks on {b.num_rdma_ranks} node(s)" for b in _BUFFERS.values())


def destroy_buffers() -> None:
    """Release every shared Buffer (collective over each EP group; call before destroying groups)."""
    for buffer in _BUFFERS.values():
        buffer.destroy()
    _BUFFERS.clear()


# ---------------------------------------------------------------------------------------------
class _OnBackward(torch.autograd.Function):
    """Identity whose backward calls ``callback`` first: marks when a gradient passes this point."""

    @staticmethod
    def forward(ctx, callback: Callable[[], None], x: torch.Tensor) -> torch.Tensor:
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.callback()
        return None, grad


def _mark_backward(x: torch.Tensor, clock: StageClock, callback: Callable[[], None]) -> torch.Tensor:
    """``x``, with ``callback`` run when its gradient passes, if ``clock`` records (no autograd node otherwise)."""
    return _OnBackward.apply(callback, x) if clock.enabled and x.requires_grad else x


# ---------------------------------------------------------------------------------------------
def routing_map_to_topk(
    routing_map: torch.Tensor, probs: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn megatron's routing into DeepEP's top-k form.

    Args:
        routing_map: [T, E] bool, token t goes to expert e (dropped tokens are already False).
        probs: [T, E] router probabilities (any float dtype; may require grad).
        topk: K, the router's top-k (a token never has more than K experts).
    Returns:
        ``topk_idx`` [T, K] int64: the selected experts in ascending order, -1 padding;
        ``topk_weights`` [T, K] fp32: their probabilities, 0 at -1 (differentiable w.r.t. probs).
    """
    num_experts = routing_map.size(1)
    # Score = (E - e) on selected experts, 0 elsewhere: top-k picks selected ones, lowest e first.
    descending_ids = torch.arange(num_experts, 0, -1, device=routing_map.device)
    scores = routing_map.long() * descending_ids
    top_scores, top_experts = torch.topk(scores, k=topk, dim=1)
    selected = top_scores > 0
    topk_idx = torch.where(selected, top_experts, torch.full_like(top_experts, -1))
    topk_weights = probs.float().gather(1, top_experts) * selected
    return topk_idx, topk_weights


def topk_to_local_routing(
    recv_topk_idx: torch.Tensor, recv_topk_weights: torch.Tensor, num_local_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] local expert ids (-1 = not here) and fp32 weights -> [N, E_local] bool map and
    [N, E_local] fp32 probs (differentiable w.r.t. the weights)."""
    num_rows = recv_topk_idx.size(0)
    # Column E_local collects the -1 slots and is dropped afterwards.
    columns = torch.where(recv_topk_idx >= 0, recv_topk_idx, torch.full_like(recv_topk_idx, num_local_experts))
    routing_map = torch.zeros(num_rows, num_local_experts + 1, dtype=torch.bool, device=recv_topk_idx.device)
    routing_map.scatter_(1, columns, True)
    probs = torch.zeros(num_rows, num_local_experts + 1, dtype=torch.float32, device=recv_topk_idx.device)
    probs = probs.scatter(1, columns, recv_topk_weights.float())
    return routing_map[:, :num_local_experts], probs[:, :num_local_experts]


# ---------------------------------------------------------------------------------------------
# Static shapes (--moe-expert-capacity-factor with --moe-pad-expert-input-to-capacity).
@dataclass(frozen=True)
class CapacityLayout:
    """The sizes of one pad-to-capacity MoE layer: host ints that follow from T and the config.

    Attributes:
        capacity: tokens each expert takes from each rank: megatron's
            ``get_capacity(T * K, E, capacity_factor)``, the bound its router enforces.
        rows_per_expert: rows each local expert computes, R * capacity (megatron's
            ``tokens_per_expert`` for padded capacity).
        num_worst_tokens: rows every dispatch returns, R * min(T, E_local * capacity).

    Why ``num_worst_tokens`` is never exceeded: with a capacity factor megatron's router
    (``apply_router_token_dropping``) keeps at most ``capacity`` of a rank's T tokens per
    expert, so a rank sends this rank at most min(T, E_local * capacity) tokens (one row per
    token, however many of its experts are here). Tighter than DeepEP's R * T when E_local *
    capacity < T (e.g. EP8, top-2, factor 1: a quarter). Every EP rank must route the same T
    tokens per layer (what megatron's alltoall padding assumes too).
    """

    capacity: int
    rows_per_expert: int
    num_worst_tokens: int

    @classmethod
    def of(
        cls, num_tokens: int, topk: int, num_experts: int, num_ranks: int, capacity_factor: float
    ) -> "CapacityLayout":
        capacity = get_capacity(num_tokens=num_tokens * topk, num_experts=num_experts, capacity_factor=capacity_factor)
        num_local_experts = num_experts // num_ranks
        return cls(capacity, num_ranks * capacity, num_ranks * min(num_tokens, num_local_experts * capacity))


def capacity_slots(recv_topk_idx: torch.Tensor, num_local_experts: int, rows_per_expert: int) -> torch.Tensor:
    """Where each local expert's fixed-size input comes from, without reading the device.

    Args:
        recv_topk_idx: [N, K] int64 local expert ids of the received rows (-1 = not here), rows
            in received order (source rank, token).
        num_local_experts: E_local.
        rows_per_expert: C, the rows of each expert's input.
    Returns:
        [E_local * C] int64 indices into ``recv_topk_idx.flatten()``: slot ``s`` of expert ``j``
        (position ``j * C + s``) is the ``s``-th entry that names ``j``; N * K (one past the end)
        for slots nothing fills. Entries beyond C for an expert get no slot (dropped).
    """
    entries = recv_topk_idx.flatten()
    experts = torch.arange(num_local_experts, device=entries.device)
    # running[j, i]: entries 0..i naming expert j. A row names an expert at most once, so entry
    # order is received-row order. int32: E_local x N*K counts, half the bytes of int64.
    running = torch.cumsum(entries.unsqueeze(0) == experts.unsqueeze(1), dim=1, dtype=torch.int32)
    wanted = torch.arange(1, rows_per_expert + 1, dtype=torch.int32, device=entries.device)
    # The first entry where expert j's count reaches s + 1 is its (s + 1)-th; N * K if it has fewer.
    return torch.searchsorted(running, wanted.expand(num_local_experts, -1).contiguous()).flatten()


def _with_zero_row(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` [N, ...] with one zero row appended at index N: what empty slots read."""
    return torch.cat([tensor, tensor.new_zeros((1, *tensor.shape[1:]))])


# ---------------------------------------------------------------------------------------------
def check_supported(config: TransformerConfig, options: DeepEPOptions, pg_collection: Any) -> None:
    """Refuse megatron options the deepep dispatcher does not implement, naming the flag and fix."""

    def refuse(what: str, fix: str) -> None:
        raise ValueError(f"--moe-token-dispatcher deepep does not support {what}; {fix}")

    if config.num_moe_experts is None:
        refuse("dense models (num_moe_experts is None)", "set --num-experts")
    if getattr(config, "moe_router_padding_for_quantization", False):
        refuse("--moe-router-padding-for-quantization", "drop it or use alltoall")
    if config.moe_shared_expert_overlap:
        refuse("--moe-shared-expert-overlap", "drop it (shared experts still run, without overlap)")
    if getattr(config, "overlap_moe_expert_parallel_comm", False):
        refuse("--overlap-moe-expert-parallel-comm", "drop it")
    if config.moe_latent_size:
        refuse("--moe-latent-size", "drop it or use alltoall")
    if config.moe_token_dispatcher_type == "flex":
        refuse(
            "megatron's flex dispatcher type underneath",
            "configure megatron with moe_token_dispatcher_type='alltoall' (it validates the same options)",
        )
    expert_tp_size = torch.distributed.get_world_size(pg_collection.expt_tp) if pg_collection.expt_tp is not None else 1
    if expert_tp_size != 1:
        refuse(f"expert tensor parallelism (size {expert_tp_size})", "set --expert-tensor-parallel-size 1")
    compat.dispatcher_num_sms(config)  # raises for a bad SM count, naming the flag
    if options.use_fp8_dispatch and config.hidden_size % FP8_BLOCK:
        raise ValueError(
            f"--moe-deepep-fp8-dispatch needs --hidden-size divisible by {FP8_BLOCK} (one scale per "
            f"{FP8_BLOCK} channels), got {config.hidden_size}"
        )


class DeepEPTokenDispatcher(MoETokenDispatcher):
    """megatron-core ``MoETokenDispatcher`` over ``deepep_megatron`` dispatch/combine.

    Args:
        num_local_experts: experts on this EP rank (E / EP).
        local_expert_indices: their global ids (contiguous).
        config: the model's TransformerConfig (its SM-count field: :func:`compat.dispatcher_num_sms`).
        pg_collection: process groups; ``.ep`` is the expert-parallel group.
        options: :class:`DeepEPOptions`.

    Besides the interface it keeps expert-load counts (:meth:`pop_expert_load`) and
    dispatch/combine timings (:attr:`clock`). With ``config.moe_pad_expert_input_to_capacity``
    it runs the static-shape layout (see the module docstring): :attr:`capacity_layout` holds the
    last forward's sizes.
    """

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: list[int],
        config: TransformerConfig,
        pg_collection: Any,
        options: DeepEPOptions = DeepEPOptions(),
    ) -> None:
        check_supported(config, options, pg_collection)
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.options = options
        self.pad_to_capacity = bool(config.moe_pad_expert_input_to_capacity)
        self.capacity_layout: Optional[CapacityLayout] = None
        Buffer.set_num_sms(compat.dispatcher_num_sms(config))
        # Forward and backward communication time; backward is caught by identity autograd
        # functions on both sides of each communication (_mark_backward).
        self.clock = StageClock(("dispatch", "combine"))
        # [E] tokens routed to each global expert from this rank's input since the last pop; kept
        # on the routing map's device so counting never synchronizes.
        self._expert_load: Optional[torch.Tensor] = None
        self._buffer: Optional[Buffer] = None

    # -- helpers ------------------------------------------------------------------------------
    def _get_buffer(self, x: torch.Tensor) -> Buffer:
        # Asked every time: another layer may have replaced (and destroyed) the shared buffer.
        # The combine of this dispatch uses the same one.
        self._buffer = get_buffer(self.ep_group, x.size(1) * max(x.element_size(), 2), self.options.backend)
        return self._buffer

    def pop_expert_load(self) -> torch.Tensor:
        """[E] int64 on the routing map's device (CPU zeros before any forward): tokens this rank
        routed to each expert since the last call (dropped ones excluded); resets the count. Sum it
        over the ranks that hold different tokens."""
        load, self._expert_load = self._expert_load, None
        return load if load is not None else torch.zeros(self.num_experts, dtype=torch.int64)

    # -- MoETokenDispatcher interface ----------------------------------------------------------
    def dispatch_preprocess(self, tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """[S, B, H] tokens, [T, E] bool routing_map, [T, E] probs -> ([T, H] tokens, [T, K] fp32
        weights). The top-k ids are kept for :meth:`token_dispatch`."""
        self.hidden_shape = tokens.shape
        self.probs_dtype = probs.dtype
        if routing_map.dim() != 2 or routing_map.dtype != torch.bool or routing_map.shape != probs.shape:
            raise ValueError(
                f"routing_map must be a bool [tokens, experts] tensor shaped like probs; got "
                f"{routing_map.dtype} {tuple(routing_map.shape)} and probs {tuple(probs.shape)}"
            )
        if self.pad_to_capacity:
            # megatron's router fills each expert's capacity with tokens of probability 0 (up to E
            # per token). They would add exactly nothing, so they are not sent: the receiver pads
            # with zero rows instead, and each token keeps at most its K routed experts (as
            # megatron's own DeepEP manager reads a capacity routing: probability 0 = not routed).
            routing_map = routing_map & (probs != 0)
            self.capacity_layout = CapacityLayout.of(
                routing_map.size(0), self.topk, self.num_experts, self.ep_size, self.config.moe_expert_capacity_factor
            )
        self.topk_idx, topk_weights = routing_map_to_topk(routing_map, probs, self.topk)
        load = routing_map.sum(dim=0, dtype=torch.int64)
        self._expert_load = load if self._expert_load is None else self._expert_load + load
        return tokens.reshape(-1, self.hidden_shape[-1]), topk_weights

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """[T, H] tokens and [T, K] weights -> [N, H] received rows and [N, K] fp32 weights
        (N = ``capacity_layout.num_worst_tokens`` when padding to capacity)."""
        buffer = self._get_buffer(hidden_states)
        device = hidden_states.device
        hidden_states = _mark_backward(hidden_states, self.clock, lambda: self.clock.stop("dispatch"))
        with self.clock.measure("dispatch", device):
            if self.pad_to_capacity:
                layout = self.capacity_layout
                # received rows: the real ones first, then top-k -1 / weight 0 (their recv_x: zeros on
                # the reference backend, left unwritten by the cuda kernels, as in DeepEP)
                recv_x, recv_topk_idx, recv_weights, _, self.handle = deepep_autograd.dispatch(
                    buffer, hidden_states, self.topk_idx, probs, self.num_experts,
                    use_fp8=self.options.use_fp8_dispatch, num_worst_tokens=layout.num_worst_tokens,
                )
                tokens_per_expert = [layout.rows_per_expert] * self.num_local_experts
            else:
                recv_x, recv_topk_idx, recv_weights, tokens_per_expert, self.handle = deepep_autograd.dispatch(
                    buffer,
                    hidden_states,
                    self.topk_idx,
                    probs,
                    self.num_experts,
                    use_fp8=self.options.use_fp8_dispatch,
                )
        recv_x = _mark_backward(recv_x, self.clock, lambda: self.clock.start("dispatch", device))
        self.recv_topk_idx = recv_topk_idx
        self.tokens_per_expert = torch.tensor(tokens_per_expert, dtype=torch.int64)  # host values: a CPU tensor
        return recv_x, recv_weights

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """[N, H] rows, [N, K] weights -> ([M, H] rows sorted by local expert, [E_local] CPU int64
        counts, [M] probs in the router's dtype). Padding to capacity, M = E_local x
        ``capacity_layout.rows_per_expert``."""
        with nvtx_range("moe/permute"):
            self.hidden_shape_before_permute = hidden_states.shape
            if self.pad_to_capacity:
                permuted, permuted_probs = self._permute_to_capacity(hidden_states, probs)
            else:
                self.local_routing_map, local_probs = topk_to_local_routing(
                    self.recv_topk_idx, probs, self.num_local_experts
                )
                permuted, permuted_probs, self.reversed_mapping = compat.permute(
                    hidden_states,
                    self.local_routing_map,
                    probs=local_probs,
                    num_out_tokens=int(self.tokens_per_expert.sum()),
                    fused=self.config.moe_permute_fusion,
                )
        return permuted, self.tokens_per_expert, permuted_probs.to(self.probs_dtype)

    def _permute_to_capacity(
        self, hidden_states: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, H] rows, [N, K] fp32 weights -> [E_local * C, H] expert inputs and [E_local * C] fp32
        probs: expert j's C slots hold its received rows in order, then zero rows of probability 0.
        Index arithmetic only (megatron's fused permute needs counts on the host, so
        ``--moe-permute-fusion`` does not apply here)."""
        slots = capacity_slots(self.recv_topk_idx, self.num_local_experts, self.capacity_layout.rows_per_expert)
        # Entry i * K + k belongs to row i; the empty-slot index N * K lands on row N, the appended
        # zero row (never on the dispatch's padding rows, whose x the cuda kernels leave unwritten).
        self.slot_rows = slots // self.recv_topk_idx.size(1)
        permuted = _with_zero_row(hidden_states).index_select(0, self.slot_rows)
        return permuted, _with_zero_row(probs.flatten()).index_select(0, slots)

    def combine_preprocess(self, hidden_states: torch.Tensor):
        """[M, H] expert outputs -> [N, H]: each received row's local expert outputs summed."""
        with nvtx_range("moe/permute"):
            if self.pad_to_capacity:
                num_rows, hidden = self.hidden_shape_before_permute
                # Row N gathers what the empty slots computed and is cut off.
                return unpermute(
                    hidden_states, self.slot_rows, restore_shape=torch.Size((num_rows + 1, hidden)), fused=False
                )[:num_rows]
            return unpermute(
                hidden_states,
                self.reversed_mapping,
                restore_shape=self.hidden_shape_before_permute,
                routing_map=self.local_routing_map,
                fused=self.config.moe_permute_fusion,
            )

    def token_combine(self, hidden_states: torch.Tensor):
        """[N, H] -> [T, H], summed over EP ranks in fp32."""
        device = hidden_states.device
        hidden_states = _mark_backward(hidden_states, self.clock, lambda: self.clock.stop("combine"))
        with self.clock.measure("combine", device):
            combined = deepep_autograd.combine(self._buffer, hidden_states, self.handle)
        self.handle = None  # the autograd graph keeps its own reference for the backward
        return _mark_backward(combined, self.clock, lambda: self.clock.start("combine", device))

    def combine_postprocess(self, hidden_states: torch.Tensor):
        """[T, H] -> the input's [S, B, H]."""
        return hidden_states.view(self.hidden_shape)


class DeepEPMoELayer(MoELayer):
    """A megatron ``MoELayer`` whose tokens travel through :class:`DeepEPTokenDispatcher`.

    Build it through a spec (:func:`deepep_moe_layer_spec`) or :func:`install`. Its
    :class:`DeepEPOptions` are the class attribute ``options``; :func:`deepep_moe_layer_class`
    makes a subclass with other options. megatron's ``config.moe_token_dispatcher_type`` must be
    "alltoall" or "allgather" (the options megatron validates for them hold here too); the layer
    replaces the dispatcher megatron built from it.
    """

    options: DeepEPOptions = DeepEPOptions()

    def __init__(self, config: TransformerConfig, submodules: Any = None, layer_number: Optional[int] = None,
                 pg_collection: Any = None, **kwargs: Any) -> None:
        if pg_collection is None:
            pg_collection = compat.default_moe_pg_collection()
        check_supported(config, self.options, pg_collection)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection, **kwargs)
        self.token_dispatcher = DeepEPTokenDispatcher(
            self.num_local_experts, self.local_expert_indices, config, pg_collection, self.options
        )
        self._experts_range: Optional[contextlib.AbstractContextManager] = None
        self.experts.register_forward_pre_hook(self._open_experts_range)
        self.experts.register_forward_hook(self._close_experts_range)

    # "moe/experts" brackets exactly the local experts' forward, without wrapping the module
    # (wrapping would rename its parameters in checkpoints).
    def _open_experts_range(self, module: torch.nn.Module, args: Any) -> None:
        self._experts_range = nvtx_range("moe/experts")
        self._experts_range.__enter__()

    def _close_experts_range(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._experts_range is not None:
            self._experts_range.__exit__(None, None, None)
            self._experts_range = None


_LAYER_CLASSES: dict[DeepEPOptions, type] = {DeepEPOptions(): DeepEPMoELayer}


def deepep_moe_layer_class(options: DeepEPOptions = DeepEPOptions()) -> type:
    """``DeepEPMoELayer`` configured with ``options`` (one class per distinct options)."""
    if not isinstance(options, DeepEPOptions):
        raise TypeError(f"options must be a DeepEPOptions, got {type(options).__name__}")
    if options not in _LAYER_CLASSES:
        _LAYER_CLASSES[options] = type("DeepEPMoELayer", (DeepEPMoELayer,), {"options": options})
    return _LAYER_CLASSES[options]


def deepep_moe_layer_spec(spec: Any, options: DeepEPOptions = DeepEPOptions()) -> Any:
    """Copy of a GPT layer/block spec whose MoE layers use the deepep dispatcher.

    Example::

        spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
        model = GPTModel(config, deepep_moe_layer_spec(spec), vocab_size, max_seq_len)
    """
    return compat.replace_moe_layer(spec, deepep_moe_layer_class(options))


def iter_deepep_dispatchers(model: Any) -> Iterable[DeepEPTokenDispatcher]:
    """The deepep dispatchers of ``model`` (a module or a list of model chunks), in layer order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, DeepEPMoELayer):
                yield module.token_dispatcher
