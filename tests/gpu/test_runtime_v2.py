"""Runtime v2 of the cuda backend on real GPUs: what issue 12 adds over test_intranode.py.

* the layout header and the extension agree (slot sizes, limits);
* CUDA graphs: get_dispatch_layout + dispatch(num_worst_tokens) + combine captured once, replayed
  with new inputs, equal to the reference backend on the same inputs; capturing a dispatch without
  num_worst_tokens raises ValueError;
* ranks must agree: each kind of mismatch (dispatch vs combine, other SM counts, other hidden
  sizes) raises on every rank, then reset() and a correct round;
* num_worst_tokens errors on the device (bad expert ids, too small a bound): every rank raises,
  then reset() and a correct round;
* a stalled peer: timeout on the waiting rank (and on the late one), reset(), a correct round.

Two ranks, one per GPU over NCCL or two on one GPU under MPS (gloo). Skipped without them.
"""
from __future__ import annotations

import time

import pytest
import torch

from harness import GPU_MARKS, local_backend, mps_running, run_ranks
from oracle import Case, expert_transform, make_inputs

pytestmark = GPU_MARKS

WORLD = 2
CONFIG_SMS = 8


def _launch() -> str:
    backend, ranks_per_gpu = local_backend(WORLD)
    if ranks_per_gpu > 1 and not mps_running():
        pytest.skip(f"{WORLD} ranks on {torch.cuda.device_count()} GPU(s) need MPS")
    return backend


def _buffers(hidden: int, timeout_s: float = 100.0):
    import torch.distributed as dist

    from deepep_megatron import Buffer, Config

    nvl = max(Config(s, 6, 256).get_nvl_buffer_size_hint(hidden * 4, WORLD) for s in (4, CONFIG_SMS))
    fast = Buffer(dist.group.WORLD, num_nvl_bytes=nvl, explicitly_destroy=True, backend="cuda", timeout_s=timeout_s)
    ref = Buffer(dist.group.WORLD, backend="reference")
    return fast, ref


def _round(fast, ref, case: Case, rank: int, tag: str, worst: int = 0) -> None:
    """One dispatch + combine on both backends, asserting equality (real rows under num_worst_tokens)."""
    from deepep_megatron import Config

    device = torch.device("cuda", torch.cuda.current_device())
    x, topk_idx, topk_weights = make_inputs(case, rank, device=str(device))
    config = Config(CONFIG_SMS, 6, 256)
    outs = []
    for buf in (fast, ref):
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, case.num_experts)
        outs.append(buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                 topk_idx=topk_idx, topk_weights=topk_weights, config=config, num_worst_tokens=worst))
    (rx_f, ti_f, tw_f, _, h_f, _), (rx_r, ti_r, tw_r, _, h_r, _) = outs
    real = h_r.num_recv_tokens  # the reference knows its real count (it pads at the Buffer)
    assert torch.equal(rx_f[:real], rx_r[:real]), f"{tag}: recv_x differs"
    assert torch.equal(ti_f, ti_r) and torch.equal(tw_f, tw_r), f"{tag}: top-k differs"
    y = expert_transform(rx_r, rank)
    assert torch.equal(fast.combine(y, h_f, config=config)[0], ref.combine(y, h_r)[0]), f"{tag}: combine differs"


# ------------------------------------------------------------------------------------------ layout
def test_layout_header_matches_extension() -> None:
    from deepep_megatron import _C, layout

    assert _C.CONTROL_BYTES == layout.CONTROL_BYTES and _C.MAX_TOPK == layout.MAX_TOPK
    assert _C.MAX_CHANNELS == layout.MAX_CHANNELS and _C.WARPS_PER_BLOCK == layout.WARPS_PER_BLOCK
    for hidden_bytes in (256, 4096, 5120, 7168, 8192, 14336, 7168 * 4, 16 * 3):
        assert _C.slot_bytes(hidden_bytes) == layout.token_slot_bytes(hidden_bytes), hidden_bytes


