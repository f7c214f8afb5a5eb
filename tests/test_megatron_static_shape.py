"""The deepep dispatcher's static-shape layout (``--moe-expert-capacity-factor`` with
``--moe-pad-expert-input-to-capacity``) on the reference backend, 2 or 4 ranks over gloo:

* training equals megatron's alltoall dispatcher with the same flags (losses and reduced gradients,
  as tests/test_megatron_equivalence.py checks the exact-size layout), with experts over capacity
  (tokens dropped) and with a routing that leaves one rank nothing to receive; and, with a capacity
  above the token count (which megatron's alltoall padding cannot run), equals dropless training;
* one MoE layer's forward and backward make no host sync outside the Buffer (:class:`HostSyncGuard`;
  on GPU ``torch.cuda.set_sync_debug_mode`` would say it, on CPU every op is watched instead), while
  the same guard does catch the exact-size layout's syncs;
* an EP group over several nodes is refused, naming the flag.
"""
from __future__ import annotations

import traceback
from typing import Any, Callable, Optional

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from harness import run_ranks  # noqa: E402
from test_megatron_equivalence import TINY, train_and_collect  # noqa: E402

ITERS = 3
PAD = ["--moe-pad-expert-input-to-capacity"]
#: Added to the router logits of every token: experts 0 and 1 (EP rank 0's, at EP2 with 4 experts)
#: are never chosen, so rank 0 receives nothing and experts 2 and 3 each get every token. megatron's
#: router then fills the capacity of experts 0 and 1 with tokens of probability 0: low expert ids
#: beside the real high ones, which a dispatcher that took them for routed experts would get wrong.
STARVE_RANK_0 = [-1e4, -1e4, 0.0, 0.0]


# ------------------------------------------------------------------------ training, per rank
#: What one rank's deepep dispatchers saw, filled in by the instruments of :func:`_instrument`.
_SEEN: dict[str, list[int]] = {"dropped": [], "received": []}


def _bias_router_logits(bias: list[float]) -> None:
    """Add ``bias`` [E] to the logits megatron's router sees (both dispatchers get the same routing)."""
    from megatron.core.transformer.moe.router import TopKRouter

    routing = TopKRouter.routing

    def biased(self, logits: torch.Tensor, *args: Any, **kwargs: Any):
        return routing(self, logits + logits.new_tensor(bias), *args, **kwargs)

    TopKRouter.routing = biased


def _instrument() -> None:
    """Record per deepep forward the (token, expert) pairs the capacity dropped and the real rows
    this rank received (reads device values: test-only)."""
    from deepep_megatron.megatron.dispatcher import DeepEPTokenDispatcher

    preprocess, dispatch = DeepEPTokenDispatcher.dispatch_preprocess, DeepEPTokenDispatcher.token_dispatch

    def recording_preprocess(self, tokens, routing_map, probs):
        routed = int((routing_map & (probs != 0)).sum())
        _SEEN["dropped"].append(routing_map.size(0) * self.topk - routed)
        return preprocess(self, tokens, routing_map, probs)

    def recording_dispatch(self, hidden_states, probs):
        result = dispatch(self, hidden_states, probs)
        _SEEN["received"].append(int((self.recv_topk_idx >= 0).any(dim=1).sum()))
        return result

    DeepEPTokenDispatcher.dispatch_preprocess = recording_preprocess
    DeepEPTokenDispatcher.token_dispatch = recording_dispatch


def _train(rank: int, world_size: int, argv: list[str], logit_bias: Optional[list[float]]) -> dict:
    """:func:`train_and_collect` (losses, gradients per step), with the router's logits shifted by
    ``logit_bias`` and, for the deepep dispatcher, what :func:`_instrument` records."""
    if logit_bias is not None:
        _bias_router_logits(logit_bias)
    _instrument()
    return {**train_and_collect(rank, world_size, argv), **_SEEN}


def _assert_same_training(got: list[dict], want: list[dict], later_atol: float = 1e-6) -> None:
    """Losses and every reduced gradient of every step agree on every rank (fp32 summation order).
    ``later_atol``: the gradients' bound from the second optimizer step on (the first is always 1e-6)."""
    for rank, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g["losses"], w["losses"], rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} losses: {m}")
        for step, (got_grads, want_grads) in enumerate(zip(g["grads"], w["grads"])):
            assert got_grads.keys() == want_grads.keys()
            for name in want_grads:
                torch.testing.assert_close(
                    torch.from_numpy(got_grads[name]), torch.from_numpy(want_grads[name]), rtol=1e-5,
                    atol=1e-6 if step < 2 else later_atol, msg=lambda m: f"rank {rank} step {step} grad of {name}: {m}",
                )


def _ep(world: int, experts: int) -> list[str]:
    return ["--expert-model-parallel-size", str(world), "--num-experts", str(experts), "--moe-router-topk", "2"]


