"""megatron-core integration: the deepep token dispatcher, its layer spec / install hook, and the
pretraining entry (``python -m deepep_megatron.pretrain``). Needs megatron-core >= 0.16.

Select the dispatcher in one of two ways:

* a layer spec: ``deepep_moe_layer_spec(get_gpt_layer_local_spec(num_experts=8), DeepEPOptions())``;
* Megatron-LM: ``python -m deepep_megatron.megatron.megatron_lm pretrain_gpt.py ... --moe-deepep-megatron``
  (see :mod:`deepep_megatron.megatron.megatron_lm`).

The names below are imported on first use, so that the light submodules (``arguments``: the flags
and their checks, ``te_fp8``) load without megatron-core: a bad flag or ``--help`` costs no
megatron-core import.
"""
from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule that defines it.
_LAZY = {
    name: "dispatcher"
    for name in (
        "DeepEPMoELayer",
        "DeepEPOptions",
        "DeepEPTokenDispatcher",
        "deepep_moe_layer_class",
        "deepep_moe_layer_spec",
        "destroy_buffers",
        "iter_deepep_dispatchers",
    )
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import the dispatcher (and megatron-core) when one of its names is first asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
