"""The NVSHMEM low-latency kernels (backends/low_latency.py, csrc/kernels/low_latency.cu) against the
reference backend, on a GPU: several ranks on one GPU under MPS (or one per GPU).

Checks, on random routing with -1 experts, empty tokens and a rank that receives nothing:
dispatch bf16 and FP8 (plain, round_scale, UE8M0-packed scales): counts, recv_layout_range and
recv_src_info equal to the reference, rows equal (FP8: scales equal, e4m3 codes within one step of the
reference's); combine within bf16 rounding of the reference (out=, zero_copy); the receive hook with
GPU work launched between send and hook; CUDA graph capture + replay with new data; the statistics
(cumulative_local_expert_recv_stats, wait-cost stats); a timeout diagnostic and clean_low_latency_buffer.
Skipped without a GPU, an NVSHMEM build, or (ranks sharing a GPU) MPS.
"""
from __future__ import annotations

import pytest
import torch

from harness import GPU_MARKS, nvshmem_launch, run_ranks
from oracle import Case, beyond_bf16_rounding, beyond_one_e4m3_step, low_latency_expert, make_inputs

pytestmark = GPU_MARKS


def _cases(w: int) -> list[tuple[int, Case]]:
    """(max_tokens, case) pairs."""
    return [
        (128, Case(w, tokens=(128,) * w, hidden=7168, num_topk=8, num_experts=8 * w * (4 if w <= 2 else 1), seed=21)),
        # 37..55 tokens (at most max_tokens=64 on every rank, whatever w)
        (64, Case(w, tokens=tuple(37 + 9 * (r % 3) for r in range(w)), hidden=2048, num_topk=6, num_experts=4 * w,
                  seed=22, starved_rank=w - 1, drop=0.3, empty_tokens=0.2)),
        (16, Case(w, tokens=(0,) + (16,) * (w - 1), hidden=512, num_topk=3, num_experts=2 * w, seed=23)),
    ]


def _poison(device: torch.device, nbytes: int = 1 << 27) -> None:
    junk = torch.empty(nbytes, dtype=torch.uint8, device=device)
    junk.fill_(0xFF)
    del junk


def _valid_rows(count: torch.Tensor, slots: int) -> torch.Tensor:
    """[E_l, slots] bool: the first count[e] rows of expert e."""
    return torch.arange(slots, device=count.device).unsqueeze(0) < count.unsqueeze(1)


def _check_dispatch(tag, got, want, use_fp8: bool, use_ue8m0: bool, stats) -> None:
    (g_x, g_count, g_handle), (w_x, w_count, w_handle) = got, want
    assert torch.equal(g_count.cpu(), w_count.cpu()), f"{tag}: recv_count {g_count.tolist()} vs {w_count.tolist()}"
    for i, name in ((0, "recv_src_info"), (1, "recv_layout_range")):
        assert torch.equal(g_handle[i].cpu(), w_handle[i].cpu()), f"{tag}: {name} differs"
    slots = g_handle[0].size(1)
    valid = _valid_rows(w_count, slots).cpu()
    if not use_fp8:
        assert torch.equal(g_x.cpu()[valid], w_x.cpu()[valid]), f"{tag}: bf16 rows differ"
        return stats
    (g_data, g_scales), (w_data, w_scales) = g_x, w_x
    assert g_scales.shape == w_scales.shape and g_scales.stride() == w_scales.stride(), f"{tag}: scale layout"
    assert torch.equal(g_scales.cpu()[valid], w_scales.cpu()[valid]), f"{tag}: scales differ"
    a, b = g_data.view(torch.uint8).cpu()[valid], w_data.view(torch.uint8).cpu()[valid]
    differ = int((a != b).sum())
    # within one e4m3 step (same sign, adjacent code) of the reference: its quantization bound
    assert not bool(beyond_one_e4m3_step(a, b).any()), f"{tag}: e4m3 codes further than one step from the reference"
    stats["fp8_bytes_differing"] += differ
    stats["fp8_bytes"] += a.numel()
    return stats