# ------------------------------------------------------------------------------------------ graphs
def _graph(rank: int, world_size: int) -> int:
    from deepep_megatron import Config

    device = torch.device("cuda", torch.cuda.current_device())
    hidden, experts = 2048, 16
    fast, ref = _buffers(hidden)
    config = Config(CONFIG_SMS, 6, 256)
    tokens = 300
    worst = tokens * world_size
    static_x = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=device)
    static_idx = torch.empty(tokens, 4, dtype=torch.int64, device=device)
    static_w = torch.empty(tokens, 4, dtype=torch.float32, device=device)

    def step():
        per_rank, _, per_expert, in_rank, _ = fast.get_dispatch_layout(static_idx, experts)
        recv_x, recv_idx, recv_w, _, handle, _ = fast.dispatch(
            static_x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=static_idx, topk_weights=static_w, config=config, num_worst_tokens=worst)
        y = (recv_x.float() * (rank + 1) + rank).to(torch.bfloat16)  # expert_transform, inside the graph
        combined, _, _ = fast.combine(y, handle, config=config)
        return recv_x, recv_idx, recv_w, combined

    def load(seed: int) -> Case:
        case = Case(world_size, tokens=(tokens,) * world_size, hidden=hidden, num_topk=4, num_experts=experts, seed=seed)
        x, idx, w = make_inputs(case, rank, device=str(device))
        static_x.copy_(x)
        static_idx.copy_(idx)
        static_w.copy_(w)
        return case

    load(100)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graph asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    replays = 0
    for seed in (101, 102, 103):
        case = load(seed)
        graph.replay()
        torch.cuda.synchronize()
        fast.runtime.check_errors()
        x, idx, w = make_inputs(case, rank, device=str(device))
        per_rank, _, per_expert, in_rank, _ = ref.get_dispatch_layout(idx, experts)
        rx, ri, rw, _, h, _ = ref.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                           num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w,
                                           num_worst_tokens=worst)
        real = h.num_recv_tokens
        assert torch.equal(outputs[0][:real], rx[:real]), f"replay {seed}: recv_x"
        assert torch.equal(outputs[1], ri) and torch.equal(outputs[2], rw), f"replay {seed}: top-k"
        want = ref.combine(expert_transform(rx, rank), h)[0]
        assert torch.equal(outputs[3], want), f"replay {seed}: combined"
        replays += 1
    # An eager call after the replays still works (the device epochs moved on alike on every rank).
    _round(fast, ref, Case(world_size, tokens=(77, 91), hidden=hidden, num_topk=2, num_experts=experts, seed=104), rank, "eager after graph")
    # A dispatch that needs the host cannot be captured.
    per_rank, _, per_expert, in_rank, _ = fast.get_dispatch_layout(static_idx, experts)
    torch.cuda.synchronize()
    bad_graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="num_worst_tokens"):
        with torch.cuda.graph(bad_graph):
            fast.dispatch(static_x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                          num_tokens_per_expert=per_expert, topk_idx=static_idx, topk_weights=static_w, config=config)
    torch.cuda.synchronize()
    fast.destroy()
    return replays


@pytest.mark.parametrize("fused_notify", ["0", "1"])
def test_graph_capture_and_replay(fused_notify: str) -> None:
    results = run_ranks(_graph, WORLD, backend=_launch(), timeout_s=300, env={"DEEPEP_MEGATRON_FUSED_NOTIFY": fused_notify})
    assert results == [3, 3]


# ------------------------------------------------------------------------------------------ agreement
def _mismatch(rank: int, world_size: int) -> list[str]:
    from deepep_megatron import Config

    device = torch.device("cuda", torch.cuda.current_device())
    hidden = 2048
    fast, ref = _buffers(2 * hidden)
    case = Case(world_size, tokens=(200, 150), hidden=hidden, num_topk=4, num_experts=16, seed=31)
    x, topk_idx, topk_weights = make_inputs(case, rank, device=str(device))
    per_rank, _, per_expert, in_rank, _ = fast.get_dispatch_layout(topk_idx, case.num_experts)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights)
    recv_x, _, _, _, handle, _ = fast.dispatch(x, config=Config(CONFIG_SMS, 6, 256), **args)
    messages = []
    kinds = {
        # rank 0 dispatches while rank 1 combines
        "operation": lambda: (fast.dispatch(x, config=Config(CONFIG_SMS, 6, 256), **args) if rank == 0
                              else fast.combine(recv_x, handle, config=Config(CONFIG_SMS, 6, 256))),
        # other SM counts
        "channels": lambda: fast.dispatch(x, config=Config(CONFIG_SMS if rank == 0 else 4, 6, 256), **args),
        # other hidden sizes in combine
        "row bytes": lambda: fast.combine(recv_x if rank == 0 else torch.cat([recv_x, recv_x], dim=1), handle,
                                          config=Config(CONFIG_SMS, 6, 256)),
    }
    for kind, call in kinds.items():
        with pytest.raises(RuntimeError, match="disagree") as info:
            call()
            fast.runtime.synchronize()  # an async combine raises at the next host-visible point
        assert f"first difference: {kind}" in str(info.value), f"{kind}: {info.value}"
        with pytest.raises(RuntimeError, match=r"reset\(\)"):  # refused until reset
            fast.get_dispatch_layout(topk_idx, case.num_experts)
        messages.append(str(info.value))
        fast.reset()
        _round(fast, ref, case, rank, f"after the {kind} mismatch")
    torch.cuda.synchronize()
    fast.destroy()
    return messages


