"""Random test cases and their expected results, computed from every rank's inputs.

Each rank draws its inputs from a generator seeded by (case seed, rank), so any process can
regenerate every rank's inputs and compute what each rank must receive, with no communication.
Used by the CPU tests (reference backend) and the GPU tests (kernels), so both check one oracle.
The FP8 expectations come from :func:`reference_cast_to_fp8`, written here from the format's
definition: the oracle never calls the code under test (``deepep_megatron.fp8``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Union

import torch


#: e4m3 (float8_e4m3fn): largest finite magnitude, and channels that share one scale.
E4M3_MAX = 448.0
SCALE_BLOCK = 128
#: Block amax floor (DeepEP's): an all-zero block still gets a finite, non-zero scale.
AMAX_FLOOR = 1e-4


def reference_cast_to_fp8(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-channel e4m3 of ``x`` [T, H]: ``(data e4m3 [T, H], scales fp32 [T, H/128])``.

    Each block's scale is ``max(amax, 1e-4) / 448`` in fp32, so its largest value maps to 448; with
    ``round_scale`` the scale is rounded up to the next power of two, done on the fp32 bits (exponent
    + 1 unless the mantissa is already zero). Data: ``x / scale`` (fp32) rounded to nearest e4m3.
    """
    num_tokens, hidden = x.shape
    blocks = x.float().reshape(num_tokens, hidden // SCALE_BLOCK, SCALE_BLOCK)
    amax = blocks.abs().amax(dim=2).clamp_min(AMAX_FLOOR)
    scales = amax / E4M3_MAX
    if round_scale:
        bits = scales.view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).int()
        scales = (exponent << 23).view(torch.float32)
    data = (blocks / scales.unsqueeze(2)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return data.reshape(num_tokens, hidden), scales


def beyond_one_e4m3_step(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Elementwise: e4m3 codes ``got`` that are not within one code step of ``want`` (same sign,
    magnitude codes at most 1 apart) -- the bound of a cast that divides or multiplies by the
    reciprocal scale."""
    a, b = got.view(torch.uint8).to(torch.int16), want.view(torch.uint8).to(torch.int16)
    close = ((a & 0x80) == (b & 0x80)) & ((a & 0x7F) - (b & 0x7F)).abs().le(1)
    return ~close


def beyond_bf16_rounding(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Elementwise: values of ``got`` further than one bf16 rounding from ``want`` (NaN counts)."""
    got, want = got.float(), want.float()
    return ~((got - want).abs() <= want.abs() * 2.0 ** -7 + 1e-6)


def reference_cast_back(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 ``data * scale`` per 128-channel block (the inverse of :func:`reference_cast_to_fp8`)."""
    blocks = data.float().reshape(*data.shape[:-1], data.size(-1) // SCALE_BLOCK, SCALE_BLOCK)
    return (blocks * scales.unsqueeze(-1)).reshape(data.shape)


def reference_fp8_round_trip(x: torch.Tensor, round_scale: bool = False) -> torch.Tensor:
    """fp32 values that an FP8 wire delivers for ``x`` [T, H]."""
    return reference_cast_back(*reference_cast_to_fp8(x, round_scale))


def reference_pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 ``scales`` [..., G] as DeepEP's UE8M0 words: int32 [..., ceil(G / 4)], byte i
    (little end first) of word j = the fp32 exponent byte of scale 4j + i (0 past G)."""
    exponent_bytes = ((scales.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    groups = scales.size(-1)
    padded = torch.zeros(*scales.shape[:-1], -(-groups // 4) * 4, dtype=torch.uint8, device=scales.device)
    padded[..., :groups] = exponent_bytes
    # four bytes -> one int32 word by reinterpreting memory: byte 0 is the low byte on this host (and on GPUs)
    assert sys.byteorder == "little", "reference_pack_ue8m0 reinterprets bytes as little-endian int32"
    return padded.view(torch.int32)


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


@dataclass
class ExpectedLowLatency:
    """What each local expert of one rank receives in a low-latency dispatch, rows grouped by
    source rank then source token: ``rows[e]`` (x as sent, before any FP8 cast), ``src_tokens[e]``,
    and ``per_rank[e, r]`` rows from rank r (so the rows of rank r start at ``sum(per_rank[e, :r])``)."""

    rows: list[torch.Tensor]
    src_tokens: list[torch.Tensor]
    per_rank: torch.Tensor


def expected_low_latency(case: Case, rank: int) -> ExpectedLowLatency:
    rows: list[list[torch.Tensor]] = [[] for _ in range(case.num_local_experts)]
    srcs: list[list[torch.Tensor]] = [[] for _ in range(case.num_local_experts)]
    per_rank = torch.zeros(case.num_local_experts, case.world_size, dtype=torch.int64)
    lo = rank * case.num_local_experts
    for src in range(case.world_size):
        x, topk_idx, _ = make_inputs(case, src)
        for e in range(case.num_local_experts):
            hit = (topk_idx == lo + e).any(dim=1)
            rows[e].append(x[hit])
            srcs[e].append(torch.nonzero(hit).flatten())
            per_rank[e, src] = int(hit.sum())
    return ExpectedLowLatency([torch.cat(r) for r in rows], [torch.cat(s) for s in srcs], per_rank)


def reference_unpack_ue8m0(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of :func:`reference_pack_ue8m0`: int32 words [..., W] -> fp32 scales [..., num_groups]."""
    byte_shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32)
    exponent_bytes = (packed.unsqueeze(-1) >> byte_shifts) & 0xFF  # [..., W, 4], little end first
    exponents = exponent_bytes.reshape(*packed.shape[:-1], 4 * packed.size(-1))[..., :num_groups]
    return (exponents << 23).contiguous().view(torch.float32)


def low_latency_expert(x: torch.Tensor, local_expert: Union[int, torch.Tensor]) -> torch.Tensor:
    """The stand-in for local expert e of a low-latency test: fp32 ``x * (e + 1)`` rounded to bf16;
    ``local_expert`` is one id or one per row of ``x``."""
    factor = torch.as_tensor(local_expert, dtype=torch.float32).reshape(-1, 1) + 1
    return (x.float() * factor).to(torch.bfloat16)


def expected_low_latency_combine(case: Case, rank: int, use_fp8: bool = False, round_scale: bool = False) -> torch.Tensor:
    """``sum_k w[t, k] * low_latency_expert(x_t)`` (fp32, k ascending, then bf16), where the experts
    see x as dispatch delivers it: bf16, or with ``use_fp8`` its e4m3 round trip."""
    x, topk_idx, topk_weights = make_inputs(case, rank)
    seen = reference_fp8_round_trip(x, round_scale) if use_fp8 else x
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(case.num_topk):
        valid = topk_idx[:, k] >= 0
        local = topk_idx[valid, k] % case.num_local_experts
        acc[valid] += topk_weights[valid, k].unsqueeze(1) * low_latency_expert(seen[valid], local).float()
    return acc.to(x.dtype)
