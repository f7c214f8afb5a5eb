"""The host-staged gloo backend (deepep_megatron.host_staged) that lets ranks sharing a GPU train:
every collective megatron-core and this package issue, against what plain gloo computes.

It is registered for CPU tensors here with DEEPEP_MEGATRON_STAGE_CPU=1, so every call goes through
its host copies exactly as CUDA tensors do on a GPU machine (only the device of the copy differs).
"""
from __future__ import annotations

import pytest
import torch

from harness import run_ranks

STAGED = {"DEEPEP_MEGATRON_STAGE_CPU": "1"}


def _collectives(rank: int, world_size: int) -> int:
    import torch.distributed as dist
    from torch.distributed import _coalescing_manager

    from deepep_megatron.host_staged import BACKEND_NAME

    assert BACKEND_NAME in str(dist.get_backend())
    g = torch.Generator().manual_seed(rank)
    everyone = [torch.randn(6, 5, generator=torch.Generator().manual_seed(r)) for r in range(world_size)]
    mine = everyone[rank]
    total = torch.stack(everyone).sum(0)
    checks = 0

    for op, want in ((dist.ReduceOp.SUM, total), (dist.ReduceOp.AVG, total / world_size),
                     (dist.ReduceOp.MAX, torch.stack(everyone).amax(0))):
        t = mine.clone()
        dist.all_reduce(t, op=op)
        torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-6)
        checks += 1
    counts = torch.tensor([rank + 1, 7], dtype=torch.int64)
    dist.all_reduce(counts, op=dist.ReduceOp.AVG)  # integers: floor division, as NCCL
    assert counts.tolist() == [sum(range(1, world_size + 1)) // world_size, 7]

    # megatron's DDP: coalesced all-reduce / reduce-scatter / all-gather of gradient buckets, async
    a, b = mine.clone(), mine[:2].clone() * 3
    with _coalescing_manager(async_ops=True) as cm:
        dist.all_reduce(a)
        dist.all_reduce(b)
    cm.wait()
    torch.testing.assert_close(a, total)
    torch.testing.assert_close(b, total[:2] * 3)
    big = torch.arange(world_size * 4, dtype=torch.float32) * (rank + 1)
    shard = torch.empty(4)
    work = dist.reduce_scatter_tensor(shard, big, async_op=True)
    work.wait()
    scale = sum(range(1, world_size + 1))
    assert torch.equal(shard, torch.arange(rank * 4, rank * 4 + 4, dtype=torch.float32) * scale)
    shards, bigs = [torch.empty(4), torch.empty(2)], [big.clone(), big[: 2 * world_size].clone()]
    with _coalescing_manager(async_ops=True) as cm:
        for out, inp in zip(shards, bigs):
            dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.AVG)
    cm.wait()
    base = torch.arange(world_size * 4, dtype=torch.float32)  # rank r holds base * (r + 1)
    torch.testing.assert_close(shards[1], base[: 2 * world_size].view(world_size, 2)[rank] * scale / world_size)
    gathered = torch.empty(world_size * 6, 5)
    dist.all_gather_into_tensor(gathered, mine)
    assert torch.equal(gathered, torch.cat(everyone))
    outs = [torch.empty(world_size * 6, 5), torch.empty(world_size * 2, 5)]
    with _coalescing_manager(async_ops=True) as cm:
        dist.all_gather_into_tensor(outs[0], mine)
        dist.all_gather_into_tensor(outs[1], mine[:2])
    cm.wait()
    assert torch.equal(outs[1], torch.cat([e[:2] for e in everyone]))

    # lists, broadcast, objects, all-to-all with splits (the reference backend's exchange), barrier
    parts = [torch.empty(6, 5) for _ in range(world_size)]
    dist.all_gather(parts, mine)
    assert all(torch.equal(p, e) for p, e in zip(parts, everyone))
    src = mine.clone() if rank == 1 else torch.zeros(6, 5)
    dist.broadcast(src, src=1)
    assert torch.equal(src, everyone[1])
    objects = [None] * world_size
    dist.all_gather_object(objects, {"rank": rank})
    assert objects == [{"rank": r} for r in range(world_size)]
    send_splits = [r + 1 for r in range(world_size)]  # rank r gets r + 1 rows from everyone
    send = torch.randn(sum(send_splits), 3, generator=g)
    recv = torch.empty((rank + 1) * world_size, 3)
    dist.all_to_all_single(recv, send, output_split_sizes=[rank + 1] * world_size, input_split_sizes=send_splits)
    rows = [torch.randn(sum(send_splits), 3, generator=torch.Generator().manual_seed(r)) for r in range(world_size)]
    start = sum(send_splits[:rank])
    assert torch.equal(recv, torch.cat([r[start : start + rank + 1] for r in rows]))
    # gather / scatter (torch.distributed.checkpoint's gather_object, megatron's dist checkpointing)
    gathered_objects = [None] * world_size if rank == 0 else None
    dist.gather_object({"from": rank}, gathered_objects, dst=0)
    if rank == 0:
        assert gathered_objects == [{"from": r} for r in range(world_size)]
    piece = torch.empty(3)
    dist.scatter(piece, [torch.full((3,), float(r)) for r in range(world_size)] if rank == 0 else None, src=0)
    assert torch.equal(piece, torch.full((3,), float(rank)))
    reduced = mine.clone()
    dist.reduce(reduced, dst=0)
    if rank == 0:
        torch.testing.assert_close(reduced, total)
    dist.barrier()
    return checks


@pytest.mark.parametrize("world_size", [2, 3])
def test_collectives_equal_gloo(world_size: int) -> None:
    assert run_ranks(_collectives, world_size, backend="cpu:deepep_host_gloo", env=STAGED) == [3] * world_size


def _buffer_over_staged(rank: int, world_size: int) -> bool:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    buffer = Buffer(dist.group.WORLD, backend="reference")
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(rank))
    idx = torch.tensor([[0], [1], [2], [3], [-1]])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    recv, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, num_tokens_per_rank=per_rank,
                                               is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    combined, _, _ = buffer.combine(recv, handle)
    return bool(torch.equal(combined, torch.where(in_rank.any(1, keepdim=True), x, torch.zeros_like(x))))


def test_buffer_runs_over_the_staged_backend() -> None:
    assert run_ranks(_buffer_over_staged, 2, backend="cpu:deepep_host_gloo", env=STAGED) == [True, True]


def _subgroup_lifecycle(rank: int, world_size: int) -> list[float]:
    """Subgroups of the staged backend as node forwarding uses them: one made and used, a second of
    the same ranks made beside it (Buffer.reset), then both destroyed (Buffer.destroy); the sums
    each computed. (Re-making a destroyed group of the same ranks would reuse its store keys.)"""
    import datetime

    import torch.distributed as dist

    def subgroup() -> dist.ProcessGroup:
        return dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=30),
                              use_local_synchronization=True)

    sums = []
    groups = [subgroup()]
    groups.append(subgroup())
    assert groups[0].group_name and groups[0].group_name != groups[1].group_name, "torch names each group"
    for group in groups:
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t, group=group)
        sums.append(float(t))
    for group in groups:
        dist.destroy_process_group(group)
    return sums


def test_subgroups_can_be_destroyed_under_the_staged_backend() -> None:
    want = float(sum(range(1, 3)))
    assert run_ranks(_subgroup_lifecycle, 2, backend="cpu:deepep_host_gloo", env=STAGED) == [[want, want]] * 2
