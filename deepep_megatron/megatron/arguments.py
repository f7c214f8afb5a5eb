"""Command-line flags of ``python -m deepep_megatron.pretrain`` (Megatron-LM names and meanings)
and their validation. Every check names the flag and says how to fix it."""
from __future__ import annotations

import argparse
import importlib.util
from typing import Optional, Sequence

from .dispatcher import BACKENDS
from .te_fp8 import FP8_FORMATS, FP8_RECIPES

DISPATCHERS = ("alltoall", "allgather", "deepep")


def add_deepep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of the deepep dispatcher that Megatron-LM does not have (shared by our pretraining
    entry and by :func:`deepep_megatron.megatron.megatron_lm.extra_args_provider`)."""
    group = parser.add_argument_group("deepep_megatron")
    group.add_argument("--moe-deepep-fp8-dispatch", action="store_true",
                       help="deepep dispatcher: send activations as FP8 e4m3 with per-128-channel scales "
                            "(needs hidden size % 128 == 0); implied by --fp8-recipe blockwise")
    group.add_argument("--moe-deepep-backend", choices=BACKENDS, default="auto",
                       help="deepep dispatcher: Buffer backend (auto = CUDA kernels when built and on GPU)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deepep_megatron.pretrain",
        description="Pretrain a GPT MoE model with megatron-core; launch with torchrun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="dense MLP width (default 4 * hidden)")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--vocab-size", type=int, default=1024, help="vocabulary of the null tokenizer (mock/pre-tokenized data)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="pad the embedding to a multiple of this x TP")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and activations (fp32 main params)")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in the linear layers (attention, MLP, experts)")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local")
    g.add_argument("--fp8-format", choices=FP8_FORMATS, default=None, help="TE FP8 training (needs --transformer-impl transformer_engine)")
    g.add_argument("--fp8-recipe", choices=sorted(FP8_RECIPES), default="delayed")

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=4)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="expert MLP width (default --ffn-hidden-size)")
    g.add_argument("--moe-token-dispatcher", choices=DISPATCHERS, default="deepep")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2)
    g.add_argument("--moe-router-load-balancing-type", choices=("aux_loss", "seq_aux_loss", "none"), default="aux_loss")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None, help="drop tokens beyond capacity (None = dropless)")
    g.add_argument("--moe-token-drop-policy", choices=("probs", "position"), default="probs")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    g.add_argument("--moe-router-dtype", choices=("fp32", "fp64"), default=None)
    g.add_argument("--moe-grouped-gemm", action="store_true", help="grouped GEMM experts (TE / GPU)")
    g.add_argument("--moe-permute-fusion", action="store_true", help="TE fused permutation (GPU)")
    g.add_argument("--moe-deepep-num-sms", type=int, default=20, help="deepep dispatcher: SMs for dispatch/combine kernels (even)")
    add_deepep_arguments(p)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="shard optimizer state over data parallel ranks")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None, help="default: nccl on GPU, gloo on CPU")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel size")
    g.add_argument("--train-iters", type=int, default=20)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="constant")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true", help="megatron-core's MockGPTDataset")
    g.add_argument("--data-path", nargs="+", default=None, help="prefixes of pre-tokenized indexed datasets (.bin/.idx)")
    g.add_argument("--split", default="100,0,0")
    g.add_argument("--data-cache-path", default=None)

    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None, help="directory for distributed checkpoints")
    g.add_argument("--save-interval", type=int, default=None, help="also save every N iterations")
    g.add_argument("--load", default=None, help="resume from the latest checkpoint in this directory")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--dry-run", action="store_true",
                   help="print the resolved arguments, layout and parameter count for WORLD_SIZE ranks and exit "
                        "(no GPU, no process group)")
    g.add_argument("--profile", action="store_true", help="profile iterations [--profile-step-start, --profile-step-end)")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-dir", default=None,
                   help="write a torch.profiler Chrome trace per rank here; without it, on GPU, "
                        "torch.cuda.profiler start/stop marks the range for nsys (CPU default: ./profile)")
    return p


def dense_ffn_width(args: argparse.Namespace) -> int:
    """The dense MLP width: --ffn-hidden-size, by default 4 x --hidden-size (Megatron-LM's default)."""
    return args.ffn_hidden_size or 4 * args.hidden_size


def expert_ffn_width(args: argparse.Namespace) -> int:
    """Each expert's MLP width: --moe-ffn-hidden-size, by default the dense width (megatron-core's default)."""
    return args.moe_ffn_hidden_size or dense_ffn_width(args)


def num_micro_batches(args: argparse.Namespace, data_parallel_size: int) -> int:
    """Micro batches per step on each data-parallel rank; --global-batch-size defaults to one micro
    batch per rank (micro batch x DP)."""
    per_step = args.micro_batch_size * data_parallel_size
    return (args.global_batch_size or per_step) // per_step


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and validate; argparse exits with status 2 on a bad flag, as usual."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> None:
    """Checks that need no process group (``world_size`` given: also the parallel sizes)."""

    def positive(name: str) -> None:
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value is None or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")

    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--vocab-size",
                 "--make-vocab-size-divisible-by", "--num-experts", "--moe-router-topk", "--micro-batch-size", "--train-iters",
                 "--tensor-model-parallel-size", "--expert-model-parallel-size", "--expert-tensor-parallel-size",
                 "--log-interval"):
        positive(flag)
    for flag in ("--global-batch-size", "--save-interval", "--ffn-hidden-size", "--moe-ffn-hidden-size",
                 "--max-position-embeddings"):  # optional, but positive when given
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None:
            positive(flag)
    if args.max_position_embeddings is not None and args.max_position_embeddings < args.seq_length:
        raise ValueError(
            f"--max-position-embeddings ({args.max_position_embeddings}) must be at least --seq-length ({args.seq_length})"
        )
    if args.hidden_size % args.num_attention_heads:
        raise ValueError(f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads ({args.num_attention_heads})")
    if args.moe_router_topk > args.num_experts:
        raise ValueError(f"--moe-router-topk ({args.moe_router_topk}) cannot exceed --num-experts ({args.num_experts})")
    if args.num_experts % args.expert_model_parallel_size:
        raise ValueError(
            f"--expert-model-parallel-size ({args.expert_model_parallel_size}) must divide --num-experts "
            f"({args.num_experts}): each EP rank holds num_experts / EP experts"
        )
    if args.mock_data == (args.data_path is not None):
        raise ValueError("give exactly one of --mock-data or --data-path")
    if args.moe_pad_expert_input_to_capacity and args.moe_expert_capacity_factor is None:
        raise ValueError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    if args.moe_token_dispatcher == "deepep":
        if args.moe_pad_expert_input_to_capacity:
            raise ValueError(
                "--moe-token-dispatcher deepep does not support --moe-pad-expert-input-to-capacity; "
                "drop it (capacity dropping without padding works) or use --moe-token-dispatcher alltoall"
            )
        if args.expert_tensor_parallel_size != 1:
            raise ValueError("--moe-token-dispatcher deepep needs --expert-tensor-parallel-size 1")
        if args.moe_deepep_num_sms <= 0 or args.moe_deepep_num_sms % 2:
            raise ValueError(f"--moe-deepep-num-sms must be a positive even number, got {args.moe_deepep_num_sms}")
    elif args.moe_deepep_fp8_dispatch:
        raise ValueError("--moe-deepep-fp8-dispatch needs --moe-token-dispatcher deepep")
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        raise ValueError("MoE training with --tensor-model-parallel-size > 1 needs --sequence-parallel (megatron-core requires it)")
    if args.sequence_parallel and args.transformer_impl == "local" and importlib.util.find_spec("apex") is None:
        raise ValueError(
            "--sequence-parallel with --transformer-impl local needs Apex (megatron-core's torch LayerNorm "
            "fallback refuses sequence parallelism); use --transformer-impl transformer_engine or install Apex"
        )
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save DIR")
    if args.profile and not 0 <= args.profile_step_start < args.profile_step_end:
        raise ValueError(
            f"--profile needs 0 <= --profile-step-start < --profile-step-end, got {args.profile_step_start} and {args.profile_step_end}"
        )
    if args.profile and args.profile_step_end > args.train_iters:
        raise ValueError(
            f"--profile-step-end ({args.profile_step_end}) is past --train-iters ({args.train_iters}): the profiled "
            "range would never close and no trace would be written"
        )
    # What megatron's OptimizerParamScheduler asserts, said with the flags' names.
    if not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"need 0 <= --min-lr <= --lr, got --min-lr {args.min_lr} and --lr {args.lr}")
    if not 0 <= args.lr_warmup_iters < args.train_iters:
        raise ValueError(f"--lr-warmup-iters ({args.lr_warmup_iters}) must be in [0, --train-iters={args.train_iters})")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.fp8_format is not None and args.transformer_impl != "transformer_engine":
        raise ValueError(f"--fp8-format {args.fp8_format} needs --transformer-impl transformer_engine")
    if world_size is not None:
        model_parallel = args.tensor_model_parallel_size
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {model_parallel}")
        data_parallel = world_size // model_parallel
        expert_parallel = args.expert_model_parallel_size * args.expert_tensor_parallel_size
        if world_size % expert_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by --expert-model-parallel-size x "
                f"--expert-tensor-parallel-size = {expert_parallel}"
            )
        if args.global_batch_size is None:
            args.global_batch_size = args.micro_batch_size * data_parallel
        if args.global_batch_size % (args.micro_batch_size * data_parallel):
            raise ValueError(
                f"--global-batch-size ({args.global_batch_size}) must be a multiple of --micro-batch-size x "
                f"data-parallel size = {args.micro_batch_size} x {data_parallel}"
            )
        if (args.expert_model_parallel_size == 1 and args.expert_tensor_parallel_size == 1 and args.tensor_model_parallel_size == 1
                and args.transformer_impl == "local" and not args.disable_bias_linear):
            # megatron-core's expert MLP adds its bias in place to the output of an identity
            # all-reduce (a view) when no expert communication is explicit; autograd refuses that.
            raise ValueError(
                "with --expert-model-parallel-size 1 (and TP 1, --transformer-impl local) megatron-core's expert MLP "
                "cannot add its linear bias (an in-place add on a view that autograd refuses); pass --disable-bias-linear"
            )
