// window(): typed views of an operation's few allocations, made without the dispatcher. Header-only
// (ATen, no CUDA), so that tests/test_tensor_window.py checks it on the CPU.
#pragma once

#include <ATen/ATen.h>

#include <stdexcept>

namespace deepep_megatron {

// A typed window of `base`'s storage: `sizes` elements of `dtype` from byte `byte_offset` of `base`'s
// first element, contiguous (or with `strides`). An operation's outputs share a few allocations;
// narrow() + view() made each of them through the dispatcher and autograd's view tracking at about 2
// us apiece on the device host (host_timing.h), 30-60 us per dispatch. A window is a plain tensor on
// the same storage (no autograd view record: each is an output of this non-differentiable call).
inline at::Tensor window(const at::Tensor& base, int64_t byte_offset, at::ScalarType dtype, c10::IntArrayRef sizes,
                         c10::IntArrayRef strides = {}) {
  if (!strides.empty() && strides.size() != sizes.size()) {
    throw std::logic_error("deepep_megatron._C: a tensor window needs one stride per size");
  }
  const int64_t item = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t begin = base.storage_offset() * base.element_size() + byte_offset;
  const int64_t numel = c10::multiply_integers(sizes);
  int64_t span = numel;  // elements from the first to one past the last
  if (!strides.empty() && numel > 0) {
    span = 1;
    for (size_t d = 0; d < sizes.size(); ++d) span += (sizes[d] - 1) * strides[d];
  }
  if (begin % item != 0 || begin + span * item > static_cast<int64_t>(base.storage().nbytes())) {
    throw std::logic_error("deepep_megatron._C: a tensor window falls outside its allocation");
  }
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(base.storage()), base.key_set(),
                                                   c10::scalarTypeToTypeMeta(dtype));
  if (strides.empty()) {
    impl->set_sizes_contiguous(sizes);
  } else {
    impl->set_sizes_and_strides(sizes, strides);
  }
  impl->set_storage_offset(begin / item);
  return at::Tensor(std::move(impl));
}

}  // namespace deepep_megatron
