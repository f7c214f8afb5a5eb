"""Run a function on N local ranks, each a fresh process in one process group.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, initializes a process group in
each (gloo by default; NCCL for one rank per GPU), calls ``fn(rank, world_size, *args)`` and returns
the per-rank results. An exception or a timeout in any rank fails the caller with that rank's
traceback, and every child is killed: a broken collective never hangs the caller. The tests
(tests/harness.py), the benchmarks and the profiling scripts all launch their ranks with it.

:func:`init_process_group` is ``torch.distributed.init_process_group`` made safe to tear down: every
process group this project starts (run_ranks' ranks, scripts/moe_layer_demo.py) goes through it.
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Optional

import torch.multiprocessing as mp

from . import host_staged

DEFAULT_TIMEOUT_S = 240.0
#: NVLink multicast (NVLS) off in NCCL, NVSHMEM and torch symmetric memory: the GPU machines we run
#: on must not use it. Every rank started by run_ranks gets it.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def local_backend(world_size: int) -> tuple[str, int]:
    """(process-group backend, ranks per GPU) for ``world_size`` ranks on this host's GPUs: NCCL with one
    rank per GPU when there are enough GPUs, else gloo with several ranks sharing each GPU (which
    the kernels only tolerate under CUDA MPS)."""
    import torch

    num_gpus = torch.cuda.device_count()
    if num_gpus >= world_size:
        return "nccl", 1
    return "gloo", -(-world_size // num_gpus)


#: Modules that evaluate ``torch.distributed.group.WORLD`` as a default argument when first imported.
#: Imported after ``init_process_group`` they keep the live default group in those defaults, so
#: ``destroy_process_group`` cannot free it: its gloo threads run on until interpreter exit, where
#: destroying them may abort the process ("terminate called without an active exception", SIGABRT;
#: 11 of 30 runs of a 2-rank gloo script here). ``torch.optim``'s optimizers import them (through
#: torch._dynamo), so any rank that builds an optimizer after init_process_group did.
WORLD_DEFAULT_MODULES = ("torch.distributed.nn.functional",)


def init_process_group(backend: str, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group(backend, **kwargs)``, after importing
    :data:`WORLD_DEFAULT_MODULES` while no group exists (their defaults then bind ``None``, which
    torch.distributed reads as the default group at call time), so ``destroy_process_group``
    really releases the group and its threads."""
    import importlib

    import torch.distributed as dist

    for name in WORLD_DEFAULT_MODULES:
        importlib.import_module(name)
    dist.init_process_group(backend, **kwargs)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The signal on which a run_ranks child prints its threads' stacks (faulthandler), and how long the
#: parent waits for them before it kills the child.
STACK_DUMP_SIGNAL = signal.SIGUSR1
STACK_DUMP_WAIT_S = 2.0


def _child(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    env: dict[str, str],
    fn: Callable[..., Any],
    args: tuple,
    results: "mp.Queue",
) -> None:
    os.environ.update(NO_MULTICAST_ENV)
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # A rank that has to be killed (a stall) first prints every thread's Python stack to stderr.
    faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # several ranks share two cores in CI
    if torch.cuda.is_available():  # before the process group: NCCL binds each rank to its device
        torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        if host_staged.BACKEND_NAME in backend:
            host_staged.register()
        init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
        value = fn(rank, world_size, *args)
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: Optional[dict[str, str]] = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; return results by rank.

    ``fn`` must be a module-level function (it is pickled into spawned processes). Each child gets
    :data:`NO_MULTICAST_ENV`, then ``env``, before its process group starts; LOCAL_RANK is the rank
    (one host), and where CUDA is available the current device is ``rank % device count``.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, backend, dict(env or {}), fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f} s; reports so far: {outcomes}")
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead:
                    raise RuntimeError(f"ranks {dead} exited with codes {[procs[r].exitcode for r in dead]} without a report")
                continue
            outcomes[rank] = (status, value)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
    finally:
        stalled = [p for r, p in enumerate(procs) if r not in outcomes and p.is_alive()]
        for p in stalled:  # where each unfinished rank stands, before it is killed
            os.kill(p.pid, STACK_DUMP_SIGNAL)
        if stalled:
            print(f"run_ranks: ranks {[procs.index(p) for p in stalled]} did not report; their Python stacks follow "
                  "(stderr)", file=sys.stderr, flush=True)
            time.sleep(STACK_DUMP_WAIT_S)
        for p in procs:
            p.join(timeout=5 if len(outcomes) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [outcomes[r][1] for r in range(world_size)]


#: Names the tree a benchmark ran on where git cannot (a device copy's git metadata may be older than
#: its files): ``DEEPEP_BENCH_COMMIT=$(git rev-parse --short HEAD)`` in the device command.
COMMIT_ENV = "DEEPEP_BENCH_COMMIT"


def tree_commit(path: str) -> str:
    """The commit a benchmark table names: ``$DEEPEP_BENCH_COMMIT`` if set, else ``git rev-parse
    --short HEAD`` of the checkout holding ``path`` (+ " + uncommitted" when tracked files changed)."""
    commit = os.environ.get(COMMIT_ENV, "")
    if commit:
        return commit
    git = dict(capture_output=True, text=True, cwd=path)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip() or "no commit"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git).stdout.strip()
    except OSError:
        return "unknown"
    return commit + (" + uncommitted" if dirty else "")


