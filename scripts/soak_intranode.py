#!/usr/bin/env python3
"""Soak of the intranode normal dispatch/combine: many randomized rounds, each checked bit for bit.

    python scripts/soak_intranode.py --ranks 2 --rounds 10000 --backend cuda --seed 1 --out soak.md \
        [--time-budget-s 400] [--stop-on-failure] [--only-round N]
    python scripts/soak_intranode.py --ranks 2,3 --rounds 30 --backend reference --max-tokens 48 --max-hidden 256
    python scripts/soak_intranode.py --ranks 4,8 --ranks-per-node 2 --backend cuda [--rdma-leg nvshmem]

Ranks: one per GPU over NCCL when there are enough GPUs, otherwise several on one GPU over gloo
(start MPS first: ``source scripts/mps.sh && mps_start``); ``--backend reference`` runs on CPU over
gloo. ``--ranks 2,4`` soaks each rank count in turn (one launch each). ``--ranks-per-node L`` groups
the ranks into virtual nodes of L: the cuda backend then runs node forwarding with the kernels inside
each node (``--backend forwarding``: the reference inside each node, on CPU), and the expected
combine sums each node's ranks first, rounds that partial, then adds the nodes' partials in node
order (backends/forwarding.py); ``--rdma-leg nvshmem`` moves the RDMA leg by NVSHMEM puts.

Every round draws, from an RNG seeded by (seed, ranks, round) and so identical on every rank:
hidden, tokens per rank (log-uniform, some ranks at 0, some large rounds), top-k, experts, x dtype
(bf16/fp32), FP8 on/off, num_sms, num_worst_tokens on/off, expert_alignment, a rank that nobody
routes to, dropped top-k slots. Then, on every rank:

  get_dispatch_layout -> check; dispatch -> check; cached dispatch (handle) -> check;
  combine of a per-rank transform of the received rows (with or without topk_weights) -> check.

Expected values follow the reference semantics (tests/oracle.py; deepep_megatron/backends/base.py):
received rows ordered by (source rank, source token), combine summed in fp32 over ranks 0..R-1 from
zero and rounded once. They are computed without communication: each rank regenerates every rank's
inputs from the round seed (a torch.Generator on the device) and derives its expected outputs with
vectorized torch ops. Outputs are compared as bits; output memory is poisoned (0xFF) before each call.

A mismatch prints the round's parameters and the command that replays it (``--only-round N``), is
counted, and the soak goes on (or stops with ``--stop-on-failure``). An exception stops the soak
(the group's state is then unknown). A markdown table is printed last and written to ``--out``.
Exit status: 0 when no round failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from deepep_megatron import Buffer, Config, per_token_cast_to_fp8  # noqa: E402 - after the path insert
from deepep_megatron.config import FP8_BLOCK  # noqa: E402
from deepep_megatron.layout import rail_bytes_needed, rail_row_bytes  # noqa: E402
from soak_harness import (POISON_BYTE, Checks, LoopOptions, Poisoner, describe, planted, repro_prefix,  # noqa: E402
                          run_rounds, run_soak, soak_device, soak_parser)
from oracle import expert_transform, reference_cast_back  # noqa: E402 - tests/oracle.py: the stand-in expert
from deepep_megatron.backends.rail import RDMA_LEG_ENV, RDMA_LEGS  # noqa: E402
from deepep_megatron.topology import RANKS_PER_NODE_ENV  # noqa: E402

# ---------------------------------------------------------------------------- the round distribution
#: The model shapes (2048..7168); 256, the pretraining tests' tiny model (two FP8 scales a row); and
#: rows that end 16..496 bytes into a warp's copy chunk (128 and 256; 2304 at EP8), on which the
#: direct-write dispatch once hung.
HIDDEN_CHOICES = (128, 256, 2048, 2304, 2560, 4096, 5120, 7168)
EXPERT_CHOICES = (8, 16, 32, 64, 128, 256)
#: Even SM counts per rank; those with ranks_per_gpu * num_sms above the GPU's SMs are dropped (the
#: spinning kernels of ranks sharing a GPU must all be resident at once).
SMS_CHOICES = (2, 4, 8, 16, 24, 32, 48)
MAX_DRAWN_TOPK = 8
MAX_TOKENS = 4096
#: Share of rounds whose ranks all draw large token counts (uniform in [max/2, max]); the others
#: draw log-uniform counts (median ~ sqrt(max)), so 10^4 rounds fit in minutes.
P_LARGE_ROUND = 0.1
P_ZERO_TOKENS = 0.08  # per rank
P_FP8 = 0.4
P_FP32 = 0.3
P_WORST = 0.3
P_WORST_SUM = 0.5  # of the worst-token rounds: bound = every rank's tokens summed (else tight + slack)
MAX_WORST_SLACK = 64
P_ALIGNED = 0.5
ALIGNMENT_CHOICES = (2, 3, 4, 7, 8, 16, 32, 128)
P_STARVED = 0.1  # a rank owns experts nobody routes to, so it receives nothing
DROP_CHOICES = (0.0, 0.0, 0.1, 0.5)  # probability that a top-k slot is -1
EMPTY_CHOICES = (0.0, 0.05, 0.3)  # probability that a token routes nowhere
P_COMBINE_WEIGHTS = 0.7
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: Outputs --plant-error can corrupt (one bit of one element, on rank 0) to show a mismatch is caught.
PLANTABLE = ("num_tokens_per_rank", "recv_x", "recv_topk_idx", "recv_topk_weights", "cached_recv_x", "combined_x")


@dataclass(frozen=True)
class SoakOptions:
    """What the ranks need from the command line (picklable for the spawned ranks)."""

    backend: str
    device: str  # "cuda" or "cpu"
    seed: int
    max_tokens: int
    hiddens: tuple[int, ...]
    sms_choices: tuple[int, ...]
    plant_error: Optional[str]
    ranks_per_node: int = 0  # 0: every rank on one node
    rdma_leg: str = "collective"

    def per_node(self, num_ranks: int) -> int:
        """Ranks per node of a group of ``num_ranks``."""
        return self.ranks_per_node or num_ranks

    def combine_per_node(self, num_ranks: int) -> int:
        """Ranks whose rows a combine sums before rounding: a node's under node forwarding, else all
        (the flat reference backend sums every rank at once whatever the nodes)."""
        return num_ranks if self.backend == "reference" else self.per_node(num_ranks)


@dataclass(frozen=True)
class RoundParams:
    """One round's draw: the same on every rank. ``worst``: "off", "sum" (every rank's tokens summed)
    or "tight" (the largest receive count + ``worst_slack``), turned into ``num_worst_tokens``
    once the routing is known."""

    index: int
    num_ranks: int
    hidden: int
    tokens: tuple[int, ...]
    num_topk: int
    num_experts: int
    dtype: str
    fp8: bool
    worst: str
    worst_slack: int
    expert_alignment: int
    starved_rank: Optional[int]
    drop: float
    empty_tokens: float
    combine_weights: bool
    num_sms: int
    tensor_seed: int

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks


def hidden_choices(max_hidden: Optional[int]) -> tuple[int, ...]:
    """:data:`HIDDEN_CHOICES` up to ``max_hidden``; where that leaves fewer than two (small CPU runs),
    multiples of the FP8 block up to it."""
    if max_hidden is None:
        return HIDDEN_CHOICES
    if max_hidden < FP8_BLOCK:
        raise ValueError(f"--max-hidden must be >= {FP8_BLOCK} (FP8 rounds need whole 128-channel blocks)")
    kept = tuple(h for h in HIDDEN_CHOICES if h <= max_hidden)
    return kept if len(kept) > 1 else tuple(FP8_BLOCK * m for m in range(1, max_hidden // FP8_BLOCK + 1))


def expert_choices(num_ranks: int) -> tuple[int, ...]:
    """:data:`EXPERT_CHOICES` divisible by ``num_ranks``; for rank counts that divide none (3, 5, ...)
    multiples of the rank count instead."""
    kept = tuple(e for e in EXPERT_CHOICES if e % num_ranks == 0)
    return kept or tuple(num_ranks * m for m in (1, 2, 4, 8, 16, 32))


def _draw_tokens(rng: random.Random, max_tokens: int, large_round: bool) -> int:
    if rng.random() < P_ZERO_TOKENS:
        return 0
    if large_round:
        return rng.randint(max_tokens // 2, max_tokens)
    return min(max_tokens, int(math.exp(rng.uniform(0.0, math.log(max_tokens + 1)))))


def draw_round(opts: SoakOptions, num_ranks: int, index: int) -> RoundParams:
    """The parameters of round ``index``: a pure function of (seed, ranks, index, options)."""
    rng = random.Random(f"soak-intranode:{opts.seed}:{num_ranks}:{index}")  # str seeds hash the same in every process
    large = rng.random() < P_LARGE_ROUND
    tokens = tuple(_draw_tokens(rng, opts.max_tokens, large) for _ in range(num_ranks))
    num_experts = rng.choice(expert_choices(num_ranks))
    worst = "off"
    if rng.random() < P_WORST:
        worst = "sum" if rng.random() < P_WORST_SUM else "tight"
    return RoundParams(
        index=index,
        num_ranks=num_ranks,
        hidden=rng.choice(opts.hiddens),
        tokens=tokens,
        num_topk=rng.randint(1, min(MAX_DRAWN_TOPK, num_experts)),
        num_experts=num_experts,
        dtype="fp32" if rng.random() < P_FP32 else "bf16",
        fp8=rng.random() < P_FP8,
        worst=worst,
        worst_slack=rng.choice((0, rng.randint(1, MAX_WORST_SLACK))),
        expert_alignment=1 if rng.random() < P_ALIGNED else rng.choice(ALIGNMENT_CHOICES),
        starved_rank=rng.randrange(num_ranks) if rng.random() < P_STARVED else None,
        drop=rng.choice(DROP_CHOICES),
        empty_tokens=rng.choice(EMPTY_CHOICES),
        combine_weights=rng.random() < P_COMBINE_WEIGHTS,
        tensor_seed=rng.getrandbits(48),
        num_sms=rng.choice(opts.sms_choices),  # last: the SM cap of the GPU changes no other draw
    )


# ---------------------------------------------------------------------------- inputs and expectations
@dataclass
class RoundInputs:
    """Every rank's inputs, concatenated in rank order (S = sum of all ranks' tokens).

    ``x`` [S, H] bf16/fp32; ``x_fp8`` / ``x_scales`` [S, H] e4m3 / [S, H/128] fp32 (FP8 rounds, else
    None); ``topk_idx`` [S, K] int64 (-1 = none); ``topk_weights`` [S, K] fp32; ``src_token`` [S]
    int64 (index of each row within its rank); ``starts`` [R + 1] host offsets of each rank's rows.
    """

    x: torch.Tensor
    x_fp8: Optional[torch.Tensor]
    x_scales: Optional[torch.Tensor]
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    src_token: torch.Tensor
    starts: list[int]

    def rows_of(self, rank: int) -> slice:
        return slice(self.starts[rank], self.starts[rank + 1])

    def dispatch_x(self, rank: int) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """What ``rank`` dispatches: its rows of x, or of the FP8 pair."""
        rows = self.rows_of(rank)
        if self.x_fp8 is None:
            return self.x[rows]
        return self.x_fp8[rows], self.x_scales[rows]

    def seen(self, rows: Union[slice, torch.Tensor]) -> torch.Tensor:
        """x as a receiver sees ``rows`` of it: the rows, or their FP8 values cast back to x's dtype."""
        if self.x_fp8 is None:
            return self.x[rows]
        return reference_cast_back(self.x_fp8[rows], self.x_scales[rows]).to(self.x.dtype)


