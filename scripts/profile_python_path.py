#!/usr/bin/env python3
"""Host time of the Python layers of the cuda backend's hot calls, on any machine (no GPU needed).

    python scripts/profile_python_path.py [--calls 20000] [--top 12]

``Buffer.dispatch`` (full, num_worst_tokens, cached) and ``Buffer.combine`` run through the real
``Buffer`` and ``CudaBackend`` Python code over CPU tensors, ``Buffer.low_latency_dispatch`` /
``low_latency_combine`` (plain and hooked) through ``Buffer``, ``LowLatencyBackend`` and
``LowLatencyKernels``; only ``_C.Runtime`` / ``_C.LowLatency`` are replaced by stand-ins whose
methods return prepared tensors at once. So the figures are what Python adds on top
of the binding (issue 12's "Python + binding host time" without the binding), on this host's CPU.
Prints the median microseconds per call of each op, then a cProfile of the cached dispatch and of the low-latency dispatch.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import types
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepep_megatron import Buffer, Config  # noqa: E402 - after the path insert
from deepep_megatron.backends.cuda import CudaBackend  # noqa: E402
from deepep_megatron.backends import low_latency as low_latency_module  # noqa: E402
from deepep_megatron.backends.low_latency import LowLatencyBackend, LowLatencyKernels  # noqa: E402
from deepep_megatron.launch import free_port  # noqa: E402

RANKS, TOKENS, HIDDEN, TOPK, EXPERTS, CHANNELS = 2, 256, 512, 8, 16, 12
#: The low-latency calls' shape (issue 14's benchmark: 128 tokens, top-8 of 64; hidden kept small).
LL_TOKENS, LL_EXPERTS = 128, 64


class StandInRuntime:
    """What CudaBackend calls on ``_C.Runtime`` for the normal path, answered with prepared tensors."""

    def __init__(self, rows: int) -> None:
        i32 = dict(dtype=torch.int32)
        self.recv_x = torch.zeros(rows, HIDDEN, dtype=torch.bfloat16)
        self.meta = (torch.zeros(rows, TOPK, dtype=torch.int64), torch.zeros(rows, TOPK), torch.zeros(rows, **i32))
        self.layout = (torch.zeros(TOKENS, RANKS, **i32), torch.zeros(RANKS, TOKENS, **i32), torch.zeros(RANKS, CHANNELS, **i32),
                       torch.zeros(RANKS, CHANNELS + 1, **i32), torch.full((RANKS,), rows // RANKS, **i32),
                       torch.zeros(RANKS, RANKS, **i32), torch.zeros(RANKS + EXPERTS // RANKS, **i32))
        self.host_counts = [rows // RANKS] * RANKS + [rows // (EXPERTS // RANKS)] * (EXPERTS // RANKS)
        self.host_per_rank = torch.tensor(self.host_counts[:RANKS], dtype=torch.int32)  # made by _C on the host
        self.combined = (torch.zeros(TOKENS, HIDDEN, dtype=torch.bfloat16), None)

    def has_error(self) -> bool:
        return False

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> tuple:
        i32 = dict(dtype=torch.int32)
        return torch.zeros(RANKS, **i32), torch.zeros(num_experts, **i32), torch.ones(topk_idx.size(0), RANKS, dtype=torch.bool)

    def dispatch(self, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, expert_alignment,
                 num_channels, slots, chunk, num_worst_tokens) -> tuple:
        send_position, send_tokens, channel_count, offsets, send_counts, prefix, recv_counts = self.layout
        per_rank = recv_counts[:RANKS] if num_worst_tokens else self.host_per_rank
        return (self.recv_x, None, *self.meta, send_position, send_tokens, channel_count, offsets, send_counts, prefix,
                recv_counts, self.host_counts, per_rank, offsets[:, :num_channels])

    def cached_dispatch(self, *args) -> tuple:
        return self.recv_x, None

    def combine(self, *args) -> tuple:
        return self.combined


def _stand_in_backend(group: Any, rows: int) -> CudaBackend:
    """A CudaBackend whose _C.Runtime is the stand-in (its __init__ needs a GPU and the extension)."""
    backend = CudaBackend.__new__(CudaBackend)
    backend.group, backend.rank, backend.num_ranks = group, 0, RANKS
    backend.num_nvl_bytes, backend.num_rdma_bytes, backend.low_latency_mode = 1 << 30, 0, False
    backend.device = torch.device("cpu")
    backend._runtime = StandInRuntime(rows)
    backend._error = None
    return backend


class StandInLowLatency:
    """What LowLatencyKernels calls on ``_C.LowLatency``, answered with prepared tensors."""

    timeout_s = 10.0

    def __init__(self) -> None:
        local, slots = LL_EXPERTS // RANKS, RANKS * LL_TOKENS
        self.dispatched = (torch.zeros(local, slots, HIDDEN, dtype=torch.float8_e4m3fn),
                           torch.zeros(local, slots, HIDDEN // 128), torch.zeros(local, dtype=torch.int32),
                           torch.zeros(local, slots, dtype=torch.int32), torch.zeros(local, RANKS, dtype=torch.int64),
                           torch.zeros(LL_TOKENS, TOPK, dtype=torch.int32))
        self.combined = torch.zeros(LL_TOKENS, HIDDEN, dtype=torch.bfloat16)

    def has_error(self) -> bool:
        return False

    def dispatch(self, *args) -> tuple:
        return self.dispatched

    def combine(self, *args) -> torch.Tensor:
        return self.combined


def _stand_in_low_latency(group: Any) -> LowLatencyBackend:
    """A LowLatencyBackend whose kernels' _C.LowLatency is the stand-in (their __init__ needs NVSHMEM)."""
    if low_latency_module._C is None:  # a CPU-only install: the constants and the error class the calls name
        low_latency_module._C = types.SimpleNamespace(LL_SEND=1, LL_RECV=2, LowLatencyError=RuntimeError)
    kernels = LowLatencyKernels.__new__(LowLatencyKernels)
    kernels.group, kernels.rank, kernels.num_ranks, kernels.device = group, 0, RANKS, torch.device("cpu")
    kernels.num_blocks, kernels._ll, kernels._half, kernels._error = 64, StandInLowLatency(), 0, None
    backend = LowLatencyBackend.__new__(LowLatencyBackend)
    backend._low_latency = kernels
    return backend


