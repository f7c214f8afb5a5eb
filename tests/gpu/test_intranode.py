"""The ``cuda`` backend's intranode kernels against the reference backend, on real GPUs.

Ranks run one per GPU over NCCL when there are enough GPUs, otherwise several per GPU over gloo,
which needs MPS (start it first: scripts/gpu_ci.sh does). Skipped without a GPU, the extension, or
(for several ranks per GPU) MPS, so the CPU-only CI stays green.

Checks: dispatch is bit-identical to the reference (rows, FP8 scales, top-k ids/weights, counts,
source indices), combine too (the kernels sum in the same fp32 order), on random data with outputs
poisoned first, for bf16/fp32/FP8, cached dispatch, async_finish + previous_event, layout-only
dispatch, num_worst_tokens, combine with bias, several SM counts, ranks that receive nothing and
ranks with no tokens. A stall test checks the timeout error.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from harness import GPU_MARKS, local_backend, mps_running, run_ranks
from oracle import Case, expert_transform, make_inputs

pytestmark = GPU_MARKS


#: Set by scripts/gpu_ci.sh for its second pass (under MPS): run only what needs MPS.
ONLY_MPS = os.environ.get("DEEPEP_MEGATRON_GPU_TESTS_ONLY_MPS") == "1"
#: The direct-write runs: every rank's buffer carries a receive arena whose blocks are poisoned
#: (0xFF) when taken, so a row no peer wrote cannot pass.
DIRECT_WRITE_ENV = {"DEEPEP_MEGATRON_RECV_ARENA_BYTES": str(1 << 30), "DEEPEP_MEGATRON_POISON_ARENA": "1"}


def _direct_write() -> bool:
    """Whether this rank runs with a receive arena (read in the rank's process, after run_ranks set its env)."""
    return os.environ.get("DEEPEP_MEGATRON_RECV_ARENA_BYTES", "0") != "0"


def _launch(world_size: int) -> tuple[str, int]:
    """(process-group backend, ranks per GPU) for ``world_size`` ranks, or skip."""
    backend, ranks_per_gpu = local_backend(world_size)
    if ranks_per_gpu == 1:
        if ONLY_MPS:
            pytest.skip("one rank per GPU: ran in the pass without MPS")
    elif not mps_running():
        pytest.skip(f"{world_size} ranks on {torch.cuda.device_count()} GPU(s) need MPS "
                    "(CUDA_MPS_PIPE_DIRECTORY with a running daemon)")
    return backend, ranks_per_gpu


def _max_sms(ranks_per_gpu: int) -> int:
    """Largest even SM count per rank such that every rank's persistent blocks fit at once."""
    sms_per_gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return min(48, (sms_per_gpu // ranks_per_gpu) // 2 * 2)


def _cases(world_size: int) -> list[tuple[Case, bool]]:
    """(case, use FP8) pairs covering the shapes the issue lists."""
    big = 4096 if world_size <= 4 else 2048
    w = world_size
    cases = [(Case(w, tokens=(1,) * w, hidden=2048, num_topk=1, num_experts=max(8, w), seed=11), False)]
    for tokens, seed in ((tuple(100 + 37 * r for r in range(w)), 12), ((big,) * w, 13)):  # DeepSeek-V3 widths
        dsv3 = Case(w, tokens=tokens, hidden=7168, num_topk=8, num_experts=256, seed=seed)
        cases += [(dsv3, False), (dsv3, True)]
    return cases + [
        (Case(w, tokens=(0,) + tuple(300 + r for r in range(w - 1)), hidden=4096, num_topk=4, num_experts=8 * w,
              seed=14, starved_rank=w - 1, dtype=torch.float32), False),
        (Case(w, tokens=tuple(777 - 50 * r for r in range(w)), hidden=2560, num_topk=6, num_experts=16 * w, seed=15,
              drop=0.5, empty_tokens=0.3), False),
        (Case(w, tokens=(513,) * w, hidden=2048, num_topk=2, num_experts=8, seed=16), True),  # 8 experts: R=8 has 1 each
        # FP8 rows whose size modulo one warp's copy chunk (4 KiB; 2 KiB at EP8) is under 32 int4s:
        # 256 bytes, and 2304 (256 past 2 KiB at EP8). The direct-write dispatch hung on these once
        # (a warp shuffle inside a loop that the idle lanes had left).
        (Case(w, tokens=tuple(129 + 7 * r for r in range(w)), hidden=256, num_topk=2, num_experts=4 * w, seed=17), True),
        (Case(w, tokens=(65,) * w, hidden=2304, num_topk=3, num_experts=8 * w, seed=18), True),
    ]


def _poison(device: torch.device, nbytes: int = 1 << 28) -> None:
    """Fill the allocator's free memory with 0xFF (NaN for floats) so unwritten outputs show."""
    junk = torch.empty(nbytes, dtype=torch.uint8, device=device)
    junk.fill_(0xFF)
    del junk


def _bits(t):
    if t is None:
        return None
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _same(a, b, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, f"{what}: one side is None"
        return
    a, b = _bits(a), _bits(b)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if not torch.equal(a.cpu(), b.cpu()):
        diff = (a.float() - b.float()).abs()
        bad = int((a.cpu() != b.cpu()).sum())
        raise AssertionError(f"{what}: {bad} elements differ (max abs diff {float(diff.nan_to_num(1e30).max()):g})")


def _rdma_bytes(cases: list[tuple[Case, bool]], world_size: int) -> int:
    """NVSHMEM heap bytes for node forwarding's RDMA leg over NVSHMEM (DEEPEP_MEGATRON_RDMA_LEG=nvshmem
    and virtual nodes), else 0: the widest row of the cases with its FP8 scales, source index, top-k
    ids and weights and destination bits, for the most tokens any rank has."""
    from deepep_megatron.backends.rail import RDMA_LEG_ENV
    from deepep_megatron.layout import FP8_BLOCK, rail_bytes_needed, rail_row_bytes
    from deepep_megatron.topology import RANKS_PER_NODE_ENV

    per_node = int(os.environ.get(RANKS_PER_NODE_ENV, world_size))
    if os.environ.get(RDMA_LEG_ENV) != "nvshmem" or per_node == world_size:
        return 0
    row = max(max(rail_row_bytes(c.hidden * c.dtype.itemsize, 0, c.num_topk, world_size),
                  rail_row_bytes(c.hidden, c.hidden // FP8_BLOCK, c.num_topk, world_size)) for c, _ in cases)
    return rail_bytes_needed(world_size // per_node, max(max(c.tokens) for c, _ in cases), row)


def _compare_cases(rank: int, world_size: int, ranks_per_gpu: int) -> int:
    import torch.distributed as dist

    from deepep_megatron import Buffer, Config, per_token_cast_back, per_token_cast_to_fp8

    device = torch.device("cuda", torch.cuda.current_device())  # rank % GPUs, set by run_ranks
    group = dist.group.WORLD
    max_sms = _max_sms(ranks_per_gpu)
    if os.environ.get("DEEPEP_MEGATRON_RDMA_LEG") == "nvshmem" and ranks_per_gpu > 1:
        max_sms -= 2  # leave SMs for the rail kernels beside the other ranks' spinning NVLink-leg kernels
    sms_choices = sorted({2, min(24, max_sms), max_sms})
    Buffer.set_num_sms(max(sms_choices))  # calls without a config use this many SMs
    cases = _cases(world_size)
    hidden_bytes = max(c.hidden * max(c.dtype.itemsize, 2) for c, _ in cases)
    num_nvl_bytes = max(Config(s, 6, 256).get_nvl_buffer_size_hint(hidden_bytes, world_size) for s in sms_choices)
    fast = Buffer(group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=_rdma_bytes(cases, world_size), explicitly_destroy=True,
                  backend="cuda")
    # Over virtual nodes with NVLink peers the kernels run node forwarding's NVLink leg: its oracle is
    # the same forwarding on the reference backend (bit-exact everywhere; its combine's node partials
    # differ from the flat reference's rank-order sum by their rounding). tests/gpu/test_internode.py.
    over_nodes = fast.num_rdma_ranks > 1
    rdma_leg = os.environ.pop("DEEPEP_MEGATRON_RDMA_LEG", None)  # the oracle's RDMA leg is the collective
    ref = Buffer(group, backend="forwarding" if over_nodes and fast.num_nvl_ranks > 1 else "reference")
    if rdma_leg is not None:
        os.environ["DEEPEP_MEGATRON_RDMA_LEG"] = rdma_leg
    assert fast.backend_name == ("cuda" if fast.num_nvl_ranks > 1 else "forwarding")
    checked = 0
    for index, (case, use_fp8) in enumerate(cases):
        num_sms = sms_choices[index % len(sms_choices)]
        config = Config(num_sms, 6 + index % 3 * 9, 256)
        x, topk_idx, topk_weights = make_inputs(case, rank, device=str(device))
        tag = f"case {index} ({case}, fp8={use_fp8}, num_sms={num_sms})"

        _poison(device)
        lay_fast = fast.get_dispatch_layout(topk_idx, case.num_experts)
        lay_ref = ref.get_dispatch_layout(topk_idx, case.num_experts)
        for name, a, b in zip(("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank"),
                              (lay_fast[0], lay_fast[2], lay_fast[3]), (lay_ref[0], lay_ref[2], lay_ref[3])):
            _same(a, b, f"{tag}: layout {name}")
        per_rank, per_rdma, per_expert, in_rank, _ = lay_ref

        x_in = per_token_cast_to_fp8(x) if use_fp8 else x
        args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                    topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=1 + index % 4, config=config,
                    num_tokens_per_rdma_rank=per_rdma if over_nodes else None)
        _poison(device)
        out_fast = fast.dispatch(x_in, **args)
        out_ref = ref.dispatch(x_in, **args)
        recv_fast, recv_ref = out_fast[0], out_ref[0]
        if use_fp8:
            _same(recv_fast[0], recv_ref[0], f"{tag}: recv_x (e4m3)")
            _same(recv_fast[1], recv_ref[1], f"{tag}: recv_x scales")
        else:
            _same(recv_fast, recv_ref, f"{tag}: recv_x")
        _same(out_fast[1], out_ref[1], f"{tag}: recv_topk_idx")
        _same(out_fast[2], out_ref[2], f"{tag}: recv_topk_weights")
        assert out_fast[3] == out_ref[3], f"{tag}: num_recv_tokens_per_expert_list {out_fast[3]} vs {out_ref[3]}"
        handle_fast, handle_ref = out_fast[4], out_ref[4]
        _same(handle_fast.recv_src_idx, handle_ref.recv_src_idx, f"{tag}: recv_src_idx")
        _same(handle_fast.layout.num_recv_tokens_per_rank, handle_ref.layout.num_recv_tokens_per_rank, f"{tag}: recv per rank")
        _same(handle_fast.layout.num_tokens_per_rank.cpu(), handle_ref.layout.num_tokens_per_rank.cpu(), f"{tag}: send per rank")
        for item, name in ((0, "rank_prefix_matrix"), (1, "channel_prefix_matrix"), (2, "recv_channel_prefix_matrix"),
                           (3, "recv_src_idx"), (5, "send_head")):
            _same(handle_fast[item], handle_ref[item], f"{tag}: handle[{item}] ({name})")

        # Cached dispatch (the backward of combine), async with a previous event.
        _poison(device)
        event = fast.dispatch(x_in, handle=handle_fast, async_finish=True)[5]
        cached_fast_event = fast.dispatch(x_in, handle=handle_fast, previous_event=event, async_finish=True)
        cached_fast_event[5].current_stream_wait()
        cached_ref = ref.dispatch(x_in, handle=handle_ref)
        if use_fp8:
            _same(cached_fast_event[0][0], cached_ref[0][0], f"{tag}: cached recv_x (e4m3)")
            _same(cached_fast_event[0][1], cached_ref[0][1], f"{tag}: cached scales")
        else:
            _same(cached_fast_event[0], cached_ref[0], f"{tag}: cached recv_x")
        if _direct_write() and handle_ref.num_recv_tokens > 0:  # the peers wrote into a receive block
            assert fast.runtime.arena_stats()["blocks"] >= 1, f"{tag}: the cached dispatch took no receive block"

        # Combine of a per-rank transform, with and without top-k weights.
        rows = per_token_cast_back(*recv_ref, dtype=torch.bfloat16) if use_fp8 else recv_ref
        y = expert_transform(rows, rank)
        _poison(device)
        comb_fast = fast.combine(y, handle_fast, topk_weights=out_ref[2], config=Config(num_sms, 4 + index % 2 * 6, 256))
        comb_ref = ref.combine(y, handle_ref, topk_weights=out_ref[2])
        _same(comb_fast[0], comb_ref[0], f"{tag}: combined_x")
        _same(comb_fast[1], comb_ref[1], f"{tag}: combined_topk_weights")
        _poison(device)
        comb_async = fast.combine(y, handle_fast, async_finish=True)
        comb_async[2].current_stream_wait()
        _same(comb_async[0], comb_ref[0], f"{tag}: combined_x (async, no weights)")
        assert comb_async[1] is None

        # DeepEP's other modes: layout-only dispatch, num_worst_tokens, combine with bias (fp32 sum
        # moved in column slices where the NVLink buffer is sized for narrower rows).
        layout_only = {k: v for k, v in args.items() if k not in ("topk_idx", "topk_weights")}
        _poison(device)
        lo_fast, lo_ref = fast.dispatch(x_in, **layout_only), ref.dispatch(x_in, **layout_only)
        _same(lo_fast[0][0] if use_fp8 else lo_fast[0], lo_ref[0][0] if use_fp8 else lo_ref[0], f"{tag}: layout-only recv_x")
        assert lo_fast[1] is None and lo_fast[2] is None and lo_fast[3] == lo_ref[3], f"{tag}: layout-only extras"
        worst = sum(case.tokens)
        _poison(device)
        w_fast, w_ref = fast.dispatch(x_in, num_worst_tokens=worst, **args), ref.dispatch(x_in, num_worst_tokens=worst, **args)
        # num_worst_tokens: `worst` rows; only the real ones carry x (the cuda backend leaves the
        # padding rows of x as they are, DeepEP's semantics), top-k -1 / weight 0 / source -1 past them.
        real = out_ref[4].num_recv_tokens
        pairs = ([(w_fast[0][0], w_ref[0][0], "recv_x (e4m3)"), (w_fast[0][1], w_ref[0][1], "scales")] if use_fp8
                 else [(w_fast[0], w_ref[0], "recv_x")])
        for got, want, what in pairs:
            assert got.size(0) == want.size(0) == worst, f"{tag}: worst-case {what} has {got.size(0)} rows"
            _same(got[:real], want[:real], f"{tag}: worst-case {what}")
        _same(w_fast[1], w_ref[1], f"{tag}: worst-case recv_topk_idx")
        _same(w_fast[2], w_ref[2], f"{tag}: worst-case recv_topk_weights")
        _same(w_fast[4][3], w_ref[4][3], f"{tag}: worst-case recv_src_idx (handle[3])")
        assert w_fast[3] == w_ref[3] == []
        _poison(device)
        y_worst = torch.cat([y, y.new_zeros(worst - real, y.size(1))])
        _same(fast.combine(y_worst, w_fast[4])[0], comb_ref[0], f"{tag}: combine of a worst-case dispatch")
        g = torch.Generator(device=device).manual_seed(1000 + index * 8 + rank)
        bias = (torch.randn(x.shape, generator=g, device=device).to(y.dtype), torch.randn(x.shape, generator=g, device=device).to(y.dtype))
        _poison(device)
        _same(fast.combine(y, handle_fast, bias=bias)[0], ref.combine(y, handle_ref, bias=bias)[0], f"{tag}: combined_x with bias")
        checked += 1
    torch.cuda.synchronize()
    fast.runtime.synchronize()  # raises an error a kernel recorded
    fast.destroy()
    return checked


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_cuda_matches_reference(world_size: int) -> None:
    backend, ranks_per_gpu = _launch(world_size)
    results = run_ranks(_compare_cases, world_size, ranks_per_gpu, backend=backend, timeout_s=300)
    assert all(r == len(_cases(world_size)) for r in results)


@pytest.mark.parametrize("world_size", [2, 8])
def test_cuda_matches_reference_direct_combine(world_size: int) -> None:
    """The same cases with the direct combine as well (the default with an arena): every rank
    pushes its rows into the home rank's combine block, which reduces them from its own memory."""
    backend, ranks_per_gpu = _launch(world_size)
    env = dict(DIRECT_WRITE_ENV, DEEPEP_MEGATRON_DIRECT_COMBINE="1")
    results = run_ranks(_compare_cases, world_size, ranks_per_gpu, backend=backend, timeout_s=300, env=env)
    assert all(r == len(_cases(world_size)) for r in results)


@pytest.mark.parametrize("world_size", [2, 8])
def test_cuda_matches_reference_direct_write(world_size: int) -> None:
    """The same cases with a receive arena: the senders write x rows straight into the peers'
    receive blocks (cached dispatch, num_worst_tokens, the speculative dispatch when it fits)."""
    backend, ranks_per_gpu = _launch(world_size)
    env = dict(DIRECT_WRITE_ENV, DEEPEP_MEGATRON_DIRECT_COMBINE="0")  # the ring combine beside the direct dispatch
    results = run_ranks(_compare_cases, world_size, ranks_per_gpu, backend=backend, timeout_s=300, env=env)
    assert all(r == len(_cases(world_size)) for r in results)


#: notify run by the dispatch kernel's last block instead of its own launch (opt-in until verified)
FUSED_NOTIFY_ENV = {"DEEPEP_MEGATRON_FUSED_NOTIFY": "1"}


@pytest.mark.parametrize("arena", [False, True], ids=["rings", "direct-write"])
@pytest.mark.parametrize("world_size", [2, 8])
def test_cuda_matches_reference_fused_notify(world_size: int, arena: bool) -> None:
    """The same cases with DEEPEP_MEGATRON_FUSED_NOTIFY=1: every full dispatch (host-waited,
    speculative or exact, and num_worst_tokens) is one kernel whose last block runs notify."""
    backend, ranks_per_gpu = _launch(world_size)
    env = dict(FUSED_NOTIFY_ENV, **(DIRECT_WRITE_ENV if arena else {}))
    results = run_ranks(_compare_cases, world_size, ranks_per_gpu, backend=backend, timeout_s=300, env=env)
    assert all(r == len(_cases(world_size)) for r in results)


def _stall(rank: int, world_size: int) -> float:
    import torch.distributed as dist

    from deepep_megatron import Buffer, Config

    device = torch.device("cuda", torch.cuda.current_device())  # rank % GPUs, set by run_ranks
    config = Config(4, 6, 256)
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=config.get_nvl_buffer_size_hint(2048 * 2, world_size), backend="cuda")
    assert buffer.runtime.timeout_s == 2.0
    elapsed = -1.0
    if rank == 0:
        case = Case(world_size, tokens=(64,) * world_size, hidden=2048, num_topk=2, num_experts=8)
        x, topk_idx, topk_weights = make_inputs(case, rank, device=str(device))
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, case.num_experts)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="timed out") as info:
            buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                            topk_idx=topk_idx, topk_weights=topk_weights, config=config)
        elapsed = time.monotonic() - start
        assert "rank 1" in str(info.value), str(info.value)
        with pytest.raises(RuntimeError, match=r"reset\(\)"):
            buffer.get_dispatch_layout(topk_idx, case.num_experts)
    dist.barrier()  # rank 1 stays alive (its buffer mapped) until rank 0 has seen the timeout
    return elapsed


def test_stall_raises_timeout() -> None:
    _launch(2)  # skips as the other tests do; the stall needs no NCCL, so gloo either way
    results = run_ranks(_stall, 2, backend="gloo", timeout_s=120, env={"DEEPEP_MEGATRON_TIMEOUT_S": "2"})
    assert 2.0 <= results[0] < 8.0, f"the timeout error came after {results[0]:.1f} s (limit 2 s)"


def _bad_topk(rank: int, world_size: int) -> int:
    """The cuda dispatch checks topk_idx's range in its kernels (no host sync of its own): a bad id on
    one rank makes every rank raise ValueError, and the buffer keeps working afterwards."""
    import torch.distributed as dist

    from deepep_megatron import Buffer, Config

    device = torch.device("cuda", torch.cuda.current_device())  # rank % GPUs, set by run_ranks
    config = Config(4, 6, 256)
    case = Case(world_size, tokens=(97,) * world_size, hidden=2048, num_topk=4, num_experts=8 * world_size, seed=21)
    fast = Buffer(dist.group.WORLD, num_nvl_bytes=config.get_nvl_buffer_size_hint(2048 * 2, world_size), explicitly_destroy=True, backend="cuda")
    ref = Buffer(dist.group.WORLD, backend="reference")
    x, topk_idx, topk_weights = make_inputs(case, rank, device=str(device))
    per_rank, _, per_expert, in_rank, _ = ref.get_dispatch_layout(topk_idx, case.num_experts)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_weights=topk_weights, config=config)
    for bad_value in (case.num_experts, -2):
        bad = topk_idx.clone()
        if rank == 0:
            bad[50, 1] = bad_value
        expected = (r"topk_idx values must be in \[-1, num_experts=%d\).*got values in" % case.num_experts if rank == 0
                    else r"rank\(s\) \[0\] passed values outside it")
        with pytest.raises(ValueError, match=expected):
            fast.dispatch(x, topk_idx=bad, **args)
        # The cuda layout does no host range check: it counts only the valid ids (here: the reference
        # layout without the bad entry), and the dispatch built on it raises the same error.
        fast_layout = fast.get_dispatch_layout(bad, case.num_experts)
        valid = bad.masked_fill((bad < 0) | (bad >= case.num_experts), -1)
        want_layout = ref.get_dispatch_layout(valid, case.num_experts)
        for got, want, name in zip(fast_layout[:4], want_layout[:4], ("per_rank", "per_rdma_rank", "per_expert", "in_rank")):
            if want is not None:
                _same(got, want, f"layout {name} with bad id {bad_value}")
        bad_args = dict(args, num_tokens_per_rank=fast_layout[0], is_token_in_rank=fast_layout[3],
                        num_tokens_per_expert=fast_layout[2])
        with pytest.raises(ValueError, match=expected):
            fast.dispatch(x, topk_idx=bad, **bad_args)
    out_fast = fast.dispatch(x, topk_idx=topk_idx, **args)
    out_ref = ref.dispatch(x, topk_idx=topk_idx, **args)
    _same(out_fast[0], out_ref[0], "recv_x after refused dispatches")
    _same(out_fast[1], out_ref[1], "recv_topk_idx after refused dispatches")
    comb_fast = fast.combine(out_ref[0], out_fast[4], config=config)[0]
    comb_ref = ref.combine(out_ref[0], out_ref[4])[0]
    _same(comb_fast, comb_ref, "combine after refused dispatches")
    torch.cuda.synchronize()
    fast.runtime.synchronize()
    fast.destroy()
    return 1


def test_bad_topk_refused_on_every_rank() -> None:
    backend, _ = _launch(2)
    results = run_ranks(_bad_topk, 2, backend=backend, timeout_s=120)
    assert results == [1, 1]
