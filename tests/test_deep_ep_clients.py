"""The opt-in ``deep_ep`` alias, and DeepEP clients this project did not write running on it.

megatron-core's own DeepEP path runs as it ships: ``megatron.core.transformer.moe.fused_a2a``
(``fused_dispatch``/``fused_combine``, autograd), its ``_DeepepManager`` and the flex token
dispatcher (``moe_token_dispatcher_type="flex"``, ``moe_flex_dispatcher_backend="deepep"``). They
import ``deep_ep``; the alias is installed into a temporary folder that each rank puts on its
``sys.path`` before importing megatron. Outputs and gradients are checked against a dense oracle:
``out[t] = sum_k p[t, k] * x[t] * w[e_tk]`` for experts that scale a token by a per-expert vector.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Callable

import pytest
import torch

from harness import run_ranks

# Not imported here: importing megatron.core loads fused_a2a, which looks for deep_ep once, and the
# ranks (which import this module) must put the alias on sys.path first.
needs_megatron = pytest.mark.skipif(
    importlib.util.find_spec("megatron.core") is None, reason="megatron-core is not installed (pip install -e '.[megatron]')"
)

NUM_EXPERTS = 8
HIDDEN = 128
TOP_K = 3


def _alias_cli(*args: str, target: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepep_megatron.deep_ep", *args, "--target", target],
                          capture_output=True, text=True, timeout=120)


def _import_in(target: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def alias_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    target = str(tmp_path_factory.mktemp("alias"))
    done = _alias_cli("install", target=target)
    assert done.returncode == 0, done.stderr
    return target


def test_alias_loads_this_package_and_says_so(alias_dir: str) -> None:
    probe = _import_in(alias_dir, (
        "import deep_ep, deepep_megatron\n"
        "from deep_ep import Buffer, Config, EventOverlap\n"
        "from deep_ep.utils import EventHandle, EventOverlap as E2, check_nvlink_connections\n"
        "from deep_ep.buffer import Buffer as B2\n"
        "assert deep_ep.PROVIDER == 'deepep_megatron'\n"
        "assert Buffer is B2 is deepep_megatron.Buffer and E2 is EventOverlap is deepep_megatron.EventOverlap\n"
        "print('ok')\n"))
    assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stderr
    status = subprocess.run([sys.executable, "-m", "deepep_megatron.deep_ep", "status"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=alias_dir), timeout=120)
    assert "is deepep_megatron's alias" in status.stdout


def test_alias_never_shadows_another_deep_ep(tmp_path) -> None:
    foreign = tmp_path / "deep_ep"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("PROVIDER = 'someone else'\n")
    refused = _alias_cli("install", target=str(tmp_path))
    assert refused.returncode == 1 and "not deepep_megatron's alias" in refused.stderr
    assert (foreign / "__init__.py").read_text() == "PROVIDER = 'someone else'\n"  # untouched
    assert _alias_cli("uninstall", target=str(tmp_path)).returncode == 1 and foreign.exists()
    # a DeepEP elsewhere on the path also blocks an install into a free folder
    free = tmp_path / "free"
    free.mkdir()
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    blocked = subprocess.run([sys.executable, "-m", "deepep_megatron.deep_ep", "install", "--target", str(free)],
                             capture_output=True, text=True, env=env, timeout=120)
    assert blocked.returncode == 1 and "never shadows it" in blocked.stderr and not (free / "deep_ep").exists()
    status = subprocess.run([sys.executable, "-m", "deepep_megatron.deep_ep", "status"], capture_output=True, text=True, env=env, timeout=120)
    assert "is not deepep_megatron's alias" in status.stdout


def test_alias_uninstall_removes_only_the_alias(tmp_path) -> None:
    assert _alias_cli("install", target=str(tmp_path)).returncode == 0
    assert _alias_cli("install", target=str(tmp_path)).returncode == 0  # again: rewrites its own alias
    assert (tmp_path / "deep_ep" / "__init__.py").exists()
    removed = _alias_cli("uninstall", target=str(tmp_path))
    assert removed.returncode == 0 and not (tmp_path / "deep_ep").exists()
    assert "no deep_ep alias" in _alias_cli("uninstall", target=str(tmp_path)).stdout


# ----------------------------------------------------------------------------- megatron clients
def _routing(rank: int, num_tokens: int, drop: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] fp32, top-k expert ids [T, K] (-1 = dropped slot when ``drop``), probs [T, K] fp32."""
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(num_tokens, HIDDEN, generator=g) * 2 + 0.25
    idx = torch.rand(num_tokens, NUM_EXPERTS, generator=g).topk(TOP_K, dim=1).indices
    probs = torch.rand(num_tokens, TOP_K, generator=g) + 0.05
    if drop:
        dropped = torch.rand(num_tokens, TOP_K, generator=g) < 0.2
        idx, probs = idx.masked_fill(dropped, -1), probs.masked_fill(dropped, 0.0)
    return x, idx, probs