def test_fingerprint_mismatch_refused_on_every_rank() -> None:
    results = run_ranks(_mismatch, WORLD, backend=_launch(), timeout_s=300)
    assert all(len(r) == 3 for r in results)


# ------------------------------------------------------------------------------------------ worst tokens
def _worst_errors(rank: int, world_size: int) -> int:
    from deepep_megatron import Config

    device = torch.device("cuda", torch.cuda.current_device())
    fast, ref = _buffers(2048)
    case = Case(world_size, tokens=(256, 256), hidden=2048, num_topk=4, num_experts=16, seed=41)
    x, topk_idx, topk_weights = make_inputs(case, rank, device=str(device))
    config = Config(CONFIG_SMS, 6, 256)
    checked = 0
    for what, idx, worst, error, pattern in (
        ("bad id", topk_idx.masked_fill(torch.arange(topk_idx.numel(), device=device).view_as(topk_idx) == 7, 99)
         if rank == 1 else topk_idx, 512, ValueError, r"rank\(s\) \[1\]"),
        ("small bound", topk_idx, 8, RuntimeError, "num_worst_tokens=8"),
    ):
        per_rank, _, per_expert, in_rank, _ = fast.get_dispatch_layout(idx, case.num_experts)
        out = fast.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                            topk_idx=idx, topk_weights=topk_weights, config=config, num_worst_tokens=worst)
        torch.cuda.synchronize()
        assert torch.isnan(out[0].float()).all(), f"{what}: the refused dispatch's recv_x is not poisoned"
        with pytest.raises(error, match=pattern):
            fast.get_dispatch_layout(topk_idx, case.num_experts)
        fast.reset()
        _round(fast, ref, case, rank, f"after {what}", worst=512)
        checked += 1
    fast.destroy()
    return checked


@pytest.mark.parametrize("fused_notify", ["0", "1"])
def test_worst_tokens_errors_reach_every_rank(fused_notify: str) -> None:
    """Also with notify in the dispatch kernel (DEEPEP_MEGATRON_FUSED_NOTIFY=1): its refusal must stop
    every block before any of them writes with the refused offsets."""
    results = run_ranks(_worst_errors, WORLD, backend=_launch(), timeout_s=300,
                        env={"DEEPEP_MEGATRON_FUSED_NOTIFY": fused_notify})
    assert results == [2, 2]


# ------------------------------------------------------------------------------------------ timeout
STALL_TIMEOUT_S = 2.0


def _stall_reset(rank: int, world_size: int) -> float:
    from deepep_megatron import Config

    device = torch.device("cuda", torch.cuda.current_device())
    fast, ref = _buffers(2048, timeout_s=STALL_TIMEOUT_S)
    case = Case(world_size, tokens=(512, 512), hidden=2048, num_topk=4, num_experts=16, seed=51)
    x, topk_idx, topk_weights = make_inputs(case, rank, device=str(device))
    config = Config(CONFIG_SMS, 6, 256)
    per_rank, _, per_expert, in_rank, _ = fast.get_dispatch_layout(topk_idx, case.num_experts)
    recv_x, _, _, _, handle, _ = fast.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                               num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                               topk_weights=topk_weights, config=config)
    torch.cuda.synchronize()
    if rank == 1:
        time.sleep(2 * STALL_TIMEOUT_S)  # the stalled peer: late for the combine
    start = time.monotonic()
    combined = fast.combine(recv_x, handle, config=config)[0]
    with pytest.raises(RuntimeError, match="timed out") as info:
        fast.runtime.synchronize()
    elapsed = time.monotonic() - start
    if rank == 0:
        assert "rank 1" in str(info.value), str(info.value)
    assert torch.isnan(combined.float()).all(), "the timed-out combine's output is not poisoned"
    fast.reset()
    _round(fast, ref, case, rank, "after the timeout")
    _round(fast, ref, case, rank, "second round after the timeout", worst=1024)
    fast.destroy()
    return elapsed


