"""Use the deepep dispatcher from Megatron-LM's own ``pretrain_gpt.py`` (no edits to Megatron-LM).

Two lines in ``pretrain_gpt.py``::

    from deepep_megatron.megatron import megatron_lm
    ...
    def model_provider(...):
        megatron_lm.install(get_args())      # first line: before any layer spec is built
        ...
    pretrain(..., extra_args_provider=megatron_lm.extra_args_provider)

and on the command line ``--moe-deepep-megatron`` (keep ``--moe-token-dispatcher-type alltoall``;
Megatron-LM's own ``--moe-deepep-num-sms`` sets the SM count). ``install`` makes megatron-core's
MoE spec builder (``megatron.core.models.gpt.moe_module_specs``) use :class:`DeepEPMoELayer`, so
every spec built afterwards - local, Transformer Engine, decoder block - gets it.
"""
from __future__ import annotations

import argparse
import importlib

from .arguments import add_deepep_arguments
from .dispatcher import DeepEPOptions, deepep_moe_layer_class

#: The megatron-core module whose ``MoELayer`` global every MoE spec is built from.
_SPEC_MODULE = "megatron.core.models.gpt.moe_module_specs"


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: adds ``--moe-deepep-megatron`` and the deepep flags."""
    add_deepep_arguments(parser)
    parser.add_argument(
        "--moe-deepep-megatron", action="store_true",
        help="route MoE tokens through deepep_megatron's dispatcher (with --moe-token-dispatcher-type alltoall)",
    )
    return parser


def options_from_args(args: argparse.Namespace) -> DeepEPOptions:
    """The dispatcher's options from Megatron-LM's flags (FP8 dispatch: :func:`te_fp8.fp8_dispatch`)."""
    return DeepEPOptions.from_flags(args, bool(getattr(args, "fp8", None)), getattr(args, "fp8_recipe", None))


def install(args: argparse.Namespace) -> bool:
    """Swap in the deepep MoE layer when ``--moe-deepep-megatron`` is given; returns whether it did.

    Raises ``ValueError`` naming the flag when the flags cannot work together.
    """
    if not getattr(args, "moe_deepep_megatron", False):
        return False
    dispatcher_type = getattr(args, "moe_token_dispatcher_type", "alltoall")
    if dispatcher_type not in ("alltoall", "allgather"):
        raise ValueError(
            f"--moe-deepep-megatron replaces megatron's dispatcher and needs --moe-token-dispatcher-type "
            f"alltoall (got {dispatcher_type})"
        )
    spec_module = importlib.import_module(_SPEC_MODULE)
    spec_module.MoELayer = deepep_moe_layer_class(options_from_args(args))
    return True
