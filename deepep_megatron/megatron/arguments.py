"""Command-line flags of ``python -m deepep_megatron.pretrain`` (Megatron-LM names and meanings)
and their validation: the one place that checks them, before megatron-core is imported or anything
is built. Every check names the flag and says how to fix it.

Light on purpose (argparse, and torch only through ``deepep_megatron``'s own package): a typo costs
no megatron-core import, and ``--help`` works without megatron-core installed.

Errors go through :func:`exit_with_error`: one line ``PROG: error: ...`` on stderr, printed by one
rank only (the launcher's rank 0; every rank exits with the same status), no usage block.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import sys
from typing import NoReturn, Optional, Sequence

from ..backends import BACKEND_NAMES, cuda_backend_available
from ..config import FP8_BLOCK, SUPPORTED_NVL_RANK_COUNTS
from .te_fp8 import FP8_FORMATS, FP8_RECIPES, fp8_dispatch

DISPATCHERS = ("alltoall", "allgather", "deepep")
#: SMs of the dispatch/combine kernels when no flag sets them (DeepEP's default, ``Buffer.num_sms``).
DEFAULT_NUM_SMS = 20
#: What the launcher sets; the entry needs all of them unless a process group already exists.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PROG = "python -m deepep_megatron.pretrain"
#: The file in a --save directory that names its latest checkpoint (Megatron-LM's name).
TRACKER_FILE = "latest_checkpointed_iteration.txt"


def launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun: ``RANK``, srun: ``SLURM_PROCID``);
    0 when started by hand."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def exit_with_error(prog: str, message: str, status: int = 2) -> NoReturn:
    """Print ``prog: error: message`` once per job (rank 0 only) and exit with ``status`` on every rank."""
    if launch_rank() == 0:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


class FlagParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one short line from one rank (no usage block),
    and whose unknown flags come with the closest known flag."""

    def error(self, message: str) -> NoReturn:
        exit_with_error(self.prog, f"{message} (--help lists every flag)")

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Optional[argparse.Namespace] = None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras))
        return parsed

    def _unrecognized(self, extras: list[str]) -> str:
        """Name each unknown flag with its closest known flag (``--moe-router-topkk`` -> ``--moe-router-topk``)."""
        known = list(self._option_string_actions)
        parts = []
        for position, extra in enumerate(extras):
            if not extra.startswith("-"):
                if position == 0 or not extras[position - 1].startswith("-"):  # else: the unknown flag's value
                    parts.append(f"unexpected value {extra!r} (a value follows its flag)")
                continue
            flag = extra.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            parts.append(f"unrecognized flag {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
        return "; ".join(parts)


def add_deepep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of the deepep dispatcher that Megatron-LM does not have (shared by our pretraining
    entry and by :func:`deepep_megatron.megatron.megatron_lm.extra_args_provider`)."""
    group = parser.add_argument_group("deepep_megatron")
    group.add_argument("--moe-deepep-fp8-dispatch", action="store_true",
                       help=f"deepep dispatcher: send activations as FP8 e4m3 with one scale per {FP8_BLOCK} "
                            f"channels (needs --hidden-size divisible by {FP8_BLOCK}); implied by --fp8-recipe blockwise")
    group.add_argument("--moe-deepep-backend", choices=BACKEND_NAMES, default="auto",
                       help="deepep dispatcher: Buffer backend (auto = CUDA kernels when built, on GPU, for 2, 4 or "
                            "8 EP ranks; else reference; forwarding = the reference's collectives with node "
                            "forwarding, for EP groups over several nodes)")
    return parser


def build_parser(prog: str = PROG) -> FlagParser:
    """Every flag of the pretraining entry, with its default (``--help`` lists them)."""
    p = FlagParser(
        prog=prog,
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
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                   help="pad every expert's input to its capacity (needs --moe-expert-capacity-factor): static "
                        "shapes; with deepep the layer's dispatch and combine need no host sync")
    g.add_argument("--moe-router-dtype", choices=("fp32", "fp64"), default=None)
    g.add_argument("--moe-grouped-gemm", action="store_true", help="grouped GEMM experts (TE / GPU)")
    g.add_argument("--moe-permute-fusion", action="store_true", help="TE fused permutation (GPU)")
    g.add_argument("--moe-deepep-num-sms", "--moe-flex-dispatcher-num-sms", dest="moe_deepep_num_sms", type=int,
                   default=DEFAULT_NUM_SMS,
                   help="deepep dispatcher: SMs for the dispatch/combine kernels (even; megatron-core 0.19 calls it "
                        "--moe-flex-dispatcher-num-sms)")
    add_deepep_arguments(p)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="shard optimizer state over data parallel ranks")
    g.add_argument(
        "--distributed-backend", choices=DISTRIBUTED_BACKENDS, default=None,
        help="default: nccl with one rank per GPU, host-gloo when local ranks outnumber the GPUs (several ranks "
        "share a GPU under MPS; collectives of CUDA tensors go through host memory over gloo), gloo on CPU",
    )

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
    g.add_argument("--show-warnings", action="store_true",
                   help="keep the known harmless warnings of megatron-core and torch (Apex/TE fallbacks, "
                        "deprecations) that are silenced by default")
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


def parse_args(argv: Optional[Sequence[str]] = None, *, launch: bool = False,
               parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """Parse and validate the flags; a bad one exits with status 2 and one line naming it (one rank).

    ``launch``: this process is a rank of a job about to start (the entry): the world size comes
    from the process group or the launcher's environment and the parallel layout is checked
    against it, and, unless ``--dry-run``, so is this machine (:func:`check_environment`).
    """
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)  # the flags alone first: a typo is reported before a missing launcher
        if launch:
            validate_args(args, launch_world_size(args))
            if not args.dry_run:
                check_environment(args)
    except ValueError as error:
        exit_with_error(parser.prog, str(error))
    return args


def launch_world_size(args: argparse.Namespace) -> int:
    """The job's world size: the existing process group's, else the launcher's ``WORLD_SIZE``.

    Raises ``ValueError`` saying how to launch when the launcher's variables are missing.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if args.dry_run:
        if "WORLD_SIZE" not in os.environ:
            raise ValueError(
                "--dry-run checks the flags for a world size and WORLD_SIZE is not set: run "
                "`WORLD_SIZE=N python -m deepep_megatron.pretrain --dry-run ...` or "
                "`python -m deepep_megatron.megatron.dry_run --world-size N ...`"
            )
    else:
        missing = [name for name in LAUNCH_ENV if name not in os.environ]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} not set: this is a distributed job, start it with torchrun, e.g. "
                "`torchrun --standalone --nproc-per-node 2 -m deepep_megatron.pretrain ...` "
                "(one process: --nproc-per-node 1), or with srun through recipes/launch.sh"
            )
    world = os.environ["WORLD_SIZE"]
    if not world.isdigit() or int(world) <= 0:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {world!r}")
    return int(world)


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> None:
    """Every check of the flags that needs neither a process group nor a GPU (``world_size`` given:
    also the parallel layout). Fills the derived values: ``--global-batch-size`` (with
    ``world_size``) and ``--moe-deepep-fp8-dispatch`` (on when an FP8 recipe implies it).

    Raises ``ValueError`` naming the flag and the fix.
    """
    _check_sizes(args)
    _check_moe(args)
    _check_training(args)
    if world_size is not None:
        _check_layout(args, world_size)


