#!/usr/bin/env python3
"""DeepEP v1.2.1 and deepep_megatron timed by one driver: the same inputs, configs and clocks.

    python scripts/bench_vs_deepep.py --impl both [--ranks 2] [--sms 24,48] [--iters 30] [--out FILE]
    python scripts/bench_vs_deepep.py --impl deep_ep --deepep-path .carry/DeepEP      # one package only
    python scripts/bench_vs_deepep.py --impl deepep_megatron                          # (backend cuda)

``--impl deep_ep`` imports ``deep_ep`` (DeepSeek's build: ``--deepep-path``, else $DEEPEP_PATH, else
.carry/DeepEP when it exists, else whatever ``import deep_ep`` finds; refused if that is this
project's alias), ``--impl deepep_megatron`` imports ``deepep_megatron`` (``backend="cuda"``).
``--impl both`` runs the first, then the second, each as a separate launch of this script, and
merges their results into one table.

Ranks: one per GPU over NCCL when there are enough GPUs, otherwise several on one GPU over gloo,
which needs CUDA MPS (``source scripts/mps.sh && mps_start``). SM counts whose total over the ranks
sharing a GPU exceeds its SMs are dropped (their spinning kernels must all be resident).
Shape: DeepSeek-V3, 4096 tokens per rank, hidden 7168, top-8 of 256 experts, uniform random routing.

Ops, each with ``Config(num_sms, chunks...)`` built from the same numbers for both packages
(default: deepep_megatron's defaults for the rank count; ``--dispatch-chunks`` / ``--combine-chunks``):
  full dispatch (get_dispatch_layout then dispatch, as Megatron calls them), dispatch bf16,
  dispatch fp8 ((e4m3 [T, H], fp32 scales [T, H/128])), dispatch with num_worst_tokens = 4096 * ranks,
  cached dispatch (handle), combine (bf16 rows, no weights).
Per (op, SMs), medians in microseconds, the slowest rank:
  one-call:     torch.cuda.synchronize(); start together (barrier + a common deadline on the host clock);
                t0; op; [host]; torch.cuda.synchronize(); t1 (--iters calls)
  back-to-back: --iters calls between two CUDA events (median over --repeats)
  host:         t0 to the op's return, without a sync (Python + binding + any host wait inside the op)
The markdown table comes last; --out writes it, --json writes the raw results.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from deepep_megatron.config import default_combine_config, default_dispatch_config  # noqa: E402 - after the path insert
from deepep_megatron.fp8 import per_token_cast_to_fp8  # noqa: E402
from deepep_megatron.launch import local_backend, run_ranks, tree_commit  # noqa: E402
from deepep_megatron.profiling import copy_roofline, one_call_seconds, seconds_per_call, sm_copy_GBps  # noqa: E402
from harness import mps_running  # noqa: E402 - tests/harness.py

IMPLS = ("deep_ep", "deepep_megatron")
LABELS = {"deep_ep": "DeepEP", "deepep_megatron": "ours"}
#: DeepSeek-V3 routing: tokens per rank, hidden, top-k, experts.
TOKENS, HIDDEN, TOPK, EXPERTS = 4096, 7168, 8, 256
OPS = ("full dispatch", "dispatch bf16", "dispatch fp8", "dispatch num_worst_tokens", "cached dispatch",
       "cached dispatch fp8", "combine bf16")
#: Ops whose bytes the table sets against the copy rooflines: each rank reads its rows once and writes
#: them once where they go (dispatch: T rows read, N written; combine: N read, T written), and the
#: row is bf16, or e4m3 with its fp32 scales (FP8_OPS).
ROOFLINE_OPS = ("dispatch bf16", "dispatch fp8", "cached dispatch", "cached dispatch fp8", "combine bf16")
FP8_OPS = ("dispatch fp8", "cached dispatch fp8")
#: Ops whose host time the table shows (the ones whose host path differs: host sync, no sync, cached, combine).
HOST_OPS = ("full dispatch", "dispatch num_worst_tokens", "cached dispatch", "combine bf16")
DEFAULT_DEEPEP_PATH = os.path.join(ROOT, ".carry", "DeepEP")
DEEPEP_PATH_ENV = "DEEPEP_PATH"


@dataclass(frozen=True)
class BenchOptions:
    """What the ranks need (picklable for the spawned ranks)."""

    impl: str
    sms: tuple[int, ...]
    iters: int
    repeats: int
    warmup: int
    dispatch_chunks: tuple[int, int, int, int]  # nvl send, nvl recv, rdma send, rdma recv
    combine_chunks: tuple[int, int, int, int]


def _load(impl: str) -> tuple[Any, Any, dict[str, Any], str]:
    """``(Buffer class, Config class, extra Buffer kwargs, module file)`` of ``impl``."""
    if impl == "deep_ep":
        module = importlib.import_module("deep_ep")
        if getattr(module, "PROVIDER", None) == "deepep_megatron":
            raise RuntimeError(f"`import deep_ep` loaded this project's alias ({module.__file__}), not DeepSeek's DeepEP; "
                               "pass --deepep-path DIR of the DeepEP build (scripts/build_deepep.sh)")
        return module.Buffer, module.Config, {}, module.__file__
    module = importlib.import_module("deepep_megatron")
    return module.Buffer, module.Config, {"backend": "cuda"}, module.__file__


def _inputs(rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [T, H] bf16, topk_idx [T, K] int64, topk_weights [T, K] fp32)``: uniform random routing
    (K distinct experts per token), seeded by rank so both packages get the same tensors."""
    g = torch.Generator(device=device)
    g.manual_seed(1000 + rank)
    x = torch.randn(TOKENS, HIDDEN, generator=g, device=device).to(torch.bfloat16)
    topk_idx = torch.rand(TOKENS, EXPERTS, generator=g, device=device).topk(TOPK, dim=1).indices
    topk_weights = torch.rand(TOKENS, TOPK, generator=g, device=device)
    return x, topk_idx.contiguous(), topk_weights


