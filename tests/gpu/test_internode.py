"""Internode dispatch/combine (node forwarding, backends/forwarding.py) with the intranode kernels as
its NVLink leg, on one GPU: ranks grouped into virtual nodes by DEEPEP_MEGATRON_RANKS_PER_NODE, all
sharing the GPU under MPS over gloo (the RDMA leg is the rail group's collective, staged through host
memory; no RDMA NIC is used or claimed).

Every case of tests/gpu/test_intranode.py (shapes, bf16/fp32/FP8, cached, async, layout-only,
num_worst_tokens, combine with bias and weights, ranks that send or receive nothing), outputs
poisoned first, compared bit for bit with the same forwarding on the reference backend (which the
CPU tests hold equal to the flat reference's dispatch, and its combine to the forwarding emulation).
With one rank per node there is no NVLink leg and the comparison is with the flat reference.
Each topology runs with the RDMA leg as the rail's collective and as NVSHMEM puts (backends/rail.py).
"""
from __future__ import annotations

import pytest

from harness import GPU_MARKS, run_ranks
from test_intranode import _cases, _compare_cases, _launch

pytestmark = GPU_MARKS

#: (nodes, ranks per node) of issue [5/8]'s test list
TOPOLOGIES = [(2, 1), (2, 2), (4, 1), (2, 4), (4, 2)]


@pytest.mark.timeout(900)  # the whole case list at up to 8 ranks on one GPU, the RDMA leg staged through the host
@pytest.mark.parametrize("rdma_leg", ["collective", "nvshmem"])
@pytest.mark.parametrize("nodes,per_node", TOPOLOGIES, ids=[f"{n}x{l}" for n, l in TOPOLOGIES])
def test_internode_matches_forwarding_on_the_reference(nodes: int, per_node: int, rdma_leg: str) -> None:
    from deepep_megatron.backends import nvshmem

    if rdma_leg == "nvshmem" and not nvshmem.is_available():
        pytest.skip("deepep_megatron._C was built without NVSHMEM")
    world_size = nodes * per_node
    backend, ranks_per_gpu = _launch(world_size)
    results = run_ranks(_compare_cases, world_size, ranks_per_gpu, backend=backend, timeout_s=600,
                        env={"DEEPEP_MEGATRON_RANKS_PER_NODE": str(per_node), "DEEPEP_MEGATRON_RDMA_LEG": rdma_leg})
    assert all(r == len(_cases(world_size)) for r in results)