def _flag_value(args: argparse.Namespace, flag: str):
    return getattr(args, flag.lstrip("-").replace("-", "_"))


def _check_sizes(args: argparse.Namespace) -> None:
    """Positive sizes and the attention heads' split of the hidden size."""

    def positive(flag: str) -> None:
        value = _flag_value(args, flag)
        if value is None or value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value}")

    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--vocab-size",
                 "--make-vocab-size-divisible-by", "--num-experts", "--moe-router-topk", "--micro-batch-size", "--train-iters",
                 "--tensor-model-parallel-size", "--expert-model-parallel-size", "--expert-tensor-parallel-size",
                 "--log-interval"):
        positive(flag)
    for flag in ("--global-batch-size", "--save-interval", "--ffn-hidden-size", "--moe-ffn-hidden-size",
                 "--max-position-embeddings"):  # optional, but positive when given
        if _flag_value(args, flag) is not None:
            positive(flag)
    if args.max_position_embeddings is not None and args.max_position_embeddings < args.seq_length:
        raise ValueError(
            f"--max-position-embeddings ({args.max_position_embeddings}) must be at least --seq-length ({args.seq_length})"
        )
    if args.hidden_size % args.num_attention_heads:
        raise ValueError(f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads ({args.num_attention_heads})")


def _check_moe(args: argparse.Namespace) -> None:
    """Router, experts, the dispatcher's own flags and FP8."""
    if args.moe_router_topk > args.num_experts:
        raise ValueError(f"--moe-router-topk ({args.moe_router_topk}) cannot exceed --num-experts ({args.num_experts})")
    if args.num_experts % args.expert_model_parallel_size:
        raise ValueError(
            f"--expert-model-parallel-size ({args.expert_model_parallel_size}) must divide --num-experts "
            f"({args.num_experts}): each EP rank holds num_experts / EP experts"
        )
    if args.moe_pad_expert_input_to_capacity and args.moe_expert_capacity_factor is None:
        raise ValueError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    if args.fp8_format is not None and args.transformer_impl != "transformer_engine":
        raise ValueError(f"--fp8-format {args.fp8_format} needs --transformer-impl transformer_engine")
    if args.moe_token_dispatcher != "deepep":
        if args.moe_deepep_fp8_dispatch:
            raise ValueError("--moe-deepep-fp8-dispatch needs --moe-token-dispatcher deepep")
        return
    if args.expert_tensor_parallel_size != 1:
        raise ValueError("--moe-token-dispatcher deepep needs --expert-tensor-parallel-size 1")
    check_num_sms(args.moe_deepep_num_sms, "--moe-deepep-num-sms/--moe-flex-dispatcher-num-sms")
    # The resolved value, so that everything downstream (and the dry run's printout) sees it.
    args.moe_deepep_fp8_dispatch = fp8_dispatch(args.moe_deepep_fp8_dispatch, args.fp8_format is not None, args.fp8_recipe)
    if args.moe_deepep_fp8_dispatch and args.hidden_size % FP8_BLOCK:
        raise ValueError(
            f"FP8 dispatch (--moe-deepep-fp8-dispatch, implied by --fp8-recipe blockwise) needs --hidden-size "
            f"divisible by {FP8_BLOCK} (one scale per {FP8_BLOCK} channels), got {args.hidden_size}"
        )


def check_num_sms(num_sms: object, flag: str) -> int:
    """The dispatch/combine SM count: a positive even int (two SMs per channel), else ``ValueError`` naming ``flag``."""
    if not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms <= 0 or num_sms % 2:
        raise ValueError(f"{flag} must be a positive even number (two SMs per channel), got {num_sms!r}")
    return num_sms


def _check_training(args: argparse.Namespace) -> None:
    """Data, parallel options, checkpointing, profiling and the optimizer schedule."""
    if args.mock_data == (args.data_path is not None):
        raise ValueError("give exactly one of --mock-data or --data-path")
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


def _check_layout(args: argparse.Namespace, world_size: int) -> None:
    """The parallel sizes against the world size and what TP splits; fills --global-batch-size's default."""
    model_parallel = args.tensor_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {model_parallel}")
    by_tp = f"must be divisible by --tensor-model-parallel-size ({model_parallel})"
    if args.num_attention_heads % model_parallel:
        raise ValueError(f"--num-attention-heads ({args.num_attention_heads}) {by_tp}")
    if dense_ffn_width(args) % model_parallel:
        raise ValueError(f"the dense FFN width (--ffn-hidden-size, default 4 x --hidden-size: {dense_ffn_width(args)}) {by_tp}")
    if args.sequence_parallel and args.seq_length % model_parallel:
        raise ValueError(f"--seq-length ({args.seq_length}) {by_tp} with --sequence-parallel")
    data_parallel = world_size // model_parallel
    expert_parallel = args.expert_model_parallel_size * args.expert_tensor_parallel_size
    if world_size % expert_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by --expert-model-parallel-size x "
            f"--expert-tensor-parallel-size = {expert_parallel}: launch a multiple of {expert_parallel} ranks "
            "or lower --expert-model-parallel-size"
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


def check_environment(args: argparse.Namespace) -> None:
    """What this machine must offer for a real run (not for a dry run): the checkpoint to resume,
    the deepep backend asked for, and NCCL's one rank per GPU. Raises ``ValueError`` naming the
    flag and the fix."""
    import torch

    if args.load is not None and not os.path.isfile(os.path.join(args.load, TRACKER_FILE)):
        raise ValueError(f"--load {args.load}: no {TRACKER_FILE} there; point --load at a --save directory")
    if args.moe_token_dispatcher == "deepep" and args.moe_deepep_backend == "cuda":
        if not cuda_backend_available():
            raise ValueError(
                "--moe-deepep-backend cuda needs a CUDA GPU and the compiled extension (build it with "
                "`DEEPEP_MEGATRON_BUILD_CUDA=1 pip install -e .`); use --moe-deepep-backend auto or reference"
            )
        if args.expert_model_parallel_size not in SUPPORTED_NVL_RANK_COUNTS:
            raise ValueError(
                f"--moe-deepep-backend cuda runs EP groups of {SUPPORTED_NVL_RANK_COUNTS} ranks, got "
                f"--expert-model-parallel-size {args.expert_model_parallel_size}; use --moe-deepep-backend auto"
            )
    if not torch.cuda.is_available():
        return
    backend = distributed_backend(args)
    if backend == "gloo":
        # Seen on H100 with two ranks sharing the GPU under MPS: the first gradient reduction fails.
        raise ValueError(
            "training on GPU cannot use --distributed-backend gloo: megatron's DDP all-reduces CUDA gradients with "
            "allreduce_coalesced, which gloo does not support for CUDA tensors; use nccl (one rank per GPU) or "
            "host-gloo (ranks sharing a GPU: the default when they outnumber the GPUs)"
        )
    ranks_here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
    if backend == "nccl" and ranks_here > gpus:
        raise ValueError(
            f"{ranks_here} local ranks on {gpus} GPU(s): --distributed-backend nccl needs one rank per GPU; start at "
            f"most {gpus} ranks per node (torchrun --nproc-per-node {gpus}), or use --distributed-backend host-gloo"
        )


#: ``--distributed-backend`` choices; ``host-gloo`` is :mod:`deepep_megatron.host_staged`.
DISTRIBUTED_BACKENDS = ("nccl", "gloo", "host-gloo")


def distributed_backend(args: argparse.Namespace) -> str:
    """The process-group backend a run uses: ``--distributed-backend``, else nccl with one rank per GPU,
    host-gloo when this node's ranks (LOCAL_WORLD_SIZE) outnumber its GPUs, gloo without CUDA."""
    import torch

    if args.distributed_backend:
        return args.distributed_backend
    if not torch.cuda.is_available():
        return "gloo"
    return "host-gloo" if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > torch.cuda.device_count() else "nccl"


def init_process_group_string(backend: str) -> str:
    """What ``torch.distributed.init_process_group`` takes for a :data:`DISTRIBUTED_BACKENDS` name."""
    if backend == "host-gloo":
        from ..host_staged import backend_string

        return backend_string()
    return backend
