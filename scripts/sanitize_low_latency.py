#!/usr/bin/env python3
"""compute-sanitizer (memcheck + racecheck) over a small EP2 low-latency dispatch/combine of the NVSHMEM
kernels (bf16 and FP8 dispatch, the receive hook, combine, zero-copy combine).

    python scripts/sanitize_low_latency.py [--tools memcheck,racecheck]

Each rank runs in its own process under ``compute-sanitizer --tool T`` on GPU ``rank % device_count``
and talks over gloo (the NVSHMEM unique id) and NVSHMEM's P2P transport; the kernels' wait bound is
300 s. NVSHMEM puts two PEs on one GPU only under MPS, so on a one-GPU machine this needs MPS running
(and a compute-sanitizer that attaches to MPS clients); a two-GPU machine needs neither (run clean on one
H200 under MPS, docs/perf.md). Exit status 0 only if every tool reports no error and the results match the reference backend.
Prints one line per tool last.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from deepep_megatron.launch import sanitize_main  # noqa: E402 - after the path insert


def child(rank: int, world: int) -> None:
    """One rank's case (its device set and its gloo group joined by sanitize_main)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch
    import torch.distributed as dist

    from deepep_megatron import Buffer
    from oracle import Case, make_inputs

    max_tokens = 16
    case = Case(world, tokens=(13, 16), hidden=256, num_topk=2, num_experts=4, seed=5)
    hint = Buffer.get_low_latency_rdma_size_hint(max_tokens, case.hidden, world, case.num_experts)
    fast = Buffer(dist.group.WORLD, 0, hint, low_latency_mode=True, backend="cuda", explicitly_destroy=True, timeout_s=300)
    ref = Buffer(dist.group.WORLD, 0, hint, low_latency_mode=True, backend="reference")
    x, topk_idx, topk_weights = (t.cuda() for t in make_inputs(case, rank))
    E = case.num_experts
    for use_fp8 in (False, True):
        g = fast.low_latency_dispatch(x, topk_idx, max_tokens, E, use_fp8=use_fp8, round_scale=use_fp8)
        w = ref.low_latency_dispatch(x, topk_idx, max_tokens, E, use_fp8=use_fp8, round_scale=use_fp8)
        assert torch.equal(g[1].cpu(), w[1].cpu()), "recv_count differs from the reference"
        assert torch.equal(g[2][0].cpu(), w[2][0].cpu()), "recv_src_info differs from the reference"
        h = fast.low_latency_dispatch(x, topk_idx, max_tokens, E, use_fp8=use_fp8, round_scale=use_fp8,
                                      return_recv_hook=True)
        h[4]()
        assert torch.equal(h[1].cpu(), w[1].cpu()), "hook recv_count differs from the reference"
    recv_x, count, handle, _, _ = fast.low_latency_dispatch(x, topk_idx, max_tokens, E, use_fp8=False)
    _, _, handle_ref, _, _ = ref.low_latency_dispatch(x, topk_idx, max_tokens, E, use_fp8=False)
    y = (recv_x.float() * 0.5).to(torch.bfloat16)
    valid = torch.arange(y.size(1), device=y.device).unsqueeze(0) < count.unsqueeze(1)
    y = torch.where(valid.unsqueeze(-1), y, torch.zeros_like(y))  # no NaN rows past the counts
    want = ref.low_latency_combine(y, topk_idx, topk_weights, handle_ref)[0]
    got = fast.low_latency_combine(y, topk_idx, topk_weights, handle)[0]
    assert torch.allclose(got.float().cpu(), want.float().cpu(), rtol=2 ** -7, atol=1e-6), "combine differs"
    staged = fast.get_next_low_latency_combine_buffer(handle)
    staged.copy_(y)
    got = fast.low_latency_combine(y, topk_idx, topk_weights, handle, zero_copy=True)[0]
    assert torch.allclose(got.float().cpu(), want.float().cpu(), rtol=2 ** -7, atol=1e-6), "zero-copy combine differs"
    torch.cuda.synchronize()
    fast.destroy()


def main() -> int:
    return sanitize_main(__file__, child, 2, None, timeout_s=600)


if __name__ == "__main__":
    sys.exit(main())