def _dequantize(recv_x, use_fp8: bool, use_ue8m0: bool, hidden: int) -> torch.Tensor:
    from deepep_megatron.fp8 import unpack_ue8m0

    if not use_fp8:
        return recv_x
    data, scales = recv_x
    if use_ue8m0:
        scales = unpack_ue8m0(scales.contiguous(), hidden // 128)
    blocks = data.float().view(*data.shape[:-1], hidden // 128, 128) * scales.float().unsqueeze(-1)
    return blocks.view(data.shape).to(torch.bfloat16)


def _experts(x: torch.Tensor) -> torch.Tensor:
    """[E_l, S, H] bf16 -> low_latency_expert of each local expert."""
    factor = torch.arange(x.size(0), device=x.device, dtype=torch.float32).view(-1, 1, 1) + 1
    return (x.float() * factor).to(torch.bfloat16)


def _close_bf16(tag: str, got: torch.Tensor, want: torch.Tensor, stats: dict) -> None:
    got, want = got.float().cpu(), want.float().cpu()
    assert not torch.isnan(got).any(), f"{tag}: NaN in the output"
    bad = beyond_bf16_rounding(got, want)
    assert not bool(bad.any()), f"{tag}: {int(bad.sum())} values beyond bf16 rounding (max {float((got - want).abs().max()):g})"
    stats["combine_values_differing"] += int((got != want).sum())
    stats["combine_values"] += got.numel()


def _compare(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    device = torch.device("cuda", torch.cuda.current_device())
    group = dist.group.WORLD
    cases = _cases(world_size)
    hint = max(Buffer.get_low_latency_rdma_size_hint(m, c.hidden, world_size, c.num_experts) for m, c in cases)
    fast = Buffer(group, 0, hint, low_latency_mode=True, backend="cuda", explicitly_destroy=True, timeout_s=10)
    ref = Buffer(group, 0, hint, low_latency_mode=True, backend="reference")
    assert fast.backend_name == "cuda" and type(fast.runtime).__name__ == "LowLatencyBackend"
    stats = {"fp8_bytes_differing": 0, "fp8_bytes": 0, "combine_values_differing": 0, "combine_values": 0, "checks": 0}
    modes = [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    for index, (max_tokens, case) in enumerate(cases):
        x, topk_idx, topk_weights = (t.to(device) for t in make_inputs(case, rank))
        E = case.num_experts
        for use_fp8, round_scale, use_ue8m0 in modes if index == 0 else modes[index % 2 :: 2]:
            tag = f"case {index} ({case}, fp8={use_fp8}, round_scale={round_scale}, ue8m0={use_ue8m0})"
            kwargs = dict(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0)
            _poison(device)
            cum = torch.zeros(E // world_size, dtype=torch.int32, device=device)
            wait = torch.zeros(world_size, dtype=torch.int64, device=device)
            g_x, g_count, g_handle, _, hook = fast.low_latency_dispatch(
                x, topk_idx, max_tokens, E, cumulative_local_expert_recv_stats=cum, dispatch_wait_recv_cost_stats=wait,
                **kwargs)
            w_x, w_count, w_handle, _, _ = ref.low_latency_dispatch(x, topk_idx, max_tokens, E, **kwargs)
            _check_dispatch(tag, (g_x, g_count, g_handle), (w_x, w_count, w_handle), use_fp8, use_ue8m0, stats)
            assert torch.equal(cum, g_count), f"{tag}: cumulative_local_expert_recv_stats"
            assert bool((wait >= 0).all()), f"{tag}: wait stats {wait.tolist()}"

            # The receive hook, with GPU work launched between the send and the hook.
            _poison(device)
            h_x, h_count, h_handle, _, hook = fast.low_latency_dispatch(x, topk_idx, max_tokens, E,
                                                                        return_recv_hook=True, **kwargs)
            torch.cuda._sleep(2_000_000)  # ~1 ms of other work while the tokens are in flight
            hook()
            _check_dispatch(tag + " (hook)", (h_x, h_count, h_handle), (w_x, w_count, w_handle), use_fp8, use_ue8m0, stats)

            # Combine of the experts' outputs (computed from the reference's rows), three ways.
            y = _experts(_dequantize(w_x, use_fp8, use_ue8m0, case.hidden))
            want = ref.low_latency_combine(y, topk_idx, topk_weights, w_handle)[0]
            _poison(device)
            got = fast.low_latency_combine(y, topk_idx, topk_weights, g_handle)[0]
            _close_bf16(tag + " combine", got, want, stats)
            out = torch.full_like(want, float("nan"))
            got, _, chook = fast.low_latency_combine(y, topk_idx, topk_weights, h_handle, out=out, return_recv_hook=True)
            torch.cuda._sleep(1_000_000)
            chook()
            assert got.data_ptr() == out.data_ptr()
            _close_bf16(tag + " combine (hook, out=)", out, want, stats)
            staged = fast.get_next_low_latency_combine_buffer(g_handle)
            staged.copy_(y)
            cwait = torch.zeros(world_size, dtype=torch.int64, device=device)
            got = fast.low_latency_combine(y, topk_idx, topk_weights, g_handle, zero_copy=True,
                                           combine_wait_recv_cost_stats=cwait)[0]
            _close_bf16(tag + " combine (zero_copy)", got, want, stats)
            stats["checks"] += 1
    torch.cuda.synchronize()
    fast.destroy()
    return stats


def _matches_reference(world_size: int, env: dict | None = None) -> None:
    backend = nvshmem_launch(world_size)
    results = run_ranks(_compare, world_size, backend=backend, timeout_s=150, env=env)
    total = {k: sum(r[k] for r in results) for k in results[0]}
    print(f"EP{world_size}: {total}")
    assert total["checks"] > 0


@pytest.mark.parametrize("world_size", [2, 4])
def test_low_latency_matches_reference(world_size: int) -> None:
    _matches_reference(world_size)


def test_low_latency_over_virtual_nodes() -> None:
    """EP4 as 2 nodes of 2: a low-latency Buffer over several nodes runs the same NVSHMEM kernels."""
    _matches_reference(4, env={"DEEPEP_MEGATRON_RANKS_PER_NODE": "2"})


def _graph(rank: int, world_size: int) -> int:
    import torch.distributed as dist

    from deepep_megatron import Buffer

    device = torch.device("cuda", torch.cuda.current_device())
    group = dist.group.WORLD
    max_tokens, case = 32, Case(world_size, tokens=(32,) * world_size, hidden=1024, num_topk=4, num_experts=8 * world_size,
                                seed=31)
    hint = Buffer.get_low_latency_rdma_size_hint(max_tokens, case.hidden, world_size, case.num_experts)
    fast = Buffer(group, 0, hint, low_latency_mode=True, backend="cuda", explicitly_destroy=True, timeout_s=10)
    ref = Buffer(group, 0, hint, low_latency_mode=True, backend="reference")
    x, topk_idx, topk_weights = (t.to(device) for t in make_inputs(case, rank))
    static = [x.clone(), topk_idx.clone(), topk_weights.clone()]

    def step():
        (data, scales), _, handle, _, _ = fast.low_latency_dispatch(static[0], static[1], max_tokens, case.num_experts,
                                                                    use_fp8=True, round_scale=True)
        y = _experts(_dequantize((data, scales), True, False, case.hidden))
        return fast.low_latency_combine(y, static[1], static[2], handle)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up (an even number of low-latency calls: the halves stay in step)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    torch.cuda.synchronize()
    dist.barrier()
    replays = 0
    for seed in (41, 42, 43):
        new = Case(**{**case.__dict__, "seed": seed})
        for dst, src in zip(static, make_inputs(new, rank)):
            dst.copy_(src.to(device))
        torch.cuda.synchronize()
        dist.barrier()
        graph.replay()
        torch.cuda.synchronize()
        (data, scales), _, handle, _, _ = ref.low_latency_dispatch(static[0], static[1], max_tokens, case.num_experts,
                                                                   use_fp8=True, round_scale=True)
        y = _experts(_dequantize((data, scales), True, False, case.hidden))
        want = ref.low_latency_combine(y, static[1], static[2], handle)[0]
        _close_bf16(f"graph replay seed {seed}", result, want, {"combine_values_differing": 0, "combine_values": 0})
        replays += 1
    dist.barrier()
    fast.destroy()
    return replays


def test_low_latency_cuda_graph_replay() -> None:
    backend = nvshmem_launch(2)
    assert run_ranks(_graph, 2, backend=backend, timeout_s=120) == [3, 3]


def _small_case(world_size: int, timeout_s: float):
    """(a low-latency-only cuda Buffer for 8 tokens of hidden 256 over 4 experts, x [8, 256] bf16,
    topk_idx [8, 1]: token t to expert t % 4)."""
    import torch.distributed as dist

    from deepep_megatron import Buffer

    device = torch.device("cuda", torch.cuda.current_device())
    hint = Buffer.get_low_latency_rdma_size_hint(8, 256, world_size, 4)
    fast = Buffer(dist.group.WORLD, 0, hint, low_latency_mode=True, backend="cuda", explicitly_destroy=True,
                  timeout_s=timeout_s)
    x = torch.randn(8, 256, device=device).to(torch.bfloat16)
    topk_idx = torch.arange(8, device=device).remainder(4).view(8, 1).to(torch.int64)
    return fast, x, topk_idx


def _timeout(rank: int, world_size: int) -> str:
    import torch.distributed as dist

    fast, x, topk_idx = _small_case(world_size, timeout_s=1)
    message = ""
    if rank == 0:  # rank 1 never dispatches: rank 0's receive times out
        fast.low_latency_dispatch(x, topk_idx, 8, 4, use_fp8=False)
        torch.cuda.synchronize()
        with pytest.raises(RuntimeError, match="rank 1") as error:
            fast.low_latency_dispatch(x, topk_idx, 8, 4, use_fp8=False)
        message = str(error.value)
    dist.barrier()
    fast.clean_low_latency_buffer(8, 256, 4)
    recv_x, count, _, _, _ = fast.low_latency_dispatch(x, topk_idx, 8, 4, use_fp8=False)
    torch.cuda.synchronize()
    assert int(count.sum()) == 8, count.tolist()  # each rank receives the 4 pairs of each rank
    fast.destroy()
    return message


def _bad_ids(rank: int, world_size: int) -> str:
    fast, x, topk_idx = _small_case(world_size, timeout_s=10)
    bad = topk_idx.clone()
    bad[3, 0] = 4  # == num_experts: out of range, checked on the device (no host sync)
    fast.low_latency_dispatch(x, bad, 8, 4, use_fp8=False)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="topk_idx values must be in") as error:
        fast.low_latency_dispatch(x, topk_idx, 8, 4, use_fp8=False)
    fast.clean_low_latency_buffer(8, 256, 4)
    _, count, _, _, _ = fast.low_latency_dispatch(x, topk_idx, 8, 4, use_fp8=False)
    torch.cuda.synchronize()
    assert int(count.sum()) == 8, count.tolist()
    fast.destroy()
    return str(error.value)


def test_low_latency_bad_expert_ids_raise_at_the_next_call() -> None:
    backend = nvshmem_launch(2)
    messages = run_ranks(_bad_ids, 2, backend=backend, timeout_s=90)
    assert all("token 3" in m for m in messages), messages


def test_low_latency_timeout_reports_the_peer() -> None:
    backend = nvshmem_launch(2)
    messages = run_ranks(_timeout, 2, backend=backend, timeout_s=90)
    assert "low-latency dispatch" in messages[0], messages[0]


def test_low_latency_matches_reference_ep8() -> None:
    """Last in this file: eight PEs on one GPU is the heaviest case."""
    _matches_reference(8)


def _stage_rows(rank: int, world_size: int) -> dict:
    from deepep_megatron import _C

    fast, x, topk_idx = _small_case(world_size, timeout_s=10)
    recv_x, count, _, _, _ = fast.low_latency_dispatch(x, topk_idx, 8, 4, use_fp8=False)
    kernels = fast.runtime._low_latency
    # a plain list: a tensor sent to the parent is shared through a file descriptor that dies with this rank
    rows = list(kernels._ll.stage_times())
    received = int(count.sum())
    fast.destroy()
    return {"rows": rows, "blocks": kernels.num_blocks, "received": received, "names": list(_C.LL_STAGES)}


def test_low_latency_stage_timer() -> None:
    """DEEPEP_MEGATRON_LL_STAGE_TIMES=1: one row per block, each block ends after it starts, every phase
    time is non-negative and within the block's span, and the dispatch still moves every pair."""
    backend = nvshmem_launch(2)
    for result in run_ranks(_stage_rows, 2, backend=backend, timeout_s=90, env={"DEEPEP_MEGATRON_LL_STAGE_TIMES": "1"}):
        names = result["names"]
        rows = torch.tensor(result["rows"], dtype=torch.int64).view(-1, len(names))
        assert result["received"] == 8 and rows.size(0) == result["blocks"], (result["received"], rows.shape)
        start, end = rows[:, names.index("start")], rows[:, names.index("end")]
        phases = rows[:, [i for i, n in enumerate(names) if n not in ("start", "end")]]
        assert bool((end >= start).all()) and bool((start > 0).all())
        assert bool((phases >= 0).all()) and bool((phases.sum(dim=1) <= end - start).all()), rows