def _rank_inputs(p: RoundParams, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [T, H], topk_idx [T, K] int64, topk_weights [T, K] fp32)`` of ``rank``, from its own generator.
    Routing as tests/oracle.make_inputs: distinct experts per token, dropped slots, empty tokens."""
    num_tokens, K, E = p.tokens[rank], p.num_topk, p.num_experts
    g = torch.Generator(device=device)
    g.manual_seed(p.tensor_seed + 7919 * rank)
    x = (torch.randn(num_tokens, p.hidden, generator=g, device=device) * 3 + 0.5).to(DTYPES[p.dtype])
    allowed = torch.arange(E, device=device)
    if p.starved_rank is not None:
        allowed = allowed[allowed // p.num_local_experts != p.starved_rank]
    k = min(K, allowed.numel())
    if num_tokens == 0:
        topk_idx = torch.empty(0, K, dtype=torch.int64, device=device)
    else:
        scores = torch.rand(num_tokens, allowed.numel(), generator=g, device=device)
        topk_idx = allowed[scores.topk(k, dim=1).indices]
        if k < K:
            topk_idx = torch.cat([topk_idx, torch.full((num_tokens, K - k), -1, dtype=torch.int64, device=device)], dim=1)
    dropped = torch.rand(num_tokens, K, generator=g, device=device) < p.drop
    empty = torch.rand(num_tokens, generator=g, device=device) < p.empty_tokens
    topk_idx = topk_idx.masked_fill(dropped | empty.unsqueeze(1), -1)
    topk_weights = torch.rand(num_tokens, K, generator=g, device=device) + 0.1
    return x, topk_idx, topk_weights


def make_round_inputs(p: RoundParams, device: torch.device) -> RoundInputs:
    """Every rank's inputs of round ``p``: identical on every rank (same seeds, same device kind)."""
    per_rank = [_rank_inputs(p, r, device) for r in range(p.num_ranks)]
    x = torch.cat([t[0] for t in per_rank])
    x_fp8 = x_scales = None
    if p.fp8:  # row-wise, so casting the concatenation equals casting each rank's rows
        x_fp8, x_scales = per_token_cast_to_fp8(x)
    starts = [0]
    for t in p.tokens:
        starts.append(starts[-1] + t)
    src_token = torch.cat([torch.arange(t, device=device) for t in p.tokens])
    return RoundInputs(x, x_fp8, x_scales, torch.cat([t[1] for t in per_rank]), torch.cat([t[2] for t in per_rank]),
                       src_token, starts)


