// The low-latency operations as the Python side calls them (deepep_megatron/backends/low_latency.py):
// one C++ entry per operation over tensors, which checks every shape, dtype and device against the
// symmetric region it will write (this PE's and, by the symmetric layout, every peer's), allocates
// the outputs on the current stream and launches (low_latency.h). The caller releases the GIL.
// Built only with NVSHMEM (DEEPEP_MEGATRON_WITH_NVSHMEM).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "low_latency.h"
#include "nvshmem_heap.h"

namespace deepep_megatron {

// One group's low-latency state on top of the NVSHMEM heap (whose region it uses from offset 0):
// the host-mapped diagnostic and the wait bound. The heap must outlive it (Python keeps it alive).
class LowLatencyRuntime {
 public:
  LowLatencyRuntime(NvshmemHeap& heap, int rank, int num_ranks, int device, double timeout_s);
  ~LowLatencyRuntime();
  LowLatencyRuntime(const LowLatencyRuntime&) = delete;
  LowLatencyRuntime& operator=(const LowLatencyRuntime&) = delete;

  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int device() const { return device_; }
  int64_t num_bytes() const { return num_bytes_; }
  double timeout_s() const { return timeout_s_; }
  void set_timeout_s(double timeout_s);
  bool has_error() const { return host_diagnostic_->flag != 0; }
  // [flag, code, rank, peer, expert, block, expected, seen] of the first device error (flag 0: none).
  std::vector<int64_t> diagnostic() const;
  // Collective in the caller (every PE idle, barriers around it): zero the whole region (control,
  // both halves) and the diagnostic.
  void clean();
  LowLatencyContext context() const;
  uint8_t* base() const { return base_; }
  // With DEEPEP_MEGATRON_LL_STAGE_TIMES=1: the device rows the next dispatch launch of `num_blocks`
  // blocks fills (LowLatencyStage, low_latency.h); null otherwise (the kernel then times nothing).
  int64_t* stage_rows(int num_blocks);
  // The last timed launch's rows, [blocks * kLLStageCount] (waits for the device); empty when off.
  std::vector<int64_t> stage_times() const;

 private:
  uint8_t* base_;
  int64_t num_bytes_;
  int rank_, num_ranks_, device_;
  double timeout_s_ = 0;
  Diagnostic* host_diagnostic_ = nullptr;
  Diagnostic* device_diagnostic_ = nullptr;
  int64_t* stage_device_ = nullptr;  // [kMaxStageBlocks][kLLStageCount], allocated on first timed launch
  int stage_blocks_ = 0;             // blocks of the last timed launch
};

// Thrown when this PE's low-latency kernels recorded an error (Python reads diagnostic()).
struct LowLatencyError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct LowLatencyDispatchResult {
  at::Tensor recv_x;                        // [E_l, R * M, H] e4m3 or bf16
  std::optional<at::Tensor> recv_x_scales;  // fp32 [E_l, R * M, H / 128] or packed int32 [..., H / 512] (column-major views)
  at::Tensor recv_count;                    // [E_l] int32
  at::Tensor recv_src_info;                 // [E_l, R * M] int32
  at::Tensor recv_layout_range;             // [E_l, R] int64
  at::Tensor pair_slot;                     // [T, K] int32 (for combine)
};

// Dispatch. phases: kLLSend | kLLRecv. With `outputs` (a receive-only launch: the hook) the tensors of
// the send launch are reused; without, they are allocated.
LowLatencyDispatchResult low_latency_dispatch(LowLatencyRuntime& rt, const at::Tensor& x, const at::Tensor& topk_idx,
                                              int max_tokens, int num_experts, bool use_fp8, bool round_scale,
                                              bool use_ue8m0, int half, int phases, int num_blocks,
                                              const std::optional<at::Tensor>& wait_stats,
                                              const std::optional<LowLatencyDispatchResult>& outputs);

// Combine: x [E_l, R * M, H] bf16 (possibly the half's send region) -> combined [T, H] bf16 (`out` if given).
at::Tensor low_latency_combine(LowLatencyRuntime& rt, const at::Tensor& x, const at::Tensor& topk_idx,
                               const at::Tensor& topk_weights, const at::Tensor& pair_slot,
                               const at::Tensor& recv_layout_range, int max_tokens, int num_experts, int half,
                               int phases, int num_blocks, const std::optional<at::Tensor>& wait_stats,
                               const std::optional<at::Tensor>& out);

// The send region of `half` as a bf16 tensor [E_l, R * M, H] (zero-copy combine: experts write their
// outputs there). A view of the symmetric heap: valid while the heap lives.
at::Tensor low_latency_combine_buffer(LowLatencyRuntime& rt, int max_tokens, int hidden, int num_experts, int half);

}  // namespace deepep_megatron