def test_stalled_peer_times_out_then_reset_recovers() -> None:
    results = run_ranks(_stall_reset, WORLD, backend=_launch(), timeout_s=300)
    assert STALL_TIMEOUT_S <= results[0] < 4 * STALL_TIMEOUT_S, results


# ------------------------------------------------------------------------ speculative dispatch
#: (tokens per rank, the rank that receives nothing or None) of consecutive full dispatches. The
#: speculative kernel writes tensors sized for the most rows of recent calls (+1/16) when every rank's
#: rows fit, else every rank's kernel drains the rings and every rank launches the exact one: the
#: first call (nothing allocated), a jump on every rank, a shrink (fits), a jump on rank 0 alone
#: (rank 1, starved, fits: every rank still misses), a collapse (fits but holds too much: copies are
#: returned), then rounds where rank 1 receives nothing and one after them.
SPECULATION_ROUNDS = ((300, None), (306, None), (900, None), (880, None), (900, 1), (40, None), (41, None), (300, 1),
                      (300, None), (300, 1), (300, 1), (310, None))


def _speculation(rank: int, world_size: int) -> int:
    fast, ref = _buffers(2048)
    for i, (tokens, starved) in enumerate(SPECULATION_ROUNDS):
        case = Case(world_size, tokens=(tokens,) * world_size, hidden=2048, num_topk=4, num_experts=16, seed=60 + i,
                    starved_rank=starved)
        _round(fast, ref, case, rank, f"round {i} ({tokens} tokens per rank, rank {starved} starved)")
    fast.destroy()
    return len(SPECULATION_ROUNDS)


@pytest.mark.parametrize("env", [{"DEEPEP_MEGATRON_PDL": "1"}, {"DEEPEP_MEGATRON_PDL": "0"}, {"DEEPEP_MEGATRON_FUSED_NOTIFY": "1"}],
                         ids=["dependent-launch", "after-notify", "fused-notify"])
def test_speculative_dispatch_stays_correct_when_sizes_change(env: dict) -> None:
    """The host-waited dispatch launches its kernel behind notify (early, as a programmatic dependent
    launch, or after notify with DEEPEP_MEGATRON_PDL=0), or as one kernel that runs notify in its last
    block (DEEPEP_MEGATRON_FUSED_NOTIFY=1), into tensors sized from recent calls; every change of the
    receive counts, on one rank or all, stays bit-exact."""
    results = run_ranks(_speculation, WORLD, backend=_launch(), timeout_s=300, env=env)
    assert results == [len(SPECULATION_ROUNDS)] * WORLD


# ------------------------------------------------------------------------ direct write
#: Rank 0's receive arena holds three blocks of the largest dispatch below (1800 rows of 4 KiB);
#: rank 1's holds none, so its rows always take the rings while rank 0's are written directly.
DIRECT_ARENA_BYTES = (24 << 20, 4096)
HELD_OUTPUTS = 5


def _direct_write(rank: int, world_size: int, direct_combine: bool = False) -> dict:
    import gc
    import os

    from deepep_megatron import Config

    os.environ["DEEPEP_MEGATRON_RECV_ARENA_BYTES"] = str(DIRECT_ARENA_BYTES[rank])
    os.environ["DEEPEP_MEGATRON_POISON_ARENA"] = "1"
    os.environ["DEEPEP_MEGATRON_DIRECT_COMBINE"] = "1" if direct_combine else "0"
    device = torch.device("cuda", torch.cuda.current_device())
    fast, ref = _buffers(2048, timeout_s=15.0)  # a hang shows as a diagnostic within the test's time
    config = Config(CONFIG_SMS, 6, 256)
    used = 0
    # Host-waited (speculative hits, misses, copies), then num_worst_tokens, each with a cached dispatch.
    rounds = [(tokens, starved, 0) for tokens, starved in SPECULATION_ROUNDS] + [(900, None, 1800), (300, 1, 1800)]
    for i, (tokens, starved, worst) in enumerate(rounds):
        case = Case(world_size, tokens=(tokens,) * world_size, hidden=2048, num_topk=4, num_experts=16, seed=200 + i,
                    starved_rank=starved)
        tag = f"direct round {i} ({tokens} tokens, rank {starved} starved, worst {worst})"
        _round(fast, ref, case, rank, tag, worst=worst)
        x, topk_idx, topk_weights = make_inputs(case, rank, device=str(device))
        handles = []
        for buf in (fast, ref):
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, case.num_experts)
            handles.append(buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
                                        config=config, num_worst_tokens=worst)[4])
        cached_fast, cached_ref = fast.dispatch(x, handle=handles[0], config=config)[0], ref.dispatch(x, handle=handles[1])[0]
        real = handles[1].num_recv_tokens
        assert torch.equal(cached_fast[:real], cached_ref[:real]), f"{tag}: cached recv_x differs"
        used += fast.runtime.arena_stats()["blocks"] > 0
        del cached_fast, handles
    # Outputs held at once: rank 0's arena runs out after three, the rest take the rings.
    case = Case(world_size, tokens=(900,) * world_size, hidden=2048, num_topk=4, num_experts=16, seed=250)
    x, topk_idx, topk_weights = make_inputs(case, rank, device=str(device))
    per_rank, _, per_expert, in_rank, _ = ref.get_dispatch_layout(topk_idx, case.num_experts)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=1800)
    out_ref = ref.dispatch(x, **args)
    want, real = out_ref[0], out_ref[4].num_recv_tokens  # rows past `real` are padding (x left as is)
    held, blocks = [], []
    for _ in range(HELD_OUTPUTS):
        held.append(fast.dispatch(x, config=config, **args)[0])
        blocks.append(fast.runtime.arena_stats()["blocks"])
    for i, got in enumerate(held):
        assert torch.equal(got[:real], want[:real]), f"held output {i} differs"
    del held, got
    gc.collect()
    torch.cuda.synchronize()
    after = fast.runtime.arena_stats()
    _round(fast, ref, case, rank, "after the held outputs died", worst=1800)
    fast.destroy()
    return {"used": used, "blocks": blocks, "in_use_after": after["bytes_in_use"]}


