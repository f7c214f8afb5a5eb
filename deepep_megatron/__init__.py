"""deepep_megatron: expert-parallel dispatch/combine for MoE training, DeepEP-compatible, for Megatron-core.

Public API (DeepEP names): :class:`Buffer`, :class:`Config`, :class:`EventOverlap`, :class:`EventHandle`,
:func:`per_token_cast_to_fp8` / :func:`per_token_cast_back`; differentiable ``autograd.dispatch`` /
``autograd.combine``; the Megatron token dispatcher lives in ``deepep_megatron.megatron``; ``deepep_megatron.deep_ep`` is
DeepEP's module surface (the opt-in ``deep_ep`` alias: ``python -m deepep_megatron.deep_ep install``).
"""
from .buffer import Buffer, DispatchHandle, LowLatencyHandle
from .config import Config, get_low_latency_rdma_size_hint
from .events import EventHandle, EventOverlap
from .fp8 import per_token_cast_back, per_token_cast_to_fp8

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "Config",
    "DispatchHandle",
    "EventHandle",
    "EventOverlap",
    "LowLatencyHandle",
    "get_low_latency_rdma_size_hint",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
]
