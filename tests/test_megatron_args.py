"""Fast single-process checks: flags, FP8 recipe mapping, spec replacement, routing conversion."""
import argparse
import functools
import types

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from megatron.core.models.gpt import moe_module_specs  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules  # noqa: E402

from deepep_megatron.megatron import DeepEPMoELayer, DeepEPOptions, deepep_moe_layer_class, deepep_moe_layer_spec  # noqa: E402
from deepep_megatron.megatron import compat, megatron_lm  # noqa: E402
from deepep_megatron.megatron.arguments import build_parser, parse_args, validate_args  # noqa: E402
from deepep_megatron.megatron.dispatcher import check_supported, routing_map_to_topk, topk_to_local_routing  # noqa: E402
from deepep_megatron.megatron.te_fp8 import FP8_RECIPES, have_transformer_engine, resolve_fp8  # noqa: E402

BASE = ["--mock-data"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-experts", "6", "--expert-model-parallel-size", "4"], "--expert-model-parallel-size (4) must divide --num-experts (6)"),
        (["--moe-pad-expert-input-to-capacity"], "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"),
        (["--moe-token-dispatcher", "alltoall", "--moe-deepep-fp8-dispatch"], "--moe-deepep-fp8-dispatch needs --moe-token-dispatcher deepep"),
        (["--moe-deepep-num-sms", "21"], "--moe-deepep-num-sms/--moe-flex-dispatcher-num-sms must be a positive even number"),
        (["--expert-tensor-parallel-size", "2"], "deepep needs --expert-tensor-parallel-size 1"),
        (["--fp8-format", "hybrid"], "--fp8-format hybrid needs --transformer-impl transformer_engine"),
        (["--moe-router-topk", "5"], "--moe-router-topk (5) cannot exceed --num-experts (4)"),
        (["--tensor-model-parallel-size", "2"], "needs --sequence-parallel"),
        (["--profile", "--profile-step-start", "5", "--profile-step-end", "5"], "--profile-step-start < --profile-step-end"),
        (["--global-batch-size", "-2"], "--global-batch-size must be a positive integer, got -2"),
        (["--train-iters", "5", "--profile", "--profile-step-start", "2", "--profile-step-end", "9"], "--profile-step-end (9) is past --train-iters (5)"),
        (["--lr", "1e-4", "--min-lr", "1e-3"], "need 0 <= --min-lr <= --lr"),
        (["--train-iters", "5", "--lr-warmup-iters", "5"], "--lr-warmup-iters (5) must be in [0, --train-iters=5)"),
        (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
        (["--save", "ckpt", "--save-interval", "-1"], "--save-interval must be a positive integer, got -1"),
        (["--seq-length", "64", "--max-position-embeddings", "16"], "--max-position-embeddings (16) must be at least --seq-length (64)"),
    ],
)
def test_bad_flags_exit_with_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(BASE + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_data_source_is_required(capsys):
    with pytest.raises(SystemExit):
        parse_args([])
    assert "exactly one of --mock-data or --data-path" in capsys.readouterr().err


def test_parallel_sizes_checked_against_world_size():
    args = build_parser().parse_args(BASE + ["--expert-model-parallel-size", "4", "--micro-batch-size", "2", "--global-batch-size", "6"])
    with pytest.raises(ValueError, match="world size 2 is not divisible by --expert-model-parallel-size"):
        validate_args(args, world_size=2)
    args = build_parser().parse_args(BASE + ["--micro-batch-size", "2", "--global-batch-size", "6"])
    with pytest.raises(ValueError, match=r"--global-batch-size \(6\) must be a multiple"):
        validate_args(args, world_size=2)
    # EP1 with biases trips megatron-core's in-place expert bias add: refused up front, with the fix
    args = build_parser().parse_args(BASE)
    with pytest.raises(ValueError, match="pass --disable-bias-linear"):
        validate_args(args, world_size=1)
    validate_args(build_parser().parse_args(BASE + ["--disable-bias-linear"]), world_size=1)


def test_fp8_recipe_mapping():
    assert {name: (r.te_recipe_class, r.dispatch_in_fp8) for name, r in FP8_RECIPES.items()} == {
        "delayed": ("DelayedScaling", False),
        "tensorwise": ("Float8CurrentScaling", False),
        "blockwise": ("Float8BlockScaling", True),
        "mxfp8": ("MXFP8BlockScaling", False),
    }
    assert resolve_fp8("local", None, "blockwise") == (None, None)
    with pytest.raises(ValueError, match="needs --transformer-impl transformer_engine"):
        resolve_fp8("local", "hybrid", "blockwise")
    with pytest.raises(ValueError, match="--fp8-format must be one of"):
        resolve_fp8("transformer_engine", "e5m2", "blockwise")
    if have_transformer_engine():
        import transformer_engine.common.recipe as te_recipe

        for recipe in FP8_RECIPES.values():
            assert hasattr(te_recipe, recipe.te_recipe_class)
        assert resolve_fp8("transformer_engine", "hybrid", "blockwise") == ("hybrid", FP8_RECIPES["blockwise"])
    else:
        with pytest.raises(RuntimeError, match="needs NVIDIA Transformer Engine"):
            resolve_fp8("transformer_engine", "hybrid", "blockwise")


def test_megatron_lm_blockwise_recipe_turns_on_fp8_dispatch():
    args = types.SimpleNamespace(moe_deepep_fp8_dispatch=False, moe_deepep_backend="auto", fp8="hybrid", fp8_recipe="blockwise")
    assert megatron_lm.options_from_args(args).use_fp8_dispatch
    args.fp8_recipe = "delayed"
    assert not megatron_lm.options_from_args(args).use_fp8_dispatch


def test_megatron_lm_install_swaps_the_spec_builders_moe_layer(monkeypatch):
    monkeypatch.setattr(moe_module_specs, "MoELayer", MoELayer)
    parser = megatron_lm.extra_args_provider(argparse.ArgumentParser())  # stands in for Megatron-LM's
    args = parser.parse_args(["--moe-deepep-megatron"])
    args.moe_token_dispatcher_type = "alltoall"
    assert megatron_lm.install(args)
    spec = get_gpt_layer_local_spec(num_experts=4)
    assert issubclass(spec.submodules.mlp.module, DeepEPMoELayer)
    args.moe_token_dispatcher_type = "flex"
    with pytest.raises(ValueError, match="needs --moe-token-dispatcher-type alltoall"):
        megatron_lm.install(args)


def test_spec_replacement_both_spec_styles():
    options = DeepEPOptions(use_fp8_dispatch=True)
    layer_class = deepep_moe_layer_class(options)
    assert layer_class.options == options and deepep_moe_layer_class(options) is layer_class
    # 0.16 style: the MoE module is a ModuleSpec.
    spec = deepep_moe_layer_spec(get_gpt_layer_local_spec(num_experts=4), options)
    assert spec.submodules.mlp.module is layer_class
    assert get_gpt_layer_local_spec(num_experts=4).submodules.mlp.module is MoELayer  # not mutated
    # 0.19 style: functools.partial(MoELayer, submodules=...).
    moe = get_gpt_layer_local_spec(num_experts=4).submodules.mlp
    partial_spec = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        mlp=functools.partial(MoELayer, submodules=moe.submodules)))
    replaced = deepep_moe_layer_spec(partial_spec, options)
    assert replaced.submodules.mlp.func is layer_class
    assert replaced.submodules.mlp.keywords["submodules"] is moe.submodules
    with pytest.raises(ValueError, match="contains no MoELayer"):
        deepep_moe_layer_spec(get_gpt_layer_local_spec())


