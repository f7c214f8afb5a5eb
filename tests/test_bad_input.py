"""Bad input gets a clear error naming the argument, before any communication starts."""
from __future__ import annotations

import pytest
import torch

from harness import run_ranks


def _bad_calls(buffer, other, ll_buffer):
    """(description, callable, exception type, message regex). Every rank makes the same calls."""
    from deepep_megatron import Buffer, Config, per_token_cast_to_fp8

    T, H, E = 6, 256, 8
    x = torch.randn(T, H, dtype=torch.bfloat16)
    topk_idx = torch.tensor([[0, 5], [1, -1], [7, 2], [-1, -1], [3, 4], [6, 0]])
    weights = torch.rand(T, 2)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    _, _, _, _, other_handle, _ = other.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    x_fp8, scales = per_token_cast_to_fp8(x)
    _, _, ll_handle, _, _ = ll_buffer.low_latency_dispatch(x, topk_idx, 8, E, use_fp8=False)
    ll_x = torch.randn(E // 2, 16, H, dtype=torch.bfloat16)
    return [
        ("topk_idx int32", lambda: buffer.get_dispatch_layout(topk_idx.int(), E), TypeError, "topk_idx must have dtype int64"),
        ("topk_idx 1-D", lambda: buffer.get_dispatch_layout(topk_idx[:, 0], E), ValueError, r"topk_idx must have shape \[\*, \*\]"),
        ("expert id too large", lambda: buffer.get_dispatch_layout(topk_idx + 2, E), ValueError, r"topk_idx values must be in \[-1, num_experts=8\)"),
        ("expert id below -1", lambda: buffer.get_dispatch_layout(topk_idx - 1, E), ValueError, "topk_idx values"),
        ("experts not divisible", lambda: buffer.get_dispatch_layout(topk_idx, 7), ValueError, r"num_experts \(7\) must be divisible by the number of ranks \(2\)"),
        ("num_experts float", lambda: buffer.get_dispatch_layout(topk_idx, 8.0), ValueError, "num_experts must be a positive int"),
        ("top-k too large", lambda: buffer.get_dispatch_layout(torch.zeros(T, 17, dtype=torch.int64), E), ValueError, "top-k"),
        ("x int", lambda: buffer.dispatch(x.int(), topk_idx=topk_idx, **layout), TypeError, "x must have dtype bfloat16 or float32"),
        ("x 3-D", lambda: buffer.dispatch(x.unsqueeze(0), topk_idx=topk_idx, **layout), ValueError, "x must have shape"),
        ("fp8 hidden", lambda: buffer.dispatch((x_fp8[:, :100], scales), topk_idx=topk_idx, **layout), ValueError, "divisible by 128"),
        ("fp8 scales shape", lambda: buffer.dispatch((x_fp8, scales[:, :1]), topk_idx=topk_idx, **layout), ValueError, "FP8 scales"),
        ("fp8 triple", lambda: buffer.dispatch((x_fp8, scales, scales), topk_idx=topk_idx, **layout), ValueError, "pair"),
        ("weights fp16", lambda: buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights.half(), **layout), TypeError, "topk_weights must have dtype float32"),
        ("weights shape", lambda: buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights[:, :1], **layout), ValueError, "topk_weights must have shape"),
        ("is_token_in_rank shape", lambda: buffer.dispatch(x, topk_idx=topk_idx, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank[:3], num_tokens_per_expert=per_expert), ValueError, "is_token_in_rank must have shape"),
        ("topk_idx rows", lambda: buffer.dispatch(x, topk_idx=topk_idx[:3], **layout), ValueError, r"topk_idx must have shape \[6, \*\]"),
        ("no layout", lambda: buffer.dispatch(x, topk_idx=topk_idx), ValueError, "missing num_tokens_per_rank, is_token_in_rank"),
        ("device mismatch", lambda: buffer.dispatch(x, topk_idx=topk_idx.to("meta"), **layout), ValueError, "topk_idx is on meta but x is on cpu"),
        ("alignment 0", lambda: buffer.dispatch(x, topk_idx=topk_idx, expert_alignment=0, **layout), ValueError, "expert_alignment"),
        ("config type", lambda: buffer.dispatch(x, topk_idx=topk_idx, config={"num_sms": 20}, **layout), TypeError, "config must be"),
        ("event type", lambda: buffer.dispatch(x, topk_idx=topk_idx, previous_event="e", **layout), TypeError, "previous_event must be an EventOverlap"),
        ("foreign handle", lambda: buffer.combine(recv_x, other_handle), ValueError, "another Buffer"),
        ("handle type", lambda: buffer.combine(recv_x, (1, 2, 3)), TypeError, "handle must be the DispatchHandle"),
        ("combine rows", lambda: buffer.combine(recv_x[1:], handle), ValueError, "x must have shape"),
        ("combine weights rows", lambda: buffer.combine(recv_x, handle, topk_weights=recv_w[1:]), ValueError, r"topk_weights must have shape \[\d+, 2\]"),
        ("combine weights top-k", lambda: buffer.combine(recv_x, handle, topk_weights=recv_w[:, :1]), ValueError, r"topk_weights must have shape \[\d+, 2\]"),
        ("combine weights fp64", lambda: buffer.combine(recv_x, handle, topk_weights=recv_w.double()), TypeError, "topk_weights must have dtype float32"),
        ("rdma counts intranode", lambda: buffer.dispatch(x, topk_idx=topk_idx, num_tokens_per_rdma_rank=per_rank, **layout), ValueError, "num_tokens_per_rdma_rank must be None for intranode"),
        ("cached dispatch tokens", lambda: buffer.dispatch(x[:2], handle=handle), ValueError, "x has 2 tokens but the handle was made for 6"),
        ("cached dispatch extras", lambda: buffer.dispatch(x, handle=handle, topk_idx=topk_idx), ValueError, "takes only x"),
        ("nvl buffer too small", lambda: Buffer(buffer.group, num_nvl_bytes=4096).dispatch(x, topk_idx=topk_idx, **layout), RuntimeError, r"needs \d+ bytes of NVLink buffer"),
        ("low latency off", lambda: buffer.low_latency_dispatch(x, topk_idx, 8, E), RuntimeError, "low_latency_mode=True"),
        ("too many ll tokens", lambda: ll_buffer.low_latency_dispatch(x, topk_idx, 4, E), ValueError, "num_max_dispatch_tokens_per_rank=4"),
        ("rdma buffer too small", lambda: ll_buffer.low_latency_dispatch(x, topk_idx, 4096, E), RuntimeError, r"needs \d+ bytes of RDMA buffer"),
        ("ll x fp32", lambda: ll_buffer.low_latency_dispatch(x.float(), topk_idx, 8, E), TypeError, "x must have dtype bfloat16"),
        ("ll combine shape", lambda: ll_buffer.low_latency_combine(ll_x[:, :8], topk_idx, weights, ll_handle), ValueError, "x must have shape"),
        ("ll combine topk", lambda: ll_buffer.low_latency_combine(ll_x, topk_idx[:, :1], weights[:, :1], ll_handle), ValueError, "top-k 1"),
        ("ll combine out shape", lambda: ll_buffer.low_latency_combine(ll_x, topk_idx, weights, ll_handle, out=torch.empty(T, H + 128, dtype=torch.bfloat16)), ValueError, rf"out must have shape \[{T}, {H}\]"),
        ("ll combine out fp32", lambda: ll_buffer.low_latency_combine(ll_x, topk_idx, weights, ll_handle, out=torch.empty(T, H)), TypeError, "out must have dtype bfloat16"),
        ("ll combine weights fp16", lambda: ll_buffer.low_latency_combine(ll_x, topk_idx, weights.half(), ll_handle), TypeError, "topk_weights must have dtype float32"),
        ("ll combine logfmt", lambda: ll_buffer.low_latency_combine(ll_x, topk_idx, weights, ll_handle, use_logfmt=True), ValueError, "use_logfmt"),
        ("qps 0", lambda: Buffer(buffer.group, num_rdma_bytes=1 << 20, low_latency_mode=True, num_qps_per_rank=0), ValueError, "num_qps_per_rank must be a positive int"),
        ("qps float", lambda: Buffer(buffer.group, num_qps_per_rank=2.0), ValueError, "num_qps_per_rank must be a positive int"),
        ("negative buffer", lambda: Buffer(buffer.group, num_nvl_bytes=-1), ValueError, "num_nvl_bytes must be a non-negative int"),
        ("unknown backend", lambda: Buffer(buffer.group, backend="nccl"), ValueError, "backend must be one of"),
        ("cuda unavailable", lambda: Buffer(buffer.group, num_nvl_bytes=1 << 20, backend="cuda"), RuntimeError, "compiled extension"),
        ("config odd sms", lambda: Config(num_sms=5), ValueError, "even"),
    ]