@dataclass
class Expected:
    """What one rank must get (N = rows it receives, T its tokens).

    Layout: ``per_rank`` [R] int32, ``per_rdma`` [nodes] int32 (None on one node), ``per_expert`` [E]
    int32, ``in_rank`` [T, R] bool. Dispatch:
    ``recv_x`` [N, H] (or the FP8 pair), ``recv_topk_idx`` [N, K] int64 (local ids, -1 elsewhere),
    ``recv_topk_weights`` [N, K] fp32 (0 where -1), ``recv_src_idx`` [N] int32, ``per_expert_list``
    [E_local] int64 (aligned). Combine of ``combine_x`` [rows, H] (+ ``combine_weights`` [rows, K]
    or None; rows = num_worst_tokens or N, padding rows NaN): ``combined_x`` [T, H] x dtype,
    ``combined_weights`` [T, K] fp32. ``recv_counts`` (host): rows every rank receives.
    """

    per_rank: torch.Tensor
    per_rdma: Optional[torch.Tensor]
    per_expert: torch.Tensor
    in_rank: torch.Tensor
    recv_x: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    recv_src_idx: torch.Tensor
    per_expert_list: torch.Tensor
    num_recv: int
    num_worst_tokens: int
    recv_counts: list[int]
    combine_x: torch.Tensor
    combine_weights: Optional[torch.Tensor]
    combined_x: torch.Tensor
    combined_weights: Optional[torch.Tensor]


