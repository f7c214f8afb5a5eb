"""What the soak scripts (scripts/soak_intranode.py, scripts/soak_low_latency.py) share: bitwise and
bounded checks that sync the host once a round, output poisoning, a planted error that proves a
mismatch is caught, the loop that runs the rounds on every rank and stops them together, and the
markdown report (one row per feature a round exercised).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

POISON_BYTE = 0xFF  # NaN in every float format: an unwritten output element cannot pass as a value
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as integers of its element size: equal bits <=> equal integers (NaN too)."""
    t = t.contiguous()
    if t.dtype == torch.bool or t.is_floating_point():
        return t.view(_INT_OF_SIZE[t.element_size()])
    return t


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return type(value).__name__ + "(" + ", ".join(describe(v) for v in value) + ")"
    return repr(value)


def _value(t: torch.Tensor, index: tuple[int, ...]) -> str:
    """One element, as a number and (for floats) its bits in hex."""
    element = t[index]
    if not element.is_floating_point():
        return repr(element.item())
    raw = bits(element.reshape(1)).item() & ((1 << (8 * t.element_size())) - 1)
    return f"{element.float().item()!r} (0x{raw:0{2 * t.element_size()}x})"


def _mismatch(what: str, got: torch.Tensor, want: torch.Tensor, differ: torch.Tensor, bound: str) -> str:
    where = differ.reshape(got.shape).nonzero()
    first = tuple(where[0].tolist())
    return (f"{what}: {where.size(0)} of {got.numel()} elements {bound}; first at {list(first)}: "
            f"got {_value(got, first)}, expected {_value(want, first)}")


class Checks:
    """Collects comparisons of one round and syncs the host once, in :meth:`failures`."""

    def __init__(self) -> None:
        # (what, got, want, elementwise "bad" mask, how the failure reads)
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, str]] = []
        self._errors: list[str] = []

    def fail(self, message: str) -> None:
        self._errors.append(message)

    def _comparable(self, what: str, got: Any, want: Optional[torch.Tensor]) -> bool:
        if want is None or got is None:
            if (want is None) != (got is None):
                self.fail(f"{what}: expected {'None' if want is None else 'a tensor'}, got {describe(got)}")
            return False
        if not isinstance(got, torch.Tensor):
            self.fail(f"{what}: expected a tensor, got {describe(got)}")
        elif got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            self.fail(f"{what}: expected {describe(want)}, got {describe(got)}")
        else:
            return True
        return False

    def same(self, what: str, got: Any, want: Optional[torch.Tensor]) -> None:
        """``got`` must equal ``want`` bit for bit (None: ``got`` must be None)."""
        if self._comparable(what, got, want):
            self._pending.append((what, got, want, bits(got) != bits(want).to(got.device), "differ"))

    def within(self, what: str, got: Any, want: Optional[torch.Tensor],
               bad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bound: str) -> None:
        """``bad(got, want)`` (an elementwise bool tensor) must be False everywhere; ``bound`` says
        what a True element breaks (e.g. "are more than one e4m3 step from the oracle")."""
        if self._comparable(what, got, want):
            self._pending.append((what, got, want, bad(got, want.to(got.device)), bound))

    def failures(self) -> list[str]:
        if self._pending:
            flags = torch.stack([mask.any() if mask.numel() else mask.new_zeros((), dtype=torch.bool)
                                 for *_, mask, _ in self._pending])
            for (what, got, want, mask, bound), failed in zip(self._pending, flags.cpu().tolist()):  # the one host sync
                if failed:
                    self._errors.append(_mismatch(what, got, want, mask, bound))
        return self._errors


def planted(plant_error: Optional[str], rank: int, name: str, tensor: Any) -> Any:
    """``tensor`` as the checks see it. With ``--plant-error name``, on rank 0, a copy whose first
    element has bit 6 of its most significant byte flipped (an exponent bit of every float format:
    an error no tolerance admits), to prove a mismatch is caught; the calls that follow get the original."""
    if plant_error != name or rank != 0 or not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
        return tensor
    corrupted = tensor.clone()
    high_byte = tensor.element_size() - 1  # little-endian
    corrupted.view(torch.uint8).view(-1)[high_byte : high_byte + 1].bitwise_xor_(0x40)
    return corrupted


class Poisoner:
    """Fills, before each call, free allocator memory with 0xFF where that call's outputs will land.

    The caching allocator keeps a pool per stream and gives a request the smallest free block that
    fits. So for each stream that may allocate outputs (the current one and the Buffer's
    communication stream) we allocate blocks of exactly the output sizes, fill them and free them:
    an output then gets a poisoned block (rather than, say, the just-freed block of an earlier call
    that held the same values). Deferred frees (record_stream) are flushed by a sync first. No-op on CPU.
    """

    def __init__(self, device: torch.device, streams: Sequence["torch.cuda.Stream"]) -> None:
        self.device = device
        self.streams = list(streams)

    def __call__(self, sizes_bytes: Sequence[int]) -> None:
        if self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        for stream in self.streams:
            with torch.cuda.stream(stream):
                junk = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in sizes_bytes if n > 0]
                for block in junk:
                    block.fill_(POISON_BYTE)
                del junk  # freed on the stream that allocated them: the next allocations there reuse them


