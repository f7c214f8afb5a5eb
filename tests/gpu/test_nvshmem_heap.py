"""The NVSHMEM room of the runtime on a GPU: bootstrap over the process group, the symmetric heap,
puts between every pair of PEs (deepep_megatron.backends.nvshmem). EP2 and EP4, one PE per GPU or
several on one GPU under MPS. Skipped without a GPU, an NVSHMEM build, or (sharing a GPU) MPS."""
from __future__ import annotations

import pytest
import torch

from harness import GPU_MARKS, nvshmem_launch, run_ranks

pytestmark = GPU_MARKS

HEAP_BYTES = 1 << 20


def _probe(rank: int, world_size: int) -> list[int]:
    import torch.distributed as dist

    from deepep_megatron.backends import nvshmem

    heap = nvshmem.open_heap(dist.group.WORLD, HEAP_BYTES)
    assert (heap.my_pe, heap.n_pes, heap.num_bytes) == (rank, world_size, HEAP_BYTES)
    assert all(heap.peer_reachable(pe) for pe in range(world_size)), "a peer on this node is not load/store reachable"
    seen = heap.probe(torch.cuda.current_stream().cuda_stream)
    heap.destroy()
    return seen


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_pe_reaches_every_pe(world_size: int) -> None:
    results = run_ranks(_probe, world_size, backend=nvshmem_launch(world_size), timeout_s=180)
    for pe, seen in enumerate(results):
        # slot [r] of PE pe holds what rank r put there: r * 1000 + pe
        assert seen == [r * 1000 + pe for r in range(world_size)], f"PE {pe} holds {seen}"
