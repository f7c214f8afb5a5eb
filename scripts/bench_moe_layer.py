"""Time one megatron-core MoE layer, forward + backward, with megatron's alltoall dispatcher and with
deepep, in the same run, from the same weights and inputs; print the forward split (router,
dispatch, experts, combine) from CUDA events and check that outputs and gradients agree.

    torchrun --nproc-per-node 2 scripts/bench_moe_layer.py                       # GPU, EP2, issue 5's shape
    torchrun --nproc-per-node 2 scripts/bench_moe_layer.py --hidden-size 256 \\
        --num-experts 8 --moe-ffn-hidden-size 128 --tokens 64 --iters 2          # CPU smoke run (gloo)

The layer is built exactly as the pretraining entry builds it (``deepep_megatron.pretrain`` flags;
SequentialMLP experts), so the numbers are the ones a training step sees.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from deepep_megatron.megatron import pretrain
from deepep_megatron.megatron.arguments import build_parser, expert_ffn_width
from deepep_megatron.profiling import StageClock

STAGES = ("router", "dispatch", "experts", "combine")


def build_moe_layer(args: argparse.Namespace, config: Any, device: torch.device) -> torch.nn.Module:
    """The MoE layer (``mlp`` of the entry's layer spec) for ``args.moe_token_dispatcher``."""
    mlp = pretrain.build_layer_spec(args).submodules.mlp
    if hasattr(mlp, "module"):  # megatron-core 0.16: ModuleSpec
        layer = mlp.module(config=config, submodules=mlp.submodules)
    else:  # newer: functools.partial(MoELayer, submodules=...)
        layer = mlp(config=config)
    return layer.to(device)


def instrument(layer: torch.nn.Module, clock: StageClock, device: torch.device) -> None:
    """Time the layer's forward stages on ``clock`` (STAGES)."""
    layer.router.forward = clock.wrap("router", layer.router.forward, device)
    layer.experts.forward = clock.wrap("experts", layer.experts.forward, device)
    disp = layer.token_dispatcher
    for name, stage in (("dispatch_preprocess", "dispatch"), ("token_dispatch", "dispatch"),
                        ("dispatch_postprocess", "dispatch"), ("combine_preprocess", "combine"),
                        ("token_combine", "combine"), ("combine_postprocess", "combine")):
        setattr(disp, name, clock.wrap(stage, getattr(disp, name), device))


def run(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, clock: StageClock, iters: int, warmup: int):
    """Median fwd+bwd ms, median ms per stage, last output, input grad and parameter grads."""
    totals = []
    stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
    for i in range(warmup + iters):
        layer.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        out, _ = layer(inp)
        out.backward(grad)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) * 1e3
        step = clock.pop_ms()
        if i >= warmup:
            totals.append(elapsed)
            for s in STAGES:
                stage_ms[s].append(step[s])
    grads = {n: p.grad.detach().float().clone() for n, p in layer.named_parameters() if p.grad is not None}
    medians = {s: statistics.median(v) for s, v in stage_ms.items()}
    return statistics.median(totals), medians, out.detach().float(), inp.grad.detach().float(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def main() -> int:
    """Exit status: 1 on rank 0 when deepep and alltoall disagree."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    own.add_argument("--iters", type=int, default=10)
    own.add_argument("--warmup", type=int, default=3)
    mine, rest = own.parse_known_args()
    defaults = ["--num-layers", "1", "--hidden-size", "4096", "--num-attention-heads", "32", "--num-experts", "64",
                "--moe-router-topk", "8", "--moe-ffn-hidden-size", "2048", "--expert-model-parallel-size", "2",
                "--seq-length", str(mine.tokens), "--micro-batch-size", "1", "--mock-data"]
    if torch.cuda.is_available():
        defaults.append("--bf16")
    args = build_parser().parse_args(defaults + rest)  # later flags win
    args.moe_token_dispatcher = "alltoall"
    device = pretrain.initialize(args)
    rank = dist.get_rank()
    config = pretrain.build_transformer_config(args)
    dtype = config.params_dtype

    results = {}
    reference_state = None
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(mine.tokens, 1, args.hidden_size, generator=g).to(device, dtype)
    grad = torch.randn(mine.tokens, 1, args.hidden_size, generator=g).to(device, dtype)
    for dispatcher in ("alltoall", "deepep"):
        layer_args = copy.copy(args)
        layer_args.moe_token_dispatcher = dispatcher
        layer = build_moe_layer(layer_args, config, device)
        if reference_state is None:
            reference_state = {n: p.detach().clone() for n, p in layer.named_parameters()}
        else:  # same weights: parameter names are identical in both layers
            with torch.no_grad():
                for n, p in layer.named_parameters():
                    p.copy_(reference_state[n])
        clock = StageClock(STAGES, enabled=True)
        instrument(layer, clock, device)
        total, stage_ms, out, gx, grads = run(layer, x, grad, clock, mine.iters, mine.warmup)
        results[dispatcher] = (total, stage_ms, out, gx, grads)
        del layer

    a, d = results["alltoall"], results["deepep"]
    errs = {"output": rel_err(d[2], a[2]), "grad x": rel_err(d[3], a[3]),
            "grad params": max(rel_err(d[4][n], a[4][n]) for n in a[4])}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (results["alltoall"][:2], results["deepep"][:2], errs))
    if rank == 0:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"MoE layer fwd+bwd, {name}, EP{dist.get_world_size()}, hidden {args.hidden_size}, "
              f"{args.num_experts} experts top-{args.moe_router_topk}, expert FFN {expert_ffn_width(args)}, "
              f"{mine.tokens} tokens/rank, {str(dtype).replace('torch.', '')}, median of {mine.iters}")
        print("| rank | dispatcher | fwd router ms | fwd dispatch ms | fwd experts ms | fwd combine ms | fwd+bwd ms |")
        print("|---|---|---|---|---|---|---|")
        for r, (alltoall, deepep, _) in enumerate(gathered):
            for label, (total, split) in (("alltoall", alltoall), ("deepep", deepep)):
                cells = " | ".join(f"{split[s]:.3f}" for s in STAGES)
                print(f"| {r} | {label} | {cells} | {total:.2f} |")
        worst = {k: max(e[2][k] for e in gathered) for k in errs}
        print("deepep vs alltoall, relative error (worst rank): " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
        # bf16 rounding differs only by summation order; fp32 agrees to ~1e-6.
        limit = 2e-2 if dtype == torch.bfloat16 else 1e-5
        agree = all(v < limit for v in worst.values())
        print("AGREE" if agree else f"DISAGREE (limit {limit})")
    pretrain.shutdown()
    dist.destroy_process_group()
    return 0 if rank != 0 or agree else 1


if __name__ == "__main__":
    sys.exit(main())
