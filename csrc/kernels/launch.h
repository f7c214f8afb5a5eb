// Argument structs and launchers of the kernels: the interface between the runtime (host C++)
// and the kernel files. Plain C++ (no device code). Launchers are stream-ordered, check their
// launch and never synchronize.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "context.h"

namespace deepep_megatron {

// Geometry of the per-(channel, peer) rings for one call.
struct RingGeometry {
  int num_channels;
  int num_slots;     // slots per ring
  int send_chunk;    // tokens a sender publishes per step
  int slot_bytes;    // bytes per slot (kSlotAlign-aligned)
};

struct NotifyArgs {
  const bool* is_token_in_rank;      // [T, R]
  const int64_t* topk_idx;           // [T, K] (range-checked here)
  const int* num_tokens_per_expert;  // [E] top-k hits of this rank's tokens per expert
  int num_tokens;
  int num_topk;
  int64_t num_experts;
  int num_channels;
  int num_local_experts;
  int expert_alignment;
  int num_worst_tokens;              // 0: publish the sizes to the host (NotifyResult); else the bound
  uint32_t ticket;                   // NotifyResult::sequence to publish (host-side count, host mode only)
  // outputs (device)
  int* channel_count;                // [R, C] tokens of channel c this rank sends to rank r
  int* recv_channel_offset;          // [R, C + 1] first output row of (source rank, channel)
  int* send_counts;                  // [R] rows this rank sends to each rank
  int* rank_prefix_matrix;           // [R, R] rows ranks 0..i send to rank j
  int* recv_counts;                  // [R + E_l] rows per source rank, then per local expert (aligned)
  NotifyResult* result;              // host-mapped, written only when num_worst_tokens == 0
  // speculation (host mode): rows this rank allocated before its wait (every rank launches the
  // speculative dispatch); notify writes 1 to *fits (device) and result->fits when every rank's
  // rows fit its capacity and no rank refused, else 0
  int capacity;
  int* fits;
  BlockExchange blocks;              // this rank's receive block, published in the first barrier
};

// Output regions a kernel overwrites with 0xFF bytes (NaN for floats, -1 for ints) when this rank was
// aborted before or during the operation: the last block to finish checks (done counter), so a
// failed operation never hands plausible data to the next layer.
struct PoisonList {
  static constexpr int kMaxRegions = 5;
  uint8_t* data[kMaxRegions];
  int64_t bytes[kMaxRegions];
  int count;
};

// What opens a data kernel, i.e. lets its blocks touch the peers' buffers (the go word, wait.cuh).
enum class Opening : int {
  kNone = 0,        // nothing to wait for: the exact dispatch after a host wait, behind a complete notify
  kAfterNotify = 1, // launched behind notify (programmatic dependent launch): notify's first barrier
  kOwnBarrier = 2,  // the kernel carries its barrier (fused_barrier): a cached dispatch, a combine
  kFusedNotify = 3, // a full dispatch whose last block runs notify (DispatchArgs::notify) instead of a
                    // notify launch before it (DEEPEP_MEGATRON_FUSED_NOTIFY=1): one launch fewer
};

struct DispatchArgs {
  // sender side (this rank's tokens)
  const uint8_t* x;               // [T, row_bytes]
  const float* x_scales;          // [T, num_scales] or null
  const int64_t* topk_idx;        // [T, num_topk] or null (cached dispatch)
  const float* topk_weights;      // [T, num_topk] or null
  const bool* is_token_in_rank;   // [T, R] (full dispatch; null when T == 0)
  bool builds_streams;            // full dispatch: the sender blocks build the streams from is_token_in_rank
                                  // (a cached dispatch reads send_tokens / channel_count; never tell the two
                                  // apart by the pointer: an empty tensor's is null too)
  int* send_position;             // [T, R] written with the streams (full dispatch); read by a cached
                                  // direct dispatch (every token's row at every destination)
  int* send_tokens;               // [R, T] token at each position of stream (channel, me -> r)
  const int* channel_count;       // [R, C] length of stream (channel c, me -> r): a cached dispatch's
                                  // (a full one counts its streams itself)
  int num_tokens;
  int num_scales;                 // 0 without FP8
  int num_topk;                   // 0 for cached dispatch
  // receiver side
  const int* recv_channel_offset;  // [R, C + 1] first output row of (source rank, channel)
  int num_recv_rows;               // rows of the outputs (num_worst_tokens, or the exact count)
  bool pad_rows;                   // fill rows past the received ones (num_worst_tokens): topk -1
  uint8_t* recv_x;                 // [N, row_bytes]
  float* recv_x_scales;            // [N, num_scales] or null
  int64_t* recv_topk_idx;          // [N, num_topk] or null
  float* recv_topk_weights;        // [N, num_topk] or null
  int* recv_src_idx;               // [N] or null
  int num_local_experts;
  // A speculative dispatch (launched before the host knew the sizes, into outputs of num_recv_rows
  // rows) writes its outputs only when notify set *fits; else its receivers drain the rings without
  // writing (every rank alike) and the host launches the exact one. null: not speculative.
  const int* fits;
  Opening opening;
  Fingerprint barrier_fp;          // kOwnBarrier: the barrier's fingerprint; kFusedNotify: notify's
  NotifyArgs notify;               // kFusedNotify: what notify's block (the last, blockIdx 2 * C) computes
  // Direct write (receive arena): `blocks` is what this rank published in the barrier that opens the
  // kernel (kOwnBarrier: the kernel's own; kAfterNotify: notify's first), recv_x being the block's
  // rows when blocks.block.offset != kNoReceiveBlock. Every rank with a block: the direct kernel;
  // else the rings, a sender writing the x rows of its stream to peer d straight into d's block
  // (kOffReceiveBlocks[d]) at row rank_prefix_matrix[me - 1][d] + (rows of the channels before) +
  // position when d has one.
  BlockExchange blocks;
  bool use_blocks;                 // kOffReceiveBlocks holds this operation's blocks (false: rings only)
  const int* rank_prefix_matrix;   // [R, R] (full dispatch: notify's output)
  SlotLayout slot;
  PoisonList poison;
};

struct CombineArgs {
  // sender side (rows this rank received in the dispatch)
  const uint8_t* x;               // [N, row_bytes] bf16 or fp32
  const float* topk_weights;      // [N, num_topk] or null
  const int* recv_channel_offset; // [R, C + 1]
  // receiver side (this rank's original tokens)
  const int* send_position;       // [T, R] position of token t in stream (channel of t, me -> r), -1 if not sent
  int num_tokens;
  uint8_t* combined_x;            // [T, row_bytes]
  float* combined_topk_weights;   // [T, num_topk] or null
  int row_bytes;
  int num_topk;                   // 0 without weights
  bool is_bf16;                   // else fp32
  int off_weights;
  Fingerprint barrier_fp;         // combine carries its barrier (fused_barrier, wait.cuh)
  PoisonList poison;
  // kOwnBarrier, or kNone for the ring kernel launched behind combine_direct_kernel (which ran it)
  Opening opening;
  // Direct combine (with a receive arena, unless DEEPEP_MEGATRON_DIRECT_COMBINE=0): `blocks` is this rank's
  // combine block (combine_block in the layout header), published in the barrier. When every rank
  // published one, each pushes every home rank's rows into that rank's block and reduces its own
  // tokens from its own block; else the ring kernel launched behind it moves the data.
  BlockExchange blocks;
  bool use_blocks;
  const int* rank_prefix_matrix;  // [R, R] of the dispatch that made the layout
  const int* channel_count;       // [R, C] this rank's dispatch streams (rows it sent each rank per channel)
};

void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                                int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
                                cudaStream_t stream);
void launch_barrier(const PeerContext& ctx, const Fingerprint& fp, cudaStream_t stream);
void launch_notify(const PeerContext& ctx, const Fingerprint& fp, const NotifyArgs& args, cudaStream_t stream);
void launch_dispatch(const PeerContext& ctx, const RingGeometry& ring, const DispatchArgs& args, cudaStream_t stream);
void launch_combine(const PeerContext& ctx, const RingGeometry& ring, const CombineArgs& args, cudaStream_t stream);

void check_cuda(cudaError_t err, const char* what);

// A switch from the environment: on by default, `name`=0 turns it off; off by default, `name`=1
// turns it on (anything else leaves the default). Callers keep the result (read once).
bool env_switch(const char* name, bool default_on);

}  // namespace deepep_megatron