def test_unsupported_megatron_options_are_refused():
    def config(**overrides):
        fields = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=4, moe_router_topk=2,
                      moe_token_dispatcher_type="alltoall")
        fields.update(overrides)
        return TransformerConfig(**fields)

    groups = types.SimpleNamespace(expt_tp=None)
    check_supported(config(), DeepEPOptions(), groups)
    with pytest.raises(ValueError, match="--moe-shared-expert-overlap"):
        check_supported(config(moe_shared_expert_intermediate_size=64, moe_shared_expert_overlap=True), DeepEPOptions(), groups)
    with pytest.raises(ValueError, match="--moe-deepep-fp8-dispatch needs --hidden-size divisible by 128"):
        check_supported(config(), DeepEPOptions(use_fp8_dispatch=True), groups)
    with pytest.raises(ValueError, match="--moe-deepep-num-sms must be a positive even number"):
        check_supported(config(moe_deepep_num_sms=3), DeepEPOptions(), groups)
    with pytest.raises(ValueError, match="DeepEPOptions.backend"):
        DeepEPOptions(backend="nvshmem")


def test_routing_conversion_round_trip():
    routing_map = torch.tensor([[True, False, True, False], [False, False, False, True], [False, False, False, False]])
    probs = torch.tensor([[0.6, 0.1, 0.3, 0.0], [0.2, 0.2, 0.1, 0.5], [0.25, 0.25, 0.25, 0.25]], requires_grad=True)
    topk_idx, topk_weights = routing_map_to_topk(routing_map, probs, topk=2)
    assert topk_idx.tolist() == [[0, 2], [3, -1], [-1, -1]]
    assert torch.equal(topk_weights, torch.tensor([[0.6, 0.3], [0.5, 0.0], [0.0, 0.0]]))
    topk_weights.sum().backward()
    assert torch.equal(probs.grad, routing_map.float())  # gradient only through the selected experts
    # As received on EP rank 1 of 2 (local experts 0, 1 = global 2, 3).
    local_map, local_probs = topk_to_local_routing(torch.tensor([[0, -1], [1, -1]]), torch.tensor([[0.3, 0.0], [0.5, 0.0]]), 2)
    assert local_map.tolist() == [[True, False], [False, True]]
    assert torch.equal(local_probs, torch.tensor([[0.3, 0.0], [0.0, 0.5]]))