# ---------------------------------------------------------------------------- the rounds of one rank
@dataclass(frozen=True)
class LoopOptions:
    """How a rank runs its rounds (picklable for the spawned ranks)."""

    indices: tuple[int, ...]
    time_budget_s: float  # <= 0: none
    stop_on_failure: bool
    progress_s: float
    repro: str  # the command line that replays a round, without --ranks / --only-round


def run_rounds(rank: int, world: int, loop: LoopOptions, group: dist.ProcessGroup, flag_device: torch.device,
               run: Callable[[int], tuple[list[str], list[str], str]]) -> dict[str, Any]:
    """Run ``run(index) -> (failure messages, feature names, what to print about the round if it
    failed)`` for every index; every rank stops after the same round (a failure with
    ``stop_on_failure``, an exception on any rank, or the time budget). Returns this rank's records."""
    records: list[tuple[int, list[str], bool]] = []
    started = last_report = time.monotonic()
    stopped, broken = "", False
    for index in loop.indices:
        try:
            failures, names, about = run(index)
        except Exception:  # noqa: BLE001 - report the round, then stop: the group's state is unknown
            failures, names, about, broken = [traceback.format_exc()], ["all rounds"], "(raised)", True
        if failures:
            print(f"[rank {rank}] FAILED round {index}: {about}\n  replay: {loop.repro} --ranks {world} --only-round {index}\n  "
                  + "\n  ".join(failures), flush=True)
        records.append((index, names, bool(failures)))
        over_time = loop.time_budget_s > 0 and time.monotonic() - started > loop.time_budget_s
        flags = torch.tensor([int(bool(failures) and loop.stop_on_failure), int(broken), int(over_time)], device=flag_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        stop_failure, stop_broken, stop_time = flags.tolist()
        if stop_failure or stop_broken or stop_time:
            stopped = ("an exception" if stop_broken else "a failure (--stop-on-failure)" if stop_failure
                       else f"the time budget ({loop.time_budget_s:g} s)")
            break
        now = time.monotonic()
        if rank == 0 and now - last_report >= loop.progress_s:
            bad = sum(failed for *_, failed in records)
            print(f"[EP{world}] round {index + 1}/{len(loop.indices)}, {bad} failed so far, {now - started:.0f} s", flush=True)
            last_report = now
    return {"records": records, "seconds": time.monotonic() - started, "stopped": stopped,
            "requested": len(loop.indices), "broken": broken}


def share_of_budget(total_s: float, started: float, position: int, count: int) -> float:
    """Seconds for rank count ``position`` of ``count``: what is left of ``total_s``, shared among the
    rank counts still to run (0: no budget)."""
    if total_s <= 0:
        return 0.0
    return max(1.0, (total_s - (time.monotonic() - started)) / (count - position))


# ---------------------------------------------------------------------------- report
@dataclass
class Summary:
    """Merged result of one rank count: a round failed when it failed on any rank."""

    num_ranks: int
    requested: int
    rounds: int = 0
    failed: int = 0
    seconds: float = 0.0
    stopped: str = ""
    per_feature: dict[str, list[int]] = field(default_factory=dict)  # name -> [rounds, failed]


def summarize(num_ranks: int, per_rank: list[dict[str, Any]]) -> Summary:
    failed_rounds = {index for result in per_rank for index, _, failed in result["records"] if failed}
    s = Summary(num_ranks, per_rank[0]["requested"], seconds=max(r["seconds"] for r in per_rank), stopped=per_rank[0]["stopped"])
    for index, names, _ in per_rank[0]["records"]:
        s.rounds += 1
        s.failed += index in failed_rounds
        for name in names:
            count = s.per_feature.setdefault(name, [0, 0])
            count[0] += 1
            count[1] += index in failed_rounds
    return s


def format_report(summaries: list[Summary], header: str, feature_rows: Sequence[str]) -> str:
    lines = [header, ""]
    for s in summaries:
        early = f", stopped early by {s.stopped}" if s.stopped else ""
        pace = f" ({1e3 * s.seconds / s.rounds:.1f} ms/round)" if s.rounds else ""
        lines.append(f"- EP{s.num_ranks}: {s.rounds} of {s.requested} rounds in {s.seconds:.0f} s{pace}, {s.failed} failed{early}")
    lines += ["", "| feature | " + " | ".join(f"EP{s.num_ranks} rounds | EP{s.num_ranks} failed" for s in summaries) + " |",
              "|---|" + "---|---|" * len(summaries)]
    for name in feature_rows:
        cells = [f"{s.per_feature.get(name, [0, 0])[0]} | {s.per_feature.get(name, [0, 0])[1]}" for s in summaries]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| seconds | " + " | ".join(f"{s.seconds:.0f} | " for s in summaries) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the command line
def soak_parser(description: str, plantable: Sequence[str],
                backends: Sequence[str] = ("cuda", "reference")) -> argparse.ArgumentParser:
    """The options every soak takes; a soak adds its own (shapes, buffers) before parsing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ranks", default="2", help="rank count, or a comma list soaked one after the other")
    parser.add_argument("--rounds", type=int, default=10000, help="rounds per rank count")
    parser.add_argument("--backend", choices=tuple(backends), default="cuda")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda for --backend cuda, else cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only-round", type=int, default=None, help="run just this round (replay a failure)")
    parser.add_argument("--max-hidden", type=int, default=None, help="largest hidden (small shapes for CPU runs)")
    parser.add_argument("--time-budget-s", type=float, default=0.0, help="stop after this many seconds in all (0: no limit)")
    parser.add_argument("--stop-on-failure", action="store_true")
    parser.add_argument("--plant-error", choices=tuple(plantable), default=None,
                        help="testing the soak itself: corrupt this output on rank 0 in every round where it has elements")
    parser.add_argument("--progress-s", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--out", default=None, help="also write the report (markdown) here")
    return parser


def soak_device(args: argparse.Namespace, name: str) -> str:
    device = args.device if args.device != "auto" else ("cuda" if args.backend == "cuda" else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{name}: no CUDA device here; use --backend reference (CPU)")
    return device


def repro_prefix(script: str, args: argparse.Namespace) -> list[str]:
    """The replay command's options every soak shares (a soak appends its own)."""
    parts = [f"python {os.path.relpath(os.path.abspath(script))}", f"--backend {args.backend}", f"--seed {args.seed}"]
    if args.device != "auto":
        parts.append(f"--device {args.device}")
    if args.max_hidden is not None:
        parts.append(f"--max-hidden {args.max_hidden}")
    if args.plant_error:
        parts.append(f"--plant-error {args.plant_error}")
    return parts


def run_soak(name: str, args: argparse.Namespace, device: str, repro: str, worker: Callable[..., dict[str, Any]],
             options_for: Callable[[int, int], tuple[Any, str]], feature_rows: Sequence[str], header: str,
             env: Optional[dict[str, str]] = None) -> int:
    """Soak each of ``--ranks`` in turn: ``options_for(num_ranks, ranks_per_gpu) -> (picklable options,
    what to print about them)``, then ``worker(rank, world, options, LoopOptions)`` on every rank
    (run_ranks). Prints the report last (and writes ``--out``); returns the exit status."""
    from deepep_megatron.launch import local_backend, run_ranks
    from harness import mps_running

    rank_counts = [int(r) for r in args.ranks.split(",")]
    indices = (args.only_round,) if args.only_round is not None else tuple(range(args.rounds))
    summaries, started = [], time.monotonic()
    for position, num_ranks in enumerate(rank_counts):
        pg_backend, ranks_per_gpu = local_backend(num_ranks) if device == "cuda" else ("gloo", 1)
        if ranks_per_gpu > 1 and not mps_running():
            raise SystemExit(f"{name}: {num_ranks} ranks share a GPU and need CUDA MPS; start it first "
                             "(source scripts/mps.sh && mps_start)")
        budget = share_of_budget(args.time_budget_s, started, position, len(rank_counts))
        loop = LoopOptions(indices, budget, args.stop_on_failure, args.progress_s, repro)
        opts, about = options_for(num_ranks, ranks_per_gpu)
        print(f"EP{num_ranks}: {args.backend} backend on {device} over {pg_backend}, {about}", flush=True)
        timeout = (budget + 600) if budget else 24 * 3600
        try:
            per_rank = run_ranks(worker, num_ranks, opts, loop, backend=pg_backend, timeout_s=timeout, env=env)
        except (AssertionError, RuntimeError, TimeoutError) as error:  # a rank died: its traceback is in the message
            print(f"{name}: EP{num_ranks} aborted: {error}", flush=True)
            summaries.append(Summary(num_ranks, len(indices), stopped="a crashed rank", failed=1))
            continue
        summaries.append(summarize(num_ranks, per_rank))
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    full_header = (f"{name} · backend {args.backend} · {where} · seed {args.seed} · ranks {args.ranks} · {header}"
                   + (f" · planted error in {args.plant_error}" if args.plant_error else ""))
    report = format_report(summaries, full_header, feature_rows)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    print(report, flush=True)
    return 1 if any(s.failed for s in summaries) else 0


def run_soak_script(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The CPU tests' way to run a soak: a subprocess from the repository root, one thread per rank."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(root, "scripts", script), *args], cwd=root, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
