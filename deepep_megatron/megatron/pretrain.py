"""GPT MoE pretraining on megatron-core: ``torchrun ... -m deepep_megatron.pretrain [flags]``.

Built from megatron-core's own pieces: ``parallel_state`` groups, ``GPTModel`` with the MoE layer
specs (local or Transformer Engine), ``DistributedDataParallel``, ``get_megatron_optimizer``
(DistributedOptimizer with ``--use-distributed-optimizer``), ``OptimizerParamScheduler``,
``get_forward_backward_func``, the mock / indexed GPT datasets and ``dist_checkpointing``.
``--moe-token-dispatcher deepep`` swaps the MoE layers for :class:`DeepEPMoELayer`. The model
itself is built by :mod:`.model` (shared with the dry run); the command line is :mod:`.cli`'s
(flags checked and warnings quieted before this module imports megatron-core).

On a machine without CUDA it runs on gloo with :mod:`cpu_compat` applied (tests, the tiny demo).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from . import cpu_compat
from ..host_staged import BACKEND_NAME as HOST_STAGED_BACKEND
from .arguments import (
    PROG,
    TRACKER_FILE,
    distributed_backend,
    exit_with_error,
    init_process_group_string,
    num_micro_batches,
    parse_args,
    validate_args,
)
from .dispatcher import describe_buffers, destroy_buffers, iter_deepep_dispatchers
# The model builders live in .model (shared with the dry run); scripts/bench_moe_layer.py and the
# tests reach them through this module too, hence GPTModel and friends imported by name here.
from .model import GPTModel, build_gpt_model, build_layer_spec, build_transformer_config, padded_vocab_size  # noqa: F401

# megatron-core imports after our modules so that import errors name deepep_megatron first.
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedObject  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron.core.utils import unwrap_model  # noqa: E402

_DIST_OPT_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


# ------------------------------------------------------------------------------------ setup
def initialize(args: argparse.Namespace) -> torch.device:
    """Process group (if the launcher has not made one), CPU shims, parallel_state, seeds."""
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            # More local ranks than GPUs share them round-robin (under MPS, over host-gloo).
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group(init_process_group_string(distributed_backend(args)), timeout=datetime.timedelta(minutes=10))
    validate_args(args, dist.get_world_size())
    cpu_compat.apply()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def describe_process_group() -> str:
    """The default process group's backend, for the start banner."""
    name = str(dist.get_backend())
    if HOST_STAGED_BACKEND not in name:
        return name
    mps = "on" if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") else "not seen (CUDA_MPS_PIPE_DIRECTORY unset: start MPS, or kernels that wait on peers crawl)"
    return (f"host-gloo ({os.environ.get('LOCAL_WORLD_SIZE', '?')} local ranks share {torch.cuda.device_count()} GPU(s), "
            f"CUDA collectives through host memory; MPS {mps})")


def build_model(args: argparse.Namespace, config: TransformerConfig, device: torch.device) -> list[DistributedDataParallel]:
    """GPTModel wrapped in megatron's DDP; a one-chunk list, as get_forward_backward_func expects.
    (GPU training needs NCCL: arguments.check_environment refuses gloo there, before anything is built.)"""
    model = build_gpt_model(args, config).to(device)
    if args.bf16:  # bf16 weights, fp32 logits; DDP keeps fp32 grads and the optimizer fp32 main params
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    return [DistributedDataParallel(config, ddp_config, model)]


def build_optimizer(args: argparse.Namespace, model: list) -> tuple[Any, OptimizerParamScheduler]:
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_iters else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


# ------------------------------------------------------------------------------------ data
def build_dataset(args: argparse.Namespace) -> GPTDataset:
    """Training split: enough samples for every iteration (mock or indexed data)."""
    num_samples = args.train_iters * args.global_batch_size
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=None if args.mock_data else (args.data_path, None),
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=NullTokenizer(args.vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=True,
        mid_level_dataset_surplus=0.005,
    )
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    train, _, _ = BlendedMegatronDatasetBuilder(dataset_type, [num_samples, 0, 0], lambda: True, config).build()
    return train


