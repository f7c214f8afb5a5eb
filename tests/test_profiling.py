"""Profiling on CPU: the pretraining entry's --profile trace holds the deepep/* and moe/* ranges,
scripts/trace_summary.py turns traces into the per-range table, and scripts/profile_nsys.sh asks
nsys for the right capture (checked with a recording stand-in: nsys is on no machine here).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import run_ranks

REPO = Path(__file__).resolve().parents[1]
SUMMARY = REPO / "scripts" / "trace_summary.py"


def _summary(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUMMARY), *args], capture_output=True, text=True, timeout=60)


def _table_rows(stdout: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in stdout.splitlines() if line.startswith(("deepep/", "moe/"))}


def test_summary_counts_nested_same_name_once(tmp_path):
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "ProfilerStep#1", "pid": 1, "tid": 1, "ts": 0, "dur": 1000},
        {"ph": "X", "cat": "user_annotation", "name": "deepep/dispatch", "pid": 1, "tid": 1, "ts": 100, "dur": 300},
        {"ph": "X", "cat": "user_annotation", "name": "deepep/dispatch", "pid": 1, "tid": 1, "ts": 150, "dur": 100},
        {"ph": "X", "cat": "user_annotation", "name": "deepep/notify", "pid": 1, "tid": 1, "ts": 110, "dur": 50},
        {"ph": "X", "cat": "user_annotation", "name": "other/range", "pid": 1, "tid": 1, "ts": 500, "dur": 50},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "deepep/dispatch", "pid": 0, "tid": 7, "ts": 120, "dur": 40},
    ]
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": events}))
    out = _summary(str(tmp_path / "t.json"), "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["profiled_ms"] == pytest.approx(1.0)
    assert r["ranges"]["deepep/dispatch"] == {"count": 1, "total_ms": 0.3, "mean_ms": 0.3, "share": 0.3}
    assert set(r["ranges"]) == {"deepep/dispatch", "deepep/notify"}
    # Two files (ranks) add up; the table has one row per range, longest total first.
    (tmp_path / "u.json").write_text(json.dumps({"traceEvents": events}))
    table = _summary(str(tmp_path))
    assert table.returncode == 0, table.stderr
    rows = _table_rows(table.stdout)
    assert rows["deepep/dispatch"] == ["deepep/dispatch", "2", "0.600", "0.3000", "30.0%"], table.stdout
    assert list(rows) == ["deepep/dispatch", "deepep/notify"] and "profiled time: 2.000 ms" in table.stdout
    gpu = json.loads(_summary(str(tmp_path / "t.json"), "--json", "--kind", "gpu").stdout)
    assert gpu["ranges"]["deepep/dispatch"]["total_ms"] == pytest.approx(0.04)


def test_summary_errors_are_clear(tmp_path):
    missing = _summary(str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    (tmp_path / "empty.json").write_text(json.dumps({"traceEvents": []}))
    empty = _summary(str(tmp_path / "empty.json"))
    assert empty.returncode == 1 and "no cpu ranges" in empty.stderr


def test_profile_nsys_without_nsys_says_how_to_profile_instead(tmp_path):
    env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")  # no nsys there
    out = subprocess.run([str(REPO / "scripts" / "profile_nsys.sh"), "--", "true"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 127 and "nsys" in out.stderr and "trace_summary.py" in out.stderr


def test_profile_nsys_command_line(tmp_path):
    """With a recording stand-in for nsys (the real one is on no machine here), check what the
    script asks nsys to do: capture the cudaProfilerApi window, keep training, then nvtx_sum."""
    log = tmp_path / "nsys_calls.txt"
    fake = tmp_path / "nsys"
    fake.write_text(f'#!/bin/bash\necho "$*" >> {log}\n'
                    'if [[ $1 == profile ]]; then shift; while [[ $1 == -* ]]; do '
                    '[[ $1 == -o || $1 == -t ]] && shift; shift; done; exec "$@"; fi\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", RANK="0")
    out = subprocess.run([str(REPO / "scripts" / "profile_nsys.sh"), "--out", str(tmp_path / "p"),
                          "--steps", "3:4", "--", "echo", "train"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "train --profile --profile-step-start 3 --profile-step-end 4" in out.stdout
    calls = log.read_text().splitlines()
    assert "--capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx,osrt" in calls[0]
    assert f"-o {tmp_path / 'p' / 'profile_rank0'}" in calls[0]
    assert calls[1].startswith("stats --report nvtx_sum --format csv")
    # A rank outside --ranks runs the command without nsys.
    env["RANK"] = "1"
    out = subprocess.run([str(REPO / "scripts" / "profile_nsys.sh"), "--", "echo", "plain"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.stdout.startswith("plain --profile") and len(log.read_text().splitlines()) == 3


TINY = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --num-experts 4 "
        "--moe-router-topk 2 --expert-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 8 "
        "--moe-token-dispatcher deepep --mock-data --train-iters 4 "
        "--profile --profile-step-start 1 --profile-step-end 3").split()


def _pretrain(rank: int, world_size: int, profile_dir: str) -> None:
    from deepep_megatron.megatron.pretrain import main

    main(TINY + ["--profile-dir", profile_dir])


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed")
def test_pretrain_profile_trace_has_dispatch_and_combine(tmp_path):
    """--profile on CPU: a Chrome trace per rank with the dispatcher's ranges from real MoE layers."""
    run_ranks(_pretrain, 2, str(tmp_path), timeout_s=180)
    traces = sorted(tmp_path.glob("trace_rank*.json"))
    assert [t.name for t in traces] == ["trace_rank0.json", "trace_rank1.json"]
    for t in traces:
        names = {e.get("name") for e in json.loads(t.read_text())["traceEvents"]}
        assert {"deepep/dispatch", "deepep/combine", "moe/experts", "moe/permute"} <= names, t

    out = _summary(str(tmp_path))
    assert out.returncode == 0, out.stderr
    rows = _table_rows(out.stdout)
    # 2 profiled steps x 2 MoE layers x 2 ranks = 8 forward dispatches, plus the backward's (the
    # backward of dispatch is a combine and vice versa), so at least 8 of each.
    assert int(rows["deepep/dispatch"][1]) >= 8 and int(rows["deepep/combine"][1]) >= 8, out.stdout
    assert {"moe/experts", "moe/permute"} <= set(rows), out.stdout
    print(out.stdout)