def test_direct_write_with_mixed_arenas_and_block_lifetime() -> None:
    """Rank 0 takes its rows into receive blocks (the senders write them directly), rank 1 through
    the rings; every kind of dispatch stays bit-exact, blocks go back when their tensors die, and a
    full arena falls back to the rings."""
    results = run_ranks(_direct_write, WORLD, backend=_launch(), timeout_s=300)
    first, second = results
    assert first["used"] >= 2 and second["used"] == 0, results
    assert first["blocks"] == [1, 2, 3, 3, 3] and second["blocks"] == [0] * HELD_OUTPUTS, results
    assert first["in_use_after"] == 0, results


def test_direct_combine_falls_back_to_the_rings_with_mixed_arenas() -> None:
    """The direct combine with mixed arenas: rank 0 takes a combine block and runs
    combine_direct_kernel, rank 1 has none, so the ring kernel launched behind rank 0's direct one
    moves the data; every combine stays bit-exact."""
    results = run_ranks(_direct_write, WORLD, True, backend=_launch(), timeout_s=300)
    assert results[0]["in_use_after"] == 0, results


#: GPU cycles the compute stream sleeps before it reads the first dispatch's rows (about 50 ms on
#: an H200): long enough that a dispatch on the comm stream that reused the block without waiting
#: would overwrite them first.
READER_SLEEP_CYCLES = 100_000_000


def _async_block_reuse(rank: int, world_size: int) -> int:
    import os

    from deepep_megatron import Config

    os.environ["DEEPEP_MEGATRON_RECV_ARENA_BYTES"] = str(64 << 20)
    device = torch.device("cuda", torch.cuda.current_device())
    fast, ref = _buffers(2048, timeout_s=30.0)
    config = Config(CONFIG_SMS, 6, 256)
    compute = torch.cuda.current_stream(device)
    mismatches = 0
    for i in range(3):
        case = Case(world_size, tokens=(700,) * world_size, hidden=2048, num_topk=4, num_experts=16, seed=300 + i)
        x, topk_idx, topk_weights = make_inputs(case, rank, device=str(device))
        per_rank, _, per_expert, in_rank, _ = ref.get_dispatch_layout(topk_idx, case.num_experts)
        args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                    topk_idx=topk_idx, topk_weights=topk_weights, config=config)
        want = ref.dispatch(x, **args)[0]
        # Once synchronously: the speculative receive size now fits this routing, so the
        # dispatches below take receive blocks.
        fast.dispatch(x, **args)
        torch.cuda.synchronize()
        # The first dispatch on the comm stream (async_finish); the compute stream reads its rows
        # only after a long sleep, and the host drops them before that read has run.
        recv_x, _, _, _, _, event = fast.dispatch(x, async_finish=True, allocate_on_comm_stream=True, **args)
        assert fast.runtime.arena_stats()["blocks"] > 0, "the first dispatch did not take a receive block"
        event.current_stream_wait()
        before_read = fast.capture()  # the compute stream before its read: what the next call waits for
        torch.cuda._sleep(READER_SLEEP_CYCLES)
        seen = recv_x.clone()
        del recv_x, event
        # The second dispatch (the same routing, other rows), on the comm stream again and ordered
        # only after `before_read` (as a DeepEP caller passes previous_event), takes a block at the
        # same offset (first fit) and writes it: the arena must make it wait for the compute
        # stream's read.
        out2 = fast.dispatch(x * 2 + 1, previous_event=before_read, async_finish=True, allocate_on_comm_stream=True, **args)
        out2[5].current_stream_wait()
        compute.synchronize()
        mismatches += int(not torch.equal(seen, want))
        del out2
    fast.destroy()
    return mismatches