def _median_us(op: Callable[[], Any], calls: int) -> float:
    for _ in range(min(calls, 200)):
        op()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        op()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--top", type=int, default=12, help="cProfile rows of the cached dispatch")
    args = parser.parse_args()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 30, backend="reference")
    rows = TOKENS * RANKS
    buffer.runtime = _stand_in_backend(dist.group.WORLD, rows)
    buffer.group_size = RANKS  # the stand-in plays rank 0 of an EP2 group
    config = Config(2 * CHANNELS, 6, 256)
    x = torch.randn(TOKENS, HIDDEN).to(torch.bfloat16)
    topk_idx = torch.randint(0, EXPERTS, (TOKENS, TOPK))
    topk_weights = torch.rand(TOKENS, TOPK)
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, EXPERTS)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                  topk_idx=topk_idx, topk_weights=topk_weights, config=config)
    handle = buffer.dispatch(x, **layout)[4]
    y = torch.zeros(handle.num_recv_tokens, HIDDEN, dtype=torch.bfloat16)
    ll_buffer = Buffer(dist.group.WORLD, 0, Buffer.get_low_latency_rdma_size_hint(LL_TOKENS, HIDDEN, RANKS, LL_EXPERTS),
                       low_latency_mode=True, backend="reference")
    ll_buffer.runtime = _stand_in_low_latency(dist.group.WORLD)
    ll_buffer.group_size = RANKS
    ll_x = x[:LL_TOKENS]
    ll_idx = torch.stack([torch.randperm(LL_EXPERTS)[:TOPK] for _ in range(LL_TOKENS)])
    ll_weights = topk_weights[:LL_TOKENS]
    ll_handle = ll_buffer.low_latency_dispatch(ll_x, ll_idx, LL_TOKENS, LL_EXPERTS)[2]
    ll_y = torch.zeros(LL_EXPERTS // RANKS, RANKS * LL_TOKENS, HIDDEN, dtype=torch.bfloat16)
    ll_stats = torch.zeros(LL_EXPERTS // RANKS, dtype=torch.int32)
    ops = {
        "get_dispatch_layout": lambda: buffer.get_dispatch_layout(topk_idx, EXPERTS),
        "dispatch (full)": lambda: buffer.dispatch(x, **layout),
        "dispatch num_worst_tokens": lambda: buffer.dispatch(x, num_worst_tokens=rows, **layout),
        "cached dispatch": lambda: buffer.dispatch(x, handle=handle, config=config),
        "combine": lambda: buffer.combine(y, handle, config=config),
        "low_latency_dispatch fp8": lambda: ll_buffer.low_latency_dispatch(ll_x, ll_idx, LL_TOKENS, LL_EXPERTS),
        "low_latency_dispatch fp8 + recv stats": lambda: ll_buffer.low_latency_dispatch(
            ll_x, ll_idx, LL_TOKENS, LL_EXPERTS, cumulative_local_expert_recv_stats=ll_stats),
        "low_latency_dispatch fp8, hook + hook()": lambda: ll_buffer.low_latency_dispatch(
            ll_x, ll_idx, LL_TOKENS, LL_EXPERTS, return_recv_hook=True)[4](),
        "low_latency_combine": lambda: ll_buffer.low_latency_combine(ll_y, ll_idx, ll_weights, ll_handle),
    }
    print(f"# Python host time per call (median of {args.calls}; _C.Runtime stood in), {torch.__version__}, "
          f"{os.cpu_count()} CPUs\n\n| op | us |\n|---|---|")
    for name, op in ops.items():
        print(f"| {name} | {_median_us(op, args.calls):.1f} |")
    for name in ("cached dispatch", "low_latency_dispatch fp8"):
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(2000):
            ops[name]()
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
        print(f"\ncProfile of 2000 calls of {name} (own time):\n" + text.getvalue())
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
