#!/usr/bin/env python3
"""Where the host time of one Buffer.dispatch goes (cuda backend, EP2, DeepSeek-V3 shape).

    python scripts/profile_dispatch_host.py [--sms 24] [--calls 100] [--fp8]

Two ranks (one per GPU over NCCL, or two on one GPU over gloo under MPS). Per rank: GPU-paced time
per call (events around back-to-back calls, as bench_intranode.py), the time the host spent
spinning in wait_notify (≈ 0 means the host, not the GPU, paces the loop), then on rank 0 a
cProfile of the same calls (top functions by own time). Full, num_worst_tokens and cached dispatch, then combine.

``--one-call``: instead, each op one call at a time after a sync and ``start_together`` (what a training step
sees). Per op on rank 0: host time split into Python (Buffer + backend) and ``_C`` (checks,
allocation, launches, the notify wait; with ``DEEPEP_MEGATRON_HOST_TIMING=1`` also ``_C`` stage by
stage, csrc/runtime/host_timing.h), then from a torch.profiler trace of the same loop the GPU
timeline relative to the call's start: when the first kernel started (launch latency), each
kernel's duration, the idle gaps between kernels, and when the last one ended (medians).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepep_megatron.launch import local_backend, run_ranks  # noqa: E402 - after the path insert
from deepep_megatron.profiling import start_together  # noqa: E402


class _Timed:
    """Proxy of the backend's _C.Runtime that sums the host time of each method."""

    def __init__(self, inner):
        self._inner = inner
        self.spent: dict[str, float] = {}

    def __getattr__(self, name):
        fn = getattr(self._inner, name)
        if not callable(fn):
            return fn

        def wrapped(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t

        return wrapped


def _one_call_timeline(rank: int, name: str, fn, timed: "_Timed", calls: int) -> list[str]:
    """The --one-call figures of one op (see the module docstring); rank 0 reports, every rank runs."""
    hosts, in_c, stages = [], [], {}
    for _ in range(calls):
        torch.cuda.synchronize()
        start_together()
        timed.spent.clear()
        t0 = time.perf_counter()
        result = fn()  # kept until the clock stopped: freeing the outputs is the next step's host work
        hosts.append(time.perf_counter() - t0)
        in_c.append(sum(timed.spent.values()))
        for stage, us in timed._inner.host_timing():  # empty unless DEEPEP_MEGATRON_HOST_TIMING=1
            stages.setdefault(stage, []).append(us)
        torch.cuda.synchronize()
        del result
    med = lambda values: statistics.median(values) * 1e6  # noqa: E731
    lines = [f"rank {rank} {name:7s} one call: host {med(hosts):6.1f} us = Python {med([h - c for h, c in zip(hosts, in_c)]):5.1f}"
             f" + _C {med(in_c):5.1f}"]
    if stages:  # the _C part stage by stage (csrc/runtime/host_timing.h); the rest of _C is the binding
        split = "; ".join(f"{stage} {statistics.median(us):.1f}" for stage, us in stages.items())
        lines.append(f"rank {rank} {name:7s} _C stages (us, median): {split}")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            torch.cuda.synchronize()
            start_together()
            with torch.profiler.record_function("one_call"):
                fn()
            torch.cuda.synchronize()
    if rank != 0:
        return lines
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    calls_ = sorted((e for e in events if e.get("name") == "one_call" and e.get("ph") == "X"), key=lambda e: e["ts"])
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    launches = [e for e in events if e.get("cat") == "cuda_runtime" and "LaunchKernel" in e.get("name", "")]
    per_kernel: dict[str, list[float]] = {}
    first, last, gaps = [], [], []
    for i, call in enumerate(calls_):
        end = calls_[i + 1]["ts"] if i + 1 < len(calls_) else float("inf")
        mine = [k for k in kernels if call["ts"] <= k["ts"] < end]
        if not mine:
            continue
        first.append(mine[0]["ts"] - call["ts"])
        last.append(mine[-1]["ts"] + mine[-1]["dur"] - call["ts"])
        gaps.append(sum(max(0.0, b["ts"] - (a["ts"] + a["dur"])) for a, b in zip(mine, mine[1:])))
        for k in mine:
            per_kernel.setdefault(k["name"].split("(")[0].split("<")[0][-28:], []).append(k["dur"])
    if first:
        kernel_part = ", ".join(f"{n} {statistics.median(d):.1f}" for n, d in per_kernel.items())
        lines.append(f"rank 0 {name:7s} GPU timeline (us from the call): first kernel at {statistics.median(first):.1f}, "
                     f"last ends at {statistics.median(last):.1f}, idle between kernels {statistics.median(gaps):.1f}; "
                     f"kernels: {kernel_part}; cudaLaunchKernel {statistics.median([e['dur'] for e in launches]):.1f} each")
    return lines


def _worker(rank: int, world: int, sms: int, calls: int, fp8: bool, one_call: bool = False) -> None:
    """One rank (run_ranks started its process group)."""
    device = torch.device("cuda", torch.cuda.current_device())  # rank % GPUs, set by run_ranks
    from deepep_megatron import Buffer, Config, per_token_cast_to_fp8

    H, T, K, E = 7168, 4096, 8, 256
    config = Config(sms, 32, 256)
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=config.get_nvl_buffer_size_hint(H * 2, world), explicitly_destroy=True, backend="cuda")
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
    topk_idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices.to(device)
    weights = torch.rand(T, K, generator=g).to(device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
    x_in = per_token_cast_to_fp8(x) if fp8 else x
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=weights, config=config)
    recv = buffer.dispatch(x_in, **args)
    handle = recv[4]
    y = recv[0] if not fp8 else torch.randn(handle.num_recv_tokens, H, device=device).to(torch.bfloat16)
    backend = buffer.runtime
    timed = _Timed(backend._runtime)
    backend._runtime = timed
    lines = []
    for name, fn in (("full", lambda: buffer.dispatch(x_in, **args)),
                     ("worst", lambda: buffer.dispatch(x_in, num_worst_tokens=T * world, **args)),
                     ("cached", lambda: buffer.dispatch(x_in, handle=handle, config=config)),
                     ("combine", lambda: buffer.combine(y, handle, config=config))):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        if one_call:
            lines += _one_call_timeline(rank, name, fn, timed, calls)
            dist.barrier()
            continue
        timed.spent.clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(calls):
            fn()
        t_host = time.perf_counter() - t0
        end.record()
        torch.cuda.synchronize()
        gpu_us = start.elapsed_time(end) * 1e3 / calls
        parts = ", ".join(f"{k} {v * 1e6 / calls:.1f}" for k, v in sorted(timed.spent.items()))
        lines.append(f"rank {rank} {name:7s}: {gpu_us:6.1f} us/call (events), host loop {t_host * 1e6 / calls:6.1f} us/call; "
                     f"in _C per call (us): {parts}")
        dist.barrier()
        prof = cProfile.Profile() if rank == 0 else None
        if prof:
            prof.enable()
        for _ in range(calls):
            fn()
        if prof:
            prof.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            lines.append(f"--- cProfile rank 0, {name}, {calls} calls (inflated by the profiler)\n" +
                         "\n".join(s.getvalue().splitlines()[4:]))
        torch.cuda.synchronize()
        dist.barrier()
    backend._runtime = timed._inner
    print("\n".join(lines), flush=True)
    dist.barrier()
    buffer.destroy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sms", type=int, default=24)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--one-call", action="store_true", help="one call at a time after a barrier, with the GPU timeline")
    a = p.parse_args()
    run_ranks(_worker, 2, a.sms, a.calls, a.fp8, a.one_call, backend=local_backend(2)[0], timeout_s=1800)


if __name__ == "__main__":
    main()