def sanitize_main(script: str, child: Callable[[int, int], None], world: int,
                  extra_env: Optional[dict[str, str]] = None, timeout_s: float = 900) -> int:
    """The command line of a sanitizer script (scripts/sanitize_*.py): ``--tools T1,T2`` (default
    memcheck,racecheck) runs ``script`` once per rank under each tool (:func:`sanitize_ranks`);
    ``--child-rank R``, which is how those processes are started, takes this process to GPU
    ``R % device_count``, joins the gloo group over MASTER_ADDR/PORT, runs ``child(R, world)`` (which
    asserts its results against the reference backend), leaves the group and says so. Returns the
    exit status."""
    import argparse

    import torch
    import torch.distributed as dist

    parser = argparse.ArgumentParser(description=f"compute-sanitizer over {os.path.basename(script)}'s case")
    parser.add_argument("--tools", default="memcheck,racecheck")
    parser.add_argument("--child-rank", type=int, default=None, help="(internal) run one rank's case")
    args = parser.parse_args()
    if args.child_rank is None:
        return sanitize_ranks(script, world, args.tools.split(","), extra_env, timeout_s=timeout_s)
    torch.cuda.set_device(args.child_rank % torch.cuda.device_count())
    dist.init_process_group("gloo", rank=args.child_rank, world_size=world)
    child(args.child_rank, world)
    dist.destroy_process_group()
    print(f"rank {args.child_rank}: results match the reference", flush=True)
    return 0


def sanitize_ranks(script: str, world: int, tools: list[str], extra_env: Optional[dict[str, str]] = None,
                   timeout_s: float = 900) -> int:
    """Run ``script --child-rank R`` for every rank under ``compute-sanitizer --tool T`` for each tool
    (ranks talk over MASTER_ADDR/PORT on this host), print each rank's output and one summary line
    per tool; return 0 when every tool reports no error on every rank, else 1."""
    summary = []
    for tool in tools:
        env = dict(os.environ, **NO_MULTICAST_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   PYTHONUNBUFFERED="1", **(extra_env or {}))
        extra = ["--racecheck-report", "all"] if tool == "racecheck" else []
        start = time.monotonic()
        procs = [subprocess.Popen(["compute-sanitizer", "--tool", tool, "--error-exitcode", "99", *extra, sys.executable,
                                   os.path.abspath(script), "--child-rank", str(rank)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(world)]
        try:
            outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
        except subprocess.TimeoutExpired:  # a hung rank must not outlive the script
            for p in procs:
                p.kill()
            raise
        for rank, (p, text) in enumerate(zip(procs, outputs)):
            print(f"===== {tool} rank {rank} (exit {p.returncode}) =====\n{text}", flush=True)
        ok = all(p.returncode == 0 for p in procs) and all(
            "ERROR SUMMARY: 0 errors" in t or "RACECHECK SUMMARY: 0 hazards" in t for t in outputs)
        summary.append(f"{tool}: {'clean' if ok else 'FAILED'} (exit codes {[p.returncode for p in procs]}, "
                       f"{time.monotonic() - start:.0f} s)")
    print("\n".join(summary), flush=True)
    return 0 if all("clean" in line for line in summary) else 1
