"""Train one expert-parallel MoE layer through the Buffer API (a CPU-friendly example).

Each rank holds ``num_experts / world_size`` experts (2-layer MLPs) and its own tokens; a router
picks the top-k experts; tokens travel with ``deepep_megatron.autograd.dispatch``, the experts run
on the rank that holds them, and ``combine`` brings the weighted results back. The layer learns to
imitate a fixed random teacher MoE, so the printed loss falls.

    torchrun --nproc-per-node 2 scripts/moe_layer_demo.py --steps 30
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from deepep_megatron import Buffer
from deepep_megatron.autograd import combine, dispatch
from deepep_megatron.launch import init_process_group


class ExpertParallelMoE(torch.nn.Module):
    """Router (replicated) + this rank's slice of the experts."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, topk: int, rank: int, world_size: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_experts, self.topk = num_experts, topk
        self.num_local = num_experts // world_size
        self.router = torch.nn.Parameter(torch.randn(hidden, num_experts, generator=g) / hidden**0.5)
        w1 = torch.randn(num_experts, hidden, ffn, generator=g) / hidden**0.5
        w2 = torch.randn(num_experts, ffn, hidden, generator=g) / ffn**0.5
        local = slice(rank * self.num_local, (rank + 1) * self.num_local)
        self.w1 = torch.nn.Parameter(w1[local].clone())
        self.w2 = torch.nn.Parameter(w2[local].clone())

    def forward(self, x: torch.Tensor, buffer: Buffer) -> torch.Tensor:
        probs = torch.softmax(x @ self.router, dim=-1)
        topk_weights, topk_idx = probs.topk(self.topk, dim=-1)
        recv_x, recv_idx, recv_w, counts, handle = dispatch(buffer, x, topk_idx, topk_weights, self.num_experts)
        out = torch.zeros_like(recv_x)
        for e in range(self.num_local):  # each received row through each of its local experts
            rows, slot = torch.nonzero(recv_idx == e, as_tuple=True)
            if rows.numel():
                y = torch.relu(recv_x[rows] @ self.w1[e]) @ self.w2[e]
                out = out.index_add(0, rows, recv_w[rows, slot].unsqueeze(1) * y)
        return combine(buffer, out, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    # Not dist.init_process_group: this one lets destroy_process_group free the group (and its
    # gloo threads) before exit, where freeing it could abort the process (launch.py says why).
    init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=Buffer.get_nvl_size_hint(args.hidden * 4, world) if device.type == "cuda" else 0)
    student = ExpertParallelMoE(args.hidden, args.ffn, args.num_experts, args.topk, rank, world, seed=1).to(device)
    teacher = ExpertParallelMoE(args.hidden, args.ffn, args.num_experts, args.topk, rank, world, seed=2).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        x = torch.randn(args.tokens, args.hidden, generator=data).to(device)
        loss = torch.nn.functional.mse_loss(student(x, buffer), teacher(x, buffer))
        opt.zero_grad()
        loss.backward()
        for p in [student.router]:  # the router is replicated: average its gradient
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        if rank == 0 and (step == 1 or step % 5 == 0 or step == args.steps):
            ms = (time.perf_counter() - start) * 1e3
            print(f"step {step:4d} | loss {mean_loss.item():.5f} | {ms:7.1f} ms | backend {buffer.backend_name}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