def batches(dataset: GPTDataset, args: argparse.Namespace, start_iteration: int, device: torch.device) -> Iterator[dict]:
    """Micro batches of this data-parallel rank from ``start_iteration`` on.

    Sample ``((iteration * M + micro) * DP + dp_rank) * B + b`` for M micro batches of B samples:
    deterministic, disjoint across DP ranks, identical across TP ranks, and resumable.
    """
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    micro = args.micro_batch_size
    per_iteration = num_micro_batches(args, dp_size)
    step = start_iteration * per_iteration
    while True:
        first = (step * dp_size + dp_rank) * micro
        samples = [dataset[first + b] for b in range(micro)]
        batch = torch.utils.data.default_collate(samples)
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        step += 1


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """megatron's forward_step_func: run the model, hand back the masked mean LM loss."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, partial(_masked_mean_loss, batch["loss_mask"])


def _masked_mean_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.view(-1).float()
    loss = torch.sum(per_token_loss.view(-1).float() * mask) / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach()}


# ------------------------------------------------------------------------------------ training
@dataclass
class StepResult:
    loss: float
    grad_norm: Optional[float]
    lr: float
    seconds: float
    dispatch_ms: float = 0.0
    combine_ms: float = 0.0
    load_imbalance: Optional[float] = None  # max/mean tokens per expert, averaged over MoE layers
    skipped: bool = False


@dataclass
class Trainer:
    """Everything one run holds; :meth:`step` is one optimizer step over a global batch."""

    args: argparse.Namespace
    config: TransformerConfig
    model: list
    optimizer: Any
    scheduler: OptimizerParamScheduler
    device: torch.device
    iteration: int = 0
    data: Optional[Iterator[dict]] = None
    dataset: Any = field(default=None, repr=False)
    #: The model's deepep dispatchers, found once; :meth:`step` reads their clocks and expert load.
    dispatchers: list = field(default_factory=list, repr=False)

    @classmethod
    def create(cls, args: argparse.Namespace) -> "Trainer":
        device = initialize(args)
        config = build_transformer_config(args)
        model = build_model(args, config, device)
        optimizer, scheduler = build_optimizer(args, model)
        # Hooks the schedule calls: grad all-reduce across DP/EP-DP, loss scaling.
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        trainer = cls(args, config, model, optimizer, scheduler, device)
        trainer.dispatchers = list(iter_deepep_dispatchers(model))
        for dispatcher in trainer.dispatchers:  # read every step by _add_dispatcher_stats
            dispatcher.clock.enabled = True
        trainer.dataset = build_dataset(args)
        if args.load:
            trainer.load_checkpoint(args.load)
        trainer.data = batches(trainer.dataset, args, trainer.iteration, device)
        return trainer

    @property
    def num_microbatches(self) -> int:
        return num_micro_batches(self.args, parallel_state.get_data_parallel_world_size())

    def step(self) -> StepResult:
        start = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=self.data,
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size,
            forward_only=False,
        )
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        self.iteration += 1
        loss = torch.stack([d["lm loss"] for d in losses]).mean()
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss = loss / parallel_state.get_data_parallel_world_size()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        result = StepResult(
            loss=float(loss),
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            lr=self.optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - start,
            skipped=not update_ok,
        )
        self._add_dispatcher_stats(result)
        return result

    def _add_dispatcher_stats(self, result: StepResult) -> None:
        dispatchers = self.dispatchers
        if not dispatchers:
            return
        for dispatcher in dispatchers:
            times = dispatcher.clock.pop_ms()
            result.dispatch_ms += times["dispatch"]
            result.combine_ms += times["combine"]
        # Expert load: each rank of a pipeline stage routes different tokens (DP, CP, and TP
        # with sequence parallelism), so the stage total is the sum over that group.
        load = torch.stack([d.pop_expert_load().to(self.device, torch.float64) for d in dispatchers])
        dist.all_reduce(load, group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))
        mean = load.mean(dim=1).clamp(min=1)
        result.load_imbalance = float((load.max(dim=1).values / mean).mean())

    # -- checkpointing ---------------------------------------------------------------------
    def _sharded_state_dict(self, is_loading: bool) -> dict:
        model_state = unwrap_model(self.model[0]).sharded_state_dict()
        rank, world = dist.get_rank(), dist.get_world_size()
        rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        }
        return {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=_DIST_OPT_FORMAT),
            "scheduler": self.scheduler.state_dict(),
            "iteration": self.iteration,
            # Per-rank RNG (dropout, router jitter): same world size needed to restore it exactly.
            "rng_state": ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0),
        }

    def save_checkpoint(self, directory: str) -> str:
        path = os.path.join(directory, f"iter_{self.iteration:07d}")
        if dist.get_rank() == 0:
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(self._sharded_state_dict(is_loading=False), path)
        dist.barrier()
        if dist.get_rank() == 0:
            with open(os.path.join(directory, TRACKER_FILE), "w") as f:
                f.write(str(self.iteration))
        dist.barrier()
        return path

    def load_checkpoint(self, directory: str) -> None:
        with open(os.path.join(directory, TRACKER_FILE)) as f:  # there: arguments.check_environment checked
            iteration = int(f.read().strip())
        with torch.no_grad():  # the optimizer copies into views of parameters that require grad
            state = dist_checkpointing.load(self._sharded_state_dict(is_loading=True), os.path.join(directory, f"iter_{iteration:07d}"))
            unwrap_model(self.model[0]).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = state["iteration"]
        rng = state["rng_state"]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])


# ------------------------------------------------------------------------------------ profiling
class Profiler:
    """``--profile``: iterations [start, end) (0-based, as Megatron-LM counts them).

    With ``--profile-dir`` (or without CUDA) a torch.profiler Chrome trace per rank is written to
    ``<profile-dir>/trace_rank<R>.json``; on GPU without it, ``torch.cuda.profiler.start/stop``
    bound the range for ``nsys profile --capture-range=cudaProfilerApi``.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = args.profile
        self.start_step, self.end_step = args.profile_step_start, args.profile_step_end
        self.use_cuda_profiler = torch.cuda.is_available() and args.profile_dir is None
        self.directory = args.profile_dir or "profile"
        self._torch_profiler: Optional[torch.profiler.profile] = None

    def before_step(self, iteration: int) -> None:
        if not self.enabled or iteration != self.start_step:
            return
        if self.use_cuda_profiler:
            torch.cuda.profiler.start()
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._torch_profiler = torch.profiler.profile(activities=activities, record_shapes=False)
        self._torch_profiler.__enter__()

    def after_step(self, iteration: int) -> Optional[str]:
        """``iteration`` = steps completed. Returns the trace path when one was written."""
        if not self.enabled or iteration != self.end_step:
            return None
        if self.use_cuda_profiler:
            torch.cuda.profiler.stop()
            return None
        if self._torch_profiler is None:
            return None
        self._torch_profiler.__exit__(None, None, None)
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"trace_rank{dist.get_rank()}.json")
        self._torch_profiler.export_chrome_trace(path)
        self._torch_profiler = None
        return path