def test_stage_clock_records_only_when_enabled():
    import torch

    from deepep_megatron.profiling import StageClock

    cpu = torch.device("cpu")
    clock = StageClock(("dispatch", "combine"))
    with clock.measure("dispatch", cpu):  # off by default: nothing kept for a reader that never comes
        time.sleep(0.002)
    assert clock.pop_ms() == {"dispatch": 0.0, "combine": 0.0}
    clock.enabled = True
    with clock.measure("dispatch", cpu):
        time.sleep(0.002)
    times = clock.pop_ms()
    assert times["dispatch"] >= 2.0 and times["combine"] == 0.0, times
    assert clock.pop_ms()["dispatch"] == 0.0  # a read resets it
    timed_sleep = clock.wrap("combine", time.sleep, cpu)
    timed_sleep(0.002)
    timed_sleep(0.002)
    times = clock.pop_ms()
    assert times["combine"] >= 4.0 and times["dispatch"] == 0.0, times


STATS_ARGV = ["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--seq-length", "32", "--vocab-size", "256", "--micro-batch-size", "2", "--num-experts", "4",
              "--moe-router-topk", "2", "--expert-model-parallel-size", "2", "--moe-token-dispatcher", "deepep",
              "--train-iters", "2"]
#: Added to every forward dispatch (two MoE layers per step): far above what a tiny dispatch or combine
#: costs, also on a slow, loaded CI machine (0.1 s was not: a combine stage took 0.3 s there).
DISPATCH_DELAY_S = 0.5


