#!/usr/bin/env python3
"""Benchmark of the NVSHMEM low-latency kernels, with the reference backend and the normal (intranode)
kernels at the same shape measured in the same run.

    python scripts/bench_low_latency.py [--ranks 2] [--tokens 128] [--hidden 7168] [--topk 8]
                                        [--experts 64] [--iters 20] [--out FILE]

Ranks: one per GPU over NCCL when there are enough GPUs, otherwise several on one GPU over gloo
(start MPS first). Uniform random routing (distinct experts per token), FP8 dispatch (per-128
scales) and bf16 combine. Times, from CUDA events, median over repeats, the slowest rank:
  * "kernel: ...": the calls queued behind a GPU sleep, so the events time the kernels and not the
    host path (dispatch/combine: 20 back-to-back calls, which amortizes the ranks' start skew; the
    hook parts: one call, the receive once the data arrived);
  * "per call": one call after a sync and a barrier of every rank (includes the ranks' launch skew);
  * "back-to-back": --iters calls queued between two events, per call (what a decode step sees);
  * the hook mode's parts: the send kernel alone, and the receive (hook) alone once the data arrived;
  * overlap: send, a bf16 matmul, hook -- against the matmul alone (work between send and hook runs
    while the data is in flight, nothing holds SMs);
  * the reference backend (torch.distributed) and the cuda backend's normal dispatch/combine of the
    same tokens (24 SMs per rank, fewer where the ranks sharing a GPU would not fit: EP8 on one H200 gets 16);
  * with --stage-times (DEEPEP_MEGATRON_LL_STAGE_TIMES=1 in every rank, so every row carries the
    timer's few reads of %globaltimer): where a dispatch's blocks spend their time, per stage
    (LowLatencyStage, csrc/kernels/low_latency.h) the largest over blocks, and the span from the
    first block's start to the last block's end; medians over 9 dispatches, rank 0.
Prints a short table last; --out writes it (markdown) too.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepep_megatron.launch import local_backend, run_ranks, tree_commit  # noqa: E402

#: SMs per rank of the normal (intranode) kernels measured beside the low-latency ones.
NORMAL_SMS = 24
#: Turns the low-latency dispatch's stage timer on (csrc/runtime/low_latency_ops.cpp).
STAGE_TIMES_ENV = "DEEPEP_MEGATRON_LL_STAGE_TIMES"
from deepep_megatron.profiling import seconds_per_call  # noqa: E402


def _per_call(fn, group, repeats: int, before=None, after=None) -> float:
    """Median seconds of one call timed from an idle stream after a sync + barrier (host path included)."""
    return _gpu_time(fn, group, repeats, before=before, after=after, sleep=False)


#: Cycles of torch.cuda._sleep queued before the timed calls (~8 ms on an H200): the host enqueues the
#: calls while the GPU sleeps, so the events time the kernels, not the host path.
SLEEP_CYCLES = 16_000_000


def _gpu_time(fn, group, repeats: int, iters: int = 1, before=None, after=None, sleep: bool = True) -> float:
    """Median seconds per call of ``iters`` calls after a sync + start_together, queued behind a GPU
    sleep (host path hidden; cross-rank skew at the start amortized over ``iters``), or with
    ``sleep=False`` timed from an idle stream (host path included). ``before()`` runs first and
    ``after()`` last, untimed."""
    return seconds_per_call(fn, iters, repeats=repeats, warmup=0, group=group, sleep_cycles=SLEEP_CYCLES if sleep else 0,
                            before=before, after=after)


def _stage_times(fast, dispatch, group, calls: int = 9) -> dict[str, float]:
    """Per stage of the dispatch kernel, the largest and the median time over blocks (a slow stage
    of every block, or a few slow blocks), and the blocks' span, in seconds: medians over ``calls``
    dispatches, each run alone after a barrier."""
    from deepep_megatron import _C

    kernels = fast.runtime._low_latency._ll  # the LowLatencyKernels of the LowLatencyBackend
    names = list(_C.LL_STAGES)
    per_call: dict[str, list[float]] = {}
    for _ in range(calls):
        torch.cuda.synchronize()
        dist.barrier(group=group)
        dispatch()
        rows = torch.tensor(kernels.stage_times(), dtype=torch.int64).view(-1, len(names))
        span = float(rows[:, names.index("end")].max() - rows[:, names.index("start")].min())
        per_call.setdefault("stage: span, first block start -> last block end", []).append(span)
        for i, name in enumerate(names):
            if name not in ("start", "end"):
                per_call.setdefault(f"stage: {name} (max over blocks)", []).append(float(rows[:, i].max()))
                per_call.setdefault(f"stage: {name} (median over blocks)", []).append(float(rows[:, i].median()))
    return {what: statistics.median(values) * 1e-9 for what, values in per_call.items()}


def _worker(rank: int, world: int, tokens: int, hidden: int, topk: int, experts: int, iters: int) -> list | None:
    from deepep_megatron import Buffer, Config

    device = torch.device("cuda", torch.cuda.current_device())
    group = dist.group.WORLD
    g = torch.Generator(device="cpu").manual_seed(100 + rank)
    x = (torch.randn(tokens, hidden, generator=g) * 2).to(torch.bfloat16).to(device)
    topk_idx = torch.rand(tokens, experts, generator=g).topk(topk, dim=1).indices.to(device)
    topk_weights = (torch.rand(tokens, topk, generator=g) + 0.1).to(device)
    hint = Buffer.get_low_latency_rdma_size_hint(tokens, hidden, world, experts)
    fast = Buffer(group, 0, hint, low_latency_mode=True, backend="cuda", explicitly_destroy=True, timeout_s=60)
    assert type(fast.runtime).__name__ == "LowLatencyBackend", "the NVSHMEM kernels are not built"
    ref = Buffer(group, 0, hint, low_latency_mode=True, backend="reference")
    blocks = fast.runtime._low_latency.num_blocks
    results: dict[str, float] = {}

    def slowest(seconds: float) -> float:
        values = [None] * world
        dist.all_gather_object(values, seconds, group=group)
        return max(values)

    # ---------------------------------------------------------------- low-latency kernels
    state = {}

    def dispatch():
        state["d"] = fast.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=True)

    dispatch()
    recv_x, _, handle, _, _ = state["d"]
    y = (recv_x[0].float() * 0.5).to(torch.bfloat16)  # stand-in expert outputs [E_l, R*M, H]

    def combine():
        fast.low_latency_combine(y, topk_idx, topk_weights, handle)

    # Kernel time (host path hidden behind a GPU sleep).
    results["kernel: ll dispatch fp8 (20 back-to-back, per call)"] = slowest(_gpu_time(dispatch, group, 9, iters=20))
    results["kernel: ll combine (20 back-to-back, per call)"] = slowest(_gpu_time(combine, group, 9, iters=20))
    results["ll dispatch fp8 (per call)"] = slowest(_per_call(dispatch, group, 30))
    results["ll combine (per call)"] = slowest(_per_call(combine, group, 30))
    results["ll dispatch fp8 (back-to-back)"] = slowest(seconds_per_call(dispatch, iters, repeats=9, group=group))
    results["ll combine (back-to-back)"] = slowest(seconds_per_call(combine, iters, repeats=9, group=group))
    if os.environ.get(STAGE_TIMES_ENV) == "1":
        results.update(_stage_times(fast, dispatch, group))

    hooks = {}

    def dispatch_send():
        hooks["h"] = fast.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=True, return_recv_hook=True)[4]

    def dispatch_recv():
        hooks["h"]()

    def combine_send():
        hooks["h"] = fast.low_latency_combine(y, topk_idx, topk_weights, handle, return_recv_hook=True)[2]

    def finish():
        hooks["h"]()

    results["kernel: ll dispatch send (hook mode)"] = slowest(_gpu_time(dispatch_send, group, 15, after=dispatch_recv))
    results["kernel: ll dispatch recv (hook, data arrived)"] = slowest(_gpu_time(dispatch_recv, group, 15, before=dispatch_send))
    results["kernel: ll combine send (hook mode)"] = slowest(_gpu_time(combine_send, group, 15, after=finish))
    results["kernel: ll combine recv (hook, data arrived)"] = slowest(_gpu_time(finish, group, 15, before=combine_send))
    results["ll dispatch send (hook mode)"] = slowest(_per_call(dispatch_send, group, 30, after=dispatch_recv))
    results["ll dispatch recv (hook, data arrived)"] = slowest(_per_call(dispatch_recv, group, 30, before=dispatch_send))
    results["ll combine send (hook mode)"] = slowest(_per_call(combine_send, group, 30, after=finish))
    results["ll combine recv (hook, data arrived)"] = slowest(_per_call(finish, group, 30, before=combine_send))

    # Overlap: send -> matmul -> hook, against the matmul alone.
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    def gemm():
        a @ a

    def overlapped():
        dispatch_send()
        gemm()
        dispatch_recv()

    # Kernel time: if the hook waited for nothing, send + matmul + hook ~ send + matmul + receive(data arrived).
    results["kernel: matmul 4096^3 alone"] = slowest(_gpu_time(gemm, group, 9))
    results["kernel: send + matmul + hook"] = slowest(_gpu_time(overlapped, group, 9))
    results["matmul 4096^3 alone"] = slowest(_per_call(gemm, group, 15))
    results["send + matmul + hook"] = slowest(_per_call(overlapped, group, 15))

    # ---------------------------------------------------------------- baselines, same run
    ref_state = {}

    def ref_dispatch():
        ref_state["d"] = ref.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=True)

    ref_dispatch()
    ref_handle = ref_state["d"][2]
    results["reference dispatch fp8"] = slowest(_per_call(ref_dispatch, group, 5))
    results["reference combine"] = slowest(
        _per_call(lambda: ref.low_latency_combine(y, topk_idx, topk_weights, ref_handle), group, 5))

    # 24 SMs per rank, or fewer where the ranks sharing this GPU would not all fit (their blocks spin on each other)
    sharing = -(-world // torch.cuda.device_count())
    sms = min(NORMAL_SMS, torch.cuda.get_device_properties(device).multi_processor_count // sharing // 2 * 2)
    config = Config(sms, 6, 256)
    normal = Buffer(group, num_nvl_bytes=config.get_nvl_buffer_size_hint(hidden * 2, world), explicitly_destroy=True,
                    backend="cuda")
    layout = normal.get_dispatch_layout(topk_idx, experts)
    per_rank, _, per_expert, in_rank, _ = layout
    norm_state = {}

    def normal_dispatch():
        norm_state["d"] = normal.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                          num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                          topk_weights=topk_weights, config=config)

    normal_dispatch()
    n_recv, _, n_weights, _, n_handle, _ = norm_state["d"]

    def normal_combine():
        normal.combine(n_recv, n_handle, topk_weights=n_weights, config=config)

    results[f"normal dispatch bf16 ({sms} SMs, per call)"] = slowest(_per_call(normal_dispatch, group, 20))
    results[f"normal combine ({sms} SMs, per call)"] = slowest(_per_call(normal_combine, group, 20))
    torch.cuda.synchronize()
    dist.barrier(group=group)
    normal.destroy()
    fast.destroy()
    if rank != 0:
        return None
    return [(name, seconds * 1e6) for name, seconds in results.items()] + [("low-latency blocks per rank", blocks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--stage-times", action="store_true", help="time the dispatch kernel's stages too (see above)")
    args = parser.parse_args()
    backend, ranks_per_gpu = local_backend(args.ranks)
    rows = run_ranks(_worker, args.ranks, args.tokens, args.hidden, args.topk, args.experts, args.iters,
                     backend=backend, timeout_s=400, env={STAGE_TIMES_ENV: "1" if args.stage_times else "0"})[0]
    name = torch.cuda.get_device_name(0)
    lines = [
        f"# bench_low_latency: EP{args.ranks} ({ranks_per_gpu} rank(s) per GPU, {backend}), {args.tokens} tokens/rank, "
        f"hidden {args.hidden}, top-{args.topk} of {args.experts}, FP8 dispatch; {name}; "
        f"{datetime.date.today()}; commit {tree_commit(os.path.dirname(os.path.abspath(__file__)))}"
        + ("; stage timer on" if args.stage_times else ""),
        "",
        "| what | us (median, slowest rank) |",
        "|---|---|",
    ]
    lines += [f"| {what} | {value:.1f} |" if isinstance(value, float) else f"| {what} | {value} |" for what, value in rows]
    table = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
