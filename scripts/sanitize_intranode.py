#!/usr/bin/env python3
"""compute-sanitizer (memcheck + racecheck) over a small EP2 dispatch/combine of the cuda backend
(bf16, FP8, cached, num_worst_tokens, combine with weights).

    python scripts/sanitize_intranode.py [--tools memcheck,racecheck]

Each rank runs in its own process under ``compute-sanitizer --tool T``; ranks go to GPU
``rank % device_count`` and talk over gloo (IPC handles) and CUDA IPC. With one GPU and no MPS the two
processes time-slice the GPU, which is slow but finishes for this small case (the kernel timeout
is raised to 300 s). Exit status 0 only if every tool reports no error and results match the
reference backend. Prints one line per tool last.
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

    from deepep_megatron import Buffer, Config, per_token_cast_to_fp8
    from oracle import Case, expert_transform, make_inputs

    config = Config(4, 6, 64)
    case = Case(world, tokens=(37, 52), hidden=256, num_topk=3, num_experts=8, seed=3)
    fast = Buffer(dist.group.WORLD, num_nvl_bytes=config.get_nvl_buffer_size_hint(256 * 4, world), explicitly_destroy=True, backend="cuda")
    ref = Buffer(dist.group.WORLD, backend="reference")
    x, topk_idx, topk_weights = make_inputs(case, rank, device="cuda")
    per_rank, _, per_expert, in_rank, _ = fast.get_dispatch_layout(topk_idx, case.num_experts)
    for x_in in (x, per_token_cast_to_fp8(x)):
        args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                    topk_idx=topk_idx, topk_weights=topk_weights, config=config)
        out_fast, out_ref = fast.dispatch(x_in, **args), ref.dispatch(x_in, **args)
        a = out_fast[0] if isinstance(x_in, torch.Tensor) else out_fast[0][0].view(torch.uint8)
        b = out_ref[0] if isinstance(x_in, torch.Tensor) else out_ref[0][0].view(torch.uint8)
        assert torch.equal(a.cpu(), b.cpu()), "dispatch differs from the reference"
        cached = fast.dispatch(x_in, handle=out_fast[4], config=config)[0]
        c = cached if isinstance(x_in, torch.Tensor) else cached[0].view(torch.uint8)
        assert torch.equal(c.cpu(), b.cpu()), "cached dispatch differs from the reference"
    recv, _, recv_w, _, handle, _ = fast.dispatch(x, **args)
    _, _, _, _, handle_ref, _ = ref.dispatch(x, **args)
    y = expert_transform(recv, rank)
    comb = fast.combine(y, handle, topk_weights=recv_w, config=config)
    comb_ref = ref.combine(y, handle_ref, topk_weights=recv_w)
    assert torch.equal(comb[0].cpu(), comb_ref[0].cpu()), "combine differs from the reference"
    assert torch.equal(comb[1].cpu(), comb_ref[1].cpu()), "combined weights differ from the reference"
    # num_worst_tokens: no host sync, padding rows written by the receivers, combine of all the rows
    worst = sum(case.tokens)
    w_fast = fast.dispatch(x, num_worst_tokens=worst, **args)
    w_ref = ref.dispatch(x, num_worst_tokens=worst, **args)
    real = handle_ref.num_recv_tokens
    assert torch.equal(w_fast[0][:real].cpu(), w_ref[0][:real].cpu()), "worst-case dispatch differs from the reference"
    assert torch.equal(w_fast[1].cpu(), w_ref[1].cpu()), "worst-case top-k (padding -1) differs from the reference"
    y_worst = expert_transform(w_ref[0], rank)
    assert torch.equal(fast.combine(y_worst, w_fast[4], config=config)[0].cpu(), ref.combine(y_worst, w_ref[4])[0].cpu()), \
        "combine of a worst-case dispatch differs from the reference"
    fast.runtime.synchronize()
    fast.destroy()


def main() -> int:
    return sanitize_main(__file__, child, 2, {"DEEPEP_MEGATRON_TIMEOUT_S": "300"}, timeout_s=900)


if __name__ == "__main__":
    sys.exit(main())
