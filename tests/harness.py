"""The multi-process harness of every distributed test: :func:`deepep_megatron.launch.run_ranks`
(spawn N ranks with a process group each; a failing or hung rank fails the test with its
traceback) and :func:`~deepep_megatron.launch.free_port`."""
from deepep_megatron.launch import free_port, local_backend, run_ranks

__all__ = ["free_port", "local_backend", "run_ranks"]
