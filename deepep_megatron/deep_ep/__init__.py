"""DeepEP v1.2.1's public Python surface over deepep_megatron (the opt-in ``deep_ep`` alias).

Code written for DeepEP (megatron-core's ``fused_a2a`` and flex dispatcher, vLLM's and SGLang's
DeepEP managers, DeepEP's own tests) imports ``deep_ep``. This package is what it gets once the
alias is installed with ``python -m deepep_megatron.deep_ep install`` (which refuses when DeepSeek's
DeepEP is installed: it never shadows it). ``deep_ep.PROVIDER`` says which one was imported.

Surface: ``Buffer`` (DeepEP's constructor arguments, methods, defaults, return tuples and
indexable handles), ``Config``, ``EventOverlap``, ``deep_ep.utils`` (``EventHandle``,
``EventOverlap``, ``check_nvlink_connections``) and ``deep_ep.buffer.Buffer``. They are
deepep_megatron's own classes, not copies, so ``deep_ep.Buffer is deepep_megatron.Buffer``.
"""
from ..buffer import Buffer
from ..config import Config
from ..events import EventHandle, EventOverlap
from . import buffer, utils

#: Which implementation ``import deep_ep`` loaded: this one, not DeepSeek's DeepEP.
PROVIDER = "deepep_megatron"
#: The DeepEP release whose public surface this module follows.
DEEPEP_API_VERSION = "1.2.1"

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "PROVIDER", "DEEPEP_API_VERSION", "buffer", "utils"]
