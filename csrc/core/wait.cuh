// Bounded waits on peers and the cross-rank barrier. A wait that runs past ctx.timeout_ns, or a
// barrier whose peer is in another operation, records a Diagnostic (host-mapped) and raises this
// rank's abort word; every later wait and kernel of this rank sees the abort and stops, so one
// error never becomes a hang. The host reads the diagnostic; reset() clears both.
#pragma once

#include "context.h"
#include "diagnostic.cuh"
#include "ptx.cuh"

namespace deepep_megatron {

// Record the first device-detected error of this rank (record_error, diagnostic.cuh).
static __device__ __forceinline__ void report_error(const PeerContext& ctx, int code, int peer, int channel,
                                                    int64_t expected, int64_t seen, const int32_t* mine = nullptr,
                                                    const volatile int32_t* theirs = nullptr) {
  record_error(at<uint32_t>(ctx.buffers[ctx.rank], kOffAbort), ctx.diagnostic, code, ctx.rank, peer, channel, expected,
               seen, mine, theirs);
}

__device__ __forceinline__ bool aborted(const PeerContext& ctx) {
  return ld_volatile(at<uint32_t>(ctx.buffers[ctx.rank], kOffAbort)) != 0u;
}

// Spin until the counter at `p` reaches `target` (wrap-safe: (int)(value - target) >= 0).
// Returns false after reporting a timeout, or on seeing this rank's abort.
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
        report_error(ctx, code, peer, channel, target, value);
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


// Cross-rank barrier with the operation's fingerprint, called by EVERY thread of one block.
// The epoch is this rank's device word (bumped here), so graph replays need no host counter.
// Thread s < R writes its signal {fingerprint, published block, epoch} into slot [epoch & 1][me] of
// peer s's buffer and waits for peer s's signal in its own slot [epoch & 1][s]; two parities,
// because a fast peer may already signal the next barrier before this rank has read the current
// one. With blocks.exchange, once peer s's signal is in, thread s copies the receive block peer s
// published into kOffReceiveBlocks[s] (the senders of the dispatch this barrier opens read it there). Returns false
// (on every thread) after a timeout, a fingerprint mismatch, or when this rank was aborted.
__device__ __forceinline__ bool cross_rank_barrier(const PeerContext& ctx, const Fingerprint& fp,
                                                   const BlockExchange blocks = kNoExchange) {
  __shared__ uint32_t epoch;
  __shared__ int ok;
  uint32_t* epoch_word = at<uint32_t>(ctx.buffers[ctx.rank], kOffEpoch);
  if (threadIdx.x == 0) {
    epoch = ld_volatile(epoch_word) + 1u;
    ok = aborted(ctx) ? 0 : 1;
  }
  __syncthreads();
  const int peer = static_cast<int>(threadIdx.x);
  if (ok && peer < ctx.num_ranks) {
    const size_t parity = (epoch & 1u) * kMaxRanks;
    BarrierSignal* out = at<BarrierSignal>(ctx.buffers[peer], kOffBarrier) + parity + ctx.rank;
    for (int i = 0; i < kFingerprintWords; ++i) reinterpret_cast<volatile int32_t*>(out->fingerprint)[i] = fp.words[i];
    reinterpret_cast<volatile int64_t*>(&out->block)[0] = blocks.block.offset;
    reinterpret_cast<volatile int64_t*>(&out->block)[1] = blocks.block.rows;
    __threadfence_system();  // everything this block wrote before the barrier is visible first
    st_release_sys(&out->epoch, epoch);
    BarrierSignal* in = at<BarrierSignal>(ctx.buffers[ctx.rank], kOffBarrier) + parity + peer;
    uint32_t seen;
    if (!wait_counter(ctx, &in->epoch, epoch, kWaitBarrier, peer, -1, seen)) {
      ok = 0;
    } else {
      const volatile int32_t* theirs = in->fingerprint;
      for (int i = 0; i < kFingerprintWords; ++i) {
        if (theirs[i] != fp.words[i]) {
          report_error(ctx, kFingerprintMismatch, peer, -1, fp.words[i], theirs[i], fp.words, theirs);
          ok = 0;
          break;
        }
      }
      if (blocks.exchange) {
        volatile int64_t* copy =
            reinterpret_cast<volatile int64_t*>(at<ReceiveBlock>(ctx.buffers[ctx.rank], kOffReceiveBlocks) + peer);
        copy[0] = reinterpret_cast<const volatile int64_t*>(&in->block)[0];
        copy[1] = reinterpret_cast<const volatile int64_t*>(&in->block)[1];
        __threadfence();  // before the go word that thread 0 publishes after this barrier
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && ok) *reinterpret_cast<volatile uint32_t*>(epoch_word) = epoch;
  const bool passed = ok != 0;
  __syncthreads();  // `ok` and `epoch` are rewritten by the next barrier of this block
  return passed;
}

// The go word (kOffGo): the verdict of the barrier that opens the running data kernel, written by
// notify after its first barrier (a dispatch launched behind it) or by block 0 of a kernel that
// carries its own barrier (fused_barrier); the kernel's last block (finish_block) resets it to 0.
constexpr uint32_t kGoPassed = 1u;
constexpr uint32_t kGoFailed = 2u;
constexpr uint32_t kGoNotified = 3u;  // passed, and (kFusedNotify) the kernel's notify block wrote its outputs

__device__ __forceinline__ void publish_go(const PeerContext& ctx, bool passed) {
  st_release_sys(at<uint32_t>(ctx.buffers[ctx.rank], kOffGo), passed ? kGoPassed : kGoFailed);
}

// Called by EVERY thread of a block: wait (thread 0, bounded by twice the timeout so that the
// barrier's own timeout is the one reported) until the go word holds a verdict. Returns whether it
// passed, on every thread.
__device__ __forceinline__ bool wait_go(const PeerContext& ctx) {
  __shared__ int passed;
  if (threadIdx.x == 0) {
    const uint32_t* go = at<uint32_t>(ctx.buffers[ctx.rank], kOffGo);
    const uint64_t start = global_timer_ns();
    uint32_t verdict = ld_acquire_sys(go);
    for (uint32_t iter = 1; verdict == 0u; ++iter) {
      if ((iter & 63u) == 0u && (aborted(ctx) || global_timer_ns() - start > 2 * ctx.timeout_ns)) {
        report_error(ctx, kWaitBarrier, ctx.rank, -1, kGoPassed, 0);  // the barrier never got through
        break;
      }
      verdict = ld_acquire_sys(go);
    }
    passed = verdict != kGoFailed ? 1 : 0;  // kGoPassed, or already kGoNotified
  }
  __syncthreads();
  const bool ok = passed != 0;
  __syncthreads();  // `passed` is rewritten by the next wait of this block
  return ok;
}

// Called by any thread of a kernel whose own notify block publishes kGoNotified (kFusedNotify), before
// it reads what notify computes: spin (acquire, so this thread sees notify's outputs) until then.
// False when this rank was aborted first (notify stopped early or refused the input) or after twice
// the timeout (the notify block never ran: a diagnostic names the wait).
// Not inlined (ctx copied): the kernels that never fuse notify keep their registers.
static __device__ __noinline__ bool wait_notified(const PeerContext ctx) {
  const uint32_t* go = at<uint32_t>(ctx.buffers[ctx.rank], kOffGo);
  const uint64_t start = global_timer_ns();
  for (uint32_t iter = 1;; ++iter) {
    if (ld_acquire_sys(go) == kGoNotified) return true;
    if ((iter & 63u) == 0u) {
      if (aborted(ctx)) return false;
      if (global_timer_ns() - start > 2 * ctx.timeout_ns) {
        report_error(ctx, kWaitBarrier, ctx.rank, -1, kGoNotified, 0);
        return false;
      }
    }
    __nanosleep(64);
  }
}

// The barrier a data kernel carries itself (a cached dispatch, a combine: one launch instead of a
// barrier kernel and the data kernel), called by EVERY thread of every block before any of them
// touches a peer: block 0 runs cross_rank_barrier and publishes its verdict in the go word, the
// other blocks wait for it (the receive blocks the peers published are in kOffReceiveBlocks then).
// Returns whether the barrier passed. `fp` is taken by value: a reference
// into the kernel's argument struct would make the compiler copy that whole struct to local memory
// (the barrier's error report takes the fingerprint's address), which slows every later access.
__device__ __forceinline__ bool fused_barrier(const PeerContext& ctx, const Fingerprint fp,
                                              const BlockExchange blocks = kNoExchange) {
  if (blockIdx.x != 0) return wait_go(ctx);
  const bool ok = cross_rank_barrier(ctx, fp, blocks);
  if (threadIdx.x == 0) publish_go(ctx, ok);
  return ok;
}

}  // namespace deepep_megatron

namespace deepep_megatron {

// Called by EVERY thread of every block at the very end of a data kernel (dispatch, combine; their
// bodies return into it). The last block to finish resets the done counter and the go word for the
// next kernel and, when this rank was aborted before or during the operation, overwrites every
// output region with 0xFF bytes (NaN for floats, -1 for ints), so no plausible data survives a
// failed operation.
template <typename PoisonList>
__device__ __forceinline__ void finish_block(const PeerContext& ctx, const PoisonList& poison) {
  __shared__ int last;
  __syncthreads();
  uint32_t* done = at<uint32_t>(ctx.buffers[ctx.rank], kOffDoneCounter);
  if (threadIdx.x == 0) {
    __threadfence();  // this block's abort report (if any) before its count
    last = atomicAdd(done, 1u) + 1u == gridDim.x ? 1 : 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (threadIdx.x == 0) {
    *reinterpret_cast<volatile uint32_t*>(done) = 0u;
    *reinterpret_cast<volatile uint32_t*>(at<uint32_t>(ctx.buffers[ctx.rank], kOffGo)) = 0u;  // for the next kernel
  }
  if (!aborted(ctx)) return;
  const int4 fill = make_int4(-1, -1, -1, -1);
  for (int r = 0; r < poison.count; ++r) {
    uint8_t* data = poison.data[r];
    const int64_t vectors = poison.bytes[r] / 16;  // torch allocations are 16-byte aligned
    for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) reinterpret_cast<int4*>(data)[i] = fill;
    for (int64_t i = vectors * 16 + threadIdx.x; i < poison.bytes[r]; i += blockDim.x) data[i] = 0xFF;
  }
}

}  // namespace deepep_megatron
