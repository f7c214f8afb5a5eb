// Low-latency dispatch and combine over NVSHMEM (DeepEP's low_latency_dispatch / low_latency_combine
// semantics, deterministic order).
//
// Data layout (deepep_megatron_layout.h, ll_layout): one symmetric region per PE, a control block,
// the signals of each half at fixed offsets, then the data of two halves that consecutive calls
// alternate. In a half:
//   send    dispatch: the cast message of each of my tokens, [M] x message (staged for puts only)
//           combine:  [E_l][R * M][H] bf16 rows (zero-copy combine: the experts write here)
//   recv    dispatch: [E_l][R][M] messages: slot (e, s, i) holds the i-th (token, k) pair of source
//                     rank s whose expert is my local expert e, pairs counted in (token, k) order
//           combine:  [E][M] rows of 2H bytes: row (e, i) is expert e's output for MY pair i of e
//   signals u64 counts [E_l][R], u64 flags [R], i32 scratch [E]
//
// Who signals whom:
//   dispatch send (rank s): every block takes its tokens in batches: first one warp per (token, k)
//     pair finds the pair's slot (e % E_l, s, i) on rank e / E_l, counting pairs per expert in
//     scratch; then every warp casts units of the batch's rows (FP8 per 128 channels, or bf16) and
//     stores each unit straight into every slot of its token whose rank is load/store reachable
//     (nvshmem_ptr). Only pairs whose rank is not (puts) get a staged message in the send region
//     and an nvshmemx_putmem_nbi_warp from it. The last
//     block to finish (done counter) writes counts[e % E_l][s] = n + 1 on rank e / E_l for EVERY
//     expert e (n may be 0), after a system fence (puts: nvshmem_quiet first), then clears scratch.
//   dispatch recv (rank d): blocks own (local expert, part); each waits (bounded) for the R counts
//     of its expert, lays the rows out compactly by (source rank, slot) -- DeepEP's
//     recv_layout_range -- and copies them into recv_x / scales / recv_src_info. The last block to
//     finish clears the count signals.
//   combine send (rank d): rows of each (local expert, source rank) go back to slot (global expert,
//     i) of the source rank; the last block sets flags[d] = 1 on every rank.
//   combine recv (rank s): every block waits for the R flags, then one warp per token sums
//     w[t, k] * row(topk_idx[t, k], pair_slot[t, k]) over k ascending in fp32 (no FMA, as the
//     reference) and writes bf16. The last block clears the flags. A combine that sends and
//     receives in one launch (no hook) leaves its own rank's rows in x: the send skips them and the
//     receive reads them there (row recv_layout_range offset + slot of the expert's [S] rows).
// Every receiver clears what it consumed, so the next call on the half starts from zero signals.
// Grid sizes come from the caller (a rank's kernel must fit on the GPU next to its peers' when
// ranks share one GPU: the receive spins). Every wait is bounded by ctx.timeout_ns and reports a
// Diagnostic; the abort word stops the other waits of this rank.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <stdexcept>
#include <string>

#include "diagnostic.cuh"
#include "low_latency.h"
#include "ptx.cuh"

