// The per-channel send streams of a dispatch, built inside the dispatch kernel by the sender block
// of each channel (no separate launch): which of its tokens go to each rank, in token order.
//
//   reads   is_token_in_rank [T, R] bool (the slice [begin, end) of this channel)
//   writes  send_position [T, R] int32   index of token t in stream (channel of t, me -> r), -1 when
//                                        t does not go to r (the combine reads it)
//           send_tokens [R, T] int32     the inverse: send_tokens[r][begin + p] = the token at
//                                        position p of stream (c, me -> r); entries past the stream's
//                                        length are not written (a cached dispatch reads it)
//   returns the stream lengths in `lengths` [kMaxRanks] (shared memory)
// Block-wide exclusive scans over tiles of blockDim tokens, one ballot per rank and warp.
#pragma once

#include "wait.cuh"

namespace deepep_megatron {

template <int kThreads>
__device__ __forceinline__ void build_channel_streams(const bool* __restrict__ is_token_in_rank, int num_tokens,
                                                      int num_ranks, int begin, int end, int* send_position,
                                                      int* send_tokens, int* lengths) {
  constexpr int kWarps = kThreads / 32;
  __shared__ int warp_totals[kMaxRanks][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int running[kMaxRanks];
  for (int r = 0; r < kMaxRanks; ++r) running[r] = 0;
  for (int tile = begin; tile < end; tile += kThreads) {
    const int token = tile + threadIdx.x;
    const bool valid = token < end;
    int prefix_in_warp[kMaxRanks];
    bool hit[kMaxRanks];
    for (int r = 0; r < num_ranks; ++r) {
      hit[r] = valid && is_token_in_rank[static_cast<int64_t>(token) * num_ranks + r];
      const unsigned mask = __ballot_sync(0xffffffffu, hit[r]);
      prefix_in_warp[r] = __popc(mask & ((1u << lane) - 1u));
      if (lane == 0) warp_totals[r][warp] = __popc(mask);
    }
    __syncthreads();
    for (int r = 0; r < num_ranks; ++r) {
      int before = running[r];
      int tile_total = 0;
      for (int w = 0; w < kWarps; ++w) {
        if (w < warp) before += warp_totals[r][w];
        tile_total += warp_totals[r][w];
      }
      const int position = before + prefix_in_warp[r];
      if (valid) send_position[static_cast<int64_t>(token) * num_ranks + r] = hit[r] ? position : -1;
      if (hit[r]) send_tokens[static_cast<int64_t>(r) * num_tokens + begin + position] = token;
      running[r] += tile_total;
    }
    __syncthreads();  // warp_totals is rewritten by the next tile
  }
  if (threadIdx.x == 0) {
    for (int r = 0; r < num_ranks; ++r) lengths[r] = running[r];
  }
  __syncthreads();  // lengths and this block's send_tokens are visible to the whole block
}

}  // namespace deepep_megatron