def _nan_padded(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``rows`` [N, C] extended to ``num_rows`` rows of poison bits (NaN): combine must ignore them."""
    if num_rows == rows.size(0):
        return rows
    padded = torch.empty(num_rows, rows.size(1), dtype=rows.dtype, device=rows.device)
    padded.view(torch.uint8).fill_(POISON_BYTE)
    padded[: rows.size(0)] = rows
    return padded


def expected_for_rank(p: RoundParams, inputs: RoundInputs, rank: int, per_node: int, combine_per_node: int) -> Expected:
    """Rank ``rank``'s expected layout, dispatch and combine for round ``p``, vectorized (loops over
    ranks only). Combine input on every rank d is ``expert_transform(rows d received, d)``, so the
    expected sum for a token is ``sum_d expert_transform(its row, d)`` over the ranks d it went to,
    grouped in nodes of ``combine_per_node`` ranks (each node's fp32 sum rounded to the rows'
    dtype, the partials added in node order, rounded once more). ``per_node``: ranks per node of
    the group (the layout's ``num_tokens_per_rdma_rank``)."""
    R, L, E = p.num_ranks, p.num_local_experts, p.num_experts
    idx, weights = inputs.topk_idx, inputs.topk_weights
    valid = idx >= 0
    owner = torch.where(valid, idx // L, -1)  # [S, K] rank of each slot's expert, -1 = none
    in_rank_all = (owner.unsqueeze(2) == torch.arange(R, device=idx.device)).any(dim=1)  # [S, R]
    recv_counts = in_rank_all.sum(dim=0).tolist()
    num_worst = 0
    if p.worst == "sum":
        num_worst = max(1, sum(p.tokens))
    elif p.worst == "tight":
        num_worst = max(1, max(recv_counts) + p.worst_slack)

    mine = inputs.rows_of(rank)
    my_idx, my_owner, in_rank = idx[mine], owner[mine], in_rank_all[mine]
    per_expert = torch.bincount(torch.where(valid[mine], my_idx, E).flatten(), minlength=E + 1)[:E].to(torch.int32)

    # Dispatch: the rows of every rank (in rank order, then token order) that have an expert here.
    sel = in_rank_all[:, rank].nonzero().flatten()
    local = owner == rank
    lo = rank * L
    recv_topk_idx = torch.where(local, idx - lo, -1)[sel]
    recv_topk_weights = torch.where(local, weights, 0.0)[sel]
    counts = torch.bincount(torch.where(local, idx - lo, L).flatten(), minlength=L + 1)[:L]
    a = p.expert_alignment
    per_expert_list = (counts + a - 1) // a * a
    recv_x = inputs.x[sel] if inputs.x_fp8 is None else (inputs.x_fp8[sel], inputs.x_scales[sel])
    num_recv = int(sel.numel())

    rows = num_worst or num_recv
    combine_x = _nan_padded(expert_transform(inputs.seen(sel), rank), rows)
    combine_weights = _nan_padded(recv_topk_weights, rows) if p.combine_weights else None

    # Combine: fp32 sum over each node's destination ranks in rank order from zero, rounded (one
    # node: the whole sum, one rounding), the partials added in node order (adding 0.0 where a token
    # did not go is exact: the sum starts at +0.0 and never becomes -0.0).
    seen_mine = inputs.seen(mine)
    acc = torch.zeros(seen_mine.shape, dtype=torch.float32, device=seen_mine.device)
    acc_w = torch.zeros(my_idx.shape, dtype=torch.float32, device=seen_mine.device)
    my_weights = weights[mine]
    for first in range(0, R, combine_per_node):
        partial = torch.zeros_like(acc)
        for d in range(first, first + combine_per_node):
            went = in_rank[:, d : d + 1]
            partial += torch.where(went, expert_transform(seen_mine, d).float(), 0.0)
            acc_w += torch.where(went, torch.where(my_owner == d, my_weights, 0.0), 0.0)
        acc += partial.to(seen_mine.dtype).float()
    num_nodes = R // per_node
    per_rdma = (in_rank.view(-1, num_nodes, per_node).any(dim=2).sum(dim=0).to(torch.int32) if num_nodes > 1
                else None)
    return Expected(
        per_rank=in_rank.sum(dim=0).to(torch.int32),
        per_rdma=per_rdma,
        per_expert=per_expert,
        in_rank=in_rank,
        recv_x=recv_x,
        recv_topk_idx=recv_topk_idx,
        recv_topk_weights=recv_topk_weights,
        recv_src_idx=inputs.src_token[sel].to(torch.int32),
        per_expert_list=per_expert_list,
        num_recv=num_recv,
        num_worst_tokens=num_worst,
        recv_counts=recv_counts,
        combine_x=combine_x,
        combine_weights=combine_weights,
        combined_x=acc.to(seen_mine.dtype),
        combined_weights=acc_w if p.combine_weights else None,
    )


# ---------------------------------------------------------------------------- checking
# ---------------------------------------------------------------------------- one round
def _config_like(default: Config, num_sms: int) -> Config:
    """``default`` (a Buffer.get_*_config) with ``num_sms`` SMs; DeepEP's five-argument constructor."""
    return Config(num_sms, default.num_max_nvl_chunked_send_tokens, default.num_max_nvl_chunked_recv_tokens,
                  default.num_max_rdma_chunked_send_tokens, default.num_max_rdma_chunked_recv_tokens)


def _planted_x(opts: SoakOptions, rank: int, name: str, recv_x: Any) -> Any:
    """:func:`planted` for a received x: the tensor, or the e4m3 half of an FP8 pair."""
    if isinstance(recv_x, tuple) and len(recv_x) == 2:
        return (planted(opts.plant_error, rank, name, recv_x[0]), recv_x[1])
    return planted(opts.plant_error, rank, name, recv_x)


def _rows(value: Union[torch.Tensor, tuple, None], num_rows: int) -> Any:
    """The first ``num_rows`` rows of a tensor or of each tensor of an FP8 pair."""
    if isinstance(value, (tuple, list)):
        return tuple(v[:num_rows] if isinstance(v, torch.Tensor) else v for v in value)
    return value[:num_rows] if isinstance(value, torch.Tensor) else value


def _same_x(checks: Checks, what: str, got: Any, want: Union[torch.Tensor, tuple], num_rows: int) -> None:
    """Received x (tensor or FP8 pair): ``num_rows`` rows in all, the first ones equal to ``want``."""
    if isinstance(want, tuple):
        if not (isinstance(got, tuple) and len(got) == 2):
            checks.fail(f"{what}: expected an FP8 pair, got {describe(got)}")
            return
        for part, name in zip(range(2), ("e4m3", "scales")):
            if got[part].size(0) != num_rows:
                checks.fail(f"{what} ({name}): expected {num_rows} rows, got {describe(got[part])}")
            else:
                checks.same(f"{what} ({name})", got[part][: want[part].size(0)], want[part])
        return
    if not isinstance(got, torch.Tensor) or got.size(0) != num_rows:
        checks.fail(f"{what}: expected {num_rows} rows, got {describe(got)}")
    else:
        checks.same(what, got[: want.size(0)], want)


def run_round(buffer: Buffer, p: RoundParams, rank: int, device: torch.device, poison: Poisoner,
              opts: SoakOptions) -> tuple[list[str], dict[str, Any]]:
    """Run and check round ``p`` on this rank: ``(failure messages, facts for the report)``.
    Every output is kept alive until the round ends, so no later call reuses its memory."""
    R, H, K, E = p.num_ranks, p.hidden, p.num_topk, p.num_experts
    inputs = make_round_inputs(p, device)
    exp = expected_for_rank(p, inputs, rank, opts.per_node(p.num_ranks), opts.combine_per_node(p.num_ranks))
    T, N, W = p.tokens[rank], exp.num_recv, exp.num_worst_tokens
    rows = W or N
    mine = inputs.rows_of(rank)
    x_in, topk_idx, topk_weights = inputs.dispatch_x(rank), inputs.topk_idx[mine], inputs.topk_weights[mine]
    x_bytes = 1 if p.fp8 else DTYPES[p.dtype].itemsize
    groups = H // FP8_BLOCK if p.fp8 else 0
    dispatch_config = _config_like(Buffer.get_dispatch_config(R), p.num_sms)
    combine_config = _config_like(Buffer.get_combine_config(R), p.num_sms)
    checks = Checks()
    keep: list[Any] = []  # outputs held to the end of the round

    poison([R * 4, E * 4, T * R])
    layout = buffer.get_dispatch_layout(topk_idx, E)
    keep.append(layout)
    per_rank, per_rdma, per_expert, in_rank = layout[:4]
    checks.same("layout num_tokens_per_rank", planted(opts.plant_error, rank, "num_tokens_per_rank", per_rank), exp.per_rank)
    checks.same("layout num_tokens_per_rdma_rank", per_rdma, exp.per_rdma)
    checks.same("layout num_tokens_per_expert", per_expert, exp.per_expert)
    checks.same("layout is_token_in_rank", in_rank, exp.in_rank)

    row_sizes = sorted({N, rows})
    poison([n * b for n in row_sizes for b in (H * x_bytes, groups * 4, K * 8, K * 4, 4)])
    out = buffer.dispatch(x_in, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                          num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
                          expert_alignment=p.expert_alignment, num_worst_tokens=W, config=dispatch_config)
    keep.append(out)
    recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle = out[:5]
    recv_topk_idx = planted(opts.plant_error, rank, "recv_topk_idx", recv_topk_idx)
    recv_topk_weights = planted(opts.plant_error, rank, "recv_topk_weights", recv_topk_weights)
    _same_x(checks, "dispatch recv_x", _planted_x(opts, rank, "recv_x", recv_x), exp.recv_x, rows)
    for what, got, want in (("recv_topk_idx", recv_topk_idx, exp.recv_topk_idx),
                            ("recv_topk_weights", recv_topk_weights, exp.recv_topk_weights)):
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (rows, K):
            checks.fail(f"dispatch {what}: expected [{rows}, {K}], got {describe(got)}")
        else:
            checks.same(f"dispatch {what}", got[:N], want)
    if W and isinstance(recv_topk_idx, torch.Tensor) and recv_topk_idx.size(0) == W:
        checks.same("dispatch recv_topk_idx padding (must be -1)", recv_topk_idx[N:], torch.full((W - N, K), -1, dtype=torch.int64, device=device))
    if W:
        if per_expert_list != []:
            checks.fail(f"dispatch num_recv_tokens_per_expert_list with num_worst_tokens: expected [], got {per_expert_list!r}")
    elif not isinstance(per_expert_list, list) or len(per_expert_list) != p.num_local_experts:
        checks.fail(f"dispatch num_recv_tokens_per_expert_list: expected {p.num_local_experts} counts, got {per_expert_list!r}")
    else:
        checks.same("dispatch num_recv_tokens_per_expert_list", torch.tensor(per_expert_list, dtype=torch.int64, device=device), exp.per_expert_list)
    if not W and handle.num_recv_tokens != N:  # under num_worst_tokens the cuda backend keeps its counts on the device
        checks.fail(f"handle.num_recv_tokens: expected {N}, got {handle.num_recv_tokens}")
    src = handle.recv_src_idx
    if src.size(0) < N:
        checks.fail(f"handle.recv_src_idx: expected >= {N} rows, got {describe(src)}")
    else:
        checks.same("handle.recv_src_idx", src[:N], exp.recv_src_idx)
        if src.size(0) > N:  # padded to num_worst_tokens: past the real rows there is no source
            checks.same("handle.recv_src_idx padding (must be -1)", src[N:], torch.full((src.size(0) - N,), -1, dtype=torch.int32, device=device))

    poison([n * b for n in row_sizes for b in (H * x_bytes, groups * 4)])
    cached = buffer.dispatch(x_in, handle=handle, config=dispatch_config)
    keep.append(cached)
    _same_x(checks, "cached dispatch recv_x", _planted_x(opts, rank, "cached_recv_x", cached[0]), exp.recv_x, rows)
    if any(v is not None for v in cached[1:5]):
        checks.fail(f"cached dispatch: expected (recv_x, None, None, None, None, event), got {describe(cached[:5])}")

    poison([T * H * DTYPES[p.dtype].itemsize, T * K * 4])
    combined = buffer.combine(exp.combine_x, handle, topk_weights=exp.combine_weights, config=combine_config)
    keep.append(combined)
    checks.same("combine combined_x", planted(opts.plant_error, rank, "combined_x", combined[0]), exp.combined_x)
    checks.same("combine combined_topk_weights", combined[1], exp.combined_weights)

    facts = {"num_worst_tokens": W, "recv_counts": exp.recv_counts}
    return checks.failures(), facts


def features(p: RoundParams, facts: dict[str, Any], max_tokens: int) -> list[str]:
    """Report rows this round counts in (see :data:`FEATURE_ROWS`)."""
    names = ["all rounds", "cached dispatch", "fp8" if p.fp8 else "no fp8", f"x {p.dtype}"]
    if facts["num_worst_tokens"]:
        names.append(f"num_worst_tokens ({p.worst})")
    if p.combine_weights:
        names.append("combine with topk_weights")
    if p.expert_alignment > 1:
        names.append("expert_alignment > 1")
    if 0 in p.tokens:
        names.append("a rank with 0 tokens")
    if 0 in facts["recv_counts"]:
        names.append("a rank receives nothing")
    if max(p.tokens) >= max_tokens // 2:
        names.append("large (a rank >= max_tokens/2)")
    names.append(f"num_sms={p.num_sms}")
    return names


FEATURE_ROWS = ("all rounds", "cached dispatch", "fp8", "no fp8", "x bf16", "x fp32", "num_worst_tokens (sum)",
                "num_worst_tokens (tight)", "combine with topk_weights", "expert_alignment > 1", "a rank with 0 tokens",
                "a rank receives nothing", "large (a rank >= max_tokens/2)") + tuple(f"num_sms={s}" for s in SMS_CHOICES)


# ---------------------------------------------------------------------------- the ranks
def _nvl_bytes(num_ranks: int, opts: SoakOptions) -> int:
    """NVLink-buffer bytes for the largest round: fp32 rows of the widest hidden, largest SM count."""
    hidden_bytes = max(opts.hiddens) * DTYPES["fp32"].itemsize
    return max(_config_like(default, sms).get_nvl_buffer_size_hint(hidden_bytes, num_ranks)
               for sms in opts.sms_choices
               for default in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)))