namespace deepep_megatron {

namespace {

constexpr int kThreads = kLLWarpsPerBlock * 32;
constexpr int kCounterDispatchSend = 0;
constexpr int kCounterDispatchRecv = 1;
constexpr int kCounterCombineSend = 2;
constexpr int kCounterCombineRecv = 3;
// (token, k) pairs a dispatch send block places at a time (its shared tables; >= kMaxTopk tokens' worth).
constexpr int kLLSendBatchPairs = 128;
static_assert(kLLSendBatchPairs >= kMaxTopk, "a send batch holds at least one token");

// Data (send, recv) and signals of the call's half.
__device__ __forceinline__ uint8_t* half_base(const LowLatencyContext& ctx, const LowLatencyShape& s) {
  return ctx.heap + s.layout.off_data + static_cast<int64_t>(s.half) * s.layout.half_bytes;
}

__device__ __forceinline__ uint8_t* half_signals(const LowLatencyContext& ctx, const LowLatencyShape& s) {
  return ctx.heap + kLLControlBytes + static_cast<int64_t>(s.half) * kLLSignalBytes;
}

__device__ __forceinline__ uint32_t* abort_word(const LowLatencyContext& ctx) {
  return reinterpret_cast<uint32_t*>(ctx.heap);
}

__device__ __forceinline__ uint32_t* done_counter(const LowLatencyContext& ctx, int half, int which) {
  return reinterpret_cast<uint32_t*>(ctx.heap + kLLOffDone) + half * kLLCounters + which;
}

__device__ __forceinline__ bool ll_aborted(const LowLatencyContext& ctx) {
  return ld_volatile(abort_word(ctx)) != 0u;
}

// The first device-detected error of this rank (record_error, diagnostic.cuh); `expert` goes in the
// channel field: the (local, for dispatch) expert the wait was for, -1 for combine.
__device__ __forceinline__ void ll_report(const LowLatencyContext& ctx, int code, int peer, int expert, int64_t expected,
                                          int64_t seen) {
  record_error(abort_word(ctx), ctx.diagnostic, code, ctx.rank, peer, expert, expected, seen);
}

// Spin until the u64 signal at `p` is nonzero; returns it, or 0 after a timeout (reported) or an abort.
__device__ __forceinline__ uint64_t wait_signal(const LowLatencyContext& ctx, const uint64_t* p, int code, int peer,
                                                int expert, int64_t* waited_ns) {
  uint64_t v = ld_acquire_sys_u64(p);
  if (v != 0) return v;
  const uint64_t start = global_timer_ns();
  for (uint32_t iter = 1;; ++iter) {
    v = ld_acquire_sys_u64(p);
    if (v != 0) break;
    if ((iter & 63u) == 0u) {
      if (ll_aborted(ctx)) return 0;
      if (global_timer_ns() - start > ctx.timeout_ns) {
        ll_report(ctx, code, peer, expert, 1, 0);
        return 0;
      }
    }
  }
  if (waited_ns != nullptr) *waited_ns = static_cast<int64_t>(global_timer_ns() - start);
  return v;
}

// Store `value` into the u64 signal at `local_addr` (same offset) on `pe`: a release store through
// nvshmem_ptr when `pe` is load/store reachable, else an NVSHMEM signal operation (then quieted, so
// it is delivered before the kernel ends).
__device__ __forceinline__ void put_signal(uint64_t* local_addr, uint64_t value, int pe) {
  uint64_t* peer = static_cast<uint64_t*>(nvshmem_ptr(local_addr, pe));
  if (peer != nullptr) {
    st_release_sys_u64(peer, value);
  } else {
    nvshmemx_signal_op(local_addr, value, NVSHMEM_SIGNAL_SET, pe);
    nvshmem_quiet();
  }
}

// One warp copies `vectors` 16-byte vectors from `src` to `dst` (L2 only on both sides), kCopyUnroll
// loads in flight per lane before their stores: a copy is latency-bound otherwise (the compiler cannot
// reorder a load past a store that may alias it).
constexpr int kCopyUnroll = 8;

__device__ __forceinline__ void warp_copy(int4* dst, const int4* src, int64_t vectors, int lane) {
  for (int64_t base = 0; base < vectors; base += 32 * kCopyUnroll) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < vectors) v[u] = __ldcg(src + i);
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < vectors) __stcg(dst + i, v[u]);
    }
  }
}

// One warp copies `bytes` (a multiple of 16) from local `src` to `dst` (an address of this PE's
// region, the same offset on `pe`). Returns true when it used a put (the caller quiets before signalling).
__device__ __forceinline__ bool warp_send(uint8_t* dst, const uint8_t* src, int64_t bytes, int pe, int lane) {
  uint8_t* peer = static_cast<uint8_t*>(nvshmem_ptr(dst, pe));
  if (peer != nullptr) {
    warp_copy(reinterpret_cast<int4*>(peer), reinterpret_cast<const int4*>(src), bytes / 16, lane);
    return false;
  }
  nvshmemx_putmem_nbi_warp(dst, src, static_cast<size_t>(bytes), pe);
  return true;
}