def _sanity(x: torch.Tensor, is_token_in_rank: torch.Tensor, recv_x: torch.Tensor, combined: torch.Tensor,
            group: dist.ProcessGroup) -> str:
    """What is wrong with the results being timed ("" when nothing): ``recv_x`` must have the rows
    every rank's ``is_token_in_rank`` [T, R] sends here, and ``combined`` (the combine of ``recv_x``
    unchanged) must be x times the number of ranks each token went to (exact: at most 8 equal bf16
    values summed in fp32, rounded once)."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, is_token_in_rank.sum(dim=0).tolist(), group=group)
    want_rows = sum(sent[dist.get_rank(group)] for sent in everyone)
    if recv_x.size(0) != want_rows:
        return f"dispatch received {recv_x.size(0)} rows, the layouts send {want_rows}"
    want = (x.float() * is_token_in_rank.sum(dim=1, keepdim=True)).to(x.dtype)
    if not torch.equal(combined, want):
        return f"combine of the received rows is not x * (ranks per token): {int((combined != want).sum())} elements differ"
    return ""


def _arena_misses(buffer: Any) -> int:
    """Receive-arena blocks our backend refused so far (0 for DeepEP, or without an arena): a refused
    block sends that call through the rings, so a timed row with misses is not the direct path's."""
    stats = getattr(getattr(buffer, "runtime", None), "arena_stats", None)
    return int(stats()["misses"]) if callable(stats) else 0