def _rdma_bytes(num_ranks: int, opts: SoakOptions) -> int:
    """NVSHMEM heap bytes for the largest round's RDMA leg (0 unless --rdma-leg nvshmem): fp32 rows of
    the widest hidden (wider than its FP8 rows with their scales) at the largest top-k."""
    if opts.rdma_leg != "nvshmem":
        return 0
    row = rail_row_bytes(max(opts.hiddens) * DTYPES["fp32"].itemsize, 0, MAX_DRAWN_TOPK, num_ranks)
    return rail_bytes_needed(num_ranks // opts.per_node(num_ranks), opts.max_tokens, row)


def _worker(rank: int, world: int, opts: SoakOptions, loop: LoopOptions) -> dict[str, Any]:
    """One rank (run_ranks started its process group): run the rounds, return its records."""
    device = torch.device("cuda", torch.cuda.current_device()) if opts.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.init()  # the Buffer has a communication stream only once CUDA is initialized
    group = dist.group.WORLD
    buffer = Buffer(group, num_nvl_bytes=_nvl_bytes(world, opts), num_rdma_bytes=_rdma_bytes(world, opts),
                    explicitly_destroy=True, backend=opts.backend)
    streams = [torch.cuda.current_stream(device), buffer.get_comm_stream()] if device.type == "cuda" else []
    poison = Poisoner(device, streams)
    flag_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")

    def one_round(index: int) -> tuple[list[str], list[str], str]:
        p = draw_round(opts, world, index)
        failures, facts = run_round(buffer, p, rank, device, poison, opts)
        about = (f"{asdict(p)}\n  num_worst_tokens={facts['num_worst_tokens']}, "
                 f"rows received per rank={facts['recv_counts']}")
        return failures, features(p, facts, opts.max_tokens), about

    result = run_rounds(rank, world, loop, group, flag_device, one_round)
    if not result["broken"]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        buffer.destroy()
    return result


def _sms_cap(device: str, ranks_per_gpu: int) -> tuple[int, ...]:
    if device != "cuda":
        return SMS_CHOICES
    sms_per_gpu = torch.cuda.get_device_properties(0).multi_processor_count
    kept = tuple(s for s in SMS_CHOICES if s * ranks_per_gpu <= sms_per_gpu)
    if not kept:
        raise SystemExit(f"soak_intranode: {ranks_per_gpu} ranks per GPU leave no SM count of {SMS_CHOICES} that fits {sms_per_gpu} SMs")
    return kept


def _repro_command(args: argparse.Namespace) -> str:
    parts = repro_prefix(__file__, args)
    if args.max_tokens != MAX_TOKENS:
        parts.append(f"--max-tokens {args.max_tokens}")
    if args.recv_arena_bytes:
        parts.append(f"--recv-arena-bytes {args.recv_arena_bytes}")
    if args.ring_combine:
        parts.append("--ring-combine")
    if args.fused_notify:
        parts.append("--fused-notify")
    if args.ranks_per_node:
        parts.append(f"--ranks-per-node {args.ranks_per_node}")
    if args.rdma_leg != "collective":
        parts.append(f"--rdma-leg {args.rdma_leg}")
    return " ".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    parser = soak_parser(__doc__.split("\n")[0], PLANTABLE, backends=("cuda", "reference", "forwarding"))
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="largest token count of a rank")
    parser.add_argument("--recv-arena-bytes", type=int, default=0,
                        help="cuda: a receive arena of this many bytes per rank (direct-write dispatch; its blocks are "
                             "poisoned when taken); 0: the rings only")
    parser.add_argument("--ring-combine", action="store_true",
                        help="with --recv-arena-bytes: combine through the rings, not direct (DEEPEP_MEGATRON_DIRECT_COMBINE=0)")
    parser.add_argument("--fused-notify", action="store_true",
                        help="cuda: notify in block 1 of the dispatch kernel, not its own launch (DEEPEP_MEGATRON_FUSED_NOTIFY=1)")
    parser.add_argument("--ranks-per-node", type=int, default=0,
                        help="virtual nodes of this many ranks (node forwarding: the cuda or forwarding backend); 0: one node")
    parser.add_argument("--rdma-leg", choices=RDMA_LEGS, default="collective",
                        help="over nodes: the RDMA leg as the rail's collective or as NVSHMEM puts (DEEPEP_MEGATRON_RDMA_LEG)")
    args = parser.parse_args(argv)
    if args.recv_arena_bytes < 0:
        parser.error("--recv-arena-bytes must be >= 0")
    rank_counts = [int(r) for r in args.ranks.split(",")]
    if args.ranks_per_node < 0 or any(args.ranks_per_node and r % args.ranks_per_node for r in rank_counts):
        parser.error(f"--ranks-per-node {args.ranks_per_node} must divide every rank count of --ranks {args.ranks}")
    if args.backend == "forwarding" and not any(args.ranks_per_node and r > args.ranks_per_node for r in rank_counts):
        parser.error("--backend forwarding needs --ranks-per-node with at least two nodes")
    rank_env = {"DEEPEP_MEGATRON_RECV_ARENA_BYTES": str(args.recv_arena_bytes), "DEEPEP_MEGATRON_POISON_ARENA": "1",
                "DEEPEP_MEGATRON_DIRECT_COMBINE": "0" if args.ring_combine else "1",
                "DEEPEP_MEGATRON_FUSED_NOTIFY": "1" if args.fused_notify else "0",
                RDMA_LEG_ENV: args.rdma_leg}
    if args.ranks_per_node:
        rank_env[RANKS_PER_NODE_ENV] = str(args.ranks_per_node)
    device = soak_device(args, "soak_intranode")
    try:
        hiddens = hidden_choices(args.max_hidden)
    except ValueError as error:
        parser.error(str(error))

    def options_for(num_ranks: int, ranks_per_gpu: int) -> tuple[SoakOptions, str]:
        opts = SoakOptions(backend=args.backend, device=device, seed=args.seed, max_tokens=args.max_tokens,
                           hiddens=hiddens, sms_choices=_sms_cap(device, ranks_per_gpu), plant_error=args.plant_error,
                           ranks_per_node=args.ranks_per_node, rdma_leg=args.rdma_leg)
        return opts, f"sms {list(opts.sms_choices)}, hidden {list(hiddens)}, tokens <= {args.max_tokens}"

    header = (f"max tokens {args.max_tokens} · hidden {list(hiddens)}"
              + (f" · receive arena {args.recv_arena_bytes} bytes" if args.recv_arena_bytes else "")
              + ((" · ring combine" if args.ring_combine else " · direct combine") if args.recv_arena_bytes else "")
              + (" · fused notify" if args.fused_notify else "")
              + (f" · virtual nodes of {args.ranks_per_node} ranks, RDMA leg {args.rdma_leg}" if args.ranks_per_node else ""))
    return run_soak("soak_intranode", args, device, _repro_command(args), _worker, options_for, FEATURE_ROWS, header,
                    env=rank_env)


if __name__ == "__main__":
    sys.exit(main())
