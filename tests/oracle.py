"""Random test cases and their expected results, computed from every rank's inputs.

Each rank draws its inputs from a generator seeded by (case seed, rank), so any process can
regenerate every rank's inputs and compute what each rank must receive, with no communication.
Used by the CPU tests (reference backend) and the GPU tests (kernels), so both check one oracle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from deepep_megatron.fp8 import per_token_cast_to_fp8


@dataclass(frozen=True)
class Case:
    """One dispatch/combine scenario.

    ``tokens`` gives T per rank; ``starved_rank`` (if set) owns experts nobody routes to, so it
    receives nothing; ``drop`` is the probability that a top-k slot is -1, and ``empty_tokens`` that
    a whole token routes nowhere.
    """

    world_size: int
    tokens: tuple[int, ...]
    hidden: int
    num_topk: int
    num_experts: int
    seed: int = 0
    dtype: torch.dtype = torch.bfloat16
    starved_rank: Optional[int] = None
    drop: float = 0.1
    empty_tokens: float = 0.05

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size


def make_inputs(case: Case, rank: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [T, H] case.dtype, topk_idx [T, K] int64, topk_weights [T, K] fp32)`` of ``rank``; never zeros."""
    g = torch.Generator().manual_seed(case.seed * 1009 + rank)
    num_tokens = case.tokens[rank]
    x = (torch.randn(num_tokens, case.hidden, generator=g) * 3 + 0.5).to(case.dtype)
    allowed = torch.arange(case.num_experts)
    if case.starved_rank is not None:
        owner = allowed // case.num_local_experts
        allowed = allowed[owner != case.starved_rank]
    k = min(case.num_topk, allowed.numel())
    scores = torch.rand(num_tokens, allowed.numel(), generator=g)
    topk_idx = allowed[scores.topk(k, dim=1).indices]
    if k < case.num_topk:
        topk_idx = torch.cat([topk_idx, torch.full((num_tokens, case.num_topk - k), -1)], dim=1)
    topk_idx = torch.where(torch.rand(topk_idx.shape, generator=g) < case.drop, torch.full_like(topk_idx, -1), topk_idx)
    empty = torch.rand(num_tokens, generator=g) < case.empty_tokens
    topk_idx[empty] = -1
    topk_weights = torch.rand(num_tokens, case.num_topk, generator=g) + 0.1
    return x.to(device), topk_idx.to(device), topk_weights.to(device)


@dataclass
class Expected:
    """What one rank must receive: rows ordered by (source rank, source token)."""

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    recv_src_rank: torch.Tensor
    recv_src_idx: torch.Tensor
    num_recv_tokens_per_expert: list[int]


def expected_dispatch(case: Case, rank: int, expert_alignment: int = 1) -> Expected:
    lo, hi = rank * case.num_local_experts, (rank + 1) * case.num_local_experts
    xs, idxs, ws, srcs, src_ranks = [], [], [], [], []
    for src in range(case.world_size):
        x, topk_idx, topk_weights = make_inputs(case, src)
        local = (topk_idx >= lo) & (topk_idx < hi)
        mask = local.any(dim=1)
        xs.append(x[mask])
        idxs.append(torch.where(local, topk_idx - lo, -1)[mask])
        ws.append(torch.where(local, topk_weights, 0.0)[mask])
        srcs.append(torch.nonzero(mask).flatten())
        src_ranks.append(torch.full((int(mask.sum()),), src))
    recv_idx = torch.cat(idxs)
    counts = torch.bincount(recv_idx[recv_idx >= 0], minlength=case.num_local_experts).tolist()
    counts = [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in counts]
    return Expected(torch.cat(xs), recv_idx, torch.cat(ws), torch.cat(src_ranks), torch.cat(srcs), counts)


def expert_transform(recv_x: torch.Tensor, rank: int) -> torch.Tensor:
    """A stand-in for the experts that differs per rank, so combine's sum is checkable."""
    return (recv_x.float() * (rank + 1) + rank).to(recv_x.dtype)


def expected_combine(case: Case, rank: int) -> torch.Tensor:
    """Combine of ``expert_transform`` outputs, for the tokens of ``rank``: fp32 sum in rank order."""
    x, topk_idx, _ = make_inputs(case, rank)
    owner = torch.where(topk_idx >= 0, topk_idx // case.num_local_experts, -1)
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for dst in range(case.world_size):
        hit = (owner == dst).any(dim=1)
        acc[hit] += expert_transform(x[hit], dst).float()
    return acc.to(case.dtype)


def expected_low_latency(
    case: Case, rank: int, max_tokens: int, use_fp8: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per local expert of ``rank``: the rows it receives (dequantization-free: bf16 or the e4m3
    pair's data) and their source token ids, grouped by source rank then token."""
    rows: list[list[torch.Tensor]] = [[] for _ in range(case.num_local_experts)]
    srcs: list[list[torch.Tensor]] = [[] for _ in range(case.num_local_experts)]
    lo = rank * case.num_local_experts
    for src in range(case.world_size):
        x, topk_idx, _ = make_inputs(case, src)
        payload = per_token_cast_to_fp8(x)[0] if use_fp8 else x
        for e in range(case.num_local_experts):
            hit = (topk_idx == lo + e).any(dim=1)
            rows[e].append(payload[hit])
            srcs[e].append(torch.nonzero(hit).flatten())
    return [torch.cat(r) for r in rows], [torch.cat(s) for s in srcs]


def expected_low_latency_combine(case: Case, rank: int) -> torch.Tensor:
    """``sum_k w[t, k] * expert_out`` where expert e's output is ``x * (e + 1)`` (bf16), k ascending, fp32."""
    x, topk_idx, topk_weights = make_inputs(case, rank)
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(case.num_topk):
        valid = topk_idx[:, k] >= 0
        e = topk_idx[valid, k]
        y = (x[valid].float() * (e % case.num_local_experts + 1).unsqueeze(1).float()).to(x.dtype)
        acc[valid] += topk_weights[valid, k].unsqueeze(1) * y.float()
    return acc.to(x.dtype)