def _worker(rank: int, world: int, opts: BenchOptions) -> Optional[dict[str, Any]]:
    """One rank (run_ranks started its process group): time every (op, SMs); rank 0 returns the
    slowest rank's figures, the others None."""
    device = torch.device("cuda", torch.cuda.current_device())  # rank % GPUs, set by run_ranks
    buffer_cls, config_cls, buffer_kwargs, module_file = _load(opts.impl)
    group = dist.group.WORLD
    configs = {s: (config_cls(s, *opts.dispatch_chunks), config_cls(s, *opts.combine_chunks)) for s in opts.sms}
    hidden_bytes = HIDDEN * 2  # bf16 rows; FP8 rows are sized as bf16 by both packages' hints
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, world) for pair in configs.values() for c in pair)
    buffer = buffer_cls(group, num_nvl_bytes, 0, explicitly_destroy=True, **buffer_kwargs)
    x, topk_idx, topk_weights = _inputs(rank, device)
    x_fp8 = per_token_cast_to_fp8(x)
    figures: dict[str, dict[str, float]] = {}
    problems: list[str] = []  # timed anyway (a lent GPU is scarce), and flagged in the report
    for sms, (dispatch_config, combine_config) in configs.items():
        per_rank, per_rdma, per_expert, in_rank = buffer.get_dispatch_layout(topk_idx, EXPERTS)[:4]
        args = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                    num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights, config=dispatch_config)
        first = buffer.dispatch(x, **args)
        recv_x, handle = first[0], first[4]
        problem = _sanity(x, in_rank, recv_x, buffer.combine(recv_x, handle, config=combine_config)[0], group)
        if problem:
            problems.append(f"rank {rank}, {sms} SMs: {problem}")
            print(f"bench_vs_deepep: {opts.impl} WRONG RESULTS: {problems[-1]}", flush=True)

        def full_dispatch() -> Any:
            layout = buffer.get_dispatch_layout(topk_idx, EXPERTS)
            return buffer.dispatch(x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                                   is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], topk_idx=topk_idx,
                                   topk_weights=topk_weights, config=dispatch_config)

        ops = {
            "full dispatch": full_dispatch,
            "dispatch bf16": lambda: buffer.dispatch(x, **args),
            "dispatch fp8": lambda: buffer.dispatch(x_fp8, **args),
            "dispatch num_worst_tokens": lambda: buffer.dispatch(x, num_worst_tokens=TOKENS * world, **args),
            "cached dispatch": lambda: buffer.dispatch(x, handle=handle, config=dispatch_config),
            "cached dispatch fp8": lambda: buffer.dispatch(x_fp8, handle=handle, config=dispatch_config),
            "combine bf16": lambda: buffer.combine(recv_x, handle, config=combine_config),
        }
        for name in OPS:
            misses = _arena_misses(buffer)
            one, host = one_call_seconds(ops[name], opts.iters, opts.warmup)
            b2b = seconds_per_call(ops[name], opts.iters, repeats=opts.repeats, warmup=opts.warmup, group=group)
            figures[f"{name}|{sms}"] = {"one_call_us": one * 1e6, "host_us": host * 1e6, "b2b_us": b2b * 1e6,
                                        "arena_misses": float(_arena_misses(buffer) - misses)}
        rows = (TOKENS, int(recv_x.size(0)))  # (tokens sent from, rows received on) this rank
        del first, recv_x, handle
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (figures, problems, rows), group=group)
    torch.cuda.synchronize()
    dist.barrier()
    buffer.destroy()
    if rank != 0:
        return None
    slowest = {key: {metric: max(f[key][metric] for f, _, _ in everyone) for metric in figures[key]} for key in figures}
    return {"impl": opts.impl, "module": module_file, "figures": slowest, "num_nvl_bytes": num_nvl_bytes,
            "problems": [p for _, ps, _ in everyone for p in ps], "rows": [r for _, _, r in everyone]}


# ---------------------------------------------------------------------------- command line and report
def _chunks(text: Optional[str], default: Any) -> tuple[int, int, int, int]:
    """``send,recv`` NVLink chunks (the RDMA ones are the default's: unused within a node)."""
    send, recv = (int(v) for v in text.split(",")) if text else (default.num_max_nvl_chunked_send_tokens,
                                                                  default.num_max_nvl_chunked_recv_tokens)
    return send, recv, default.num_max_rdma_chunked_send_tokens, default.num_max_rdma_chunked_recv_tokens


def _cell(results: dict[str, Any], impl: str, key: str, metric: str) -> str:
    figures = results.get(impl, {}).get("figures", {})
    return f"{figures[key][metric]:.0f}" if key in figures else "-"


