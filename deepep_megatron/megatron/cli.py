"""The command line of the pretraining entry: ``python -m deepep_megatron.pretrain`` and the
``deepep-megatron-pretrain`` console script.

In this order, so that a mistake costs milliseconds and one line:

1. the flags are parsed and checked against the launch (world size from torchrun's environment)
   and this machine by :func:`.arguments.parse_args`, before megatron-core is imported; a bad
   flag is one ``error:`` line from rank 0 and exit status 2 on every rank;
2. :func:`.startup.prepare`: the known harmless warnings are silenced (unless
   ``--show-warnings``) and megatron-core's presence is checked (a plain ``pip install .`` lacks
   it: the message says how to add it);
3. the dry run (``--dry-run``: rank 0 only) or the training runs.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .arguments import PROG, launch_rank, launch_world_size, parse_args
from .startup import prepare


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Check the flags, then dry-run (``--dry-run``) or train; see the module docstring."""
    args = parse_args(argv, launch=True)
    prepare(args, PROG)
    if args.dry_run:
        from .dry_run import run_report

        # Every rank checked the flags; one report per job is enough.
        sys.exit(run_report(args, launch_world_size(args)) if launch_rank() == 0 else 0)
    from .pretrain import run

    run(args)