// The last block of a kernel to reach this point (per half and counter) gets true. Every thread of
// every block calls it; it fences this block's writes (system scope) and, for puts, quiets first.
__device__ __forceinline__ bool last_block(const LowLatencyContext& ctx, int half, int which, bool used_puts) {
  __shared__ int last;
  if (__syncthreads_or(used_puts ? 1 : 0)) nvshmem_quiet();
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* counter = done_counter(ctx, half, which);
    last = atomicAdd(counter, 1u) + 1u == gridDim.x ? 1 : 0;
    if (last) *reinterpret_cast<volatile uint32_t*>(counter) = 0u;
  }
  __syncthreads();
  if (last) __threadfence_system();
  return last != 0;
}

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// Smallest power of two >= v (v positive, normal): the reference's round_up_to_power_of_two.
__device__ __forceinline__ float round_up_pow2(float v) {
  uint32_t bits = __float_as_uint(v);
  if ((bits & 0x7FFFFFu) != 0u) bits = (bits & 0xFF800000u) + 0x800000u;
  return __uint_as_float(bits);
}

__device__ __forceinline__ uint32_t fp8_e4m3(float v) {
  return static_cast<uint32_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// The stage timer (LowLatencyStage): thread 0 of a block adds the ns since its last mark to `stage`
// of the block's row. Every thread may call it (the others do nothing); off when `row` is null.
__device__ __forceinline__ void stage_mark(int64_t* row, int stage, uint64_t& since) {
  if (row == nullptr || threadIdx.x != 0) return;
  const uint64_t now = global_timer_ns();
  row[stage] += static_cast<int64_t>(now - since);
  since = now;
}

// ------------------------------------------------------------------------------------- dispatch
__global__ void __launch_bounds__(kThreads, 1)
    low_latency_dispatch_kernel(LowLatencyContext ctx, LowLatencyDispatchArgs args, int phases) {
  extern __shared__ int topk_s[];  // [T * K] expert ids (-1: none), send phase only
  const LowLatencyShape& s = args.shape;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int T = s.num_tokens, K = s.num_topk, H = s.hidden, M = s.max_tokens, R = ctx.num_ranks;
  const int E = s.num_experts, El = s.num_local_experts;
  const int G = H / kFp8Block;
  const int64_t msg_bytes = ll_message_bytes(H, args.use_fp8);  // what moves
  const int64_t slot_stride = s.layout.message_bytes;           // slot size (bf16 message)
  const int64_t row_bytes = args.use_fp8 ? H : 2 * H;
  uint8_t* half = half_base(ctx, s);
  uint8_t* send = half;
  uint8_t* recv = half + s.layout.send_bytes;
  uint8_t* signals = half_signals(ctx, s);
  uint64_t* counts = reinterpret_cast<uint64_t*>(signals);                        // [E_l][R]
  int* scratch = reinterpret_cast<int*>(signals + s.layout.off_scratch);          // [E]
  int64_t* stage_row = args.stage_ns != nullptr ? args.stage_ns + static_cast<int64_t>(blockIdx.x) * kLLStageCount : nullptr;
  uint64_t stage_since = 0;
  if (stage_row != nullptr && threadIdx.x == 0) {
    stage_since = global_timer_ns();
    for (int i = 0; i < kLLStageCount; ++i) stage_row[i] = 0;
    stage_row[kLLStageStart] = static_cast<int64_t>(stage_since);
  }

  if (phases & kLLSend) {
    for (int i = threadIdx.x; i < T * K; i += blockDim.x) {
      const int64_t e = args.topk_idx[i];
      topk_s[i] = (e >= 0 && e < E) ? static_cast<int>(e) : -1;
      // The range check lives here (no host sync): ids outside [-1, E) are dropped and reported.
      if ((e < -1 || e >= E) && blockIdx.x == 0) ll_report(ctx, kLowLatencyBadExpertIds, ctx.rank, i / K, E, e);
    }
    __syncthreads();
    stage_mark(stage_row, kLLStageTopk, stage_since);
    // The batch's (token, k) pairs: where each one's slot is (byte offset in the receive region, and
    // its address on the destination rank when that rank is load/store reachable), -1 / null: none.
    __shared__ uint8_t* pair_peer_s[kLLSendBatchPairs];
    __shared__ int64_t pair_offset_s[kLLSendBatchPairs];
    __shared__ int pair_rank_s[kLLSendBatchPairs];
    bool used_puts = false;
    const int batch = kLLSendBatchPairs / K;  // tokens a batch takes (K <= kMaxTopk)
    const int mine = static_cast<int>(blockIdx.x) < T ? (T - 1 - static_cast<int>(blockIdx.x)) / gridDim.x + 1 : 0;
    // A unit is what one warp moves of a row: two 128-channel groups (FP8) or 32 vectors (bf16).
    const int row_vectors = static_cast<int>(row_bytes / 16);
    const int units = args.use_fp8 ? (G + 1) / 2 : (row_vectors + 31) / 32;
    for (int j0 = 0; j0 < mine; j0 += batch) {  // this block's tokens blockIdx.x + j * gridDim.x
      const int nb = min(batch, mine - j0);
      const auto token_of = [&](int j) { return static_cast<int>(blockIdx.x) + (j0 + j) * static_cast<int>(gridDim.x); };
      // 1. One warp per pair: its slot, the pairs before it in (token, k) order with the same expert
      //    (every lane counts the same ballots; lanes at or past p vote no).
      int need_put = 0;
      for (int q = warp; q < nb * K; q += kLLWarpsPerBlock) {
        const int p = token_of(q / K) * K + q % K;
        const int e = topk_s[p];
        int slot = -1, dst = -1;
        int64_t offset = -1;
        uint8_t* peer = nullptr;
        if (e >= 0) {
          slot = 0;
          for (int base = 0; base < p; base += 32) {
            const int r = base + lane;
            slot += __popc(__ballot_sync(0xFFFFFFFFu, r < p && topk_s[r] == e));
          }
          dst = e / El;
          if (slot >= M) {
            if (lane == 0) ll_report(ctx, kLowLatencySlotOverflow, dst, e, M, slot + 1);
            slot = -1;
          } else {
            offset = ((static_cast<int64_t>(e % El) * R + ctx.rank) * M + slot) * slot_stride;
            peer = static_cast<uint8_t*>(nvshmem_ptr(recv + offset, dst));
            if (lane == 0) atomicAdd(scratch + e, 1);
          }
        }
        if (lane == 0) {
          args.pair_slot[p] = slot;
          pair_peer_s[q] = peer;
          pair_offset_s[q] = offset;
          pair_rank_s[q] = dst;
        }
        need_put |= (offset >= 0 && peer == nullptr) ? 1 : 0;
      }
      const bool puts = __syncthreads_or(need_put) != 0;  // block-uniform: stage the batch's messages
      stage_mark(stage_row, kLLStagePairs, stage_since);
      // 2. Every warp takes units of the batch's rows and stores each straight into every reachable
      //    slot of its token (no staging pass, no block barrier in between); the next unit's load is
      //    issued before this unit's stores (they may alias it as far as the compiler knows).
      const int items = nb * units;
      const auto load_unit = [&](int item) {
        const int j = item / units, u = item % units;
        const int4* row = reinterpret_cast<const int4*>(args.x + static_cast<int64_t>(token_of(j)) * H);
        if (args.use_fp8) {
          const int g = u * 2 + lane / 16;
          return g < G ? ld_input_int4(row + (g * kFp8Block + (lane % 16) * 8) / 8) : make_int4(0, 0, 0, 0);
        }
        const int v = u * 32 + lane;
        return v < row_vectors ? ld_input_int4(row + v) : make_int4(0, 0, 0, 0);
      };
      int4 next = warp < items ? load_unit(warp) : make_int4(0, 0, 0, 0);
      for (int item = warp; item < items; item += kLLWarpsPerBlock) {
        const int4 v = next;
        if (item + kLLWarpsPerBlock < items) next = load_unit(item + kLLWarpsPerBlock);
        const int j = item / units, u = item % units;
        uint8_t* const* peers = pair_peer_s + j * K;
        uint8_t* staged = send + static_cast<int64_t>(token_of(j)) * msg_bytes;
        if (args.use_fp8) {
          // Half-warp h casts group 2u + h, 8 channels a lane; the group's amax over its 16 lanes.
          const int g = u * 2 + lane / 16;
          const int c = g * kFp8Block + (lane % 16) * 8;
          const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                                 static_cast<uint32_t>(v.w)};
          float f[8];
          float amax = 0.0f;
          for (int i = 0; i < 4; ++i) {
            f[2 * i] = bf16_bits_to_float(w[i] & 0xFFFFu);
            f[2 * i + 1] = bf16_bits_to_float(w[i] >> 16);
            amax = fmaxf(amax, fmaxf(fabsf(f[2 * i]), fabsf(f[2 * i + 1])));
          }
          for (int m = 8; m >= 1; m /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, m));
          // amax * (1 / 448), not amax / 448: the reference's `amax / 448.0` on a CUDA tensor is a
          // multiplication by the scalar's fp32 reciprocal in PyTorch (measured: division differs).
          float scale = fmaxf(amax, 1e-4f) * (1.0f / 448.0f);
          if (args.round_scale || args.use_ue8m0) scale = round_up_pow2(scale);
          if (g < G) {
            uint32_t lo = 0, hi = 0;
            for (int i = 0; i < 4; ++i) {
              lo |= fp8_e4m3(fminf(fmaxf(f[i] / scale, -448.0f), 448.0f)) << (8 * i);
              hi |= fp8_e4m3(fminf(fmaxf(f[4 + i] / scale, -448.0f), 448.0f)) << (8 * i);
            }
            const uint2 codes = make_uint2(lo, hi);
            for (int k = 0; k < K; ++k) {
              uint8_t* peer = peers[k];
              if (peer == nullptr) continue;
              __stcg(reinterpret_cast<uint2*>(peer + kLLHeaderBytes + c), codes);
              if (lane % 16 == 0) __stcg(reinterpret_cast<float*>(peer + kLLHeaderBytes + H) + g, scale);
            }
            if (puts) {
              __stcg(reinterpret_cast<uint2*>(staged + kLLHeaderBytes + c), codes);
              if (lane % 16 == 0) __stcg(reinterpret_cast<float*>(staged + kLLHeaderBytes + H) + g, scale);
            }
          }
        } else {
          const int i = u * 32 + lane;
          if (i < row_vectors) {
            for (int k = 0; k < K; ++k) {
              if (peers[k] != nullptr) __stcg(reinterpret_cast<int4*>(peers[k] + kLLHeaderBytes) + i, v);
            }
            if (puts) __stcg(reinterpret_cast<int4*>(staged + kLLHeaderBytes) + i, v);
          }
        }
      }
      // 3. Headers (the source token index), one thread per pair; then the puts of the batch's pairs
      //    whose rank is not load/store reachable, from the staged messages (one warp per pair).
      for (int q = threadIdx.x; q < nb * K; q += blockDim.x) {
        if (pair_peer_s[q] != nullptr) __stcg(reinterpret_cast<int4*>(pair_peer_s[q]), make_int4(token_of(q / K), 0, 0, 0));
      }
      if (puts) {
        for (int j = threadIdx.x; j < nb; j += blockDim.x) {
          __stcg(reinterpret_cast<int4*>(send + static_cast<int64_t>(token_of(j)) * msg_bytes), make_int4(token_of(j), 0, 0, 0));
        }
        __syncthreads();  // the staged messages are complete (block-visible)
        for (int q = warp; q < nb * K; q += kLLWarpsPerBlock) {
          if (pair_offset_s[q] < 0 || pair_peer_s[q] != nullptr) continue;
          nvshmemx_putmem_nbi_warp(recv + pair_offset_s[q], send + static_cast<int64_t>(token_of(q / K)) * msg_bytes,
                                   static_cast<size_t>(msg_bytes), pair_rank_s[q]);
          used_puts = true;
        }
      }
      __syncthreads();  // the pair tables are rewritten by the next batch
      stage_mark(stage_row, kLLStageStores, stage_since);
    }
    if (last_block(ctx, s.half, kCounterDispatchSend, used_puts)) {
      for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const int n = atomicExch(scratch + e, 0);
        put_signal(counts + static_cast<int64_t>(e % El) * R + ctx.rank, static_cast<uint64_t>(n) + 1u, e / El);
      }
    }
    stage_mark(stage_row, kLLStageSignal, stage_since);
  }

  if (phases & kLLRecv) {
    __shared__ int count_s[kLLMaxRanks];
    __shared__ int offset_s[kLLMaxRanks + 1];
    const int S = R * M;
    const int W = (G + 3) / 4;
    const int parts = gridDim.x >= static_cast<unsigned>(El) ? gridDim.x / El : 1;
    const int owned = El * parts;  // (expert, part) work items; blocks past them only count themselves done
    for (int item = blockIdx.x; item < owned; item += gridDim.x) {
      const int le = item % El, part = item / El;
      for (int r = threadIdx.x; r < R; r += blockDim.x) {
        int64_t waited = 0;
        const uint64_t v = wait_signal(ctx, counts + static_cast<int64_t>(le) * R + r, kWaitLowLatencyDispatch, r, le,
                                       args.wait_stats != nullptr ? &waited : nullptr);
        count_s[r] = v == 0 ? 0 : static_cast<int>(v - 1);
        if (args.wait_stats != nullptr && waited > 0) {
          atomicAdd(reinterpret_cast<unsigned long long*>(args.wait_stats + r), static_cast<unsigned long long>(waited));
        }
      }
      __syncthreads();
      stage_mark(stage_row, kLLStageRecvWait, stage_since);
      if (threadIdx.x == 0) {
        int running = 0;
        for (int r = 0; r < R; ++r) {
          offset_s[r] = running;
          running += count_s[r];
        }
        offset_s[R] = running;
      }
      __syncthreads();
      const int total = offset_s[R];
      if (part == 0) {
        for (int r = threadIdx.x; r < R; r += blockDim.x) {
          args.recv_layout_range[static_cast<int64_t>(le) * R + r] =
              (static_cast<int64_t>(offset_s[r]) << 32) | static_cast<int64_t>(count_s[r]);
        }
        if (threadIdx.x == 0) args.recv_count[le] = total;
        for (int j = total + threadIdx.x; j < S; j += blockDim.x) args.recv_src_info[static_cast<int64_t>(le) * S + j] = -1;
      }
      for (int j = part * kLLWarpsPerBlock + warp; j < total; j += parts * kLLWarpsPerBlock) {
        int src = 0;
        while (src + 1 < R && offset_s[src + 1] <= j) ++src;
        const int i = j - offset_s[src];
        const uint8_t* msg = recv + ((static_cast<int64_t>(le) * R + src) * M + i) * slot_stride;
        const int64_t out_row = static_cast<int64_t>(le) * S + j;
        if (lane == 0) args.recv_src_info[out_row] = __ldcg(reinterpret_cast<const int*>(msg));
        warp_copy(reinterpret_cast<int4*>(args.recv_x + out_row * row_bytes),
                  reinterpret_cast<const int4*>(msg + kLLHeaderBytes), row_bytes / 16, lane);
        if (args.use_fp8) {
          const float* scales = reinterpret_cast<const float*>(msg + kLLHeaderBytes + H);
          if (args.use_ue8m0) {
            for (int w = lane; w < W; w += 32) {
              uint32_t word = 0;
              for (int b = 0; b < 4; ++b) {
                const int g = 4 * w + b;
                if (g < G) word |= ((__float_as_uint(__ldcg(scales + g)) >> 23) & 0xFFu) << (8 * b);
              }
              args.recv_scales_packed[(static_cast<int64_t>(le) * W + w) * S + j] = static_cast<int32_t>(word);
            }
          } else {
            for (int g = lane; g < G; g += 32) args.recv_scales[(static_cast<int64_t>(le) * G + g) * S + j] = __ldcg(scales + g);
          }
        }
      }
      __syncthreads();  // count_s / offset_s are rewritten by the next item
      stage_mark(stage_row, kLLStageRecvCopy, stage_since);
    }
    if (last_block(ctx, s.half, kCounterDispatchRecv, false)) {
      for (int i = threadIdx.x; i < El * R; i += blockDim.x) reinterpret_cast<volatile uint64_t*>(counts)[i] = 0;
    }
    stage_mark(stage_row, kLLStageRecvCopy, stage_since);
  }
  if (stage_row != nullptr && threadIdx.x == 0) stage_row[kLLStageEnd] = static_cast<int64_t>(global_timer_ns());
}

