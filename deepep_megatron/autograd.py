"""Dispatch and combine as autograd functions: each is the other's backward.

* ``dispatch`` forward is ``Buffer.dispatch``; its backward is ``Buffer.combine`` of the gradients
  with the saved handle, so gradients reach ``x`` and ``topk_weights``.
* ``combine`` forward is ``Buffer.combine``; its backward is a cached ``Buffer.dispatch`` of the
  gradient with the same handle.

The handle is also what the caller passes from ``dispatch`` to ``combine``.
"""
from __future__ import annotations

import torch

from .buffer import Buffer, DispatchHandle
from .fp8 import per_token_cast_back, per_token_cast_to_fp8


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, x, topk_weights, topk_idx, num_experts, expert_alignment, num_worst_tokens, use_fp8, side):
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
            topk_idx, num_experts
        )
        wire_x = per_token_cast_to_fp8(x) if use_fp8 else x
        recv_x, recv_topk_idx, recv_topk_weights, counts, handle, _ = buffer.dispatch(
            wire_x,
            num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
        )
        if use_fp8:
            recv_x = per_token_cast_back(*recv_x, dtype=x.dtype)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(recv_topk_idx)
        ctx.mark_non_differentiable(recv_topk_idx)
        side.extend([counts, handle])  # non-tensor outputs leave through a side list
        return recv_x, recv_topk_idx, recv_topk_weights

    @staticmethod
    def backward(ctx, grad_recv_x, _grad_recv_topk_idx, grad_recv_topk_weights):
        (recv_topk_idx,) = ctx.saved_tensors
        if grad_recv_weights_needed := ctx.needs_input_grad[2]:
            if grad_recv_topk_weights is None:
                grad_recv_topk_weights = torch.zeros(recv_topk_idx.shape, dtype=torch.float32, device=recv_topk_idx.device)
            # Weights of experts on other ranks were zeroed by dispatch: no gradient flows through them.
            grad_recv_topk_weights = torch.where(recv_topk_idx >= 0, grad_recv_topk_weights.float(), 0.0)
        grad_x, grad_topk_weights, _ = ctx.buffer.combine(
            grad_recv_x.contiguous(), ctx.handle, topk_weights=grad_recv_topk_weights if grad_recv_weights_needed else None
        )
        return None, grad_x, grad_topk_weights, None, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, x, handle):
        combined, _, _ = buffer.combine(x, handle)
        ctx.buffer, ctx.handle = buffer, handle
        return combined

    @staticmethod
    def backward(ctx, grad_combined):
        grad_x, *_ = ctx.buffer.dispatch(grad_combined.contiguous(), handle=ctx.handle)
        return None, grad_x, None


def dispatch(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    expert_alignment: int = 1,
    use_fp8: bool = False,
    num_worst_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], DispatchHandle]:
    """Differentiable dispatch.

    Args:
        x: [T, H] bf16/fp32 (may require grad).
        topk_idx: [T, K] int64 global expert ids, -1 = none.
        topk_weights: [T, K] fp32 routing probabilities (may require grad).
        use_fp8: send e4m3 with per-128-channel scales and dequantize to ``x.dtype`` on arrival; the
            gradient passes straight through the quantization.
        num_worst_tokens: > 0 for DeepEP's static-shape mode: the received tensors have exactly this
            many rows (real ones first, then top-k -1 / weight 0), the per-expert list is empty, and
            on the cuda backend neither direction syncs the host (CUDA-graph capturable).
    Returns:
        ``recv_x`` [N, H] (x's dtype), ``recv_topk_idx`` [N, K] local ids or -1, ``recv_topk_weights``
        [N, K] fp32, per-local-expert received counts, and the handle for :func:`combine`.
    """
    if not isinstance(buffer, Buffer):
        raise TypeError(f"buffer must be a deepep_megatron.Buffer, got {type(buffer).__name__}")
    if not isinstance(topk_weights, torch.Tensor):
        raise TypeError(f"topk_weights must be a torch.Tensor, got {type(topk_weights).__name__}")
    side: list = []
    recv_x, recv_topk_idx, recv_topk_weights = _Dispatch.apply(
        buffer, x, topk_weights, topk_idx, num_experts, expert_alignment, num_worst_tokens, use_fp8, side
    )
    counts, handle = side
    return recv_x, recv_topk_idx, recv_topk_weights, counts, handle


def combine(buffer: Buffer, x: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Differentiable combine: ``x`` [N, H] (rows as dispatch returned them) -> [T, H], summed over
    ranks in fp32. Its backward sends the gradient back along the same routes (cached dispatch)."""
    if not isinstance(buffer, Buffer):
        raise TypeError(f"buffer must be a deepep_megatron.Buffer, got {type(buffer).__name__}")
    return _Combine.apply(buffer, x, handle)


__all__ = ["dispatch", "combine"]