def _check_all(rank: int, world_size: int) -> list[str]:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    group = dist.group.WORLD
    buffer, other = Buffer(group, explicitly_destroy=True), Buffer(group)
    ll_buffer = Buffer(group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(8, 256, world_size, 8), low_latency_mode=True)
    calls = _bad_calls(buffer, other, ll_buffer)
    for description, call, error, pattern in calls:
        with pytest.raises(error, match=pattern):
            call()
    buffer.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.get_dispatch_layout(torch.zeros(1, 1, dtype=torch.int64), 8)
    # after all those refusals the ranks are still in step: a real exchange still works
    x = torch.randn(3, 128)
    idx = torch.tensor([[0], [1], [-1]])
    per_rank, _, per_expert, in_rank, _ = other.get_dispatch_layout(idx, 2)
    recv, *_ = other.dispatch(x, topk_idx=idx, topk_weights=torch.ones(3, 1), num_tokens_per_rank=per_rank,
                              is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    assert recv.shape == (2, 128)
    return [description for description, *_ in calls]


def test_bad_input_is_refused_clearly() -> None:
    checked = run_ranks(_check_all, 2)
    assert checked[0] == checked[1] and len(set(checked[0])) == len(checked[0])
    # the refusals a review found untested (issue 17) stay in the list
    assert {"combine weights rows", "combine weights fp64", "rdma counts intranode", "ll combine out shape",
            "ll combine out fp32", "ll combine logfmt", "qps 0", "combine weights top-k"} <= set(checked[0])
