// The rail exchange (the RDMA leg of node forwarding) as the Python side calls it
// (deepep_megatron/backends/rail.py): views of the send and receive slabs, and one exchange per call,
// checked against the slabs. Built only with NVSHMEM (DEEPEP_MEGATRON_WITH_NVSHMEM).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "nvshmem_heap.h"
#include "rail.h"

namespace deepep_megatron {

class RailRuntime {
 public:
  // The heap must outlive it (Python keeps it alive); its PEs are the EP group's ranks.
  RailRuntime(NvshmemHeap& heap, int rank, int num_ranks, int ranks_per_node, int device, double timeout_s);
  ~RailRuntime();
  RailRuntime(const RailRuntime&) = delete;
  RailRuntime& operator=(const RailRuntime&) = delete;

  int64_t slab_bytes() const { return ctx_.layout.slab_bytes; }
  double timeout_s() const { return timeout_s_; }
  void set_timeout_s(double timeout_s);
  bool has_error() const { return host_diagnostic_->flag != 0; }
  // [flag, code, rank, peer, node, block, expected, seen] of the first device error (flag 0: none).
  std::vector<int64_t> diagnostic() const;
  // Send slab `node` as uint8 [bytes] (the caller writes this call's rows for that node there).
  at::Tensor send_slab(int node, int64_t bytes) const;
  // Put every send slab's first send_bytes[m] bytes to node m's rank of the rail and wait (on the
  // current stream) for recv_bytes[n] from each; returns receive slab n as uint8 [recv_bytes[n]]
  // (valid until the next exchange: the caller copies it out first).
  std::vector<at::Tensor> exchange(const std::vector<int64_t>& send_bytes, const std::vector<int64_t>& recv_bytes,
                                   int num_blocks);
  // Collective in the caller (every rank idle, barriers around it): zero the control region and the
  // diagnostic; calls count from 1 again.
  void clean();

 private:
  at::Tensor view(int64_t offset, int64_t bytes) const;

  RailContext ctx_{};
  int64_t num_bytes_;
  int device_;
  double timeout_s_ = 0;
  uint64_t calls_ = 0;        // exchanges launched since the last clean()
  uint64_t blocks_sent_ = 0;  // their blocks together: each adds one arrived signal per peer
  Diagnostic* host_diagnostic_ = nullptr;
};

// Thrown when this rank's rail exchange recorded an error (Python reads diagnostic()).
struct RailError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace deepep_megatron
