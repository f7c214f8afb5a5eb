"""One megatron-core MoE layer with the deepep dispatcher in its static-shape layout
(``--moe-expert-capacity-factor`` with ``--moe-pad-expert-input-to-capacity``: the dispatch passes
``num_worst_tokens``, every expert gets exactly its capacity of rows), EP2 on the cuda backend:
forward and backward captured in one CUDA graph, replayed on new inputs copied into the captured
input tensors, give bit for bit the outputs and gradients (input, parameters) of eager runs on the
same inputs (issue 12).

Bit for bit, not within a tolerance: a replay runs the kernels the eager step launches, on the same
values, and ``torch.use_deterministic_algorithms`` (with ``CUBLAS_WORKSPACE_CONFIG``) makes every one
of them deterministic (megatron's ``unpermute`` sums with ``index_add`` there; the Buffer's combine
sums in a fixed fp32 order), so nothing may differ, in bf16 as in fp32.

Two scopes, parametrized: ``layer`` captures ``MoELayer.forward`` (router, dispatch, experts,
combine) and its backward; ``without-router`` feeds the router's output as graph inputs and captures
the rest (``dispatch_preprocess`` ... ``combine_postprocess`` around megatron's experts): this
project's part alone, so that a capture failure of megatron's router (outside this project) shows as
``layer`` failing while ``without-router`` passes (the router, with its load-balancing loss, is
sync-free on CPU: tests/test_megatron_static_shape.py watches the whole layer). Capacity factor 0.5
drops tokens whatever the routing (pigeonhole), and the inputs differ per replay, so the routing
does too.

Ranks run one per GPU over NCCL with two GPUs, else both on one GPU under MPS (host-gloo process
group). Skipped without a GPU, the extension, megatron-core, or (sharing a GPU) MPS.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Sequence

import numpy as np
import pytest
import torch

from harness import GPU_MARKS, local_backend, mps_running, run_ranks

pytestmark = [
    *GPU_MARKS,
    pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None, reason="needs megatron-core"),
]

WORLD = 2
LAYER = ["--mock-data", "--num-layers", "1", "--hidden-size", "256", "--num-attention-heads", "4",
         "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "512",
         "--expert-model-parallel-size", str(WORLD), "--moe-expert-capacity-factor", "0.5",
         "--moe-pad-expert-input-to-capacity", "--moe-token-dispatcher", "deepep", "--moe-deepep-backend", "cuda",
         "--moe-router-dtype", "fp32",
         "--disable-bias-linear", "--bf16", "--moe-deepep-num-sms", "16"]
TOKENS = (128, 2)  # [S, B] of the layer's input: 256 tokens per rank
#: Eager steps on a side stream before the capture (torch.cuda.graph's documented warm-up).
WARMUP = 3
REPLAYS = 3
DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def _graph_against_eager(step: Callable[..., torch.Tensor], named_params: dict[str, torch.Tensor],
                         batches: Sequence[Sequence[torch.Tensor]]) -> tuple[list[str], list[np.ndarray]]:
    """Capture ``step(*inputs)`` (forward and backward; returns the output) on static copies of
    ``batches[0]``, warmed up on ``batches[:WARMUP]``; replay it on each later batch and run it
    eagerly on the same batch. Inputs that require grad and ``named_params`` have their gradients
    compared.

    Returns the differences found (empty when every replay equals its eager run bit for bit) and
    the replayed outputs (fp32 numpy: a tensor would leave the rank as shared memory that dies with it).
    """
    params = list(named_params.values())
    static = [t.detach().clone().requires_grad_(t.requires_grad) for t in batches[0]]

    def load(batch: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for s, t in zip(static, batch):
                s.copy_(t)

    def clear_grads(tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            t.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for batch in batches[:WARMUP]:
            load(batch)
            clear_grads([*static, *params])
            step(*static)
    torch.cuda.current_stream().wait_stream(side)

    clear_grads([*static, *params])  # the gradients are then the graph's own tensors, rewritten per replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(*static)
    leaves = [t for t in static if t.requires_grad] + list(params)
    captured = [static_out] + [t.grad for t in leaves]
    names = ["output"] + [f"grad of input {i}" for i, t in enumerate(static) if t.requires_grad] + [
        f"grad of {name}" for name in named_params]

    differences, outputs = [], []
    for replay, batch in enumerate(batches[WARMUP:]):
        load(batch)
        graph.replay()
        replayed = [t.clone() for t in captured]
        fresh = [t.detach().clone().requires_grad_(t.requires_grad) for t in batch]
        clear_grads(params)
        eager = [step(*fresh)] + [t.grad for t in fresh if t.requires_grad] + [p.grad for p in params]
        torch.cuda.synchronize()
        for name, got, want in zip(names, replayed, eager):
            if want is None or not torch.equal(got, want):
                worst = "missing" if want is None else f"{float((got.float() - want.float()).abs().max()):.3e}"
                differences.append(f"replay {replay}: {name} differs (max |diff| {worst})")
        outputs.append(replayed[0].float().cpu().numpy())
    del graph
    return differences, outputs


def _moe_graph(rank: int, world_size: int, argv: list[str], scope: str) -> tuple[list[str], list[np.ndarray]]:
    """This rank's :func:`_graph_against_eager` of one MoE layer built from ``argv``, in ``scope``."""
    from deepep_megatron.megatron import pretrain
    from deepep_megatron.megatron.arguments import parse_args
    from deepep_megatron.megatron.model import build_moe_layer

    torch.use_deterministic_algorithms(True)
    args = parse_args(argv)
    device = pretrain.initialize(args)
    config = pretrain.build_transformer_config(args)
    layer = build_moe_layer(args, config, device)
    generator = torch.Generator().manual_seed(1000 + rank)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, config.params_dtype)

    xs = [random(*TOKENS, args.hidden_size).requires_grad_() for _ in range(WARMUP + REPLAYS)]
    grads = [random(*TOKENS, args.hidden_size) for _ in xs]
    try:
        if scope == "layer":
            def step(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
                out, _ = layer(x)
                out.backward(dy)
                return out.detach()

            return _graph_against_eager(step, dict(layer.named_parameters()), list(zip(xs, grads)))

        dispatcher = layer.token_dispatcher

        def step(x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
            tokens, weights = dispatcher.dispatch_preprocess(x, routing_map, probs)
            received, received_weights = dispatcher.token_dispatch(tokens, weights)
            permuted, tokens_per_expert, permuted_probs = dispatcher.dispatch_postprocess(received, received_weights)
            expert_out, _ = layer.experts(permuted, tokens_per_expert, permuted_probs)
            out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(expert_out)))
            out.backward(dy)
            return out.detach()

        batches = []
        for x, dy in zip(xs, grads):
            with torch.no_grad():  # the router runs eagerly, outside the graph: its output is an input here
                probs, routing_map = layer.router(x)
            batches.append((x, probs.detach().requires_grad_(), routing_map, dy))
        return _graph_against_eager(step, dict(layer.experts.named_parameters()), batches)
    finally:
        pretrain.shutdown()


@pytest.mark.parametrize("scope", ["layer", "without-router"])
def test_moe_layer_graph_replay_equals_eager(scope: str) -> None:
    from deepep_megatron.host_staged import backend_string

    _, ranks_per_gpu = local_backend(WORLD)
    if ranks_per_gpu > 1 and not mps_running():
        pytest.skip(f"{WORLD} ranks on {torch.cuda.device_count()} GPU need MPS "
                    "(CUDA_MPS_PIPE_DIRECTORY with a running daemon)")
    backend = "nccl" if ranks_per_gpu == 1 else backend_string()
    results = run_ranks(_moe_graph, WORLD, LAYER, scope, backend=backend, timeout_s=600, env=DETERMINISTIC)
    for rank, (differences, outputs) in enumerate(results):
        assert not differences, f"rank {rank}, {scope}: graph replays differ from eager runs:\n" + "\n".join(differences)
        # new inputs gave new outputs: the replays computed, they did not return the captured step's
        assert not np.array_equal(outputs[0], outputs[1]), f"rank {rank}: two replays on different inputs gave one output"
