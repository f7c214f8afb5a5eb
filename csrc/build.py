"""Sources and flags of the CUDA extension ``deepep_megatron._C`` (the one place that lists them).

``setup.py`` calls :func:`extension_kwargs` and passes the result to
``torch.utils.cpp_extension.CUDAExtension``. The kernels target Hopper (sm_90) only.

Rooms (what each may include):
  deepep_megatron/include/deepep_megatron_layout.h   the buffer layout and limits (also parsed by Python)
  csrc/core/      PTX helpers, bounded waits, the barrier, the kernels' context (no torch)
  csrc/kernels/   one file per kernel family + launch.h, their interface (no torch)
  csrc/runtime/   IPC buffers (runtime.*), the NVSHMEM heap (nvshmem_heap.*) and the operations over
                  tensors (intranode_ops.*, low_latency_ops.*, rail_ops.*; torch)
  csrc/binding.cpp  the pybind11 module
"""
from __future__ import annotations

import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

#: Kernel, runtime and binding sources, relative to the repository root (where setup.py runs).
SOURCES = (
    "csrc/kernels/barrier.cu",
    "csrc/kernels/layout.cu",
    "csrc/kernels/intranode.cu",
    "csrc/runtime/runtime.cu",
    "csrc/runtime/receive_arena.cpp",
    "csrc/runtime/intranode_ops.cpp",
    "csrc/binding.cpp",
)

INCLUDE_DIRS = ("deepep_megatron/include", "csrc/core", "csrc/kernels", "csrc/runtime")

NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "-gencode=arch=compute_90,code=sm_90",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-Xptxas=-warn-spills",
)

CXX_FLAGS = ("-O3", "-std=c++17")

#: The NVSHMEM room of the runtime, the low-latency kernels (issue 14) and the internode rail exchange
#: (issue 15) on it: compiled with DEEPEP_MEGATRON_NVSHMEM=1 when the ``nvidia-nvshmem-cu13`` wheel is
#: installed. Opt-in until it has run on a GPU (issues 14/15): the default build stays the tested one.
NVSHMEM_SOURCES = ("csrc/runtime/nvshmem_heap.cu", "csrc/kernels/low_latency.cu", "csrc/runtime/low_latency_ops.cpp",
                   "csrc/kernels/rail.cu", "csrc/runtime/rail_ops.cpp")
NVSHMEM_ENV = "DEEPEP_MEGATRON_NVSHMEM"
#: NVSHMEM's device headers use the half/bf16 operators that torch's extension build switches off
#: (its COMMON_NVCC_FLAGS define __CUDA_NO_HALF_OPERATORS__ etc.; ours come after them on the line).
NVSHMEM_NVCC_FLAGS = ("-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__")


def nvshmem_root() -> str | None:
    """The installed NVSHMEM wheel's folder (``include/``, ``lib/``), or None when absent or not asked for."""
    if os.environ.get(NVSHMEM_ENV) != "1":
        return None
    spec = importlib.util.find_spec("nvidia.nvshmem") if importlib.util.find_spec("nvidia") else None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    return root if os.path.exists(os.path.join(root, "lib", "libnvshmem_device.a")) else None


def extension_kwargs() -> dict:
    """Keyword arguments for ``CUDAExtension`` building ``deepep_megatron._C`` for sm_90."""
    for source in SOURCES:
        if not os.path.exists(os.path.join(_ROOT, source)):
            raise FileNotFoundError(f"CUDA extension source {source} is missing under {_ROOT}")
    kwargs = {
        "name": "deepep_megatron._C",
        "sources": list(SOURCES),
        "include_dirs": [os.path.join(_ROOT, d) for d in INCLUDE_DIRS],
        "extra_compile_args": {"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
    }
    root = nvshmem_root()
    if root is not None:
        # NVSHMEM's device API lives in a static library: relocatable device code, a device link step
        # against libnvshmem_device.a, and the host library (shipped only as libnvshmem_host.so.3).
        lib = os.path.join(root, "lib")
        define = "-DDEEPEP_MEGATRON_WITH_NVSHMEM"
        kwargs["sources"] += list(NVSHMEM_SOURCES)
        kwargs["include_dirs"].append(os.path.join(root, "include"))
        # The device link runs without CUDAExtension's dlink=True: that adds -dlto, and nvlink cannot
        # load libnvshmem_device.a for LTO ("elfLink linker library load error"); torch's ninja build
        # adds the device-link step whenever 'nvcc_dlink' is given.
        kwargs["extra_compile_args"] = {"cxx": [*CXX_FLAGS, define],
                                        "nvcc": [*NVCC_FLAGS, *NVSHMEM_NVCC_FLAGS, "-rdc=true", define],
                                        "nvcc_dlink": ["-dlink", os.path.join(lib, "libnvshmem_device.a"),
                                                       "-gencode=arch=compute_90,code=sm_90"]}
        kwargs["library_dirs"] = [lib]
        # libnvshmem_device.a also holds host code (nvshmemi_init_thread, behind nvshmemx_init_attr): link it too.
        kwargs["extra_link_args"] = ["-l:libnvshmem_host.so.3", "-l:libnvshmem_device.a", f"-Wl,-rpath,{lib}"]
    return kwargs
