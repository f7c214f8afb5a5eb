"""The receive arena's bookkeeping (csrc/runtime/receive_arena.cpp) on the CPU: a small C++ check
program is built against the CUDA runtime (no GPU needed) and run. Skipped where no C++ compiler or
CUDA runtime library is installed."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")


def test_receive_arena_bookkeeping(tmp_path) -> None:
    compiler = shutil.which("g++")
    cudart = os.path.join(CUDA_HOME, "lib64")
    if compiler is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        pytest.skip("needs g++ and the CUDA runtime headers")
    if not os.path.isdir(cudart) or not any(name.startswith("libcudart.so") for name in os.listdir(cudart)):
        pytest.skip(f"no libcudart under {cudart}")
    binary = tmp_path / "receive_arena_check"
    subprocess.run(
        [compiler, "-std=c++17", "-O1", f"-I{ROOT}/csrc/runtime", f"-I{ROOT}/deepep_megatron/include",
         f"-I{CUDA_HOME}/include", os.path.join(ROOT, "tests", "native", "receive_arena_check.cpp"),
         os.path.join(ROOT, "csrc", "runtime", "receive_arena.cpp"), f"-L{cudart}", "-lcudart",
         f"-Wl,-rpath,{cudart}", "-o", str(binary)],
        check=True, capture_output=True, text=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "all passed" in result.stdout, result.stdout + result.stderr
    with open(os.path.join(ROOT, "tests", "native", "receive_arena_check.cpp")) as f:
        checks = sum(line.lstrip().startswith("check(") for line in f)
    assert checks >= 11 and result.stdout.count("ok:") == checks, result.stdout  # every check ran and passed