CASES = {
    # name: (EP size, flags, router logit bias). Capacity 0.5 holds half of the tokens on average:
    # some expert is over capacity whatever the routing (pigeonhole), so tokens are dropped.
    "ep2-drop": (2, _ep(2, 4) + ["--moe-expert-capacity-factor", "0.5"], None),
    # EP4, 2 experts a rank: num_worst_tokens = 4 x min(64, 2 x 8) = 64, a quarter of DeepEP's 4 x T.
    "ep4-drop": (4, _ep(4, 8) + ["--moe-expert-capacity-factor", "0.5"], None),
    # Every token picks experts 2 and 3 (rank 1's), capacity half of that: rank 0 receives nothing.
    "ep2-starved-rank": (2, _ep(2, 4) + ["--moe-expert-capacity-factor", "1.0"], STARVE_RANK_0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_padded_capacity_matches_alltoall(case: str) -> None:
    world, flags, bias = CASES[case]
    argv = TINY + flags + PAD + ["--train-iters", str(ITERS), "--use-distributed-optimizer"]
    alltoall = run_ranks(_train, world, argv + ["--moe-token-dispatcher", "alltoall"], bias)
    deepep = run_ranks(_train, world, argv + ["--moe-token-dispatcher", "deepep"], bias)
    _assert_same_training(deepep, alltoall)
    assert all(sum(r["dropped"]) > 0 for r in deepep), f"no token was dropped: {[r['dropped'] for r in deepep]}"
    if bias is STARVE_RANK_0:
        assert set(deepep[0]["received"]) == {0} and min(deepep[1]["received"]) > 0, [r["received"] for r in deepep]
    else:
        assert all(min(r["received"]) > 0 for r in deepep)


def test_capacity_above_the_tokens_equals_dropless() -> None:
    """Factor 3 at top-2 of 4 experts: capacity 96 > T = 64 tokens, so nothing drops and each expert's
    input is mostly padding (megatron's alltoall padding fails there: it reshapes T rows as capacity).
    With FP8 dispatch (hidden 128), which both layouts quantize the same way, row for row."""
    argv = TINY + _ep(2, 4) + ["--hidden-size", "128", "--moe-deepep-fp8-dispatch", "--train-iters", str(ITERS),
                               "--use-distributed-optimizer", "--moe-token-dispatcher", "deepep"]
    dropless = run_ranks(_train, 2, argv, None)
    padded = run_ranks(_train, 2, argv + ["--moe-expert-capacity-factor", "3.0"] + PAD, None)
    # The padded experts' GEMMs have other shapes, so their fp32 sums round differently (~1e-8 in the
    # second step's gradients); after that update a weight a few ulp apart can flip an e4m3 rounding
    # of the next step's dispatch, which moves the third step's gradients by ~1e-5 (measured 2.4e-5
    # of 0.013 on torch 2.13.0+cpu). The first two steps stay within 1e-6, the losses within 1e-5.
    _assert_same_training(padded, dropless, later_atol=1e-4)
    assert all(sum(r["dropped"]) == 0 for r in padded)


# ------------------------------------------------------------------------ no host sync
def _aten(*names: str) -> frozenset:
    return frozenset(getattr(torch.ops.aten, n) for n in names)


#: Ops that make the host wait for the device: a value read on the host (``.item()``, ``int()``,
#: ``bool()``, ``.tolist()`` of a device tensor all end in ``_local_scalar_dense``) or an output
#: whose size depends on device values.
SYNC_OPS = _aten("_local_scalar_dense", "item", "nonzero", "masked_select", "unique_dim", "_unique", "_unique2",
                 "unique_consecutive", "bincount", "histc", "repeat_interleave", "equal", "is_nonzero", "allclose")
#: Ops that sync when an index is a boolean mask (they run ``nonzero`` on it).
MASK_INDEX_OPS = _aten("index", "index_put", "index_put_", "_index_put_impl_")
#: Tensor methods that reach host memory without the dispatcher on a CPU tensor (on a GPU tensor:
#: a device-to-host copy and a sync).
HOST_METHODS = ("tolist", "numpy", "cpu", "item")


class HostSyncGuard(TorchDispatchMode):
    """Record every host sync made while active: the :data:`SYNC_OPS`, boolean-mask indexing, and
    :data:`HOST_METHODS` calls on any tensor except those ``is_host_value`` accepts (tensors that
    live on the host by design). Calls of ``exempt`` (``(class, method)`` pairs) are not watched.

    On CPU no op actually waits, so this sees what ``torch.cuda.set_sync_debug_mode("error")``
    would report on GPU, plus the host reads of CPU tensors, which that mode cannot see.
    """

    def __init__(self, exempt: list[tuple[type, str]], is_host_value: Callable[[torch.Tensor], bool]) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self._exempt = exempt
        self._is_host_value = is_host_value
        self._depth = 0  # > 0 inside an exempt call
        self._saved: list[tuple[type, str, Any]] = []

    def _record(self, what: str) -> None:
        if self._depth == 0:
            # the innermost frame outside torch says who asked
            frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename and f.filename != __file__]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            self.syncs.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in SYNC_OPS:
            self._record(str(func))
        elif func.overloadpacket in MASK_INDEX_OPS and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())
        ):
            self._record(f"{func} with a boolean mask")
        return func(*args, **kwargs)

    def _patch(self, owner: type, name: str, wrap: Callable[[Callable], Callable]) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, wrap(original))

    def __enter__(self) -> "HostSyncGuard":
        def unwatched(method: Callable) -> Callable:
            def call(*args: Any, **kwargs: Any):
                self._depth += 1
                try:
                    return method(*args, **kwargs)
                finally:
                    self._depth -= 1
            return call

        def watched(name: str) -> Callable[[Callable], Callable]:
            def wrap(method: Callable) -> Callable:
                def call(tensor: torch.Tensor, *args: Any, **kwargs: Any):
                    if not self._is_host_value(tensor):
                        self._record(f"Tensor.{name}()")
                    return method(tensor, *args, **kwargs)
                return call
            return wrap

        for owner, name in self._exempt:
            self._patch(owner, name, unwatched)
        for name in HOST_METHODS:
            self._patch(torch.Tensor, name, watched(name))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


