"""Dry run of ``python -m deepep_megatron.pretrain``: resolve and check the flags for a world size,
print the arguments and the parameter count, and start nothing (no GPU, no process group of
``world_size`` ranks). What the recipes' ``DRY_RUN=1`` calls, on a login node or in CI:

    python -m deepep_megatron.megatron.dry_run --world-size 64 [pretraining flags...]

The world size is ``--world-size`` (or ``WORLD_SIZE``; one of them is required: a dry run for the
wrong world size would check the wrong layout). ``python -m deepep_megatron.pretrain --dry-run``
runs the same report with ``WORLD_SIZE``.

Checks: every flag check of the entry (``arguments.validate_args`` with the world size: TP/EP
dividing the world, EP dividing the experts, global batch a multiple of micro batch x DP, heads
and widths by TP, FP8 dispatch's hidden size, ...) and megatron-core's own ``TransformerConfig``
checks. FP8 flags are checked for consistency; Transformer Engine itself need not be installed
here (the GPU nodes need it). The printed arguments are the resolved ones (``global_batch_size``
filled in, ``moe_deepep_fp8_dispatch`` on where the FP8 recipe implies it).

Parameter count: the model is built with one layer on the ``meta`` device (no memory), so the
count follows whatever the entry builds; layers are alike, so L layers = L x that layer. Per GPU:
experts / EP, tensor-parallel weights / TP, the rest whole. The memory line counts weights, fp32
main grads and Adam state (sharded over DP with --use-distributed-optimizer); activations are
not included.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, TextIO

from .arguments import build_parser, num_micro_batches, validate_args
from .startup import prepare

GIB = 1024**3


@dataclass
class ParamCount:
    total: int
    experts: int  # all experts of all layers
    active: int  # what one token passes through: dense + top-k experts per layer
    per_gpu: int
    per_gpu_experts: int


def _fmt(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _layout(args: argparse.Namespace, world_size: int) -> dict[str, int]:
    tp, ep, etp = args.tensor_model_parallel_size, args.expert_model_parallel_size, args.expert_tensor_parallel_size
    dp = world_size // tp
    return {
        "world": world_size, "tp": tp, "ep": ep, "etp": etp, "dp": dp,
        "expert_dp": world_size // (ep * etp),
        "micro_batches": num_micro_batches(args, dp),
        "experts_per_rank": args.num_experts // ep,
    }


def _fp8_note(args: argparse.Namespace) -> Optional[str]:
    """Check the FP8 flags; returns a note when Transformer Engine is missing here."""
    from .te_fp8 import have_transformer_engine, resolve_fp8

    if args.transformer_impl != "transformer_engine" and args.fp8_format is None:
        return None
    if have_transformer_engine():
        resolve_fp8(args.transformer_impl, args.fp8_format, args.fp8_recipe)
        return None
    # resolve_fp8 checks consistency first and only then TE's presence: a ValueError is a real
    # error, a RuntimeError only means "not installed on this machine".
    try:
        resolve_fp8(args.transformer_impl, args.fp8_format, args.fp8_recipe)
    except RuntimeError:
        pass
    return ("Transformer Engine is not installed here: the run needs it on the GPU nodes; "
            "parameters counted with the local layer spec (same weights)")


def check_transformer_config(args: argparse.Namespace, te_missing: bool) -> None:
    """megatron-core's TransformerConfig checks with the real parallel sizes (no process group
    needed). Without TE here, the FP8 fields are left out: _fp8_note checked them already."""
    from .model import build_transformer_config

    real = copy.copy(args)
    if te_missing:
        real.transformer_impl, real.fp8_format = "local", None
    try:
        build_transformer_config(real)
    except AssertionError as error:  # some of megatron's checks are asserts
        raise ValueError(f"megatron-core TransformerConfig: {error}") from error


def count_parameters(args: argparse.Namespace, world_size: int) -> ParamCount:
    """Build one layer on the meta device in a 1-rank process group and scale to the real model."""
    import torch
    import torch.distributed as dist

    from megatron.core import parallel_state

    from . import cpu_compat
    from .model import build_gpt_model, build_transformer_config

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        cpu_compat.apply()
        parallel_state.initialize_model_parallel(1, 1)
        one = copy.copy(args)
        one.num_layers = 1
        one.tensor_model_parallel_size = one.expert_model_parallel_size = one.expert_tensor_parallel_size = 1
        one.sequence_parallel = False
        one.transformer_impl, one.fp8_format = "local", None  # same weights; TE need not be here
        one.moe_token_dispatcher = "alltoall"  # the model's weights do not depend on it
        config = build_transformer_config(one)
        config.use_cpu_initialization = True  # never touch a GPU a login node may have
        with torch.device("meta"):
            model = build_gpt_model(one, config)
        layer = experts = tp_split_rest = tp_split_layer = 0
        rest = 0
        for name, p in model.named_parameters():
            n = p.numel()
            split = bool(getattr(p, "tensor_model_parallel", False))
            if ".experts." in name:
                experts += n
            elif name.startswith("decoder.layers."):
                layer += n
                tp_split_layer += n if split else 0
            else:
                rest += n
                tp_split_rest += n if split else 0
    finally:
        parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()

    L, E, k = args.num_layers, args.num_experts, args.moe_router_topk
    lay = _layout(args, world_size)
    per_expert = experts // E
    total = rest + L * (layer + experts)
    active = rest + L * (layer + k * per_expert)
    tp_split = tp_split_rest + L * tp_split_layer
    dense = rest + L * layer
    per_gpu_experts = L * experts // (lay["ep"] * lay["etp"])
    per_gpu = (dense - tp_split) + tp_split // lay["tp"] + per_gpu_experts
    return ParamCount(total, L * experts, active, per_gpu, per_gpu_experts)


def static_memory_bytes(args: argparse.Namespace, world_size: int, params: ParamCount) -> float:
    """Weights + fp32 main grads + Adam (fp32 master copy when bf16, m, v) per GPU."""
    lay = _layout(args, world_size)
    weight = 2 if args.bf16 else 4
    grad = 4  # grad_reduce_in_fp32
    optim = 12 if args.bf16 else 8
    dense = params.per_gpu - params.per_gpu_experts
    if args.use_distributed_optimizer:
        return (dense * (weight + grad + optim / lay["dp"])
                + params.per_gpu_experts * (weight + grad + optim / lay["expert_dp"]))
    return params.per_gpu * (weight + grad + optim)


def report(args: argparse.Namespace, world_size: int, gpu_memory_gib: float = 80.0, out: Optional[TextIO] = None) -> int:
    """Check ``args`` for ``world_size`` ranks and print the report to ``out`` (default: the current
    ``sys.stdout``). Returns 0, or raises ValueError."""
    out = out or sys.stdout
    validate_args(args, world_size)  # also fills --global-batch-size's default and the FP8-dispatch resolution
    note = _fp8_note(args)
    check_transformer_config(args, te_missing=note is not None)
    lay = _layout(args, world_size)
    params = count_parameters(args, world_size)
    mem = static_memory_bytes(args, world_size, params)

    print("resolved arguments:", file=out)
    for key, value in sorted(vars(args).items()):
        print(f"  {key} = {value}", file=out)
    print(f"layout: world {lay['world']} = TP {lay['tp']} x DP {lay['dp']}; experts: EP {lay['ep']} x "
          f"expert-TP {lay['etp']} x expert-DP {lay['expert_dp']}; {lay['experts_per_rank']} experts per rank; "
          f"{lay['micro_batches']} micro batch(es) per step; "
          f"{args.global_batch_size * args.seq_length} tokens per step", file=out)
    print(f"parameters: total {_fmt(params.total)} (experts {_fmt(params.experts)}), active per token "
          f"{_fmt(params.active)}; per GPU {_fmt(params.per_gpu)} (experts {_fmt(params.per_gpu_experts)})", file=out)
    print(f"memory per GPU: weights + grads + optimizer {mem / GIB:.2f} GiB "
          f"(activations not included; {gpu_memory_gib:.0f} GiB GPUs assumed)", file=out)
    if mem > gpu_memory_gib * GIB:
        raise ValueError(f"weights, grads and optimizer alone need {mem / GIB:.1f} GiB per GPU, more than "
                         f"{gpu_memory_gib:.0f} GiB: raise EP or the node count, or --use-distributed-optimizer")
    if note:
        print(f"note: {note}", file=out)
    print("dry run OK", file=out)
    return 0


def run_report(args: argparse.Namespace, world_size: int, gpu_memory_gib: float = 80.0) -> int:
    """:func:`report`, with a refusal as one ``dry run FAILED`` line on stderr: returns the exit status."""
    args.dry_run = True  # what this is, also in the printed arguments
    try:
        return report(args, world_size, gpu_memory_gib)
    except (ValueError, RuntimeError) as error:
        print(f"dry run FAILED: {error}", file=sys.stderr)
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m deepep_megatron.megatron.dry_run --world-size N [pretraining flags]``."""
    parser = build_parser(prog="python -m deepep_megatron.megatron.dry_run")
    group = parser.add_argument_group("dry run")
    env_world = os.environ.get("WORLD_SIZE")
    group.add_argument("--world-size", type=int, default=int(env_world) if env_world and env_world.isdigit() else None,
                       help="ranks the job would run on (default: WORLD_SIZE; one of them is required)")
    group.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU of the target machine")
    args = parser.parse_args(argv)
    world_size, gpu_memory_gib = args.world_size, args.gpu_memory_gib
    del args.world_size, args.gpu_memory_gib  # not pretraining flags: keep them out of the printed arguments
    if world_size is None:
        parser.error("--world-size N is required (or WORLD_SIZE=N): the layout is checked for that many ranks")
    if world_size <= 0 or gpu_memory_gib <= 0:
        parser.error(f"--world-size and --gpu-memory-gib must be positive, got {world_size} and {gpu_memory_gib}")
    prepare(args, parser.prog)
    return run_report(args, world_size, gpu_memory_gib)


if __name__ == "__main__":
    sys.exit(main())
