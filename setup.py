"""Build script. Pure Python by default; the CUDA extension ``deepep_megatron._C`` (csrc/) is built
only when a CUDA build of torch and nvcc are both present, or when DEEPEP_MEGATRON_BUILD_CUDA=1.
DEEPEP_MEGATRON_BUILD_CUDA=0 forces a pure-Python install."""
import os
import shutil

from setuptools import setup


def cuda_extensions():
    wanted = os.environ.get("DEEPEP_MEGATRON_BUILD_CUDA")
    if wanted == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if wanted != "1" and (torch.version.cuda is None or shutil.which("nvcc") is None):
        return [], {}
    from csrc.build import extension_kwargs  # one place that lists sources and flags

    return [CUDAExtension(**extension_kwargs())], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
