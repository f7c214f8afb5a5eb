"""The RDMA leg of node forwarding over NVSHMEM (backends/rail.py, csrc/kernels/rail.cu) on a GPU:
4 ranks as 2 virtual nodes of 2, so two rails of two ranks, all PEs on one GPU under MPS (NVSHMEM's
P2P transport carries the puts; no NIC is involved).

* every exchange delivers, bit for bit, the rows each node's rank of the rail put there, over
  several consecutive exchanges (the acks let a slab be rewritten) with rows of other widths, other
  block counts and ranks that send nothing;
* a rank that skips an exchange makes its rail peer's wait time out with a diagnostic naming the
  rank and node waited for, while the other rail goes on; after every rank's reset the exchanges
  are correct again;
* the layout header's slab size agrees with Python's mirror of it.
Skipped without a GPU, an NVSHMEM build or MPS.
"""
from __future__ import annotations

import time

import pytest
import torch

from harness import GPU_MARKS, nvshmem_launch, run_ranks

pytestmark = GPU_MARKS

WORLD, PER_NODE = 4, 2
HEAP_BYTES = 64 << 20
STALL_TIMEOUT_S = 2.0
#: (rows per destination node, row bytes, blocks) of consecutive exchanges; 0 rows: a rank that sends
#: nothing; the block count changes between exchanges as the operations' SM counts do
EXCHANGES = [(37, 96, 4), (0, 96, 1), (300, 14 * 16 + 8, 8), (5, 16, 2), (64, 32, 8)]


def _rows(source: int, call: int, count: int, row_bytes: int, device) -> torch.Tensor:
    """What ``source`` sends its rail peer in exchange ``call``: reproducible random bytes."""
    g = torch.Generator(device="cpu").manual_seed(1000 * call + source)
    return torch.randint(0, 256, (count, row_bytes), generator=g, dtype=torch.uint8).to(device)


def _exchange(rail, rank: int, call: int, count: int, row_bytes: int, device, num_blocks: int = 4) -> list[str]:
    """One exchange on this rank's rail; the mismatches found (none expected)."""
    from deepep_megatron.topology import Topology

    topology = Topology(WORLD, PER_NODE)
    home, local = divmod(rank, PER_NODE)
    sends = count if rank != 1 else 0  # rank 1 sends nothing
    send = [_rows(rank, call, sends, row_bytes, device) if n != home else torch.empty(0, row_bytes, dtype=torch.uint8,
                                                                                       device=device)
            for n in range(topology.num_nodes)]
    recv_counts = [0 if n == home else (count if n * PER_NODE + local != 1 else 0) for n in range(topology.num_nodes)]
    received = rail.exchange(send, recv_counts, num_blocks=num_blocks)
    problems = []
    for n, got in enumerate(received):
        if n == home:
            continue
        source = n * PER_NODE + local
        want = _rows(source, call, recv_counts[n], row_bytes, device)
        if not torch.equal(got.cpu(), want.cpu()):
            problems.append(f"rank {rank}, exchange {call}: rows from rank {source} differ")
    return problems


def _rail_round(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from deepep_megatron import layout
    from deepep_megatron.backends.rail import NvshmemRail
    from deepep_megatron.topology import Topology

    device = torch.device("cuda", torch.cuda.current_device())
    rail = NvshmemRail(dist.group.WORLD, Topology(world_size, PER_NODE), HEAP_BYTES, STALL_TIMEOUT_S)
    slabs_agree = rail._rail.slab_bytes == layout.rail_slab_bytes(HEAP_BYTES, world_size // PER_NODE) == \
        rail._C.rail_slab_bytes(HEAP_BYTES, world_size // PER_NODE)
    problems = []
    for call, (count, row_bytes, num_blocks) in enumerate(EXCHANGES, start=1):
        problems += _exchange(rail, rank, call, count, row_bytes, device, num_blocks)
    torch.cuda.synchronize()
    rail.check_errors()

    # rank 3 skips an exchange: its rail peer (rank 1) times out; rail 0 (ranks 0, 2) goes on
    message, elapsed = "", 0.0
    if rank != 3:
        start = time.monotonic()
        try:
            _exchange(rail, rank, 99, 8, 32, device)
            rail.check_errors(wait=True)
        except RuntimeError as error:
            message = str(error)
        elapsed = time.monotonic() - start
    dist.barrier()
    rail.reset(dist.group.WORLD)
    problems += _exchange(rail, rank, 100, 11, 48, device)
    torch.cuda.synchronize()
    rail.check_errors()
    rail.destroy()
    return {"problems": problems, "slabs_agree": slabs_agree, "message": message, "elapsed": elapsed}


def test_rail_exchange_delivers_times_out_and_recovers() -> None:
    backend = nvshmem_launch(WORLD)
    results = run_ranks(_rail_round, WORLD, backend=backend, timeout_s=180)
    for rank, result in enumerate(results):
        assert not result["problems"], result["problems"]
        assert result["slabs_agree"], f"rank {rank}: the slab size differs between the header and Python"
    assert results[0]["message"] == results[2]["message"] == "", "rail 0 had nobody missing"
    message = results[1]["message"]
    assert "rank 1: timed out after 2 s waiting" in message and "EP rank 3 (node 1)" in message, message
    assert STALL_TIMEOUT_S <= results[1]["elapsed"] < STALL_TIMEOUT_S + 10, results[1]["elapsed"]
