"""Differentiable dispatch/combine against a single-process dense MoE (values and gradients)."""
from __future__ import annotations

import pytest
import torch

from harness import run_ranks
from oracle import Case, make_inputs, reference_fp8_round_trip


def _expert_weights(case: Case) -> torch.Tensor:
    """[E, H, H] fp32 weights of linear experts, the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(case.num_experts, case.hidden, case.hidden, generator=g) / case.hidden**0.5


def _dense(case: Case, rank: int, quantize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every token through its top-k experts, weighted: out [T, H], and d(sum(out * cot))/dx, /dw.

    With ``quantize`` the experts see x after the oracle's FP8 round trip (what the FP8 wire
    delivers; not the code under test's cast); the experts are linear, so d/dx is the exact gradient
    either way (straight-through)."""
    x, topk_idx, topk_weights = make_inputs(case, rank)
    x = x.float()
    if quantize:
        x = reference_fp8_round_trip(x)
    x = x.requires_grad_()
    w = topk_weights.clone().requires_grad_()
    experts = _expert_weights(case)
    out = torch.zeros(x.shape)
    for k in range(case.num_topk):
        valid = topk_idx[:, k] >= 0
        y = torch.einsum("th,thd->td", x[valid], experts[topk_idx[valid, k]])
        out = out.index_add(0, torch.nonzero(valid).flatten(), w[valid, k].unsqueeze(1) * y)
    cot = _cotangent(case, rank, x.shape)
    (out * cot).sum().backward()
    return out.detach(), x.grad, w.grad, topk_idx


def _cotangent(case: Case, rank: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(99 + rank))


def _distributed(rank: int, world_size: int, case: Case, use_fp8: bool) -> None:
    import torch.distributed as dist

    from deepep_megatron import Buffer
    from deepep_megatron.autograd import combine, dispatch

    buffer = Buffer(dist.group.WORLD)
    x, topk_idx, topk_weights = make_inputs(case, rank)
    x = x.float().requires_grad_()
    w = topk_weights.clone().requires_grad_()
    recv_x, recv_idx, recv_w, counts, handle = dispatch(buffer, x, topk_idx, w, case.num_experts, use_fp8=use_fp8)
    assert sum(counts) == int((recv_idx >= 0).sum())
    experts = _expert_weights(case)[rank * case.num_local_experts : (rank + 1) * case.num_local_experts]
    y = torch.zeros(recv_x.shape)
    for k in range(case.num_topk):
        valid = recv_idx[:, k] >= 0
        contrib = torch.einsum("th,thd->td", recv_x[valid], experts[recv_idx[valid, k]])
        y = y.index_add(0, torch.nonzero(valid).flatten(), recv_w[valid, k].unsqueeze(1) * contrib)
    out = combine(buffer, y, handle)
    (out * _cotangent(case, rank, out.shape)).sum().backward()

    ref_out, ref_gx, ref_gw, _ = _dense(case, rank, quantize=use_fp8)
    # Both sides sum the same fp32 products, in different orders (per-rank partial sums vs one
    # dense loop): a few ulps of values ~1-10, far below what a wrong route or scale would change.
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(x.grad, ref_gx, **tol)
    torch.testing.assert_close(w.grad, torch.where(topk_idx >= 0, ref_gw, 0.0), **tol)


@pytest.mark.parametrize(
    "world_size,use_fp8", [(2, False), (4, False), (2, True)]
)
def test_autograd_matches_dense(world_size: int, use_fp8: bool) -> None:
    case = Case(world_size, tokens=tuple(23 + 4 * r for r in range(world_size)), hidden=128, num_topk=3,
                num_experts=2 * world_size, seed=21, dtype=torch.float32)
    run_ranks(_distributed, world_size, case, use_fp8)
