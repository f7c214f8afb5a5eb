#!/usr/bin/env python3
"""Soak of the low-latency dispatch/combine (the NVSHMEM kernels): many randomized rounds, each checked.

    python scripts/soak_low_latency.py --ranks 2 --rounds 10000 --backend cuda --seed 1 --out soak_ll.md \
        [--time-budget-s 300] [--stop-on-failure] [--only-round N]
    python scripts/soak_low_latency.py --ranks 2,3 --rounds 30 --backend reference --max-tokens 16 --max-hidden 256

Ranks as in scripts/soak_intranode.py: several on one GPU need MPS (``source scripts/mps.sh &&
mps_start``); ``--backend reference`` runs on CPU over gloo. One low-latency Buffer per rank count,
sized for the largest round (``--heap-mib``); every round draws, from an RNG seeded by (seed, ranks,
round) and so identical on every rank: num_max_dispatch_tokens_per_rank, tokens per rank (some 0),
hidden, top-k, experts, a rank nobody routes to, dropped top-k slots and empty tokens; FP8 on/off,
round_scale, UE8M0-packed scales; the receive hook (with GPU work between send and hook), two
micro-batches in flight (dispatch, dispatch, hook, hook: both heap halves), the combine as plain,
``out=``, ``zero_copy`` or hooked; cumulative_local_expert_recv_stats; the kernels' block count
(cuda). Then on every rank:

  low_latency_dispatch -> check; low_latency_combine of a per-expert transform of the rows -> check.

Expected values come from tests/oracle.py's definitions (each rank regenerates every rank's inputs
from the round seed on its own device, nothing is communicated): rows of each local expert grouped
by source rank then source token (recv_count, recv_src_info with -1 past the count, recv_layout_range
as (offset << 32) | count) compared bit for bit; bf16 rows bit for bit; FP8 scales (fp32 or the
UE8M0 words) bit for bit and e4m3 codes within one code step of the oracle's cast (the cast's bound:
the kernels multiply by the reciprocal scale); combine ``sum_k w[t, k] * expert(x_t)`` in fp32, k
ascending, within one bf16 rounding of the oracle (how many rounds were not bit-exact is a report
row). Output memory is poisoned (0xFF) before each call; rows past a count are never compared.

A mismatch prints the round's parameters and the command that replays it (``--only-round N``), is
counted, and the soak goes on (or stops with ``--stop-on-failure``). A markdown table is printed
last and written to ``--out``. Exit status: 0 when no round failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from deepep_megatron import Buffer  # noqa: E402 - after the path insert
from deepep_megatron.backends.low_latency import LowLatencyBackend  # noqa: E402
from deepep_megatron.config import FP8_BLOCK  # noqa: E402
from oracle import (beyond_bf16_rounding, beyond_one_e4m3_step, low_latency_expert, reference_cast_back,  # noqa: E402
                    reference_cast_to_fp8, reference_pack_ue8m0)
from soak_harness import (Checks, LoopOptions, Poisoner, describe, planted, repro_prefix, run_rounds,  # noqa: E402
                          run_soak, soak_device, soak_parser)

# ---------------------------------------------------------------------------- the round distribution
HIDDEN_CHOICES = (256, 512, 1024, 2048, 2560, 4096, 5120, 7168)
EXPERT_CHOICES = (8, 16, 32, 64, 128, 256)
#: num_max_dispatch_tokens_per_rank: decode batches (DeepEP's 128 among them) and a few odd sizes.
MAX_TOKENS_CHOICES = (1, 3, 8, 16, 32, 64, 100, 128, 256)
MAX_DRAWN_TOPK = 8
#: The kernels' limit on tokens * top-k a send block stages (kLLMaxSmemTopkEntries).
MAX_TOPK_ENTRIES = 8192
#: Block counts per rank (cuda); those above the GPU's share of this rank (less 2) are dropped.
BLOCK_CHOICES = (1, 2, 3, 4, 8, 16, 24, 32, 48, 64)
P_FULL_RANK = 0.3  # per rank: exactly max_tokens tokens
P_ZERO_TOKENS = 0.08  # per rank
P_FP8 = 0.5
P_ROUND_SCALE = 0.5  # of the FP8 rounds
P_UE8M0 = 0.3  # of the FP8 rounds (implies round_scale, as in DeepEP)
P_HOOK = 0.4
P_TWO_IN_FLIGHT = 0.15  # of the hooked rounds
COMBINE_MODES = ("plain", "out", "zero_copy", "hook")
P_RECV_STATS = 0.3
P_STARVED = 0.1
DROP_CHOICES = (0.0, 0.0, 0.1, 0.5)
EMPTY_CHOICES = (0.0, 0.05, 0.3)
#: Cycles of torch.cuda._sleep between a send and its hook (GPU work while the tokens fly).
HOOK_SLEEP_CYCLES = 200_000
#: Outputs --plant-error can corrupt (one bit, rank 0) to show a mismatch is caught.
PLANTABLE = ("recv_x", "recv_count", "recv_src_info", "combined_x")


@dataclass(frozen=True)
class SoakOptions:
    """What the ranks need from the command line (picklable for the spawned ranks)."""

    backend: str
    device: str  # "cuda" or "cpu"
    seed: int
    max_tokens: int  # largest num_max_dispatch_tokens_per_rank drawn
    hiddens: tuple[int, ...]
    heap_bytes: int  # num_rdma_bytes of the Buffer; rounds that need more are redrawn smaller
    block_choices: tuple[int, ...]  # () on the reference backend
    plant_error: Optional[str]


@dataclass(frozen=True)
class RoundParams:
    """One round's draw: the same on every rank."""

    index: int
    num_ranks: int
    max_tokens: int
    tokens: tuple[int, ...]
    hidden: int
    num_topk: int
    num_experts: int
    starved_rank: Optional[int]
    drop: float
    empty_tokens: float
    fp8: bool
    round_scale: bool
    ue8m0: bool
    hook: bool
    two_in_flight: bool
    combine_mode: str
    recv_stats: bool
    num_blocks: int  # 0: the Buffer's default (and always on the reference backend)
    tensor_seed: int

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks


