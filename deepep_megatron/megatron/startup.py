"""What the entries (the pretraining command line, the dry run) do between checking the flags and
importing megatron-core: silence the warnings megatron-core and torch print on every run, by every
rank, that say nothing about the run (Apex / Transformer Engine fallbacks, deprecations inside
megatron-core, its optimizer's non-leaf ``.grad`` access; ``--show-warnings`` keeps them), and
check that megatron-core is installed at all.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import warnings

from .arguments import exit_with_error

#: ``warnings`` messages (regular expressions matched at the start) printed on every run, by every
#: rank, that say nothing about this run: fallbacks for optional packages and deprecations inside
#: megatron-core's own calls.
KNOWN_WARNINGS: tuple[str, ...] = (
    r"Apex is not installed",
    r"Transformer Engine and Apex are not installed",
    r"Transformer Engine is not installed",
    r"full scope is deprecated",  # megatron-core's own default cuda_graph_scope
    r"The \.grad attribute of a Tensor that is not a leaf Tensor",  # megatron's optimizer probing params
    r"`torch\.distributed\.\w+` is deprecated",  # megatron-core's collectives (reduce_scatter_tensor, ...)
    r"absl\.logging is not installed",  # megatron-core 0.19's optional logger
    r"MimoModelConfig is experimental",  # megatron-core 0.19, at import
)
#: megatron-core log records (regular expressions searched in the message) of the same kind.
KNOWN_LOG_MESSAGES: tuple[str, ...] = (
    r"Unknown MLP type",  # TransformerLayer does not know DeepEPMoELayer; it uses parallel_state's groups
    r"Unable to save \w+ indexes because path_to_cache is None",  # mock data without --data-cache-path
    r"Implicit initialization of Rerun State Machine",
    r"RerunStateMachine initialized in mode",
    r"GPTModel IS DEPRECATED",  # megatron-core 0.19 points to HybridModel; the entry builds GPTModel on purpose
    r"DistributedDataParallel: full_param_layout not provided",  # 0.19: DDP computes the layout itself (0.16 has no such argument)
)
_INSTALL_HINT = "pip install 'deepep_megatron[megatron]' (from a checkout: pip install -e '.[megatron]')"


class _DropKnownRecords(logging.Filter):
    """Drops the log records of :data:`KNOWN_LOG_MESSAGES`."""

    def __init__(self) -> None:
        super().__init__()
        self._patterns = [re.compile(p) for p in KNOWN_LOG_MESSAGES]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self._patterns)


def quiet_known_noise() -> None:
    """Silence :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_MESSAGES` in this process; every other
    warning and megatron-core log record (WARNING and above) still prints."""
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # megatron-core's loggers have no handlers: records end on logging's last-resort stderr
    # handler. One filtered stderr handler on their parent instead (child loggers' records reach
    # the parent's handlers, not its filters).
    parent = logging.getLogger("megatron")
    if any(isinstance(f, _DropKnownRecords) for h in parent.handlers for f in h.filters):
        return  # quieted already
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(_DropKnownRecords())
    parent.addHandler(handler)
    parent.propagate = False


def require_megatron(prog: str) -> None:
    """Import megatron-core, or exit with status 1 and the install command when it is missing."""
    try:
        importlib.import_module("megatron.core")
    except ModuleNotFoundError as error:
        if error.name not in ("megatron", "megatron.core"):
            raise  # megatron-core is there but one of its own dependencies is not: its message says which
        exit_with_error(prog, f"this needs megatron-core, which is not installed: {_INSTALL_HINT}", 1)


def prepare(args: argparse.Namespace, prog: str) -> None:
    """Quiet the known noise unless ``--show-warnings``, then make sure megatron-core imports."""
    if not args.show_warnings:
        quiet_known_noise()
    require_megatron(prog)