def test_sm_count_from_either_megatron_core_field():
    """0.16 has moe_deepep_num_sms (default 20); 0.19 adds moe_flex_dispatcher_num_sms and defaults
    both to None: the new one wins, the old one counts, neither means DeepEP's 20."""
    assert compat.dispatcher_num_sms(types.SimpleNamespace(moe_deepep_num_sms=None)) == 20
    assert compat.dispatcher_num_sms(types.SimpleNamespace(moe_flex_dispatcher_num_sms=None, moe_deepep_num_sms=None)) == 20
    assert compat.dispatcher_num_sms(types.SimpleNamespace(moe_flex_dispatcher_num_sms=None, moe_deepep_num_sms=12)) == 12
    assert compat.dispatcher_num_sms(types.SimpleNamespace(moe_flex_dispatcher_num_sms=24, moe_deepep_num_sms=12)) == 24
    with pytest.raises(ValueError, match="--moe-flex-dispatcher-num-sms must be a positive even number"):
        compat.dispatcher_num_sms(types.SimpleNamespace(moe_flex_dispatcher_num_sms=5, moe_deepep_num_sms=None))
    # The entry sets the field this megatron-core reads, and the dispatcher reads it back.
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=4, moe_router_topk=2,
                               **compat.num_sms_config_field(32))
    assert compat.dispatcher_num_sms(config) == 32


def test_tp_divisibility_is_checked_with_the_layout():
    args = build_parser().parse_args(BASE + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                             "--transformer-impl", "transformer_engine",
                                             "--num-attention-heads", "3", "--hidden-size", "96"])
    with pytest.raises(ValueError, match=r"--num-attention-heads \(3\) must be divisible by --tensor-model-parallel-size \(2\)"):
        validate_args(args, world_size=2)