def hidden_choices(max_hidden: Optional[int]) -> tuple[int, ...]:
    kept = tuple(h for h in HIDDEN_CHOICES if max_hidden is None or h <= max_hidden)
    if not kept:
        raise ValueError(f"--max-hidden must be >= {HIDDEN_CHOICES[0]}")
    return kept


def layout_bytes(max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    return Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, num_ranks, num_experts)


def draw_round(opts: SoakOptions, num_ranks: int, index: int) -> RoundParams:
    """The parameters of round ``index``: a pure function of (seed, ranks, index, options)."""
    rng = random.Random(f"soak-low-latency:{opts.seed}:{num_ranks}:{index}")  # str seeds hash alike in every process
    experts = [e for e in EXPERT_CHOICES if e % num_ranks == 0] or [num_ranks * m for m in (1, 2, 4, 8)]
    num_experts = rng.choice(experts)
    hidden = rng.choice(opts.hiddens)
    starved = rng.randrange(num_ranks) if rng.random() < P_STARVED and num_ranks > 1 else None
    routable = num_experts - (num_experts // num_ranks if starved is not None else 0)
    num_topk = rng.randint(1, min(MAX_DRAWN_TOPK, routable))
    sizes = [m for m in MAX_TOKENS_CHOICES if m <= opts.max_tokens and m * num_topk <= MAX_TOPK_ENTRIES] or [1]
    max_tokens = rng.choice(sizes)
    while max_tokens > 1 and layout_bytes(max_tokens, hidden, num_ranks, num_experts) > opts.heap_bytes:
        max_tokens //= 2  # the heap holds the largest hidden x experts only for smaller batches
    tokens = tuple(0 if rng.random() < P_ZERO_TOKENS else max_tokens if rng.random() < P_FULL_RANK
                   else rng.randint(1, max_tokens) for _ in range(num_ranks))
    fp8 = rng.random() < P_FP8
    ue8m0 = fp8 and rng.random() < P_UE8M0
    hook = rng.random() < P_HOOK
    return RoundParams(
        index=index, num_ranks=num_ranks, max_tokens=max_tokens, tokens=tokens, hidden=hidden, num_topk=num_topk,
        num_experts=num_experts, starved_rank=starved, drop=rng.choice(DROP_CHOICES),
        empty_tokens=rng.choice(EMPTY_CHOICES), fp8=fp8, round_scale=ue8m0 or (fp8 and rng.random() < P_ROUND_SCALE),
        ue8m0=ue8m0, hook=hook, two_in_flight=hook and rng.random() < P_TWO_IN_FLIGHT,
        combine_mode=rng.choice(COMBINE_MODES), recv_stats=rng.random() < P_RECV_STATS,
        tensor_seed=rng.getrandbits(48),
        num_blocks=rng.choice(opts.block_choices) if opts.block_choices else 0,  # last: the GPU's cap changes no other draw
    )


# ---------------------------------------------------------------------------- inputs and expectations
def rank_inputs(p: RoundParams, rank: int, device: torch.device, salt: int = 0):
    """``(x [T, H] bf16, topk_idx [T, K] int64 with -1 and no expert twice in a row, topk_weights
    [T, K] fp32)`` of ``rank``, from a generator on ``device`` seeded by (round, rank, salt)."""
    g = torch.Generator(device=device).manual_seed((p.tensor_seed * 1009 + rank) * 7 + salt)
    T, H, K, E, El = p.tokens[rank], p.hidden, p.num_topk, p.num_experts, p.num_local_experts
    x = (torch.randn(T, H, generator=g, device=device) * 3 + 0.5).to(torch.bfloat16)
    allowed = torch.arange(E, device=device)
    if p.starved_rank is not None:
        allowed = allowed[allowed // El != p.starved_rank]
    scores = torch.rand(T, allowed.numel(), generator=g, device=device)
    topk_idx = allowed[scores.topk(K, dim=1).indices]
    topk_idx = torch.where(torch.rand(T, K, generator=g, device=device) < p.drop, -1, topk_idx)
    topk_idx[torch.rand(T, generator=g, device=device) < p.empty_tokens] = -1
    topk_weights = torch.rand(T, K, generator=g, device=device) + 0.1
    return x, topk_idx, topk_weights


@dataclass
class Expected:
    """What this rank must receive and combine. Slots: [E_l, R * M]; ``valid`` marks the first
    recv_count[e] slots of each expert (the only rows compared)."""

    recv_count: torch.Tensor  # [E_l] int32
    recv_src_info: torch.Tensor  # [E_l, R*M] int32, -1 past the count
    recv_layout_range: torch.Tensor  # [E_l, R] int64
    valid: torch.Tensor  # [E_l, R*M] bool
    recv_x: torch.Tensor  # [E_l, R*M, H] bf16 (rows as sent)
    recv_fp8: Optional[torch.Tensor]  # [E_l, R*M, H] e4m3 (the oracle's cast)
    recv_scales: Optional[torch.Tensor]  # [E_l, R*M, H/128] fp32, or UE8M0 words int32 [E_l, R*M, ceil(G/4)]
    expert_y: torch.Tensor  # [E_l, R*M, H] bf16: the combine input (NaN past the counts)
    combined: torch.Tensor  # [T, H] bf16


def _seen(p: RoundParams, x: torch.Tensor) -> torch.Tensor:
    """x as the experts see it after the dispatch: bf16, or the FP8 wire's round trip (fp32)."""
    return reference_cast_back(*reference_cast_to_fp8(x, p.round_scale)) if p.fp8 else x


def expected_for_rank(p: RoundParams, rank: int, device: torch.device, salt: int = 0) -> tuple[Expected, tuple]:
    """(this rank's Expected, its own inputs)."""
    R, M, H, El = p.num_ranks, p.max_tokens, p.hidden, p.num_local_experts
    lo = rank * El
    slots = R * M
    per_rank = torch.zeros(El, R, dtype=torch.int64, device=device)
    pieces = []  # (source, local expert of each pair, token of each pair), pairs ordered by (expert, token)
    own = None
    for src in range(R):
        x, topk_idx, topk_weights = rank_inputs(p, src, device, salt)
        if src == rank:
            own = (x, topk_idx, topk_weights)
        local = (topk_idx >= lo) & (topk_idx < lo + El)
        hit = torch.zeros(x.size(0), El, dtype=torch.bool, device=device)
        rows = torch.arange(x.size(0), device=device).unsqueeze(1).expand_as(topk_idx)
        hit[rows[local], topk_idx[local] - lo] = True
        experts_of_pairs, tokens_of_pairs = hit.t().nonzero(as_tuple=True)
        per_rank[:, src] = hit.sum(0)
        pieces.append((src, x, experts_of_pairs, tokens_of_pairs))
    offsets = per_rank.cumsum(1) - per_rank
    recv_count = per_rank.sum(1)
    valid = torch.arange(slots, device=device).unsqueeze(0) < recv_count.unsqueeze(1)
    recv_src_info = torch.full((El, slots), -1, dtype=torch.int32, device=device)
    recv_x = torch.full((El, slots, H), float("nan"), dtype=torch.bfloat16, device=device)
    expert_y = torch.full((El, slots, H), float("nan"), dtype=torch.bfloat16, device=device)
    groups = H // FP8_BLOCK
    recv_fp8 = recv_scales = None
    if p.fp8:
        recv_fp8 = torch.zeros(El, slots, H, dtype=torch.uint8, device=device)
        recv_scales = torch.zeros(El, slots, groups, dtype=torch.float32, device=device)
    for src, x, experts_of_pairs, tokens_of_pairs in pieces:
        counts = per_rank[:, src]
        first = counts.cumsum(0) - counts  # this source's first pair of each expert, in its (expert, token) list
        slot = offsets[experts_of_pairs, src] + torch.arange(experts_of_pairs.numel(), device=device) - first[experts_of_pairs]
        recv_src_info[experts_of_pairs, slot] = tokens_of_pairs.to(torch.int32)
        recv_x[experts_of_pairs, slot] = x[tokens_of_pairs]
        expert_y[experts_of_pairs, slot] = low_latency_expert(_seen(p, x)[tokens_of_pairs], experts_of_pairs)
        if p.fp8:
            data, scales = reference_cast_to_fp8(x, p.round_scale)
            recv_fp8[experts_of_pairs, slot] = data.view(torch.uint8)[tokens_of_pairs]
            recv_scales[experts_of_pairs, slot] = scales[tokens_of_pairs]
    if p.ue8m0:
        recv_scales = reference_pack_ue8m0(recv_scales)
    x, topk_idx, topk_weights = own
    seen = _seen(p, x)
    acc = torch.zeros(x.shape, dtype=torch.float32, device=device)
    for k in range(p.num_topk):  # k ascending, product then sum in fp32: the reference's order
        chosen = topk_idx[:, k] >= 0
        y = low_latency_expert(seen, topk_idx[:, k].clamp_min(0) % El).float()
        acc = acc + torch.where(chosen.unsqueeze(1), topk_weights[:, k : k + 1] * y, 0.0)  # + 0 never yields -0 here
    expected = Expected(recv_count.to(torch.int32), recv_src_info, (offsets << 32) | per_rank, valid, recv_x,
                        None if recv_fp8 is None else recv_fp8.view(torch.float8_e4m3fn), recv_scales, expert_y,
                        acc.to(torch.bfloat16))
    return expected, own


# ---------------------------------------------------------------------------- checks
def check_dispatch(checks: Checks, tag: str, p: RoundParams, exp: Expected, out: tuple, rank: int,
                   plant: Optional[str]) -> None:
    recv_x, recv_count, handle = out
    checks.same(f"{tag} recv_count", planted(plant, rank, "recv_count", recv_count), exp.recv_count)
    checks.same(f"{tag} recv_src_info", planted(plant, rank, "recv_src_info", handle[0]), exp.recv_src_info)
    checks.same(f"{tag} recv_layout_range", handle[1], exp.recv_layout_range)
    valid = exp.valid
    if not p.fp8:
        got = planted(plant, rank, "recv_x", recv_x)
        checks.within(f"{tag} recv_x", got, exp.recv_x, lambda g, w: (g.view(torch.int16) != w.view(torch.int16))
                      & valid.unsqueeze(-1), "differ")
        return
    if not (isinstance(recv_x, tuple) and len(recv_x) == 2):
        checks.fail(f"{tag}: expected an FP8 pair, got {describe(recv_x)}")
        return
    data, scales = recv_x
    checks.within(f"{tag} recv_x (e4m3)", planted(plant, rank, "recv_x", data), exp.recv_fp8,
                  lambda g, w: beyond_one_e4m3_step(g, w) & valid.unsqueeze(-1),
                  "are more than one e4m3 step from the oracle's cast")
    checks.within(f"{tag} recv_x_scales", scales, exp.recv_scales,
                  lambda g, w: (g.contiguous().view(torch.int32) != w.view(torch.int32)) & valid.unsqueeze(-1), "differ")


def check_combine(checks: Checks, tag: str, exp: Expected, combined: torch.Tensor, rank: int,
                  plant: Optional[str]) -> None:
    checks.within(tag, planted(plant, rank, "combined_x", combined), exp.combined, beyond_bf16_rounding,
                  "are beyond one bf16 rounding of the oracle")


# ---------------------------------------------------------------------------- one round
def _output_bytes(p: RoundParams, rank: int) -> list[int]:
    """Sizes of the outputs a dispatch and combine of ``p`` allocate (for the poisoner)."""
    El, S, H = p.num_local_experts, p.num_ranks * p.max_tokens, p.hidden
    row = H if p.fp8 else 2 * H
    return [El * S * row, El * S * (H // FP8_BLOCK) * 4, El * 4, El * S * 4, El * p.num_ranks * 8, p.tokens[rank] * H * 2]


class Round:
    """Runs round ``p`` on one rank: its dispatches (one, or two in flight) and their combines."""

    def __init__(self, buffer: Buffer, p: RoundParams, rank: int, device: torch.device, poison: Poisoner,
                 plant: Optional[str]) -> None:
        self.buffer, self.p, self.rank, self.device, self.poison, self.plant = buffer, p, rank, device, poison, plant
        self.checks = Checks()
        self.keep: list[Any] = []  # every output lives until the round ends: no later call reuses its memory
        self.bit_exact_combine = True

    def _gpu_work(self) -> None:
        if self.device.type == "cuda":
            torch.cuda._sleep(HOOK_SLEEP_CYCLES)

    def _sync_all(self) -> None:
        """Every rank received every call before this: a third call may reuse the first's heap half."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier()

    def dispatch_send(self, x: torch.Tensor, topk_idx: torch.Tensor):
        p = self.p
        self.poison(_output_bytes(p, self.rank))
        stats = torch.zeros(p.num_local_experts, dtype=torch.int32, device=self.device) if p.recv_stats else None
        recv_x, count, handle, _, hook = self.buffer.low_latency_dispatch(
            x, topk_idx, p.max_tokens, p.num_experts, cumulative_local_expert_recv_stats=stats, use_fp8=p.fp8,
            round_scale=p.round_scale, use_ue8m0=p.ue8m0, return_recv_hook=p.hook)
        self.keep.append((recv_x, count, handle, stats))
        return (recv_x, count, handle), stats, hook

    def dispatch_check(self, tag: str, exp: Expected, out: tuple, stats: Optional[torch.Tensor]) -> None:
        check_dispatch(self.checks, tag, self.p, exp, out, self.rank, self.plant)
        if stats is not None:
            self.checks.same(f"{tag} cumulative_local_expert_recv_stats", stats, exp.recv_count)

    def combine(self, tag: str, exp: Expected, own: tuple, handle) -> None:
        p, buffer = self.p, self.buffer
        _, topk_idx, topk_weights = own
        self.poison(_output_bytes(p, self.rank)[-1:])
        mode = p.combine_mode
        if mode == "zero_copy":
            buffer.get_next_low_latency_combine_buffer(handle).copy_(exp.expert_y)
        out = torch.full_like(exp.combined, float("nan")) if mode == "out" else None
        combined, _, hook = buffer.low_latency_combine(exp.expert_y, topk_idx, topk_weights, handle,
                                                       zero_copy=mode == "zero_copy", return_recv_hook=mode == "hook",
                                                       out=out)
        if mode == "hook":
            self._gpu_work()
            hook()
        if out is not None and combined.data_ptr() != out.data_ptr():
            self.checks.fail(f"{tag}: combine(out=) returned another tensor than out")
        self.keep.append(combined)
        check_combine(self.checks, tag, exp, combined, self.rank, self.plant)
        self.bit_exact_combine &= bool(torch.equal(combined.view(torch.int16), exp.combined.view(torch.int16)))

    def run(self) -> tuple[list[str], dict[str, Any]]:
        p = self.p
        batches = 2 if p.two_in_flight else 1
        if batches > 1:  # the second dispatch reuses the half of the previous round's combine
            self._sync_all()
        expected = [expected_for_rank(p, self.rank, self.device, salt) for salt in range(batches)]
        sent = [self.dispatch_send(own[0], own[1]) for _, own in expected]
        if p.hook:
            self._gpu_work()
            for _, _, hook in sent:
                hook()
        for b, ((exp, _), (out, stats, _)) in enumerate(zip(expected, sent)):
            self.dispatch_check(f"dispatch[{b}]", exp, out, stats)
        if batches > 1:
            self._sync_all()
        for b, ((exp, own), (out, _, _)) in enumerate(zip(expected, sent)):
            self.combine(f"combine[{b}] ({p.combine_mode})", exp, own, out[2])
        facts = {"receives_nothing": any(int(exp.recv_count.sum()) == 0 for exp, _ in expected)}
        failures = self.checks.failures()
        facts["bit_exact_combine"] = self.bit_exact_combine
        return failures, facts


def features(p: RoundParams, facts: dict[str, Any]) -> list[str]:
    names = ["all rounds", "fp8" if p.fp8 else "bf16"]
    if p.round_scale and not p.ue8m0:
        names.append("fp8 round_scale")
    if p.ue8m0:
        names.append("fp8 ue8m0")
    if p.hook:
        names.append("receive hook")
    if p.two_in_flight:
        names.append("two micro-batches in flight")
    names.append(f"combine {p.combine_mode}")
    if p.recv_stats:
        names.append("cumulative recv stats")
    if 0 in p.tokens:
        names.append("a rank with 0 tokens")
    if facts["receives_nothing"]:
        names.append("a rank receives nothing")
    if p.hidden >= 2048:
        names.append("hidden >= 2048")
    if p.num_topk == 8:
        names.append("top-8")
    if p.max_tokens >= 128:
        names.append("max_tokens >= 128")
    if not facts["bit_exact_combine"]:
        names.append("combine not bit-exact (within bf16 rounding)")
    if p.num_blocks:
        names.append(f"blocks={p.num_blocks}")
    return names


FEATURE_ROWS = ("all rounds", "bf16", "fp8", "fp8 round_scale", "fp8 ue8m0", "receive hook", "two micro-batches in flight",
                "combine plain", "combine out", "combine zero_copy", "combine hook", "cumulative recv stats",
                "a rank with 0 tokens", "a rank receives nothing", "hidden >= 2048", "top-8", "max_tokens >= 128",
                "combine not bit-exact (within bf16 rounding)") + tuple(f"blocks={b}" for b in BLOCK_CHOICES)


# ---------------------------------------------------------------------------- the ranks
def _worker(rank: int, world: int, opts: SoakOptions, loop: LoopOptions) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device()) if opts.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.init()
    group = dist.group.WORLD
    buffer = Buffer(group, 0, opts.heap_bytes, low_latency_mode=True, backend=opts.backend, explicitly_destroy=True,
                    timeout_s=20)
    if opts.backend == "cuda" and not isinstance(buffer.runtime, LowLatencyBackend):
        raise RuntimeError("the cuda backend did not get the NVSHMEM kernels (build with DEEPEP_MEGATRON_NVSHMEM=1)")
    # The kernels, whose block count each round sets (what DEEPEP_MEGATRON_LL_SMS sets); none on the reference backend.
    kernels = buffer.runtime._low_latency if opts.backend == "cuda" else None
    poison = Poisoner(device, [torch.cuda.current_stream(device)] if device.type == "cuda" else [])

    def one_round(index: int) -> tuple[list[str], list[str], str]:
        p = draw_round(opts, world, index)
        if kernels is not None and p.num_blocks:
            kernels.num_blocks = p.num_blocks
        failures, facts = Round(buffer, p, rank, device, poison, opts.plant_error).run()
        return failures, features(p, facts), str(asdict(p))

    result = run_rounds(rank, world, loop, group, torch.device("cpu"), one_round)
    if not result["broken"]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        buffer.destroy()
    return result


def _block_choices(device: str, ranks_per_gpu: int) -> tuple[int, ...]:
    if device != "cuda":
        return ()
    cap = torch.cuda.get_device_properties(0).multi_processor_count // ranks_per_gpu - 2
    return tuple(b for b in BLOCK_CHOICES if b <= cap)


def _repro_command(args: argparse.Namespace) -> str:
    return " ".join(repro_prefix(__file__, args) + [f"--max-tokens {args.max_tokens}", f"--heap-mib {args.heap_mib}"])


def main(argv: Optional[list[str]] = None) -> int:
    parser = soak_parser(__doc__.split("\n")[0], PLANTABLE)
    parser.add_argument("--max-tokens", type=int, default=max(MAX_TOKENS_CHOICES),
                        help="largest num_max_dispatch_tokens_per_rank drawn")
    parser.add_argument("--heap-mib", type=int, default=1024,
                        help="NVSHMEM heap per rank (num_rdma_bytes); a round needing more draws fewer tokens")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    device = soak_device(args, "soak_low_latency")
    try:
        hiddens = hidden_choices(args.max_hidden)
    except ValueError as error:
        parser.error(str(error))

    def options_for(num_ranks: int, ranks_per_gpu: int) -> tuple[SoakOptions, str]:
        opts = SoakOptions(backend=args.backend, device=device, seed=args.seed, max_tokens=args.max_tokens, hiddens=hiddens,
                           heap_bytes=args.heap_mib << 20, block_choices=_block_choices(device, ranks_per_gpu),
                           plant_error=args.plant_error)
        return opts, (f"blocks {list(opts.block_choices)}, hidden {list(hiddens)}, max tokens <= {args.max_tokens}, "
                      f"heap {args.heap_mib} MiB")

    header = f"max tokens {args.max_tokens} · hidden {list(hiddens)} · heap {args.heap_mib} MiB"
    return run_soak("soak_low_latency", args, device, _repro_command(args), _worker, options_for, FEATURE_ROWS, header)


if __name__ == "__main__":
    sys.exit(main())