# ------------------------------------------------------------------------------------ main
def format_log_line(result: StepResult, iteration: int, args: argparse.Namespace, eta_s: float) -> str:
    """Megatron-LM-style progress line; ``eta_s``: estimated seconds to --train-iters."""
    tokens = args.global_batch_size * args.seq_length
    parts = [
        f" [{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] iteration {iteration:6d}/{args.train_iters:6d}",
        f"consumed samples: {iteration * args.global_batch_size:9d}",
        f"elapsed time per iteration (ms): {result.seconds * 1e3:.1f}",
        f"tokens/s: {tokens / result.seconds:.0f}",
        f"ETA: {datetime.timedelta(seconds=round(eta_s))}",
        f"learning rate: {result.lr:.3E}",
        f"lm loss: {result.loss:.6E}",
        f"grad norm: {result.grad_norm:.3f}" if result.grad_norm is not None else "grad norm: n/a",
    ]
    if result.load_imbalance is not None:
        parts += [
            f"dispatch (ms): {result.dispatch_ms:.1f}",
            f"combine (ms): {result.combine_ms:.1f}",
            f"expert load max/mean: {result.load_imbalance:.2f}",
        ]
    if result.skipped:
        parts.append("skipped (inf/nan grads)")
    return " | ".join(parts) + " |"


