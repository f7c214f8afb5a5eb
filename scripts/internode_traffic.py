#!/usr/bin/env python3
"""Bytes per token on the RDMA and NVLink legs of an internode dispatch: forwarding vs direct sends.

    python scripts/internode_traffic.py [--tokens 4096] [--hidden 7168] [--topk 8] [--experts 256]
        [--layouts 2x2,2x4,4x2,4x8,8x8] [--max-nodes 4] [--fp8] [--seed 0] [--out FILE]

For each layout (nodes x ranks per node) and routing (DeepSeek-V3's node-limited top-k, each token to
at most --max-nodes nodes, and unrestricted top-k), random router scores give every rank's tokens'
experts (deepep_megatron.traffic.node_limited_topk); deepep_megatron.traffic.link_bytes counts what
issue [5/8]'s forwarding puts on each leg (one RDMA copy per destination node, NVLink copies inside
the nodes) against sending every token to every destination rank directly. A message is the row
(bf16, or e4m3 + fp32 scales per 128 channels with --fp8), the top-k ids and weights and the source
index. These are byte counts of the schemes, computed on the CPU: no link speed is measured or implied.
The table is printed last.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepep_megatron.traffic import link_bytes, node_limited_topk  # noqa: E402

FP8_BLOCK = 128


def message_bytes(hidden: int, num_topk: int, fp8: bool) -> int:
    """Bytes one token carries on a link: row (+ scales), top-k ids and weights (4 bytes each), source index."""
    row = hidden + hidden // FP8_BLOCK * 4 if fp8 else hidden * 2
    return row + num_topk * 8 + 4


def parse_layouts(text: str) -> list[tuple[int, int]]:
    layouts = []
    for part in text.split(","):
        nodes, _, per_node = part.partition("x")
        if not nodes.isdigit() or not per_node.isdigit() or int(nodes) < 1 or int(per_node) < 1:
            raise argparse.ArgumentTypeError(f"layout {part!r} must be NODESxRANKS_PER_NODE, e.g. 4x8")
        layouts.append((int(nodes), int(per_node)))
    return layouts


def rows(args: argparse.Namespace) -> list[list[str]]:
    generator = torch.Generator().manual_seed(args.seed)
    msg = message_bytes(args.hidden, args.topk, args.fp8)
    table = []
    for nodes, per_node in args.layouts:
        num_ranks = nodes * per_node
        if args.experts % num_ranks != 0:
            raise SystemExit(f"--experts {args.experts} does not split over {num_ranks} ranks ({nodes}x{per_node})")
        scores = torch.randn(args.tokens * num_ranks, args.experts, generator=generator)
        routings: list[tuple[str, Optional[int]]] = [("unrestricted", None)]
        if args.max_nodes is not None and args.max_nodes < nodes:
            routings.insert(0, (f"<= {args.max_nodes} nodes", args.max_nodes))
        for name, limit in routings:
            topk_idx = node_limited_topk(scores, args.topk, nodes, limit)
            counts = link_bytes(topk_idx, args.experts, per_node, num_ranks, msg)
            per_token = counts.tokens
            table.append([f"{nodes}x{per_node}", name, f"{counts.forwarded_rdma / per_token:.0f}",
                          f"{counts.direct_rdma / per_token:.0f}", f"{counts.rdma_saving:.2f}x",
                          f"{counts.forwarded_nvlink / per_token:.0f}", f"{counts.direct_nvlink / per_token:.0f}"])
    return table


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--layouts", type=parse_layouts, default=parse_layouts("2x2,2x4,4x2,4x8,8x8"),
                        help="comma list of NODESxRANKS_PER_NODE")
    parser.add_argument("--max-nodes", type=int, default=4, help="node-limited routing bound (DeepSeek-V3: 4)")
    parser.add_argument("--fp8", action="store_true", help="e4m3 rows with fp32 scales instead of bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    table = rows(args)
    header = (f"internode_traffic: {args.tokens} tokens/rank, hidden {args.hidden} {'e4m3' if args.fp8 else 'bf16'}, "
              f"top-{args.topk} of {args.experts}, message {message_bytes(args.hidden, args.topk, args.fp8)} bytes; "
              "bytes per token (computed from the routing, not measured)")
    lines = [header, "", "| nodes x ranks | routing | RDMA forwarded | RDMA direct | RDMA saving | NVLink forwarded | NVLink direct |",
             "|---|---|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in table]
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
