"""The multi-process harness of every distributed test: :func:`deepep_megatron.launch.run_ranks`
(spawn N ranks with a process group each; a failing or hung rank fails the test with its
traceback) and :func:`~deepep_megatron.launch.free_port`; :func:`gloo_threads` for the teardown
tests."""
from __future__ import annotations

import os

from deepep_megatron.launch import free_port, local_backend, run_ranks

__all__ = ["free_port", "gloo_threads", "local_backend", "run_ranks"]


def gloo_threads() -> list[str]:
    """Names of this process's threads that belong to a gloo process group (``gloo_tcp_loop``,
    ``pt_gloo_runloop``), read from /proc (Linux): empty once every group has really been freed."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended while we listed them
            continue
    return sorted(n for n in names if "gloo" in n)