LAYER = TINY + _ep(2, 4) + ["--moe-token-dispatcher", "deepep", "--moe-deepep-backend", "reference"]
LAYER_TOKENS = (32, 2)  # [S, B] of the layer's input


def _layer_step_syncs(rank: int, world_size: int, argvs: list[list[str]]) -> list[list[str]]:
    """Host syncs of one MoE layer's forward + backward outside the Buffer, for a layer built from
    each of ``argvs`` (the first also sets up the process groups). The Buffer's backend is the
    reference here: its collectives run on the host by nature; the cuda backend's are the GPU test's."""
    from deepep_megatron import Buffer
    from deepep_megatron.megatron import pretrain
    from deepep_megatron.megatron.arguments import parse_args
    from deepep_megatron.megatron.model import build_moe_layer

    device = pretrain.initialize(parse_args(argvs[0]))
    generator = torch.Generator().manual_seed(rank)
    found = []
    try:
        for argv in argvs:
            args = parse_args(argv)
            layer = build_moe_layer(args, pretrain.build_transformer_config(args), device)
            x = torch.randn(*LAYER_TOKENS, args.hidden_size, generator=generator, requires_grad=True)
            grad = torch.randn(*LAYER_TOKENS, args.hidden_size, generator=generator)

            def step() -> None:
                out, _ = layer(x)
                out.backward(grad)

            step()  # the first step creates the shared Buffer (a setup collective, once per run)
            buffer_calls = [(Buffer, name) for name in ("get_dispatch_layout", "dispatch", "combine")]
            # The counts the dispatcher hands the experts live on the host by contract (megatron's
            # SequentialMLP splits its input with tokens_per_expert.tolist()).
            with HostSyncGuard(buffer_calls, lambda t: t is layer.token_dispatcher.tokens_per_expert) as guard:
                step()
            assert x.grad is not None and all(p.grad is not None for p in layer.parameters())
            found.append(guard.syncs)
        return found
    finally:
        pretrain.shutdown()


def test_padded_capacity_layer_makes_no_host_sync() -> None:
    """The static-shape layer makes none; the same guard on the dropless layer must see megatron's
    permute select rows with a boolean mask (``masked_select``, a sync on GPU): a guard that saw
    nothing there would prove nothing here."""
    padded, dropless = LAYER + ["--moe-expert-capacity-factor", "1.0"] + PAD, LAYER
    for rank, (padded_syncs, dropless_syncs) in enumerate(run_ranks(_layer_step_syncs, 2, [padded, dropless])):
        assert padded_syncs == [], f"rank {rank}: host syncs in the static-shape layer:\n" + "\n".join(padded_syncs)
        assert any("aten.masked_select" in s for s in dropless_syncs), f"rank {rank}: the guard missed {dropless_syncs}"


def test_padded_capacity_over_virtual_nodes_matches_alltoall() -> None:
    """EP4 as 2 virtual nodes of 2 (node forwarding): num_worst_tokens works across nodes too, and
    training equals megatron-core's alltoall."""
    world, flags, _ = CASES["ep4-drop"]
    argv = TINY + flags + PAD + ["--train-iters", str(ITERS), "--use-distributed-optimizer"]
    nodes = {"DEEPEP_MEGATRON_RANKS_PER_NODE": "2"}
    alltoall = run_ranks(_train, world, argv + ["--moe-token-dispatcher", "alltoall"], None)
    deepep = run_ranks(_train, world, argv + ["--moe-token-dispatcher", "deepep", "--moe-deepep-backend", "forwarding"],
                       None, env=nodes)
    _assert_same_training(deepep, alltoall)
    assert all(sum(r["dropped"]) > 0 for r in deepep)
