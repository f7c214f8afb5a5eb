// The intranode operations as the Python side calls them: one C++ entry per operation that takes
// tensors, checks every shape, dtype, device, offset and size against the buffers it will write
// (this rank's and its peers'), allocates the outputs on the current stream, launches, and for a
// dispatch that must know its sizes spins on the host-mapped notify result. The caller releases
// the GIL around each call. Python keeps the user-facing argument checks; nothing here trusts them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "runtime.h"

namespace deepep_megatron {

// Thrown when this rank's kernels recorded an error (timeout, fingerprint mismatch, bad ids or an
// overflow under num_worst_tokens): Python reads Runtime::diagnostic() and raises its own message.
struct DeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Ring configuration of one call (Config.num_sms / 2 channels, its chunk sizes).
struct RingConfig {
  int num_channels;
  int num_slots;
  int send_chunk;
};

// get_dispatch_layout: topk_idx [T, K] int64 -> (num_tokens_per_rank [R] int32,
// num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool).
std::tuple<at::Tensor, at::Tensor, at::Tensor> get_dispatch_layout(Runtime& rt, const at::Tensor& topk_idx,
                                                                   int64_t num_experts);

struct DispatchResult {
  at::Tensor recv_x;                        // [N, H] x.dtype
  std::optional<at::Tensor> recv_x_scales;  // [N, H / 128] fp32
  std::optional<at::Tensor> recv_topk_idx;  // [N, K] int64 local ids (-1 elsewhere); none for layout-only
  std::optional<at::Tensor> recv_topk_weights;  // [N, K] fp32
  at::Tensor recv_src_idx;                  // [N] int32 (-1 on padding rows)
  at::Tensor send_position;                 // [T, R] int32
  at::Tensor send_tokens;                   // [R, T] int32
  at::Tensor channel_count;                 // [R, C] int32
  at::Tensor recv_channel_offset;           // [R, C + 1] int32
  at::Tensor send_counts;                   // [R] int32
  at::Tensor rank_prefix_matrix;            // [R, R] int32
  at::Tensor recv_counts;                   // [R + E_l] int32 (device): per source rank, then per local expert
  at::Tensor num_recv_tokens_per_rank;      // [R] int32: on the host when the dispatch waited for its sizes,
                                            // else a view of recv_counts (device)
  at::Tensor recv_channel_prefix_matrix;    // [R, C] int32 view of recv_channel_offset (DeepEP's handle[2])
  std::vector<int> host_counts;             // the same on the host; empty under num_worst_tokens
  int bad_ranks = 0;                        // bit s: rank s passed topk_idx outside [-1, E) (host mode)
  int64_t low = 0, high = 0;                // this rank's topk_idx min / max (host mode)
};

// Full dispatch: channel layout -> notify -> (host mode: wait for the sizes) -> dispatch.
// With num_worst_tokens > 0 nothing waits on the host and the outputs have that many rows.
// A result with bad_ranks != 0 launched no dispatch (the caller raises on every rank).
DispatchResult dispatch(Runtime& rt, const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                        const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
                        const at::Tensor& is_token_in_rank, const at::Tensor& num_tokens_per_expert,
                        int expert_alignment, const RingConfig& ring, int num_worst_tokens);

// Cached dispatch (the layout tensors of a previous dispatch; recv_src_idx gives its row count,
// rank_prefix_matrix and send_position where this rank's rows land at each peer): barrier ->
// dispatch of x only.
std::tuple<at::Tensor, std::optional<at::Tensor>> cached_dispatch(
    Runtime& rt, const at::Tensor& x, const std::optional<at::Tensor>& x_scales, const at::Tensor& send_tokens,
    const at::Tensor& channel_count, const at::Tensor& recv_channel_offset, const at::Tensor& recv_src_idx,
    const at::Tensor& rank_prefix_matrix, const at::Tensor& send_position, const RingConfig& ring);

// Combine: x [N, H] bf16/fp32 (+ topk_weights [N, K]) -> (combined [T, H], combined_weights [T, K]).
// rank_prefix_matrix [R, R] and channel_count [R, C] (the dispatch's) place the rows of a direct combine.
std::tuple<at::Tensor, std::optional<at::Tensor>> combine(Runtime& rt, const at::Tensor& x,
                                                          const std::optional<at::Tensor>& topk_weights,
                                                          const at::Tensor& recv_channel_offset,
                                                          const at::Tensor& send_position, const at::Tensor& recv_src_idx,
                                                          const at::Tensor& rank_prefix_matrix,
                                                          const at::Tensor& channel_count, const RingConfig& ring);

// A bare cross-rank barrier on the current stream (fingerprint kOpBarrier).
void barrier(Runtime& rt);

}  // namespace deepep_megatron