def bytes_per_gpu(rows: list[tuple[int, int]], name: str, ranks_per_gpu: int) -> float:
    """Bytes the ranks sharing one GPU must read and write for op ``name``: every rank's (tokens +
    received rows) rows of the op's row size, over the GPUs (ranks are spread evenly over them)."""
    row_bytes = HIDDEN + HIDDEN // 128 * 4 if name in FP8_OPS else HIDDEN * 2
    return sum(tokens + received for tokens, received in rows) * row_bytes * ranks_per_gpu / len(rows)


def format_table(results: dict[str, Any], sms: tuple[int, ...], roofline: Optional[dict[str, Any]] = None) -> str:
    """Rows (op, SMs); columns one-call and back-to-back for both packages, then host time; with
    ``roofline`` ({"hbm_copy_GBps", "sm_copy_GBps": {SMs: GB/s}, "ranks_per_gpu"}), the share of the
    HBM copy roofline and of a plain copy kernel on the same SMs our back-to-back time reaches."""
    head = ("| op | SMs | ours one-call us | DeepEP one-call us | ours back-to-back us | DeepEP back-to-back us "
            "| ours host us | DeepEP host us |")
    rule = "|---|---|---|---|---|---|---|---|"
    rows = results.get("deepep_megatron", {}).get("rows")
    if roofline and rows:
        head += " ours % of HBM copy | ours % of copy kernel on the same SMs |"
        rule += "---|---|"
    lines = [head, rule]
    for name in OPS:
        for s in sms:
            key = f"{name}|{s}"
            cells = [_cell(results, impl, key, metric) for metric in ("one_call_us", "b2b_us") for impl in ("deepep_megatron", "deep_ep")]
            cells += [_cell(results, impl, key, "host_us") if name in HOST_OPS else "-" for impl in ("deepep_megatron", "deep_ep")]
            if roofline and rows:
                figures = results["deepep_megatron"]["figures"]
                if name in ROOFLINE_OPS and key in figures:
                    rate = bytes_per_gpu(rows, name, roofline["ranks_per_gpu"]) / (figures[key]["b2b_us"] * 1e-6) / 1e9
                    sm_rate = roofline["sm_copy_GBps"].get(s)
                    cells += [f"{100 * rate / roofline['hbm_copy_GBps']:.0f}",
                              f"{100 * rate / sm_rate:.0f}" if sm_rate else "-"]
                else:
                    cells += ["-", "-"]
            lines.append(f"| {name} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=IMPLS + ("both",), default="both")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sms", default="24,48", help="SM counts per rank (even)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="back-to-back measurements (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dispatch-chunks", default=None, help="send,recv NVLink tokens (default: deepep_megatron's)")
    parser.add_argument("--combine-chunks", default=None, help="send,recv NVLink tokens (default: deepep_megatron's)")
    parser.add_argument("--deepep-path", default=None, help=f"DeepEP build folder (default ${DEEPEP_PATH_ENV} or .carry/DeepEP)")
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        raise SystemExit("bench_vs_deepep: needs a CUDA GPU")
    pg_backend, per_gpu = local_backend(args.ranks)
    if per_gpu > 1 and not mps_running():
        raise SystemExit(f"bench_vs_deepep: {args.ranks} ranks share a GPU and need CUDA MPS; start it first "
                         "(source scripts/mps.sh && mps_start)")
    sms = tuple(int(s) for s in args.sms.split(","))
    limit = torch.cuda.get_device_properties(0).multi_processor_count // per_gpu
    if max(sms) > limit:
        print(f"note: {per_gpu} ranks per GPU: dropping SM counts above {limit}", flush=True)
        sms = tuple(s for s in sms if s <= limit)
    dispatch_chunks = _chunks(args.dispatch_chunks, default_dispatch_config(args.ranks))
    combine_chunks = _chunks(args.combine_chunks, default_combine_config(args.ranks))
    deepep_path = args.deepep_path or os.environ.get(DEEPEP_PATH_ENV) or (DEFAULT_DEEPEP_PATH if os.path.isdir(DEFAULT_DEEPEP_PATH) else None)

    results: dict[str, Any] = {}
    problems: list[str] = []
    if args.impl == "both":
        common = ["--ranks", str(args.ranks), "--sms", ",".join(map(str, sms)), "--iters", str(args.iters), "--repeats",
                  str(args.repeats), "--warmup", str(args.warmup), "--dispatch-chunks", ",".join(map(str, dispatch_chunks[:2])),
                  "--combine-chunks", ",".join(map(str, combine_chunks[:2]))] + (["--deepep-path", deepep_path] if deepep_path else [])
        with tempfile.TemporaryDirectory() as tmp:
            for impl in IMPLS:  # separate processes: neither package's state (allocator, IPC maps) touches the other
                path = os.path.join(tmp, f"{impl}.json")
                print(f"=== {impl}", flush=True)
                rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--impl", impl, "--json", path, *common]).returncode
                if os.path.exists(path):  # written once the ranks finished, also when they flagged wrong results
                    with open(path) as f:
                        results[impl] = json.load(f)
                else:
                    problems.append(f"{LABELS[impl]} run failed (exit {rc})")
    else:
        if args.impl == "deep_ep" and deepep_path:
            sys.path.insert(0, os.path.abspath(deepep_path))  # spawned ranks inherit sys.path
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(deepep_path), os.environ.get("PYTHONPATH")]))
        if args.impl == "deep_ep" and importlib.util.find_spec("deep_ep") is None:
            raise SystemExit("bench_vs_deepep: `import deep_ep` finds nothing; build DeepEP (scripts/build_deepep.sh) and pass "
                             "--deepep-path DIR")
        opts = BenchOptions(args.impl, sms, args.iters, args.repeats, args.warmup, dispatch_chunks, combine_chunks)
        try:
            results[args.impl] = run_ranks(_worker, args.ranks, opts, backend=pg_backend, timeout_s=1800)[0]
        except (AssertionError, RuntimeError, TimeoutError) as error:  # a rank failed: its traceback is in the message
            print(f"bench_vs_deepep: {error}", file=sys.stderr, flush=True)
            return 1
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results[args.impl], f)

    problems += [f"{LABELS[i]} gave wrong results: {p}" for i, r in results.items() for p in r.get("problems", [])]
    notes = [f"{LABELS[i]}: the receive arena refused {f['arena_misses']:.0f} blocks in {key.replace('|', ' at ')} SMs "
             "(those calls took the rings)" for i, r in results.items() for key, f in r.get("figures", {}).items()
             if f.get("arena_misses", 0) > 0]
    modules = "; ".join(f"{LABELS[i]} {r['module']}" for i, r in results.items())
    rooflines = copy_roofline()  # after the runs: never beside them
    roofline = ", ".join(f"{k} {v:.0f}" for k, v in rooflines.items())
    try:  # a plain copy kernel on the SMs all ranks sharing a GPU occupy (issue 13's SM efficiency)
        sm_copy = {s: sm_copy_GBps(s * per_gpu) for s in sms}
        roofline += " · copy kernel on " + ", ".join(f"{s * per_gpu} SMs {v:.0f}" for s, v in sm_copy.items()) + " GB/s"
    except Exception as error:  # noqa: BLE001 - a baseline, not the measurement: say why it is missing
        sm_copy = {}
        roofline += f" · no copy-kernel baseline ({type(error).__name__}: {error})"
    shares = {"hbm_copy_GBps": rooflines["hbm_copy_GBps"], "sm_copy_GBps": sm_copy, "ranks_per_gpu": per_gpu}
    header = (f"{datetime.date.today()} · {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()} · EP{args.ranks} over "
              f"{pg_backend} ({per_gpu} rank(s) per GPU) · {TOKENS} tokens/rank, hidden {HIDDEN}, top-{TOPK} of {EXPERTS} · "
              f"Config(sms, {', '.join(map(str, dispatch_chunks))}) dispatch, Config(sms, {', '.join(map(str, combine_chunks))}) "
              f"combine · {args.iters} iters, slowest rank · commit {tree_commit(ROOT)} · {roofline} · {modules}")
    report = "\n".join([header] + [f"**{p}**" for p in problems] + notes + ["", format_table(results, sms, shares)])
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    print(report, flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
