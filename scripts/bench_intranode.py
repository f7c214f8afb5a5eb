#!/usr/bin/env python3
"""Benchmark of the cuda backend's intranode dispatch/combine, with its baselines in the same run.

    python scripts/bench_intranode.py [--ranks 2] [--sms 8,16,24,32,48,64] [--iters 20] [--out FILE]

Ranks: one per GPU over NCCL when there are enough GPUs, otherwise several on one GPU over gloo
(start MPS first). Shapes: DeepSeek-V3 (hidden 7168, 4096 tokens/rank, top-8 of 256 experts) and a
Mixtral-like one (hidden 4096, 4096 tokens/rank, top-2 of 8). Uniform random routing.

Per (shape, dtype, num_sms) it times with CUDA events, back-to-back calls, median of repeats, the
slowest rank:
  * dispatch (full: layout -> notify -> host sync -> dispatch, through Buffer.dispatch),
  * cached dispatch (handle given: barrier + dispatch kernel; what DeepEP's tuning times),
  * combine (bf16 rows back, summed).
GB/s two ways: "xing" = bytes this rank sends to OTHER ranks / time; "nvl" (DeepEP's figure) = all
bytes this rank receives, its own included / time. Baselines measured in the same run: p2p copy
peak GPU0 -> GPU1 (two GPUs) or the HBM copy (one GPU), and NCCL all_to_all_single of the same rows
with the permute (dispatch) / unpermute (combine) a Megatron all-to-all dispatcher does (NCCL only).
Prints a short table last; --out writes it (markdown) too.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepep_megatron.launch import local_backend, run_ranks, tree_commit  # noqa: E402 - after the path insert
from deepep_megatron.profiling import copy_roofline, seconds_per_call  # noqa: E402

SHAPES = {
    "dsv3": dict(hidden=7168, tokens=4096, topk=8, experts=256),
    "mixtral": dict(hidden=4096, tokens=4096, topk=2, experts=8),
}


def _time(fn, iters: int, repeats: int = 5) -> float:
    """Seconds per call, back-to-back between two events, median over repeats (profiling.seconds_per_call)."""
    return seconds_per_call(fn, iters, repeats=repeats)


def _worker(rank: int, world: int, sms_list: list[int], tune_sms: list[int], shapes: list[str], iters: int) -> list | None:
    """One rank (run_ranks started its process group): the table rows on rank 0, None elsewhere."""
    device = torch.device("cuda", torch.cuda.current_device())  # rank % GPUs, set by run_ranks
    from deepep_megatron import Buffer, Config, per_token_cast_to_fp8
    from deepep_megatron.config import default_combine_config, default_dispatch_config

    group = dist.group.WORLD
    max_hidden = max(SHAPES[s]["hidden"] for s in shapes)
    nvl = max(Config(s, 6, 512 if s in tune_sms else 256).get_nvl_buffer_size_hint(max_hidden * 2, world)
              for s in sms_list + tune_sms)
    buffer = Buffer(group, num_nvl_bytes=nvl, explicitly_destroy=True, backend="cuda")
    rows = []

    def slowest(seconds: float) -> float:
        values = [None] * world
        dist.all_gather_object(values, seconds, group=group)
        return max(values)

    for shape_name in shapes:
        shape = SHAPES[shape_name]
        H, T, K, E = shape["hidden"], shape["tokens"], shape["topk"], shape["experts"]
        g = torch.Generator(device="cpu").manual_seed(1000 + rank)
        x = torch.randn(T, H, generator=g).to(device=device, dtype=torch.bfloat16)
        scores = torch.rand(T, E, generator=g)
        topk_idx = scores.topk(K, dim=1).indices.to(device)
        topk_weights = torch.rand(T, K, generator=g).to(device)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
        send_counts = per_rank.tolist()
        values = [None] * world
        dist.all_gather_object(values, send_counts, group=group)
        recv_counts = [values[src][rank] for src in range(world)]
        crossing_rows = sum(c for r, c in enumerate(send_counts) if r != rank)
        received_rows = sum(recv_counts)

        for use_fp8 in (False, True):
            x_in = per_token_cast_to_fp8(x) if use_fp8 else x
            row_bytes = H + H // 128 * 4 if use_fp8 else H * 2
            configs = [(sms, default_dispatch_config(world, sms), default_combine_config(world, sms), str(sms))
                       for sms in sms_list]
            # A sender block splits 24 warps over the R-1 peers and moves one token per warp, so
            # the swept chunks are 1..4 rounds of one peer's warp group.
            group_warps = 24 // (world - 1)
            for sms in tune_sms:
                for chunk in (group_warps * rounds for rounds in (1, 2, 3, 4)):
                    for slots in (256, 512):
                        configs.append((sms, Config(sms, chunk, slots), Config(sms, chunk, slots),
                                        f"{sms} (chunk {chunk}, {slots} slots)"))
            for sms, dcfg, ccfg, label in configs:
                args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                            topk_idx=topk_idx, topk_weights=topk_weights, config=dcfg)
                recv = buffer.dispatch(x_in, **args)
                handle = recv[4]
                t_full = slowest(_time(lambda: buffer.dispatch(x_in, **args), iters))
                t_cached = slowest(_time(lambda: buffer.dispatch(x_in, handle=handle, config=dcfg), iters))
                t_comb = None
                if not use_fp8:
                    y = recv[0]
                    t_comb = slowest(_time(lambda: buffer.combine(y, handle, config=ccfg), iters))
                rows.append(dict(shape=shape_name, dtype="fp8" if use_fp8 else "bf16", sms=label, full_us=t_full * 1e6,
                                 cached_us=t_cached * 1e6, combine_us=None if t_comb is None else t_comb * 1e6,
                                 xing_bytes=crossing_rows * row_bytes, nvl_bytes=received_rows * row_bytes,
                                 comb_xing_bytes=crossing_rows * H * 2, comb_nvl_bytes=received_rows * H * 2))
                del recv, handle

        if dist.get_backend() == "nccl":
            # Megatron-style all-to-all: permute rows into rank-major order, all_to_all_single, and the reverse.
            dest, tokens = in_rank.t().nonzero(as_tuple=True)
            out_rows = sum(recv_counts)
            for use_fp8 in (False, True):
                if use_fp8:
                    xf, sf = per_token_cast_to_fp8(x)
                    payload = torch.cat([xf.view(torch.uint8), sf.view(torch.uint8)], dim=1)
                else:
                    payload = x
                recv_buf = torch.empty(out_rows, payload.size(1), dtype=payload.dtype, device=device)
                send_buf = payload.index_select(0, tokens)

                def a2a_dispatch():
                    permuted = payload.index_select(0, tokens)
                    dist.all_to_all_single(recv_buf, permuted, recv_counts, send_counts, group=group)

                def a2a_raw():
                    dist.all_to_all_single(recv_buf, send_buf, recv_counts, send_counts, group=group)

                t_a2a_d = slowest(_time(a2a_dispatch, iters))
                t_a2a_raw = slowest(_time(a2a_raw, iters))
                t_a2a_c = None
                if not use_fp8:
                    back = torch.empty_like(send_buf)

                    def a2a_combine():
                        dist.all_to_all_single(back, recv_buf, send_counts, recv_counts, group=group)
                        torch.zeros(T, H, dtype=torch.float32, device=device).index_add_(0, tokens, back.float()).to(torch.bfloat16)

                    t_a2a_c = slowest(_time(a2a_combine, iters))
                rows.append(dict(shape=shape_name, dtype="fp8" if use_fp8 else "bf16", sms="nccl",
                                 full_us=t_a2a_d * 1e6, cached_us=t_a2a_raw * 1e6,
                                 combine_us=None if t_a2a_c is None else t_a2a_c * 1e6,
                                 xing_bytes=crossing_rows * payload.size(1) * payload.element_size(),
                                 nvl_bytes=received_rows * payload.size(1) * payload.element_size(),
                                 comb_xing_bytes=crossing_rows * H * 2, comb_nvl_bytes=received_rows * H * 2))
    buffer.destroy()
    return rows if rank == 0 else None


def _fmt_table(rows: list[dict], baselines: dict, world: int) -> str:
    """Markdown table. The roofline column: with two GPUs, xing GB/s over the p2p copy peak; on one GPU,
    the time to copy every rank's received bytes once at the HBM copy rate over the measured time."""
    peak = baselines.get("p2p_copy_GBps")
    hbm = baselines.get("hbm_copy_GBps")
    lines = [
        "| shape | dtype | SMs | dispatch us (full) | dispatch us (cached) | xing GB/s | nvl GB/s | "
        + ("% p2p peak | " if peak else "% HBM copy roofline | ")
        + "combine us | comb xing GB/s | comb nvl GB/s | comb % roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def roofline(xing_bytes: float, nvl_bytes: float, seconds: float) -> str:
        if peak:
            return f"{100 * xing_bytes / seconds / 1e9 / peak:.0f}%"
        return f"{100 * (world * nvl_bytes * 2 / (hbm * 1e9)) / seconds:.0f}%"

    for r in rows:
        t = r["cached_us"] / 1e6
        xing = r["xing_bytes"] / t / 1e9
        nvl = r["nvl_bytes"] / t / 1e9
        comb = r["combine_us"]
        cx = r["comb_xing_bytes"] / (comb / 1e6) / 1e9 if comb else None
        cn = r["comb_nvl_bytes"] / (comb / 1e6) / 1e9 if comb else None
        sms = r["sms"] if r["sms"] != "nccl" else "NCCL a2a (full=permute+a2a, cached=raw a2a)"
        cells = [r["shape"], r["dtype"], str(sms), f"{r['full_us']:.0f}", f"{r['cached_us']:.0f}", f"{xing:.0f}", f"{nvl:.0f}"]
        cells.append(roofline(r["xing_bytes"], r["nvl_bytes"], t))
        cells += ["-" if comb is None else f"{comb:.0f}", "-" if cx is None else f"{cx:.0f}", "-" if cn is None else f"{cn:.0f}",
                  "-" if comb is None else roofline(r["comb_xing_bytes"], r["comb_nvl_bytes"], comb / 1e6)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sms", default="8,16,24,32,48,64")
    parser.add_argument("--shapes", default="dsv3,mixtral")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tune-sms", default="", help="SM counts at which to sweep chunk sizes and ring slots")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    sms_list = [int(s) for s in args.sms.split(",")]
    tune_sms = [int(s) for s in args.tune_sms.split(",") if s]
    shapes = args.shapes.split(",")
    num_gpus = torch.cuda.device_count()
    pg_backend, per_gpu = local_backend(args.ranks)
    if per_gpu > 1:
        limit = torch.cuda.get_device_properties(0).multi_processor_count // per_gpu
        if max(sms_list) > limit:
            print(f"note: {per_gpu} ranks per GPU: dropping SM counts above {limit}", flush=True)
            sms_list = [s for s in sms_list if s <= limit]
    baselines = copy_roofline()
    print(f"{torch.cuda.get_device_name(0)} x{num_gpus}, torch {torch.__version__}, {args.ranks} ranks over {pg_backend}", flush=True)
    print("baselines: " + ", ".join(f"{k} {v:.0f}" for k, v in baselines.items()), flush=True)
    try:
        rows = run_ranks(_worker, args.ranks, sms_list, tune_sms, shapes, args.iters, backend=pg_backend,
                         timeout_s=3600)[0]
    except (AssertionError, RuntimeError, TimeoutError) as error:  # a rank failed: its traceback is in the message
        sys.exit(f"bench_intranode: {error}")
    commit = tree_commit(os.path.dirname(os.path.abspath(__file__)))
    header = (f"{datetime.date.today()} · {torch.cuda.get_device_name(0)} x{num_gpus} · EP{args.ranks} over {pg_backend} · "
              f"commit {commit} · " + ", ".join(f"{k} {v:.0f}" for k, v in baselines.items()))
    table = _fmt_table(rows, baselines, args.ranks)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + table + "\n")
    print(header)
    print(table, flush=True)


if __name__ == "__main__":
    main()
