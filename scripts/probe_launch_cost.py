#!/usr/bin/env python3
"""Host cost of kernel launches on this machine: the floor under any operation's host time.

    python scripts/probe_launch_cost.py [--ranks 2]

Per rank (several ranks share one GPU under MPS when there are fewer GPUs), the host time of 1, 3
and 6 tiny launches and of one 117 MB allocation from the caching allocator, two ways: one call
at a time after a sync + barrier (what a training step's first communication sees) and back-to-back.
Prints one line per rank, microseconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepep_megatron.launch import local_backend, run_ranks  # noqa: E402 - after the path insert

ITERS, WARMUP = 30, 10
ALLOC_BYTES = 8192 * 7168 * 2  # a DeepSeek-V3 recv_x at EP2 under num_worst_tokens


def _worker(rank: int, world: int) -> dict[str, float]:
    device = torch.device("cuda", torch.cuda.current_device())
    counter = torch.ones(1024, device=device)

    def launches(n: int):
        def run() -> None:
            for _ in range(n):
                counter.add_(1)
        return run

    cases = {"1 launch": launches(1), "3 launches": launches(3), "6 launches": launches(6),
             "alloc 117MB": lambda: torch.empty(ALLOC_BYTES, dtype=torch.uint8, device=device)}
    out: dict[str, float] = {}
    for name, fn in cases.items():
        hosts = []
        for i in range(WARMUP + ITERS):
            torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            result = fn()
            hosts.append(time.perf_counter() - start)
            torch.cuda.synchronize()
            del result
        out[f"{name} one-call"] = statistics.median(hosts[WARMUP:]) * 1e6
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(ITERS):
            fn()
        out[f"{name} back-to-back"] = (time.perf_counter() - start) / ITERS * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    for rank, result in enumerate(run_ranks(_worker, args.ranks, backend=local_backend(args.ranks)[0], timeout_s=300)):
        print(f"rank {rank}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
