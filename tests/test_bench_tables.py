"""The benchmark report's arithmetic (scripts/bench_vs_deepep.py) on the CPU: bytes per GPU and the
roofline shares, from made-up timings."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_deepep", os.path.join(ROOT, "scripts", "bench_vs_deepep.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_bytes_per_gpu(bench) -> None:
    rows = [(4096, 8000), (4096, 8192)]  # two ranks sharing one GPU
    bf16 = bench.HIDDEN * 2
    assert bench.bytes_per_gpu(rows, "cached dispatch", 2) == (4096 + 8000 + 4096 + 8192) * bf16
    assert bench.bytes_per_gpu(rows, "cached dispatch", 1) == (4096 + 8000 + 4096 + 8192) * bf16 / 2  # a GPU each
    fp8 = bench.HIDDEN + bench.HIDDEN // 128 * 4
    assert bench.bytes_per_gpu(rows, "dispatch fp8", 2) == (4096 + 8000 + 4096 + 8192) * fp8


def test_table_shares(bench) -> None:
    rows = [(4096, 8192), (4096, 8192)]
    seconds = 100e-6
    rate = bench.bytes_per_gpu(rows, "combine bf16", 2) / seconds / 1e9  # GB/s the ranks' bytes take
    figures = {f"{name}|24": {"one_call_us": 300.0, "host_us": 50.0, "b2b_us": seconds * 1e6} for name in bench.OPS}
    results = {"deepep_megatron": {"figures": figures, "rows": rows}}
    table = bench.format_table(results, (24,), {"hbm_copy_GBps": rate * 2, "sm_copy_GBps": {24: rate * 4}, "ranks_per_gpu": 2})
    combine = next(line for line in table.splitlines() if line.startswith("| combine bf16 "))
    assert combine.rstrip(" |").endswith("| 50 | 25"), combine  # half the HBM roofline, a quarter of the copy kernel
    full = next(line for line in table.splitlines() if line.startswith("| full dispatch "))
    assert full.rstrip(" |").endswith("| - | -"), full  # not a roofline op
    assert "% of HBM" not in bench.format_table({"deep_ep": {"figures": figures}}, (24,), None)


def test_arena_misses_read_from_our_backend_only(bench) -> None:
    class Runtime:
        def __init__(self, misses: int) -> None:
            self.misses = misses

        def arena_stats(self) -> dict:
            return {"bytes": 1 << 20, "bytes_in_use": 0, "blocks": 0, "misses": self.misses}

    class Ours:
        runtime = Runtime(3)

    class DeepEP:  # deep_ep.Buffer has a `runtime` without arena_stats
        runtime = object()

    assert bench._arena_misses(Ours()) == 3
    assert bench._arena_misses(DeepEP()) == 0
