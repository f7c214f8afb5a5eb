"""Use the deepep dispatcher from Megatron-LM's own ``pretrain_gpt.py`` (megatron-core 0.16 and 0.19+).

No edits to Megatron-LM: run its script through this module, with its usual flags plus
``--moe-deepep-megatron``::

    torchrun --nproc-per-node 8 -m deepep_megatron.megatron.megatron_lm /path/to/Megatron-LM/pretrain_gpt.py \\
        [Megatron-LM flags] --moe-token-dispatcher-type alltoall --moe-deepep-megatron

:func:`run_script` adds our flags to Megatron-LM's parser (through
``megatron.training.arguments.add_megatron_arguments``, which every Megatron-LM line's
``parse_args`` calls) and runs the script as ``__main__``. Or, with one edit, pass
``extra_args_provider=megatron_lm.extra_args_provider`` where the script parses its flags: at
core_v0.16 the ``pretrain(...)`` call, at core_v0.19+ ``parse_and_validate_args(...)``.

Either way the parser calls :func:`install` as soon as the flags are parsed: with
``--moe-deepep-megatron`` megatron-core's MoE spec builder (``megatron.core.models.gpt.moe_module_specs``)
then builds :class:`DeepEPMoELayer`, so every spec built afterwards (local, Transformer Engine,
decoder block) gets it. The SM count is Megatron-LM's own flag: ``--moe-flex-dispatcher-num-sms``
(0.19+) or ``--moe-deepep-num-sms`` (0.16; deprecated in 0.19), DeepEP's 20 when neither is set.
"""
from __future__ import annotations

import argparse
import importlib
import os
import runpy
import sys
from typing import Optional, Sequence

from .arguments import add_deepep_arguments, exit_with_error, launch_rank

#: The megatron-core module whose ``MoELayer`` global every MoE spec is built from.
_SPEC_MODULE = "megatron.core.models.gpt.moe_module_specs"
#: Megatron-LM's parser builder, called by its ``parse_args`` at every release we support.
_ARGUMENTS_MODULE = "megatron.training.arguments"
PROG = "python -m deepep_megatron.megatron.megatron_lm"


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: adds ``--moe-deepep-megatron`` and the deepep flags, and
    makes the parser call :func:`install` on what it parses. Adding them twice is a no-op."""
    if "--moe-deepep-megatron" in parser._option_string_actions:
        return parser
    add_deepep_arguments(parser)
    parser.add_argument(
        "--moe-deepep-megatron", action="store_true",
        help="route MoE tokens through deepep_megatron's dispatcher (with --moe-token-dispatcher-type alltoall)",
    )
    parse_known_args = parser.parse_known_args  # parse_args goes through it too

    def parse_and_install(args: Optional[Sequence[str]] = None, namespace: Optional[argparse.Namespace] = None):
        parsed, extras = parse_known_args(args, namespace)
        try:
            install(parsed)
        except ValueError as error:
            exit_with_error(parser.prog, str(error))
        return parsed, extras

    parser.parse_known_args = parse_and_install  # type: ignore[method-assign]
    return parser


def options_from_args(args: argparse.Namespace):
    """The dispatcher's options from Megatron-LM's flags (FP8 dispatch: :func:`te_fp8.fp8_dispatch`)."""
    from .dispatcher import DeepEPOptions

    return DeepEPOptions.from_flags(args, bool(getattr(args, "fp8", None)), getattr(args, "fp8_recipe", None))


def install(args: argparse.Namespace) -> bool:
    """Swap in the deepep MoE layer when ``--moe-deepep-megatron`` is given; returns whether it did.
    Idempotent (the layer class is cached per options).

    Raises ``ValueError`` naming the flag when the flags cannot work together.
    """
    if not getattr(args, "moe_deepep_megatron", False):
        return False
    from . import compat
    from .dispatcher import deepep_moe_layer_class

    dispatcher_type = getattr(args, "moe_token_dispatcher_type", "alltoall")
    if dispatcher_type not in ("alltoall", "allgather"):
        raise ValueError(
            f"--moe-deepep-megatron replaces megatron's dispatcher and needs --moe-token-dispatcher-type "
            f"alltoall (got {dispatcher_type})"
        )
    num_sms = compat.dispatcher_num_sms(args)  # the flags carry the config's field names: checked before any build
    options = options_from_args(args)
    layer_class = deepep_moe_layer_class(options)
    spec_module = importlib.import_module(_SPEC_MODULE)
    if spec_module.MoELayer is not layer_class and launch_rank() == 0:
        print(f"deepep_megatron: MoE layers use the deepep dispatcher (backend {options.backend}, "
              f"FP8 dispatch {'on' if options.use_fp8_dispatch else 'off'}, {num_sms} SMs)", flush=True)
    spec_module.MoELayer = layer_class
    return True


def add_flags_to_megatron_lm() -> None:
    """Make Megatron-LM's ``parse_args`` (any release) add our flags: wraps its
    ``add_megatron_arguments``, the parser builder it looks up at each call."""
    arguments = importlib.import_module(_ARGUMENTS_MODULE)
    builder = arguments.add_megatron_arguments
    if getattr(builder, "adds_deepep_flags", False):
        return

    def add_megatron_and_deepep_arguments(parser: argparse.ArgumentParser, *args, **kwargs) -> argparse.ArgumentParser:
        return extra_args_provider(builder(parser, *args, **kwargs))

    add_megatron_and_deepep_arguments.adds_deepep_flags = True  # type: ignore[attr-defined]
    arguments.add_megatron_arguments = add_megatron_and_deepep_arguments


def run_script(script: str, argv: Sequence[str]) -> None:
    """Run Megatron-LM's ``script`` (e.g. ``pretrain_gpt.py``) as ``__main__`` with ``argv`` as its
    flags and the deepep flags added to its parser (its folder goes first on ``sys.path``, as
    ``python script`` would put it: it imports its neighbours, ``gpt_builders`` and ``model_provider``)."""
    path = os.path.abspath(script)
    if not os.path.isfile(path):
        exit_with_error(PROG, f"{script}: no such file; give the path of Megatron-LM's pretrain_gpt.py")
    sys.path.insert(0, os.path.dirname(path))
    try:
        add_flags_to_megatron_lm()
    except ModuleNotFoundError as error:
        exit_with_error(PROG, f"cannot import Megatron-LM's training package ({error}): put the Megatron-LM "
                              "checkout the script comes from on PYTHONPATH", 1)
    sys.argv = [path, *argv]
    runpy.run_path(path, run_name="__main__")


USAGE = f"""usage: {PROG} SCRIPT [Megatron-LM flags] --moe-deepep-megatron

Runs Megatron-LM's SCRIPT (e.g. /path/to/Megatron-LM/pretrain_gpt.py; its checkout on PYTHONPATH) with
the deepep dispatcher's flags added to its parser; SCRIPT --help lists all of them. Launch it with
torchrun like the script itself: torchrun --nproc-per-node 8 -m deepep_megatron.megatron.megatron_lm SCRIPT ..."""


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m deepep_megatron.megatron.megatron_lm SCRIPT [flags]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return
    if not argv or argv[0].startswith("-"):
        exit_with_error(PROG, "the first argument is Megatron-LM's script, e.g. /path/to/Megatron-LM/pretrain_gpt.py "
                              "(--help: usage)")
    run_script(argv[0], argv[1:])


if __name__ == "__main__":
    main()
