#!/usr/bin/env python3
"""Internode dispatch/combine (node forwarding) beside the intranode kernels at the same rank count,
on the same ranks in the same run.

    python scripts/bench_internode.py [--ranks 4] [--ranks-per-node 2] [--sms 24] [--iters 20] [--out FILE]
                                      [--rdma-leg collective|nvshmem] [--host-stages]

Ranks: one per GPU over NCCL when there are enough GPUs, otherwise all on one GPU over gloo (start
MPS first). Two Buffers on the same ranks, made one after the other: one node of R ranks (the
intranode kernels), and R / L virtual nodes of L ranks (``DEEPEP_MEGATRON_RANKS_PER_NODE``; node
forwarding, backends/forwarding.py: the RDMA leg is the rail groups' collective, which gloo stages
through host memory, or with ``--rdma-leg nvshmem`` NVSHMEM puts over its P2P transport; the NVLink
leg runs the intranode kernels). DeepSeek-V3 shape: 4096 tokens per rank, hidden 7168, top-8 of 256,
uniform random routing.

Times full dispatch (bf16 and FP8), cached dispatch (bf16) and combine (bf16), slowest rank: back
to back between two events, and one call at a time after :func:`start_together` (what a training
step sees, host work included). Also prints the bytes per token each leg carries, forwarding against
sending every token to every destination rank directly (traffic.link_bytes of the same routing), and
checks that both Buffers deliver the same rows. No RDMA NIC is used: no figure here is an RDMA one.

``--host-stages``: also where node forwarding's time goes, per stage of each operation (median of
``--iters`` calls, one at a time, slowest rank): its host time (``DEEPEP_MEGATRON_HOST_TIMING=1``, on
for the whole run, so ``_C``'s own stage timer runs in both Buffers' calls), and in calls of their own
the same stages with the device synchronized at each mark (``DEEPEP_MEGATRON_HOST_TIMING_SYNC=1``:
each stage with the GPU work it queued).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepep_megatron.backends.rail import RDMA_LEG_ENV, RDMA_LEGS  # noqa: E402 - after the path insert
from deepep_megatron.launch import local_backend, run_ranks, tree_commit  # noqa: E402
from deepep_megatron.layout import rail_bytes_needed, rail_row_bytes  # noqa: E402
from deepep_megatron.profiling import (  # noqa: E402
    HOST_TIMING_ENV,
    HOST_TIMING_SYNC_ENV,
    one_call_seconds,
    seconds_per_call,
)
from deepep_megatron.topology import RANKS_PER_NODE_ENV  # noqa: E402
from deepep_megatron.traffic import link_bytes  # noqa: E402

HIDDEN, TOKENS, TOPK, EXPERTS = 7168, 4096, 8, 256
OPS = ("dispatch bf16", "dispatch fp8", "cached dispatch bf16", "combine bf16")


def _stage_medians(op, runtime, iters: int, group) -> list[tuple[str, float]]:
    """Median us per stage of ``runtime.host_timing()`` over ``iters`` calls of ``op``, one at a time
    (:func:`one_call_seconds`' calls; its own times are not used here)."""
    import statistics

    per_stage: dict[str, list[float]] = {}

    def recorded():
        result = op()
        for stage, us in runtime.host_timing():  # recorded by the call itself: no sync needed to read
            per_stage.setdefault(stage, []).append(us)
        return result

    one_call_seconds(recorded, iters, warmup=0, group=group)
    return [(stage, statistics.median(values)) for stage, values in per_stage.items()]


def _worker(rank: int, world: int, per_node: int, sms: int, iters: int, rdma_leg: str,
            host_stages: bool) -> dict | None:
    from deepep_megatron import Buffer, per_token_cast_to_fp8
    from deepep_megatron.config import default_combine_config, default_dispatch_config

    device = torch.device("cuda", torch.cuda.current_device())  # rank % GPUs, set by run_ranks
    group = dist.group.WORLD
    g = torch.Generator(device="cpu").manual_seed(1000 + rank)
    x = torch.randn(TOKENS, HIDDEN, generator=g).to(device=device, dtype=torch.bfloat16)
    topk_idx = torch.rand(TOKENS, EXPERTS, generator=g).topk(TOPK, dim=1).indices.to(device)
    topk_weights = torch.rand(TOKENS, TOPK, generator=g).to(device)
    x_fp8 = per_token_cast_to_fp8(x)
    dispatch_config, combine_config = default_dispatch_config(world, sms), default_combine_config(world, sms)
    nvl = max(c.get_nvl_buffer_size_hint(HIDDEN * 2, world) for c in (dispatch_config, combine_config))

    def slowest(seconds: float) -> float:
        values = [None] * world
        dist.all_gather_object(values, seconds, group=group)
        return max(values)

    if host_stages:  # before any Buffer: _C reads it once
        os.environ[HOST_TIMING_ENV] = "1"
    times, delivered, stages = {}, {}, {}
    # the RDMA leg's widest row: bf16 (wider than the FP8 rows with their scales)
    row = rail_row_bytes(HIDDEN * 2, 0, TOPK, world)
    rdma = rail_bytes_needed(world // per_node, TOKENS, row) if rdma_leg == "nvshmem" else 0
    for label, ranks_per_node in (("intranode", world), (f"{world // per_node}x{per_node} nodes", per_node)):
        os.environ[RANKS_PER_NODE_ENV] = str(ranks_per_node)
        os.environ[RDMA_LEG_ENV] = rdma_leg
        buffer = Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma if ranks_per_node < world else 0,
                        explicitly_destroy=True, backend="cuda")
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, EXPERTS)
        args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                    topk_idx=topk_idx, topk_weights=topk_weights, config=dispatch_config,
                    num_tokens_per_rdma_rank=per_rdma if buffer.num_rdma_ranks > 1 else None)
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, **args)
        delivered[label] = recv_x
        ops = {
            "dispatch bf16": lambda: buffer.dispatch(x, **args),
            "dispatch fp8": lambda: buffer.dispatch(x_fp8, **args),
            "cached dispatch bf16": lambda: buffer.dispatch(x, handle=handle, config=dispatch_config),
            "combine bf16": lambda: buffer.combine(recv_x, handle, config=combine_config),
        }
        for name in OPS:
            back_to_back = seconds_per_call(ops[name], iters, group=group)
            one_call, host = one_call_seconds(ops[name], iters, group=group)
            times[(label, name)] = tuple(slowest(v) * 1e6 for v in (back_to_back, one_call, host))
            if host_stages and ranks_per_node < world:
                host_only = _stage_medians(ops[name], buffer.runtime, iters, group)
                os.environ[HOST_TIMING_SYNC_ENV] = "1"
                synced = dict(_stage_medians(ops[name], buffer.runtime, iters, group))
                os.environ[HOST_TIMING_SYNC_ENV] = "0"
                stages[name] = [(stage, slowest(us), slowest(synced.get(stage, float("nan"))))
                                for stage, us in host_only]
        torch.cuda.synchronize()
        buffer.destroy()
    first, second = delivered.values()
    same = [None] * world
    dist.all_gather_object(same, bool(torch.equal(first, second)), group=group)

    legs = link_bytes(torch.cat(_gather(topk_idx, world, group)), EXPERTS, per_node, world, message_bytes=HIDDEN * 2)
    return {"times": times, "same_rows": all(same), "legs": legs, "stages": stages} if rank == 0 else None


