// Layout kernels: local bookkeeping before any communication. No peer is touched here.
//
// get_dispatch_layout
//   reads   topk_idx [T, K] int64 (expert ids, -1 = none)
//   writes  num_tokens_per_rank [R] int32   tokens with at least one expert on rank r
//           num_tokens_per_expert [E] int32 top-k entries naming expert e
//           is_token_in_rank [T, R] bool    rank r = expert / (E / R) holds one of token t's experts
//   One thread per token; block-local histograms in shared memory, then one atomicAdd per bin.
//
// channel_layout
//   reads   is_token_in_rank [T, R] bool
//           topk_idx [T, K] int64 expert ids, only for their range check
//   writes  channel_count [R, C] int32     tokens of channel c (a contiguous token slice) sent to r
//           send_position [T, R] int32     index of token t in the stream (channel of t, me -> r),
//                                          -1 when t does not go to r
//           send_tokens [R, T] int32       the inverse: send_tokens[r][begin_c + p] = the token at
//                                          position p of stream (c, me -> r) (entries past the
//                                          stream's length are not written); the dispatch's
//                                          senders read it instead of scanning is_token_in_rank
//           channel_topk_range [C, 2] int64 min / max of topk_idx over channel c's tokens
//                                          (INT64_MAX / INT64_MIN when empty); the notify kernel
//                                          reduces it and reports bad ids to every rank, so the
//                                          dispatch needs no host sync of its own for that check
//   One block per channel, block-wide exclusive scans over tiles of 256 tokens, one per rank.
#include "launch.h"
#include "wait.cuh"

namespace deepep_megatron {

namespace {

constexpr int kLayoutThreads = 256;

__global__ void __launch_bounds__(kLayoutThreads) get_dispatch_layout_kernel(
    const int64_t* __restrict__ topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
    int* __restrict__ num_tokens_per_rank, int* __restrict__ num_tokens_per_expert, bool* __restrict__ is_token_in_rank) {
  extern __shared__ int shared_hist[];  // [num_experts + num_ranks]
  int* expert_hist = shared_hist;
  int* rank_hist = shared_hist + num_experts;
  for (int i = threadIdx.x; i < num_experts + num_ranks; i += blockDim.x) shared_hist[i] = 0;
  __syncthreads();

  const int experts_per_rank = num_experts / num_ranks;
  const int token = blockIdx.x * blockDim.x + threadIdx.x;
  if (token < num_tokens) {
    unsigned rank_mask = 0;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = topk_idx[static_cast<int64_t>(token) * num_topk + k];
      // Ids outside [0, E) are skipped, never indexed: this kernel runs without a host-side range
      // check, and the dispatch that follows reports bad ids (channel_topk_range) on every rank.
      if (expert < 0 || expert >= num_experts) continue;
      atomicAdd(&expert_hist[expert], 1);
      rank_mask |= 1u << static_cast<int>(expert / experts_per_rank);
    }
    for (int r = 0; r < num_ranks; ++r) {
      const bool hit = (rank_mask >> r) & 1u;
      is_token_in_rank[static_cast<int64_t>(token) * num_ranks + r] = hit;
      if (hit) atomicAdd(&rank_hist[r], 1);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    if (expert_hist[e] != 0) atomicAdd(&num_tokens_per_expert[e], expert_hist[e]);
  }
  for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) {
    if (rank_hist[r] != 0) atomicAdd(&num_tokens_per_rank[r], rank_hist[r]);
  }
}

__global__ void __launch_bounds__(kLayoutThreads) channel_layout_kernel(const bool* __restrict__ is_token_in_rank,
                                                                        int num_tokens, int num_ranks, int num_channels,
                                                                        int* __restrict__ channel_count,
                                                                        int* __restrict__ send_position,
                                                                        int* __restrict__ send_tokens,
                                                                        const int64_t* __restrict__ topk_idx,
                                                                        int num_topk,
                                                                        int64_t* __restrict__ channel_topk_range) {
  __shared__ int warp_totals[kMaxRanks][kLayoutThreads / 32];
  __shared__ long long warp_low[kLayoutThreads / 32], warp_high[kLayoutThreads / 32];
  const int channel = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int begin, end;
  channel_range(num_tokens, num_channels, channel, begin, end);
  // min / max of topk_idx over this channel's tokens, for the notify kernel's range check
  long long low = INT64_MAX, high = INT64_MIN;
  const int64_t first = static_cast<int64_t>(begin) * num_topk, last = static_cast<int64_t>(end) * num_topk;
  for (int64_t i = first + threadIdx.x; i < last; i += kLayoutThreads) {
    const long long v = __ldg(reinterpret_cast<const long long*>(topk_idx) + i);
    low = min(low, v);
    high = max(high, v);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    low = min(low, __shfl_xor_sync(0xffffffffu, low, offset));
    high = max(high, __shfl_xor_sync(0xffffffffu, high, offset));
  }
  if (lane == 0) {
    warp_low[warp] = low;
    warp_high[warp] = high;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kLayoutThreads / 32; ++w) {
      low = min(low, warp_low[w]);
      high = max(high, warp_high[w]);
    }
    channel_topk_range[2 * channel] = low;
    channel_topk_range[2 * channel + 1] = high;
  }
  int running[kMaxRanks];
  for (int r = 0; r < kMaxRanks; ++r) running[r] = 0;

  for (int tile = begin; tile < end; tile += kLayoutThreads) {
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
      for (int w = 0; w < kLayoutThreads / 32; ++w) {
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
    for (int r = 0; r < num_ranks; ++r) channel_count[r * num_channels + channel] = running[r];
  }
}

}  // namespace

void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                                int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
                                cudaStream_t stream) {
  check_cuda(cudaMemsetAsync(num_tokens_per_rank, 0, sizeof(int) * num_ranks, stream), "cudaMemsetAsync");
  check_cuda(cudaMemsetAsync(num_tokens_per_expert, 0, sizeof(int) * num_experts, stream), "cudaMemsetAsync");
  if (num_tokens == 0) return;
  const int blocks = (num_tokens + kLayoutThreads - 1) / kLayoutThreads;
  const size_t shared = sizeof(int) * (num_experts + num_ranks);
  if (shared > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(get_dispatch_layout_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(shared)),
               "cudaFuncSetAttribute(get_dispatch_layout_kernel)");
  }
  get_dispatch_layout_kernel<<<blocks, kLayoutThreads, shared, stream>>>(
      topk_idx, num_tokens, num_topk, num_experts, num_ranks, num_tokens_per_rank, num_tokens_per_expert,
      is_token_in_rank);
  check_cuda(cudaGetLastError(), "get_dispatch_layout kernel launch");
}

void launch_channel_layout(const bool* is_token_in_rank, int num_tokens, int num_ranks, int num_channels,
                           int* channel_count, int* send_position, int* send_tokens, const int64_t* topk_idx,
                           int num_topk, int64_t* channel_topk_range, cudaStream_t stream) {
  channel_layout_kernel<<<num_channels, kLayoutThreads, 0, stream>>>(is_token_in_rank, num_tokens, num_ranks,
                                                                     num_channels, channel_count, send_position,
                                                                     send_tokens,
                                                                     topk_idx, num_topk, channel_topk_range);
  check_cuda(cudaGetLastError(), "channel_layout kernel launch");
}

}  // namespace deepep_megatron
