// Argument structs and launchers of the low-latency kernels (low_latency.cu): the interface between
// the runtime (csrc/runtime/low_latency_ops.cpp) and the kernels. Plain C++ (no device code, no
// torch). Launchers are stream-ordered, check their launch and never synchronize.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "deepep_megatron_layout.h"

namespace deepep_megatron {

// What every low-latency kernel needs to reach its peers: this PE's symmetric region (the same
// offsets hold on every PE; peers are reached with nvshmem_ptr or puts), the host-mapped diagnostic.
struct LowLatencyContext {
  uint8_t* heap;            // this PE's region of the symmetric heap (kLLControlBytes + 2 halves)
  Diagnostic* diagnostic;   // device pointer of the host-mapped diagnostic
  uint64_t timeout_ns;      // bound of every wait on a peer
  int rank;
  int num_ranks;
};

// Which parts of an operation a launch runs: the send only (return_recv_hook: the hook runs the
// receive later, nothing holds SMs in between), the receive only (the hook), or both.
enum LowLatencyPhase : int { kLLSend = 1, kLLRecv = 2 };

struct LowLatencyShape {
  int num_tokens;         // T of this rank (<= max_tokens)
  int num_topk;           // K
  int hidden;             // H
  int max_tokens;         // M = num_max_dispatch_tokens_per_rank
  int num_experts;        // E
  int num_local_experts;  // E / R
  int half;               // 0 or 1: the half of the region this call uses
  LowLatencyLayout layout;
};

// Where a low-latency dispatch block spends its time (DEEPEP_MEGATRON_LL_STAGE_TIMES=1): one row of
// kLLStageCount int64 per block. kLLStageStart / kLLStageEnd are %globaltimer readings (ns) at the
// block's start and end; the others are the ns the block spent in that phase, summed over batches
// or work items, read by thread 0 at block-uniform points (after a barrier of the block).
enum LowLatencyStage : int {
  kLLStageStart = 0,     // absolute: the block began
  kLLStageTopk = 1,      // send: top-k ids into shared memory (and their range check)
  kLLStagePairs = 2,     // send: each pair's slot and peer address (ballot counts, atomics)
  kLLStageStores = 3,    // send: the rows' loads, FP8 cast and stores, headers, puts
  kLLStageSignal = 4,    // send: the last-block election (fences) and the count signals
  kLLStageRecvWait = 5,  // receive: waiting for the source ranks' counts, and the layout prefix
  kLLStageRecvCopy = 6,  // receive: copying the rows out (and the last-block clear)
  kLLStageEnd = 7,       // absolute: the block ended
  kLLStageCount = 8,
};
constexpr int kMaxStageBlocks = 1024;  // blocks of one low-latency launch (the launchers' limit too)

struct LowLatencyDispatchArgs {
  LowLatencyShape shape;
  bool use_fp8, round_scale, use_ue8m0;
  // send side
  const uint16_t* x;           // [T, H] bf16
  const int64_t* topk_idx;     // [T, K]
  int* pair_slot;              // [T, K] slot of each (token, k) inside its (expert, rank) region, -1: none
  // receive side: DeepEP's outputs, S = R * M rows per local expert
  uint8_t* recv_x;             // [E_l, S, H] e4m3 or bf16
  float* recv_scales;          // fp32 scales, element (e, s, g) at (e * G + g) * S + s; or null
  int32_t* recv_scales_packed; // UE8M0 words, element (e, s, w) at (e * W + w) * S + s; or null
  int* recv_count;             // [E_l]
  int* recv_src_info;          // [E_l, S] source token index, -1 past recv_count
  int64_t* recv_layout_range;  // [E_l, R] (offset << 32) | count
  int64_t* wait_stats;         // [R] ns waited for each source rank (summed over receiving blocks) or null
  int64_t* stage_ns;           // [gridDim][kLLStageCount] (LowLatencyStage) or null: off
};

struct LowLatencyCombineArgs {
  LowLatencyShape shape;
  // send side (the expert rank)
  const uint16_t* x;                  // [E_l, S, H] bf16 (may be the half's send region: zero copy)
  const int64_t* recv_layout_range;   // [E_l, R] of the dispatch
  // receive side (the source rank)
  const int64_t* topk_idx;            // [T, K]
  const float* topk_weights;          // [T, K]
  const int* pair_slot;               // [T, K] of the dispatch
  uint16_t* combined;                 // [T, H] bf16
  int64_t* wait_stats;                // [R] or null
};

void launch_low_latency_dispatch(const LowLatencyContext& ctx, const LowLatencyDispatchArgs& args, int phases,
                                 int num_blocks, cudaStream_t stream);
void launch_low_latency_combine(const LowLatencyContext& ctx, const LowLatencyCombineArgs& args, int phases,
                                int num_blocks, cudaStream_t stream);

}  // namespace deepep_megatron
