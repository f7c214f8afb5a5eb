"""``window()`` (csrc/runtime/tensor_window.h), the typed views the cuda backend's outputs are made
of, built on the CPU against this torch and checked against ``narrow`` / ``view`` / ``as_strided``."""
from __future__ import annotations

import gc
import os
import shutil

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRAPPER = """
#include <torch/extension.h>
#include "tensor_window.h"
at::Tensor make_window(const at::Tensor& base, int64_t byte_offset, at::ScalarType dtype, std::vector<int64_t> sizes,
                       std::vector<int64_t> strides) {
  return deepep_megatron::window(base, byte_offset, dtype, sizes, strides);
}
"""


@pytest.fixture(scope="module")
def window():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("needs a C++ compiler")
    from torch.utils.cpp_extension import load_inline

    module = load_inline("deepep_megatron_tensor_window_check", cpp_sources=WRAPPER, functions=["make_window"],
                         extra_include_paths=[os.path.join(ROOT, "csrc", "runtime")], verbose=False)
    return lambda base, offset, dtype, sizes, strides=(): module.make_window(base, offset, dtype, list(sizes), list(strides))


def test_windows_equal_the_views_they_replace(window) -> None:
    bytes_ = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    got = window(bytes_, 64, torch.int32, (3, 5))
    assert torch.equal(got, bytes_[64 : 64 + 60].view(torch.int32).view(3, 5)) and got.is_contiguous()
    assert got.data_ptr() == bytes_.data_ptr() + 64 and not got._is_view() and got.grad_fn is None
    ints = torch.arange(40, dtype=torch.int32)
    strided = window(ints, 0, torch.int32, (4, 7), (8, 1))  # [R, C] of a [R, C + 1] matrix
    assert torch.equal(strided, ints.view(5, 8)[:4, :7])
    inner = window(window(ints, 16, torch.int32, (10,)), 8, torch.int32, (3,))  # a window of a window
    assert inner.tolist() == [6, 7, 8]
    assert window(torch.empty(0, dtype=torch.uint8), 0, torch.int64, (0, 8)).shape == (0, 8)


def test_a_window_keeps_its_storage_and_writes_through(window) -> None:
    base = torch.zeros(256, dtype=torch.uint8)
    floats = window(base, 128, torch.float32, (4, 4))
    floats.fill_(1.0)
    assert torch.equal(base[128:192].view(torch.float32), torch.ones(16)) and int(base[:128].sum()) == 0
    del base
    gc.collect()
    assert float(floats.sum()) == 16.0  # the storage lives as long as any window of it


def test_a_window_outside_its_allocation_is_refused(window) -> None:
    ints = torch.zeros(10, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="falls outside its allocation"):
        window(ints, 36, torch.int32, (2,))  # bytes 36..44 of 40
    with pytest.raises(RuntimeError, match="falls outside its allocation"):
        window(ints, 2, torch.int32, (1,))  # not aligned to the element
    with pytest.raises(RuntimeError, match="falls outside its allocation"):
        window(ints, 0, torch.int32, (3, 4), (4, 1))  # strided span of 12 elements
    with pytest.raises(RuntimeError, match="one stride per size"):
        window(ints, 0, torch.int32, (2, 2), (1,))
