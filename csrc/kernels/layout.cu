// get_dispatch_layout: local bookkeeping before any communication, in ONE launch (no memset: every
// output element is written by exactly one block). No peer is touched here.
//
//   reads   topk_idx [T, K] int64 (expert ids, -1 = none)
//   writes  is_token_in_rank [T, R] bool    rank r = expert / (E / R) holds one of token t's experts
//                                           (blocks 0 .. B-1, one thread per token)
//           num_tokens_per_expert [E] int32 top-k entries naming expert e    } block B, over all
//           num_tokens_per_rank [R] int32   tokens with an expert on rank r  } tokens, shared histograms
// Ids outside [0, E) are skipped, never indexed: the layout runs without a host-side range check,
// and the dispatch that follows (its notify) reports bad ids on every rank.
#include "launch.h"
#include "wait.cuh"

namespace deepep_megatron {

namespace {

constexpr int kLayoutThreads = 256;

__global__ void __launch_bounds__(kLayoutThreads) get_dispatch_layout_kernel(
    const int64_t* __restrict__ topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
    int* __restrict__ num_tokens_per_rank, int* __restrict__ num_tokens_per_expert, bool* __restrict__ is_token_in_rank) {
  const int experts_per_rank = num_experts / num_ranks;
  auto rank_mask_of = [&](int token) {
    unsigned mask = 0;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = topk_idx[static_cast<int64_t>(token) * num_topk + k];
      if (expert >= 0 && expert < num_experts) mask |= 1u << static_cast<int>(expert / experts_per_rank);
    }
    return mask;
  };
  if (blockIdx.x + 1 < gridDim.x) {  // is_token_in_rank, one thread per token
    const int token = blockIdx.x * kLayoutThreads + threadIdx.x;
    if (token >= num_tokens) return;
    const unsigned mask = rank_mask_of(token);
    for (int r = 0; r < num_ranks; ++r) is_token_in_rank[static_cast<int64_t>(token) * num_ranks + r] = (mask >> r) & 1u;
    return;
  }
  extern __shared__ int shared_hist[];  // [num_experts + num_ranks]
  int* expert_hist = shared_hist;
  int* rank_hist = shared_hist + num_experts;
  for (int i = threadIdx.x; i < num_experts + num_ranks; i += kLayoutThreads) shared_hist[i] = 0;
  __syncthreads();
  for (int token = threadIdx.x; token < num_tokens; token += kLayoutThreads) {
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = topk_idx[static_cast<int64_t>(token) * num_topk + k];
      if (expert >= 0 && expert < num_experts) atomicAdd(&expert_hist[expert], 1);
    }
    const unsigned mask = rank_mask_of(token);
    for (int r = 0; r < num_ranks; ++r) {
      if ((mask >> r) & 1u) atomicAdd(&rank_hist[r], 1);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += kLayoutThreads) num_tokens_per_expert[e] = expert_hist[e];
  for (int r = threadIdx.x; r < num_ranks; r += kLayoutThreads) num_tokens_per_rank[r] = rank_hist[r];
}

}  // namespace

void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                                int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
                                cudaStream_t stream) {
  const int token_blocks = (num_tokens + kLayoutThreads - 1) / kLayoutThreads;
  const size_t shared = sizeof(int) * (num_experts + num_ranks);
  if (shared > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(get_dispatch_layout_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(shared)),
               "cudaFuncSetAttribute(get_dispatch_layout_kernel)");
  }
  get_dispatch_layout_kernel<<<token_blocks + 1, kLayoutThreads, shared, stream>>>(
      topk_idx, num_tokens, num_topk, num_experts, num_ranks, num_tokens_per_rank, num_tokens_per_expert,
      is_token_in_rank);
  check_cuda(cudaGetLastError(), "get_dispatch_layout kernel launch");
}

}  // namespace deepep_megatron
