"""The benchmark reports' arithmetic on the CPU, from made-up timings: scripts/bench_vs_deepep.py's
bytes per GPU and roofline shares, scripts/bench_internode.py's ratios and stage table."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    yield _script("bench_vs_deepep")
    sys.modules.pop("bench_vs_deepep", None)


@pytest.fixture(scope="module")
def internode():
    yield _script("bench_internode")
    sys.modules.pop("bench_internode", None)


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


def test_internode_table_ratios_and_stages(internode) -> None:
    from deepep_megatron.traffic import LinkBytes

    labels = ["intranode", "2x2 nodes"]
    times = {(label, op): (100.0 * (i + 1), 200.0 * (i + 1), 50.0) for i, label in enumerate(labels) for op in internode.OPS}
    legs = LinkBytes(tokens=4, forwarded_rdma=4 * 1024, forwarded_nvlink=8 * 1024, direct_rdma=8 * 1024, direct_nvlink=2048)
    stages = {"dispatch bf16": [("agreement", 12.0, 30.0), ("NVLink leg: dispatch", 800.0, 900.0)]}
    table = internode._table({"times": times, "same_rows": True, "legs": legs, "stages": stages}, 4, 2)
    assert "| dispatch bf16 | 100 | 200 | 50 | 200 | 400 | 50 | 2.00 |" in table
    assert "| dispatch bf16 | NVLink leg: dispatch | 800 | 900 |" in table and "| agreement | 12 | 30 |" in table
    assert "| RDMA saving | 2.00x | |" in table
    assert "stage |" not in internode._table({"times": times, "same_rows": True, "legs": legs, "stages": {}}, 4, 2)
