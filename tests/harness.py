"""The multi-process harness of every distributed test: :func:`deepep_megatron.launch.run_ranks`
(spawn N ranks with a process group each; a failing or hung rank fails the test with its
traceback) and :func:`~deepep_megatron.launch.free_port`; :func:`gloo_threads` for the teardown
tests; :data:`GPU_MARKS` and :func:`mps_running` for the GPU tests."""
from __future__ import annotations

import os
import time

import pytest

from deepep_megatron.launch import free_port, local_backend, run_ranks

__all__ = ["GPU_MARKS", "free_port", "gloo_threads", "local_backend", "mps_running", "run_ranks"]

try:
    from deepep_megatron.backends import cuda_backend_available

    _CUDA_BACKEND = cuda_backend_available()
except Exception:  # noqa: BLE001 - any import problem means: not available here
    _CUDA_BACKEND = False

#: ``pytestmark`` of a GPU test module: the ``gpu`` marker, skipped without a GPU and the extension.
GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _CUDA_BACKEND, reason="needs a CUDA GPU and the compiled extension deepep_megatron._C"),
]


def mps_running() -> bool:
    """True when a CUDA MPS daemon answers at ``CUDA_MPS_PIPE_DIRECTORY`` (ranks may share a GPU)."""
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
    return bool(pipe) and os.path.exists(os.path.join(pipe, "control"))


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


# How long a freed group's threads may take to end: they end asynchronously after
# destroy_process_group, and on a loaded CI machine a gloo_tcp_loop was still seen right after it.
GLOO_THREAD_EXIT_WAIT_S = 5.0


def gloo_threads_left(wait_s: float = GLOO_THREAD_EXIT_WAIT_S) -> list[str]:
    """:func:`gloo_threads` after giving them up to ``wait_s`` seconds to end: a group that was
    freed loses its threads within that time, one that was not keeps them."""
    deadline = time.monotonic() + wait_s
    while gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return gloo_threads()


def nvshmem_launch(world_size: int) -> str:
    """The process-group backend for ``world_size`` NVSHMEM PEs on this machine's GPUs, or skip the
    test: without an NVSHMEM build, or with PEs sharing a GPU and no MPS."""
    import torch

    from deepep_megatron.backends import nvshmem

    if not nvshmem.is_available():
        pytest.skip("deepep_megatron._C was built without NVSHMEM")
    backend, ranks_per_gpu = local_backend(world_size)
    if ranks_per_gpu > 1 and not mps_running():
        pytest.skip(f"{world_size} PEs on {torch.cuda.device_count()} GPU(s) need MPS")
    return backend