def _expert_scales() -> torch.Tensor:
    """[E, H] per-expert scales (the same on every rank)."""
    return torch.rand(NUM_EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(99)) + 0.5


def _dense(x: torch.Tensor, idx: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The oracle: ``sum_k p[t, k] * x[t] * w[e_tk]`` in fp32 over the valid slots."""
    w = _expert_scales()
    out = torch.zeros_like(x)
    for k in range(idx.size(1)):
        valid = idx[:, k] >= 0
        out[valid] = out[valid] + probs[valid, k : k + 1] * x[valid] * w[idx[valid, k]]
    return out


def _tolerance(dtype: torch.dtype, reference: torch.Tensor) -> dict:
    # fp32: summation-order differences only. bf16: the rows cross the wire as bf16 and each rank's
    # partial sum and the final sum are rounded, 3 roundings of at most half an ulp (2^-9 relative)
    # of values no larger than the largest partial.
    scale = float(reference.abs().max())
    return {"rtol": 0.0, "atol": (1e-5 if dtype == torch.float32 else 3 * 2.0**-8) * scale}


def _backward_against_dense(
    out: torch.Tensor, x: torch.Tensor, probs_grad: Callable[[], torch.Tensor], idx: torch.Tensor, probs: torch.Tensor, seed: int
) -> None:
    """Backpropagate a random cotangent through the client's ``out`` and through the dense oracle of
    the same ``x`` / ``idx`` / ``probs``; outputs, ``x.grad`` and the probabilities' gradient (read by
    ``probs_grad`` after the backward, per top-k slot; 0 for dropped slots) must agree."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out.float() * g).sum().backward()
    xd, pd = x.detach().float().requires_grad_(), probs.clone().requires_grad_()
    want = _dense(xd, idx, pd)
    (want * g).sum().backward()
    torch.testing.assert_close(out.float(), want.detach(), **_tolerance(x.dtype, want))
    torch.testing.assert_close(x.grad.float(), xd.grad, **_tolerance(x.dtype, xd.grad))
    torch.testing.assert_close(probs_grad(), pd.grad * (idx >= 0), **_tolerance(x.dtype, pd.grad))


def _with_alias(target: str) -> None:
    assert "megatron.core" not in sys.modules, "megatron-core was imported before the alias was on sys.path"
    sys.path.insert(0, target)
    from megatron.core.transformer.moe import fused_a2a

    assert fused_a2a.HAVE_DEEP_EP, "megatron-core did not find deep_ep through the alias"
    import deep_ep

    assert deep_ep.PROVIDER == "deepep_megatron"


