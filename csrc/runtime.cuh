// Device-side runtime of the intranode kernels: the layout of the NVLink (CUDA IPC) buffer, the
// memory-ordering primitives, and the bounded spin-wait that turns a missing peer into a diagnostic.
//
// ---------------------------------------------------------------------------------------------
// NVLink buffer of ONE rank (num_nvl_bytes, cudaMalloc'ed, zeroed once, mapped by every peer):
//
//   offset                 what                                        written by -> read by
//   kOffBarrier            u32 barrier_signal[kMaxRanks]                 peer s (remote) -> me
//   kOffNotifyChannel      i32 notify_channel_count[kMaxRanks][kMaxChannels]
//                          tokens peer s sends me in channel c           peer s (remote) -> me
//   kOffNotifyExpert       i32 notify_expert_count[kMaxRanks][kMaxLocalExperts]
//                          top-k hits of peer s on each of my experts    peer s (remote) -> me
//   kOffRingTail           u32 ring_tail[kMaxChannels][kMaxRanks]        sender s (remote) -> me (receiver)
//   kOffRingHead           u32 ring_head[kMaxChannels][kMaxRanks]        receiver d (remote) -> me (sender)
//   kOffTailShadow         u32 tail_shadow[kMaxChannels][kMaxRanks]      me -> me (last tail I wrote to d)
//   kOffHeadShadow         u32 head_shadow[kMaxChannels][kMaxRanks]      me -> me (last head I wrote to s)
//   kOffAbort              u32 abort word (first timeout of this rank)   me -> me
//   kOffNotifyFlags        i32 notify_flags[kMaxRanks]: 1 when peer s's topk_idx had ids outside
//                          [-1, num_experts) in the current notify    peer s (remote) -> me
//   kControlBytes ..       rings: ring(c, s) = slots [num_slots] of slot_bytes each, for
//                          c in [0, num_channels), s in [0, num_ranks); ring (c, s) of rank d
//                          carries channel c of sender s to receiver d.
//
// Counters are monotonic u32 that are never reset: a ring position is (counter - base) % num_slots
// where base is the counter value at the start of the call. Every dispatch/combine starts after a
// cross-rank barrier, so at that point every ring is drained (head == tail) and sender and receiver
// agree on the base: the sender takes it from its tail_shadow, the receiver from its head_shadow.
// ---------------------------------------------------------------------------------------------
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cstdint>

#include "api.h"