def test_receive_block_reuse_waits_for_the_stream_that_read_it() -> None:
    """async_finish: dispatch on the comm stream into a receive block, read its rows on the compute
    stream (after a long GPU sleep) once the host has dropped them, then dispatch again on the comm
    stream after an event from before that read: the new block reuses the range only after the
    compute stream's read (Buffer records the compute stream for the block, as Tensor.record_stream
    does for the caching allocator; record_stream itself does nothing for a receive block)."""
    assert run_ranks(_async_block_reuse, WORLD, backend=_launch(), timeout_s=300) == [0] * WORLD


#: The pretraining test's MoE shape (tests/gpu/test_pretrain_cuda.py TINY): 2 x 64 tokens per rank,
#: hidden 256, top-2 of 4 experts; two layers per step.
AUTOGRAD_STEPS, AUTOGRAD_LAYERS = 30, 2


def _autograd_fp8_arena(rank: int, world_size: int, use_fp8: bool) -> int:
    import os

    from deepep_megatron import Buffer
    from deepep_megatron import autograd as deepep_autograd

    os.environ["DEEPEP_MEGATRON_RECV_ARENA_BYTES"] = str(256 << 20)
    os.environ["DEEPEP_MEGATRON_POISON_ARENA"] = "1"
    device = torch.device("cuda", torch.cuda.current_device())
    Buffer.set_num_sms(CONFIG_SMS)  # autograd's dispatch and combine take the default configs
    fast, ref = _buffers(256, timeout_s=10.0)  # a stall shows as a diagnostic, not as a hung test
    steps = 0
    for step in range(AUTOGRAD_STEPS):
        for layer in range(AUTOGRAD_LAYERS):
            case = Case(world_size, tokens=(128,) * world_size, hidden=256, num_topk=2, num_experts=4,
                        seed=400 + step * AUTOGRAD_LAYERS + layer)
            x, topk_idx, topk_weights = make_inputs(case, rank, device=str(device))
            grads = []
            for buf in (fast, ref):
                xi = x.clone().requires_grad_(True)
                wi = topk_weights.clone().requires_grad_(True)
                recv_x, _, recv_w, _, handle = deepep_autograd.dispatch(buf, xi, topk_idx, wi, case.num_experts,
                                                                        use_fp8=use_fp8)
                y = deepep_autograd.combine(buf, expert_transform(recv_x, rank), handle)
                (y.float().square().mean() + recv_w.sum()).backward()
                grads.append((y.detach(), xi.grad, wi.grad))
            (y_f, gx_f, gw_f), (y_r, gx_r, gw_r) = grads
            tag = f"step {step} layer {layer} ({'fp8' if use_fp8 else 'bf16'} dispatch, arena)"
            assert torch.equal(y_f, y_r), f"{tag}: combine differs"
            assert torch.equal(gx_f, gx_r), f"{tag}: grad x differs"
            assert torch.equal(gw_f, gw_r), f"{tag}: grad topk_weights differs"
        steps += 1
    fast.destroy()
    return steps


@pytest.mark.parametrize("use_fp8", [True, False], ids=["fp8", "bf16"])
def test_autograd_dispatch_combine_with_receive_arena(use_fp8: bool) -> None:
    """The pretraining entry's MoE path without megatron-core (autograd dispatch -> experts ->
    combine -> backward, two layers a step) on the direct kernels, equal to the reference in every
    step; the pretraining test with the arena and FP8 dispatch stalled in the fifth session, and
    this localizes it (10 s peer timeouts: a stall ends as a diagnostic)."""
    results = run_ranks(_autograd_fp8_arena, WORLD, use_fp8, backend=_launch(), timeout_s=240)
    assert results == [AUTOGRAD_STEPS] * WORLD