def format_summary(results: Sequence[StepResult], args: argparse.Namespace, total_s: float) -> str:
    """The closing line: iterations run, wall time (and how much of it was setup), training
    throughput and the last iteration's loss."""
    train_s = sum(r.seconds for r in results)
    tokens = len(results) * args.global_batch_size * args.seq_length
    final = f"{results[-1].loss:.4f}" if results else "n/a (no iteration run)"
    return (f"done: {len(results)} iterations in {total_s:.1f} s ({total_s - train_s:.1f} s setup and checkpoints), "
            f"{tokens / train_s if train_s else 0:.0f} tokens/s, final loss {final}")


def train(args: argparse.Namespace) -> list[StepResult]:
    """Run ``--train-iters`` (from ``--load``'s iteration if given); returns each step's result.
    Rank 0 prints the banner, the progress lines and the closing summary."""
    started = time.perf_counter()
    trainer = Trainer.create(args)
    profiler = Profiler(args)
    rank0 = dist.get_rank() == 0
    if rank0:
        print(
            f"deepep_megatron.pretrain: world {dist.get_world_size()}, TP {args.tensor_model_parallel_size}, "
            f"EP {args.expert_model_parallel_size}, DP {parallel_state.get_data_parallel_world_size()}, "
            f"dispatcher {args.moe_token_dispatcher}, device {trainer.device.type}, process group "
            f"{describe_process_group()}, starting at iteration {trainer.iteration}",
            flush=True,
        )
    results = []
    while trainer.iteration < args.train_iters:
        profiler.before_step(trainer.iteration)
        result = trainer.step()
        results.append(result)
        if rank0 and len(results) == 1 and args.moe_token_dispatcher == "deepep":
            print(f"deepep: {describe_buffers()}", flush=True)  # the Buffers exist once a step has run
        trace = profiler.after_step(trainer.iteration)
        if rank0 and (trainer.iteration % args.log_interval == 0 or trainer.iteration == args.train_iters):
            mean_s = sum(r.seconds for r in results) / len(results)
            print(format_log_line(result, trainer.iteration, args, mean_s * (args.train_iters - trainer.iteration)), flush=True)
        if trace and rank0:
            print(f"profile: wrote {trace} (one per rank)", flush=True)
        if not math.isfinite(result.loss):
            raise FloatingPointError(f"loss is {result.loss} at iteration {trainer.iteration}")
        if args.save and args.save_interval and trainer.iteration % args.save_interval == 0:
            trainer.save_checkpoint(args.save)
    if args.save and (not args.save_interval or trainer.iteration % args.save_interval):
        path = trainer.save_checkpoint(args.save)
        if rank0:
            print(f"saved checkpoint {path}", flush=True)
    if rank0:
        print(format_summary(results, args, time.perf_counter() - started), flush=True)
    return results


def shutdown() -> None:
    destroy_buffers()
    parallel_state.destroy_model_parallel()


def run(args: argparse.Namespace) -> list[StepResult]:
    """Train with flags that :func:`~.arguments.parse_args` checked, then release the buffers, the
    parallel state and the process group (also on failure)."""
    try:
        return train(args)
    finally:
        if dist.is_initialized():
            shutdown()
            dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse, check and train in this already-launched process (a torchrun rank, or a rank of
    ``deepep_megatron.launch.run_ranks``). The command-line entry, which also dry-runs, is
    :func:`.cli.main`."""
    args = parse_args(argv, launch=True)
    if args.dry_run:
        exit_with_error(PROG, "--dry-run is the command line's: python -m deepep_megatron.pretrain --dry-run ...")
    run(args)