namespace deepep_megatron {

constexpr size_t kOffBarrier = 0;
constexpr size_t kOffNotifyChannel = 256;
constexpr size_t kOffNotifyExpert = kOffNotifyChannel + sizeof(int) * kMaxRanks * kMaxChannels;
constexpr size_t kOffRingTail = kOffNotifyExpert + sizeof(int) * kMaxRanks * kMaxLocalExperts;
constexpr size_t kOffRingHead = kOffRingTail + sizeof(uint32_t) * kMaxChannels * kMaxRanks;
constexpr size_t kOffTailShadow = kOffRingHead + sizeof(uint32_t) * kMaxChannels * kMaxRanks;
constexpr size_t kOffHeadShadow = kOffTailShadow + sizeof(uint32_t) * kMaxChannels * kMaxRanks;
constexpr size_t kOffAbort = kOffHeadShadow + sizeof(uint32_t) * kMaxChannels * kMaxRanks;
constexpr size_t kOffNotifyFlags = kOffAbort + 128;
static_assert(kOffNotifyFlags + sizeof(int) * kMaxRanks <= kControlBytes, "control region overflows kControlBytes");

// What waited on a peer and timed out (codes stored in Diagnostic::code).
enum WaitCode : int {
  kWaitBarrier = 1,          // barrier: waited for the peer's barrier signal
  kWaitDispatchSpace = 2,    // dispatch sender: waited for free slots (peer's ring_head)
  kWaitDispatchData = 3,     // dispatch receiver: waited for tokens (peer's ring_tail)
  kWaitCombineSpace = 4,     // combine sender: waited for free slots
  kWaitCombineData = 5,      // combine receiver: waited for rows
};

template <typename T>
__device__ __forceinline__ T* at(uint8_t* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_volatile(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Read-only input (never written during the kernel): non-coherent path, no L1 allocation.
__device__ __forceinline__ int4 ld_input_int4(const int4* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Ring slots are rewritten by peers from lap to lap: read them at L2 (never a stale L1 line).
__device__ __forceinline__ int4 ld_ring_int4(const int4* p) { return __ldcg(p); }

__device__ __forceinline__ void st_ring_int4(int4* p, const int4& v) { __stcg(p, v); }

// Named barrier for a group of warps of one block (id 1..15; 0 is __syncthreads).
__device__ __forceinline__ void group_barrier(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

// Record the first timeout of this rank: the device abort word elects one reporter, which fills
// the host-mapped diagnostic and raises its flag last.
static __device__ __noinline__ void report_timeout(const PeerContext& ctx, int code, int peer, int channel, uint32_t expected,
                                            uint32_t seen) {
  uint32_t* abort_word = at<uint32_t>(ctx.buffers[ctx.rank], kOffAbort);
  if (atomicCAS(abort_word, 0u, 1u) == 0u) {
    volatile Diagnostic* d = ctx.diagnostic;
    d->code = code;
    d->rank = ctx.rank;
    d->peer = peer;
    d->channel = channel;
    d->expected = static_cast<int64_t>(expected);
    d->seen = static_cast<int64_t>(seen);
    d->block = static_cast<int>(blockIdx.x);
    __threadfence_system();
    d->flag = 1;
    __threadfence_system();
  }
}

__device__ __forceinline__ bool aborted(const PeerContext& ctx) {
  return ld_volatile(at<uint32_t>(ctx.buffers[ctx.rank], kOffAbort)) != 0u;
}

// Spin until the counter at `p` reaches `target` (wrap-safe: (int)(value - target) >= 0).
// Returns the value seen, or reports a timeout / sees another thread's abort and returns false.
__device__ __forceinline__ bool wait_counter(const PeerContext& ctx, const uint32_t* p, uint32_t target, int code,
                                             int peer, int channel, uint32_t& value) {
  value = ld_acquire_sys(p);
  if (static_cast<int32_t>(value - target) >= 0) return true;
  const uint64_t start = global_timer_ns();
  for (uint32_t iter = 1;; ++iter) {
    value = ld_acquire_sys(p);
    if (static_cast<int32_t>(value - target) >= 0) return true;
    if ((iter & 63u) == 0u) {
      if (aborted(ctx)) return false;
      if (global_timer_ns() - start > ctx.timeout_ns) {
        report_timeout(ctx, code, peer, channel, target, value);
        return false;
      }
    }
  }
}

// Channel c owns tokens [begin, end) of a rank's T tokens (contiguous slices).
__device__ __forceinline__ void channel_range(int num_tokens, int num_channels, int channel, int& begin, int& end) {
  const int per = (num_tokens + num_channels - 1) / num_channels;
  begin = min(channel * per, num_tokens);
  end = min(begin + per, num_tokens);
}

// Threads 0..R-1 of the calling block each signal one peer and wait for that peer's signal.
// Returns false (for the calling thread) on a timeout. The caller syncs the block afterwards.
__device__ __forceinline__ bool cross_rank_barrier(const PeerContext& ctx, uint32_t epoch) {
  const int peer = static_cast<int>(threadIdx.x);
  if (peer >= ctx.num_ranks) return true;
  __threadfence_system();  // everything this block wrote before the barrier is visible first
  st_release_sys(at<uint32_t>(ctx.buffers[peer], kOffBarrier + sizeof(uint32_t) * ctx.rank), epoch);
  uint32_t seen;
  return wait_counter(ctx, at<uint32_t>(ctx.buffers[ctx.rank], kOffBarrier + sizeof(uint32_t) * peer), epoch,
                      kWaitBarrier, peer, -1, seen);
}

}  // namespace deepep_megatron