def _gather(t: torch.Tensor, world: int, group) -> list[torch.Tensor]:
    """Every rank's ``t``, on the host (NCCL gathers device tensors, gloo host ones)."""
    on_device = dist.get_backend(group) == "nccl"
    out = [torch.empty_like(t, device=t.device if on_device else "cpu") for _ in range(world)]
    dist.all_gather(out, t if on_device else t.cpu(), group=group)
    return [o.cpu() for o in out]


def _table(result: dict, world: int, per_node: int) -> str:
    labels = ["intranode", f"{world // per_node}x{per_node} nodes"]
    lines = ["| op | " + " | ".join(f"{lab} b2b us | {lab} one call us | {lab} host us" for lab in labels)
             + " | internode / intranode (one call) |",
             "|---|" + "---|" * (3 * len(labels) + 1)]
    for name in OPS:
        cells = [f"{v:.0f}" for lab in labels for v in result["times"][(lab, name)]]
        ratio = result["times"][(labels[1], name)][1] / result["times"][(labels[0], name)][1]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    legs = result["legs"]
    per_token = lambda v: v / legs.tokens / 1024  # noqa: E731
    lines += ["", "| bytes per token (KiB, bf16 rows) | RDMA leg | NVLink leg |", "|---|---|---|",
              f"| node forwarding | {per_token(legs.forwarded_rdma):.1f} | {per_token(legs.forwarded_nvlink):.1f} |",
              f"| direct to every rank | {per_token(legs.direct_rdma):.1f} | {per_token(legs.direct_nvlink):.1f} |",
              f"| RDMA saving | {legs.rdma_saving:.2f}x | |",
              "", f"both Buffers delivered the same rows on every rank: {result['same_rows']}"]
    if result["stages"]:
        lines += ["", f"| {labels[1]}: op | stage | host us | with its GPU work us (synced) |", "|---|---|---|---|"]
        for name, rows in result["stages"].items():
            lines += [f"| {name} | {stage} | {host:.0f} | {synced:.0f} |" for stage, host, synced in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--sms", type=int, default=24)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", help="also write the table (markdown) here")
    parser.add_argument("--rdma-leg", choices=RDMA_LEGS, default="collective", help="node forwarding's RDMA leg")
    parser.add_argument("--host-stages", action="store_true",
                        help="also time node forwarding's stages (see above)")
    args = parser.parse_args()
    if args.ranks % args.ranks_per_node or args.ranks == args.ranks_per_node:
        parser.error("--ranks must be a multiple of --ranks-per-node, over at least two nodes")
    backend, ranks_per_gpu = local_backend(args.ranks)
    results = run_ranks(_worker, args.ranks, args.ranks_per_node, args.sms, args.iters, args.rdma_leg,
                        args.host_stages, backend=backend, timeout_s=1200)
    header = (f"{datetime.date.today()} · {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()} · "
              f"EP{args.ranks} over {backend} ({ranks_per_gpu} rank(s) per GPU) · {args.sms} SMs · RDMA leg {args.rdma_leg} · "
              f"{TOKENS} tokens/rank, hidden {HIDDEN}, top-{TOPK} of {EXPERTS} · {args.iters} iters, slowest rank · "
              f"{'host stage timers on · ' if args.host_stages else ''}"
              f"commit {tree_commit(os.path.dirname(os.path.abspath(__file__)))}")
    table = header + "\n\n" + _table(results[0], args.ranks, args.ranks_per_node)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