// ------------------------------------------------------------------------------------- combine
__global__ void __launch_bounds__(kThreads, 1)
    low_latency_combine_kernel(LowLatencyContext ctx, LowLatencyCombineArgs args, int phases) {
  const LowLatencyShape& s = args.shape;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int T = s.num_tokens, K = s.num_topk, H = s.hidden, M = s.max_tokens, R = ctx.num_ranks;
  const int El = s.num_local_experts;
  const int S = R * M;
  const int64_t row_bytes = 2 * static_cast<int64_t>(H);
  uint8_t* half = half_base(ctx, s);
  uint8_t* send = half;
  uint8_t* recv = half + s.layout.send_bytes;
  uint64_t* flags = reinterpret_cast<uint64_t*>(half_signals(ctx, s) + s.layout.off_flags);  // [R]

  // One launch that sends and receives reads this rank's own rows straight from x in the receive
  // (x is unchanged in between): they are neither copied into the receive region nor read back from
  // it. A hooked combine copies them, since x may change before the hook.
  const bool own_rows_from_x = (phases & kLLSend) && (phases & kLLRecv);
  if (phases & kLLSend) {
    __shared__ int count_s[kLLMaxRanks];
    __shared__ int offset_s[kLLMaxRanks + 1];
    bool used_puts = false;
    const bool zero_copy = reinterpret_cast<const uint8_t*>(args.x) == send;
    const int parts = gridDim.x >= static_cast<unsigned>(El) ? gridDim.x / El : 1;
    const int owned = El * parts;
    for (int item = blockIdx.x; item < owned; item += gridDim.x) {
      const int le = item % El, part = item / El;
      for (int r = threadIdx.x; r < R; r += blockDim.x) {
        const int64_t range = args.recv_layout_range[static_cast<int64_t>(le) * R + r];
        count_s[r] = static_cast<int>(range & 0xFFFFFFFFll);
        offset_s[r] = static_cast<int>(range >> 32);
      }
      __syncthreads();
      // The expert's rows are contiguous by source rank (offset_s): one warp per row, over all of
      // them, so that the block's warps stay busy whatever the split between source ranks.
      const int total = offset_s[R - 1] + count_s[R - 1];
      for (int j = part * kLLWarpsPerBlock + warp; j < total; j += parts * kLLWarpsPerBlock) {
        int r = 0;
        while (r + 1 < R && offset_s[r + 1] <= j) ++r;
        if (own_rows_from_x && r == ctx.rank) continue;
        const int i = j - offset_s[r];
        const int64_t local_row = static_cast<int64_t>(le) * S + j;
        const uint8_t* src = reinterpret_cast<const uint8_t*>(args.x) + local_row * row_bytes;
        uint8_t* dst = recv + (static_cast<int64_t>(ctx.rank * El + le) * M + i) * row_bytes;
        if (nvshmem_ptr(dst, r) == nullptr && !zero_copy) {
          // A put reads symmetric memory: stage the row in this half's send region first.
          uint8_t* staged = send + local_row * row_bytes;
          for (int64_t v = lane; v < row_bytes / 16; v += 32) {
            __stcg(reinterpret_cast<int4*>(staged) + v, ld_input_int4(reinterpret_cast<const int4*>(src) + v));
          }
          __syncwarp();
          src = staged;
        }
        used_puts |= warp_send(dst, src, row_bytes, r, lane);
      }
      __syncthreads();
    }
    if (last_block(ctx, s.half, kCounterCombineSend, used_puts)) {
      for (int r = threadIdx.x; r < R; r += blockDim.x) put_signal(flags + ctx.rank, 1u, r);
    }
  }

  if (phases & kLLRecv) {
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
      int64_t waited = 0;
      wait_signal(ctx, flags + r, kWaitLowLatencyCombine, r, -1, args.wait_stats != nullptr ? &waited : nullptr);
      if (args.wait_stats != nullptr && waited > 0) {
        atomicAdd(reinterpret_cast<unsigned long long*>(args.wait_stats + r), static_cast<unsigned long long>(waited));
      }
    }
    __syncthreads();
    // One warp per (token, chunk of 64 vectors = 512 channels): every warp of the grid has work, and
    // each step issues the loads of kGroup top-k rows before it sums them (k ascending, as the reference).
    const int warps = gridDim.x * kLLWarpsPerBlock;
    const int vectors = H / 8;  // 8 bf16 per 16-byte vector
    constexpr int kChunk = 64, kGroup = 8;
    const int chunks = (vectors + kChunk - 1) / kChunk;
    for (int task = blockIdx.x * kLLWarpsPerBlock + warp; task < T * chunks; task += warps) {
      const int t = task / chunks, chunk = task % chunks;
      // Lane k < K: the address of pair k's row (0: none), in the receive region or (own rows) in x.
      unsigned long long my_row = 0ull;
      float my_w = 0.0f;
      if (lane < K) {
        const int64_t e = args.topk_idx[static_cast<int64_t>(t) * K + lane];
        const int slot = args.pair_slot[static_cast<int64_t>(t) * K + lane];
        my_w = args.topk_weights[static_cast<int64_t>(t) * K + lane];
        if (e >= 0 && e < s.num_experts && slot >= 0 && slot < M) {
          const int le = static_cast<int>(e % El);
          const uint8_t* row = recv + (e * M + slot) * row_bytes;
          if (own_rows_from_x && e / El == ctx.rank) {
            const int64_t first = args.recv_layout_range[static_cast<int64_t>(le) * R + ctx.rank] >> 32;
            row = reinterpret_cast<const uint8_t*>(args.x) + (static_cast<int64_t>(le) * S + first + slot) * row_bytes;
          }
          my_row = reinterpret_cast<unsigned long long>(row);
        }
      }
      const int v0 = chunk * kChunk + lane, v1 = v0 + 32;
      const bool a0 = v0 < vectors, a1 = v1 < vectors;
      float acc[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) acc[i] = 0.0f;
      for (int k0 = 0; k0 < K; k0 += kGroup) {
        int4 y[kGroup][2];
        float w[kGroup];
        bool use[kGroup];
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          const int k = k0 + g;  // < 32: lanes >= K hold no row
          const unsigned long long address = __shfl_sync(0xFFFFFFFFu, my_row, k);
          w[g] = __shfl_sync(0xFFFFFFFFu, my_w, k);
          use[g] = k < K && address != 0ull;
          y[g][0] = y[g][1] = make_int4(0, 0, 0, 0);
          if (use[g]) {
            const int4* row = reinterpret_cast<const int4*>(address);
            if (a0) y[g][0] = __ldcg(row + v0);
            if (a1) y[g][1] = __ldcg(row + v1);
          }
        }
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          if (!use[g]) continue;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t words[4] = {static_cast<uint32_t>(y[g][h].x), static_cast<uint32_t>(y[g][h].y),
                                       static_cast<uint32_t>(y[g][h].z), static_cast<uint32_t>(y[g][h].w)};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              float* a = acc + 8 * h + 2 * i;
              a[0] = __fadd_rn(a[0], __fmul_rn(w[g], bf16_bits_to_float(words[i] & 0xFFFFu)));
              a[1] = __fadd_rn(a[1], __fmul_rn(w[g], bf16_bits_to_float(words[i] >> 16)));
            }
          }
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (!(h == 0 ? a0 : a1)) continue;
        uint32_t packed[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(acc[8 * h + 2 * i]));
          const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(acc[8 * h + 2 * i + 1]));
          packed[i] = lo | (hi << 16);
        }
        reinterpret_cast<int4*>(args.combined + static_cast<int64_t>(t) * H)[h == 0 ? v0 : v1] =
            make_int4(static_cast<int>(packed[0]), static_cast<int>(packed[1]), static_cast<int>(packed[2]),
                      static_cast<int>(packed[3]));
      }
    }
    if (last_block(ctx, s.half, kCounterCombineRecv, false)) {
      for (int r = threadIdx.x; r < R; r += blockDim.x) reinterpret_cast<volatile uint64_t*>(flags)[r] = 0;
    }
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("deepep_megatron._C: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

void launch_low_latency_dispatch(const LowLatencyContext& ctx, const LowLatencyDispatchArgs& args, int phases,
                                 int num_blocks, cudaStream_t stream) {
  const size_t smem = (phases & kLLSend) ? sizeof(int) * static_cast<size_t>(args.shape.num_tokens) * args.shape.num_topk : 0;
  low_latency_dispatch_kernel<<<num_blocks, kThreads, smem, stream>>>(ctx, args, phases);
  check(cudaGetLastError(), "low-latency dispatch launch");
}

void launch_low_latency_combine(const LowLatencyContext& ctx, const LowLatencyCombineArgs& args, int phases,
                                int num_blocks, cudaStream_t stream) {
  low_latency_combine_kernel<<<num_blocks, kThreads, 0, stream>>>(ctx, args, phases);
  check(cudaGetLastError(), "low-latency combine launch");
}

}  // namespace deepep_megatron
