// Argument struct and launcher of the rail exchange (rail.cu): the RDMA leg of node forwarding.
// Plain C++ (no device code, no torch). The launcher is stream-ordered, checks its launch and never
// synchronizes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "deepep_megatron_layout.h"

namespace deepep_megatron {

// One rank's view of its rail: the symmetric region (the same offsets hold on every PE), where it
// sits, and the bound of every wait.
struct RailContext {
  uint8_t* heap;           // this PE's region of the symmetric heap (rail_layout)
  Diagnostic* diagnostic;  // device pointer of the host-mapped diagnostic
  uint64_t timeout_ns;
  int rank;                // EP rank = PE
  int num_nodes;           // N
  int ranks_per_node;      // L: node n's rank on this rail is PE n * L + local
  int home;                // this rank's node
  int local;               // this rank's index inside its node (its rail)
  RailLayout layout;
};

struct RailExchangeArgs {
  int64_t send_bytes[kRailMaxNodes];  // bytes of send slab m to put to node m (0 for this node)
  uint64_t call;                      // this exchange's number on the rail, 1-based
  uint64_t arrived_target;            // blocks of calls 1..call together: arrived[n] once call's rows are in
  int num_blocks;                     // every rank of the rail launches the same count
};

void launch_rail_exchange(const RailContext& ctx, const RailExchangeArgs& args, cudaStream_t stream);

}  // namespace deepep_megatron
