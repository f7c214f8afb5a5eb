"""megatron-core integration: the deepep token dispatcher, its layer spec / install hook, and the
pretraining entry (``python -m deepep_megatron.pretrain``). Needs megatron-core >= 0.16.

Select the dispatcher in one of two ways:

* a layer spec: ``deepep_moe_layer_spec(get_gpt_layer_local_spec(num_experts=8), DeepEPOptions())``;
* Megatron-LM: ``extra_args_provider=deepep_megatron.megatron.megatron_lm.extra_args_provider`` and
  ``deepep_megatron.megatron.megatron_lm.install(args)`` before the model is built.
"""
from . import compat

compat.check_version()

from .dispatcher import (  # noqa: E402
    DeepEPMoELayer,
    DeepEPOptions,
    DeepEPTokenDispatcher,
    deepep_moe_layer_class,
    deepep_moe_layer_spec,
    destroy_buffers,
    iter_deepep_dispatchers,
)

__all__ = [
    "DeepEPMoELayer",
    "DeepEPOptions",
    "DeepEPTokenDispatcher",
    "deepep_moe_layer_class",
    "deepep_moe_layer_spec",
    "destroy_buffers",
    "iter_deepep_dispatchers",
]