def _step_statistics(rank: int, world_size: int) -> list[dict]:
    """Train 2 steps; per step, the trainer's statistics and what the test saw itself: each router's
    routing map (the expert load's own oracle) and a known delay added to every forward dispatch."""
    import torch
    import torch.distributed as dist
    from megatron.core.transformer.moe.router import TopKRouter

    from deepep_megatron.megatron import dispatcher as dispatcher_module
    from deepep_megatron.megatron.arguments import parse_args
    from deepep_megatron.megatron.pretrain import Trainer, shutdown

    real_dispatch = dispatcher_module.deepep_autograd.dispatch
    calls = []

    def slow_dispatch(*args, **kwargs):
        time.sleep(DISPATCH_DELAY_S)
        calls.append(1)
        return real_dispatch(*args, **kwargs)

    # this rank's process only: the dispatcher looks the function up on the module at each call
    dispatcher_module.deepep_autograd.dispatch = slow_dispatch
    trainer = Trainer.create(parse_args(STATS_ARGV))
    try:
        routers = [m for m in trainer.model[0].modules() if isinstance(m, TopKRouter)]
        seen = [torch.zeros(4, dtype=torch.float64) for _ in routers]

        def count(router_index: int):
            def hook(_module, _inputs, output) -> None:
                seen[router_index] += output[1].sum(dim=0).double()  # routing map [tokens, experts]
            return hook

        for i, router in enumerate(routers):
            router.register_forward_hook(count(i))
        steps = []
        while trainer.iteration < 2:
            for s in seen:
                s.zero_()
            calls.clear()
            result = trainer.step()
            load = torch.stack(seen)
            dist.all_reduce(load)  # TP 1, CP 1: every rank routes different tokens
            expected = float((load.max(dim=1).values / load.mean(dim=1).clamp(min=1)).mean())
            leftover = [int(d.pop_expert_load().sum()) for d in trainer.dispatchers]
            steps.append(dict(load_imbalance=result.load_imbalance, expected_imbalance=expected, routers=len(routers),
                              dispatch_ms=result.dispatch_ms, combine_ms=result.combine_ms, seconds=result.seconds,
                              delayed_calls=len(calls), leftover=leftover))
        return steps
    finally:
        shutdown()


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed")
def test_expert_load_and_stage_times_of_a_step():
    for rank_steps in run_ranks(_step_statistics, 2, timeout_s=180):
        for step in rank_steps:
            assert step["routers"] == 2 and step["delayed_calls"] == 2, step
            # the same counts and float64 arithmetic as the oracle's: equal up to the last bits
            assert step["load_imbalance"] == pytest.approx(step["expected_imbalance"], rel=1e-12), step
            assert step["leftover"] == [0, 0], step  # the step read (and reset) every layer's count
            # the delay is inside the dispatch stage, not the combine stage, and within the step
            delay_ms = 1e3 * DISPATCH_DELAY_S * step["delayed_calls"]
            assert delay_ms <= step["dispatch_ms"] <= 1e3 * step["seconds"], step
            assert 0 < step["combine_ms"] < delay_ms, step


def _start_together(rank: int, world_size: int) -> list:
    import time as _time

    from deepep_megatron.profiling import start_together

    out = []
    for _ in range(3):
        deadline = start_together()
        out.append((deadline, _time.monotonic_ns()))
    return out


def test_start_together_releases_every_rank_at_one_deadline():
    """Ranks on one host get the same deadline each round (a fresh one, later than the last) and
    none returns before it: what makes one-call timings free of the barrier's release spread."""
    results = run_ranks(_start_together, 2)
    for round_ in range(3):
        deadlines = {rank_rounds[round_][0] for rank_rounds in results}
        assert len(deadlines) == 1 and None not in deadlines, deadlines
        for rank_rounds in results:
            deadline, returned = rank_rounds[round_]
            assert returned >= deadline
    firsts = [results[0][i][0] for i in range(3)]
    assert firsts == sorted(firsts) and len(set(firsts)) == 3


def test_python_path_profile_runs_the_real_buffer_code():
    """scripts/profile_python_path.py drives Buffer and CudaBackend over a stand-in _C.Runtime: each
    op gets a row (a figure, not a timing claim) and the cProfile names the Buffer's dispatch."""
    script = REPO / "scripts" / "profile_python_path.py"
    done = subprocess.run([sys.executable, str(script), "--calls", "50", "--top", "5"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for op in ("get_dispatch_layout", "dispatch (full)", "dispatch num_worst_tokens", "cached dispatch", "combine"):
        row = next(line for line in done.stdout.splitlines() if line.startswith(f"| {op} |"))
        assert float(row.split("|")[2]) > 0, row
    assert "buffer.py" in done.stdout and "(dispatch)" in done.stdout, done.stdout