def _fused_a2a(rank: int, world_size: int, target: str) -> int:
    _with_alias(target)
    import torch.distributed as dist
    from megatron.core.transformer.moe import fused_a2a

    group = dist.group.WORLD
    num_local = NUM_EXPERTS // world_size
    w_local = _expert_scales()[rank * num_local : (rank + 1) * num_local]
    checked = 0
    for dtype in (torch.float32, torch.bfloat16):
        for async_finish in (False, True):
            for drop in (False, True):
                x32, idx, probs = _routing(rank, 24 + 8 * rank, drop)
                x = x32.to(dtype).requires_grad_()
                p = probs.clone().requires_grad_()
                recv_x, recv_idx, recv_p, tokens_per_expert, handle = fused_a2a.fused_dispatch(
                    x, idx, p, NUM_EXPERTS, group, async_finish=async_finish)
                valid = recv_idx >= 0
                assert tokens_per_expert.tolist() == [int((recv_idx == e).sum()) for e in range(num_local)]
                # the experts: each received row times its local experts' scales, weighted
                scale = (recv_p.unsqueeze(-1) * w_local[recv_idx.clamp(min=0)] * valid.unsqueeze(-1)).sum(dim=1)
                y = (recv_x.float() * scale).to(dtype)
                out, _ = fused_a2a.fused_combine(y, group, handle, async_finish=async_finish)
                _backward_against_dense(out, x, lambda: p.grad, idx, probs, seed=7 + rank)
                checked += 1
    return checked


@needs_megatron
def test_megatron_fused_a2a_runs_on_deep_ep_alias(alias_dir: str) -> None:
    assert run_ranks(_fused_a2a, 2, alias_dir) == [8, 8]


@needs_megatron
def test_megatron_fused_a2a_over_virtual_nodes(alias_dir: str) -> None:
    """EP4 as 2 nodes of 2: megatron-core's fused_a2a passes DeepEP's per-node counts through."""
    assert run_ranks(_fused_a2a, 4, alias_dir, env={"DEEPEP_MEGATRON_RANKS_PER_NODE": "2"}) == [8] * 4


def _flex_dispatcher(rank: int, world_size: int, target: str) -> int:
    _with_alias(target)
    from deepep_megatron.megatron import cpu_compat

    cpu_compat.apply()
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher
    from megatron.core.transformer.transformer_config import TransformerConfig

    from deepep_megatron.megatron.compat import default_moe_pg_collection

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world_size)
    num_local = NUM_EXPERTS // world_size
    w_local = _expert_scales()[rank * num_local : (rank + 1) * num_local]
    checked = 0
    for dtype in (torch.float32, torch.bfloat16):
        config = TransformerConfig(
            num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=NUM_EXPERTS, moe_router_topk=TOP_K,
            moe_token_dispatcher_type="flex", moe_flex_dispatcher_backend="deepep", moe_router_dtype="fp32",
            expert_model_parallel_size=world_size, add_bias_linear=False, use_cpu_initialization=True,
            bf16=dtype == torch.bfloat16, params_dtype=dtype,
        )
        dispatcher = MoEFlexTokenDispatcher(num_local, list(range(rank * num_local, (rank + 1) * num_local)), config,
                                            pg_collection=default_moe_pg_collection())
        x32, idx, probs = _routing(rank, 20 + 12 * rank, drop=False)
        routing_map = torch.zeros(x32.size(0), NUM_EXPERTS, dtype=torch.bool).scatter_(1, idx, True)
        dense_probs = torch.zeros(x32.size(0), NUM_EXPERTS).scatter_(1, idx, probs).requires_grad_()
        x = x32.to(dtype).requires_grad_()

        hidden, p = dispatcher.dispatch_preprocess(x, routing_map, dense_probs)
        hidden, p = dispatcher.token_dispatch(hidden, p)
        tokens, tokens_per_expert, permuted_probs = dispatcher.dispatch_postprocess(hidden, p)
        chunks = torch.split(tokens, tokens_per_expert.tolist())
        prob_chunks = torch.split(permuted_probs, tokens_per_expert.tolist())
        expert_out = torch.cat([(c.float() * w_local[e] * q.unsqueeze(-1)).to(dtype)
                                for e, (c, q) in enumerate(zip(chunks, prob_chunks))])
        out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(expert_out)))
        _backward_against_dense(out, x, lambda: dense_probs.grad.gather(1, idx), idx, probs, seed=70 + rank)
        checked += 1
    parallel_state.destroy_model_parallel()
    return checked


@needs_megatron
def test_megatron_flex_dispatcher_runs_on_deep_ep_alias(alias_dir: str) -> None:
    assert run_ranks(_flex_dispatcher, 2, alias_dir) == [2, 2]
