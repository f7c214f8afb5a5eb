"""Dry run of ``python -m deepep_megatron.pretrain``: resolve and check the flags for a world size,
print the arguments and the parameter count, and start nothing (no GPU, no process group of
``world_size`` ranks). What the recipes' ``DRY_RUN=1`` calls, on a login node or in CI:

    python -m deepep_megatron.megatron.dry_run --world-size 64 [pretraining flags...]

Checks: every flag check of the entry (``arguments.validate_args`` with the world size: TP/EP
dividing the world, EP dividing the experts, global batch a multiple of micro batch x DP, ...),
megatron-core's own ``TransformerConfig`` checks, and the divisibilities a run would only hit
when building the model on the GPUs (heads, widths and vocabulary by TP). FP8 flags are checked
for consistency; Transformer Engine itself need not be installed here (the GPU nodes need it).

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
from typing import Optional, Sequence

from ..config import FP8_BLOCK
from .arguments import build_parser, dense_ffn_width, num_micro_batches, validate_args
from .te_fp8 import fp8_dispatch

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


def check_divisibility(args: argparse.Namespace) -> None:
    """What validate_args leaves to the model build on the GPUs, checked up front."""
    tp = args.tensor_model_parallel_size
    ffn = dense_ffn_width(args)
    by_tp = f"must be divisible by --tensor-model-parallel-size ({tp})"
    checks = [
        (args.num_attention_heads % tp == 0, f"--num-attention-heads ({args.num_attention_heads}) {by_tp}"),
        (ffn % tp == 0, f"the dense FFN width ({ffn}) {by_tp}"),
    ]
    if args.sequence_parallel:
        checks.append((args.seq_length % tp == 0, f"--seq-length ({args.seq_length}) {by_tp} with --sequence-parallel"))
    if fp8_dispatch(args.moe_deepep_fp8_dispatch, args.fp8_format is not None, args.fp8_recipe):
        checks.append((args.hidden_size % FP8_BLOCK == 0,
                       f"FP8 dispatch needs --hidden-size % {FP8_BLOCK} == 0, got {args.hidden_size}"))
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


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
    from . import pretrain

    real = copy.copy(args)
    if te_missing:
        real.transformer_impl, real.fp8_format = "local", None
    try:
        pretrain.build_transformer_config(real)
    except AssertionError as error:  # some of megatron's checks are asserts
        raise ValueError(f"megatron-core TransformerConfig: {error}") from error


def count_parameters(args: argparse.Namespace, world_size: int) -> ParamCount:
    """Build one layer on the meta device in a 1-rank process group and scale to the real model."""
    import torch
    import torch.distributed as dist

    from megatron.core import parallel_state

    from . import cpu_compat
    from . import pretrain

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
        config = pretrain.build_transformer_config(one)
        config.use_cpu_initialization = True  # never touch a GPU a login node may have
        with torch.device("meta"):
            model = pretrain.GPTModel(
                config=config, transformer_layer_spec=pretrain.build_layer_spec(one),
                vocab_size=pretrain.padded_vocab_size(one), max_sequence_length=one.max_position_embeddings or one.seq_length,
            )
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


def report(args: argparse.Namespace, world_size: int, gpu_memory_gib: float = 80.0, out=sys.stdout) -> int:
    """Check ``args`` for ``world_size`` ranks and print the report. Returns 0, or raises ValueError."""
    validate_args(args, world_size)  # also fills --global-batch-size's default
    check_divisibility(args)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    own.add_argument("--gpu-memory-gib", type=float, default=80.0)
    mine, rest = own.parse_known_args(argv)
    parser = build_parser()
    parser.prog = "python -m deepep_megatron.megatron.dry_run [--world-size N] [--gpu-memory-gib G]"
    args = parser.parse_args(rest)
    if mine.world_size <= 0:
        parser.error(f"--world-size must be positive, got {mine.world_size}")
    try:
        return report(args, mine.world_size, mine.gpu_memory_gib)
    except (ValueError, RuntimeError) as error:
        print(f"dry run FAILED: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
