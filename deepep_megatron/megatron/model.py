"""The GPT MoE model the pretraining entry trains, built from its flags: megatron-core's
``TransformerConfig``, the MoE layer spec (local or Transformer Engine, with the deepep dispatcher
swapped in), the padded vocabulary and ``GPTModel``.

One module for both users: the training loop (:mod:`.pretrain`) and the dry run (:mod:`.dry_run`,
which builds one layer on the ``meta`` device to count parameters) build exactly the same model.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
from typing import Any

import torch

from . import compat
from .arguments import dense_ffn_width, expert_ffn_width
from .dispatcher import DeepEPOptions, deepep_moe_layer_spec
from .te_fp8 import require_transformer_engine, resolve_fp8

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import (  # noqa: E402
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402


def build_transformer_config(args: argparse.Namespace) -> TransformerConfig:
    """megatron-core's TransformerConfig from the flags (CPU: no fused kernels, CPU initialization)."""
    fp8_format, fp8_recipe = resolve_fp8(args.transformer_impl, args.fp8_format, args.fp8_recipe)
    on_cpu = not torch.cuda.is_available()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=dense_ffn_width(args),
        num_attention_heads=args.num_attention_heads,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        add_bias_linear=not args.disable_bias_linear,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=expert_ffn_width(args),
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        moe_token_drop_policy=args.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
        moe_router_dtype=args.moe_router_dtype,
        moe_grouped_gemm=args.moe_grouped_gemm,
        moe_permute_fusion=args.moe_permute_fusion,
        **compat.num_sms_config_field(args.moe_deepep_num_sms),
        # deepep replaces the alltoall dispatcher inside DeepEPMoELayer; megatron validates the
        # MoE options against "alltoall", whose constraints are the ones that hold for deepep.
        moe_token_dispatcher_type="alltoall" if args.moe_token_dispatcher == "deepep" else args.moe_token_dispatcher,
        fp8=fp8_format,
        fp8_recipe=fp8_recipe.name if fp8_recipe else "delayed",
        # CPU: megatron's fused kernels and GPU-side weight init need CUDA.
        use_cpu_initialization=on_cpu,
        gradient_accumulation_fusion=False,
        # megatron fuses bias+activation with the router probs only for swiglu/quick_gelu, and
        # our MLP is gelu: the fused path raises for MoE layers (seen with megatron-core 0.19).
        bias_activation_fusion=False,
        # megatron-core 0.19 calls its compiled softmax kernel unconditionally when fused; the wheel lacks it.
        masked_softmax_fusion=not on_cpu and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        bias_dropout_fusion=not on_cpu,
        # Apex's persistent LayerNorm only; megatron's torch LayerNorm fallback asserts it is off.
        persist_layer_norm=not on_cpu and importlib.util.find_spec("apex") is not None,
    )


def build_layer_spec(args: argparse.Namespace) -> Any:
    """The MoE layer spec (TE or local); with ``--moe-token-dispatcher deepep`` its MoE layer is ours."""
    if args.transformer_impl == "transformer_engine":
        require_transformer_engine("--transformer-impl transformer_engine")
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm)
    else:
        spec = get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm)
    if args.moe_token_dispatcher == "deepep":
        spec = deepep_moe_layer_spec(spec, DeepEPOptions.from_flags(args, args.fp8_format is not None, args.fp8_recipe))
    return spec


def padded_vocab_size(args: argparse.Namespace) -> int:
    """Null-tokenizer vocabulary (+1 for its end-of-document id) padded, as Megatron-LM does, to a
    multiple of --make-vocab-size-divisible-by x TP so the embedding splits evenly across TP."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return math.ceil((args.vocab_size + 1) / multiple) * multiple


def build_gpt_model(args: argparse.Namespace, config: TransformerConfig) -> GPTModel:
    """The GPTModel of the flags (on the current default device: the dry run builds it on ``meta``)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=build_layer_spec(args),
        vocab_size=padded_vocab_size(args),
        max_sequence_length=args.max_position_embeddings or args.seq_length,
        pre_process=True,
        post_process=True,
    )


def build_moe_layer(args: argparse.Namespace, config: TransformerConfig, device: torch.device) -> torch.nn.Module:
    """One MoE layer alone (the ``mlp`` of :func:`build_layer_spec`, on ``device``): the layer that
    every transformer layer of :func:`build_gpt_model` holds, for tests and benchmarks of one layer."""
    mlp = build_layer_spec(args).submodules.mlp
    if isinstance(mlp, ModuleSpec):  # megatron-core 0.16
        layer = mlp.module(config=config, submodules=mlp.submodules)
    else:  # newer: functools.partial(MoELayer, submodules=...)
        layer = mlp(config=config)
    return layer.to(device)
