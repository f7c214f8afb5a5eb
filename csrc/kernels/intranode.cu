// Intranode normal kernels: notify, dispatch, combine over CUDA IPC (NVLink between GPUs, or the
// same HBM when several ranks share one GPU under MPS).
//
// ---------------------------------------------------------------------------------------------
// notify (1 block)                           who signals whom
//   barrier(fingerprint of the dispatch)     every rank <-> every rank (kOffBarrier); a peer in
//                                            another operation or geometry aborts every rank here
//   -> go word (kOffGo) = the verdict, then griddepcontrol.launch_dependents: the dispatch kernel
//      launched behind notify (programmatic dependent launch) starts now, its senders filling the
//      peers' rings while the rest of notify runs
//   count pass (local): channel_count[r][c] = tokens of channel c for rank r, topk_idx min / max
//   rank s writes into rank d's buffer:      notify_channel[s][c] = channel_count[d][c]
//                                            notify_expert[s][e]  = num_tokens_per_expert[d*E_l + e]
//                                            notify_send[s][*]    = s's rows to every rank
//                                            notify_flags[s] = 1 if s's topk_idx has ids outside
//                                            [-1, E), else 0; notify_capacity[s] = s's receive rows
//   barrier
//   rank d reads its own region and writes (device memory):
//     recv_channel_offset [R, C+1] int32     first output row of (source s, channel c); rows are
//                                            ordered by (source rank, source token) because channels
//                                            are contiguous token slices taken in order
//     send_counts [R], rank_prefix_matrix [R, R], recv_counts [R + E_l] int32 (rows from each
//                                            source, then per local expert rounded up to the alignment)
//   then either (num_worst_tokens == 0) publishes counts and the range verdicts to the host-mapped
//   NotifyResult (the host spins on its sequence word, written last: no stream sync, no copy) and
//   whether every rank's rows fit the receive capacity it allocated before its wait (the fits
//   word): then the speculative dispatch kernels behind notify write their outputs on every rank,
//   else on none (they drain the rings) and every host launches the exact one; or
//   (num_worst_tokens > 0, nothing on the host waits) turns bad ids on any rank, or any rank
//   receiving more than num_worst_tokens rows, into the same abort on every rank.
//   Fused (Opening::kFusedNotify, DEEPEP_MEGATRON_FUSED_NOTIFY=1): no notify launch; the dispatch
//   kernel (the direct one with a receive block) keeps its 2*C blocks; block 1 runs the above
//   first, sets the go word to kGoNotified (release), then does its own data work. The data blocks
//   open on the go word as behind notify and wait for kGoNotified (acquire) where they would wait
//   for notify's end. A block that finds this rank aborted by then (notify stopped, or refused the
//   input) reads no offset of it.
//
// direct dispatch (2*C blocks of 24 warps; every rank published a receive block in the opening
//   barrier: the layout header's "Receive arena"). A rank with a block of its own launches it first
//   (it runs the opening: notify's go word, or its own barrier) and the ring kernel below behind it;
//   each does nothing when the other is the one that moves the data (every_rank_has_block reads
//   the same R published blocks on every rank). Blocks 2c and 2c+1 each take half of channel c's
//   tokens (a full dispatch: both build the channel's streams, the same values); after notify
//   ended, a warp reads a token's row once and stores it, its scales and its metadata (ids local
//   to the destination) into row rank_prefix_matrix[me-1][d] + (rows of channels < c) +
//   send_position[t][d] of destination d's block, for every d that receives it (own rank
//   included). Then each block does red.release.sys.add 1 on kOffDirectDone[c][me] of every
//   destination; block 2c waits (ld.acquire.sys) until kOffDirectDone[c][s] reached its
//   kOffDirectSeen + 2 for every source s, then copies channel c's metadata rows out of this rank's
//   block into the ordinary top-k / source outputs. No ring is touched, so the rings stay drained.
//
// dispatch (2*C blocks of 24 warps; block 2c sends channel c, block 2c+1 receives channel c; the
//   destinations that published a receive block get their x rows written straight into it, only the
//   slot's metadata travels through the ring and the receiver does not copy x)
//   opened (Opening, launch.h) by notify's go word (launched behind it), by its own barrier (a
//   cached dispatch: fused_barrier, block 0 runs it) or by nothing (the exact dispatch after a host
//   wait). The threads that read notify's results (receivers, the own-rank group) first wait for
//   notify to end (griddepcontrol.wait); a speculative launch whose rows some rank cannot fit
//   (notify's fits word, alike on every rank) writes no output: its receivers drain the rings.
//   sender block: in a full dispatch it first builds the channel's streams from is_token_in_rank
//     (streams.cuh: send_position for the combine, send_tokens for a cached dispatch, the stream
//     lengths), so the streams cost no launch of their own. Then one warp group per destination
//     (24/R warps each): the group for me copies this rank's own tokens straight from x into output
//     rows recv_channel_offset[me][c] + p (own tokens never enter a ring, nothing to wait for); the
//     group for d walks the stream (c, me -> d): token = send_tokens[d][begin_c + p]. In steps of
//     send_chunk tokens it waits until ring (c, me) of rank d has room (its own ring_head[c][d],
//     written by d), writes each token's slot into d's buffer:
//        slot = [x row | fp32 scales | int32 global topk ids | fp32 topk weights | int32 source idx]
//     then (after the group's named barrier) st.release.sys of ring_tail[c][me] in d's buffer; the
//     release is cumulative over the group's slot writes ordered before it by the barrier.
//   receiver block (num_worst_tokens: first its share of the padding rows), one warp group per
//     peer s (24/(R-1) warps): waits on its own ring_tail[c][s] (ld.acquire.sys), copies every
//     available slot p to output row recv_channel_offset[s][c] + p (topk ids made local, -1 /
//     weight 0 where not local), then st.release.sys of ring_head[c][me] in s's buffer (frees the
//     slots).
//
// direct combine (with a receive arena, unless DEEPEP_MEGATRON_DIRECT_COMBINE=0): a rank with a combine block (combine_block in the layout header) launches
//   combine_direct_kernel, which zeroes the block's arrival words, runs the barrier (publishing the
//   block), and when every rank published one pushes, from both blocks of channel c, the rows it
//   holds of each home rank's channel-c tokens into that rank's block (a contiguous run per source),
//   adds 1 (release) to the home's arrival word (c, me), waits for 2 on its own words (c, d), and
//   reduces half of channel c's tokens from its own block (own rows from x) in the order below;
//   else it does nothing and the ring kernel launched behind it (no barrier of its own) moves
//   the data, as the ring kernel does for a rank without a block.
//
// combine (2*C blocks; the reverse direction; opened by its own barrier, fused_barrier)
//   sender block on rank d, group for the tokens' home rank s (all 24 warps split over the R-1
//     peers; own rows are not sent): rows
//     [recv_channel_offset[s][c], recv_channel_offset[s][c+1]) of x (in order), slot = [row | fp32
//     topk weights], into ring (c, d) of rank s; same head/tail protocol (send_stream).
//   receiver block on rank s, all 24 warps, one token per warp per round: token t of channel c is at
//     position send_position[t][d] of the stream from d; lanes d < R wait for ring_tail[c][d], then
//     the warp sums rows from d = 0..R-1 in fp32 starting at 0 (exactly the reference's order) and
//     casts once. After every round (__syncthreads) ring_head[c][me] in d's buffer is advanced to the
//     highest position consumed from d. Rows a rank holds of its own tokens never enter a ring:
//     the receiver reads them straight from x (row recv_channel_offset[me][c] + position).
//
// Every wait is bounded by ctx.timeout_ns; a timeout fills the diagnostic, raises this rank's abort
// word and the kernel exits. Dispatch and combine start only if this rank is not aborted (the
// barrier or notify before them passed); their last block to finish (finish_block) overwrites the
// outputs when the rank was aborted before or during the operation.
// ---------------------------------------------------------------------------------------------
#include <cuda_bf16.h>

#include <stdexcept>
#include <string>

#include "launch.h"
#include "streams.cuh"
#include "wait.cuh"

namespace deepep_megatron {

namespace {

constexpr int kNotifyThreads = 512;

// ------------------------------------------------------------------------------------- notify
// (kFusedNotify) The notify block's outputs are written: every thread's stores, then kGoNotified
// (release) for the blocks waiting in wait_for_notify.
__device__ __forceinline__ void publish_notified(const PeerContext& ctx) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) st_release_sys(at<uint32_t>(ctx.buffers[ctx.rank], kOffGo), kGoNotified);
}

// What notify does, run by one block of kThreads threads: the notify kernel's, or (fused, a full
// dispatch's Opening::kFusedNotify) the dispatch kernel's block 1, which then publishes
// kGoNotified in the go word once its outputs are written, where the other blocks wait
// (wait_for_notify) instead of for the end of a notify kernel launched before them.
template <int kThreads>
__device__ __forceinline__ void notify_block(const PeerContext& ctx, const Fingerprint fp, const NotifyArgs& a,
                                             bool fused) {
  __shared__ int totals[kMaxRanks];          // rows this rank receives from each source
  __shared__ int recv_totals[kMaxRanks];     // rows every rank receives (from the send matrix)
  __shared__ int channel_counts[kMaxRanks * kMaxChannels];  // [R, C] this rank's send streams
  __shared__ long long warp_low[kThreads / 32], warp_high[kThreads / 32];
  const int num_ranks = ctx.num_ranks, me = ctx.rank, num_channels = a.num_channels;
  const int lane = threadIdx.x % 32;

  for (int i = threadIdx.x; i < num_ranks * num_channels; i += kThreads) channel_counts[i] = 0;
  if (threadIdx.x == 0 && a.fits != nullptr) *a.fits = 0;  // stays 0 if this notify stops early
  // The first barrier opens the dispatch kernel launched behind this one (every dispatch launches
  // one): its senders start filling the peers' rings while the rest of notify runs (they need
  // nothing notify computes).
  const bool passed = cross_rank_barrier(ctx, fp, a.blocks);
  if (threadIdx.x == 0) publish_go(ctx, passed);
  if (!fused) pdl_launch_dependents();
  if (!passed) return;

  // The tokens each channel (a contiguous slice) sends to each rank: lanes of one channel add their
  // ballot once (a warp spans at most a few channels), and the min / max of topk_idx.
  const int per_channel = (a.num_tokens + num_channels - 1) / max(num_channels, 1);
  for (int base = threadIdx.x - lane; base < a.num_tokens; base += kThreads) {
    const int t = base + lane;
    const bool valid = t < a.num_tokens;
    const int c = valid ? t / per_channel : -1;
    const unsigned same_channel = __match_any_sync(0xffffffffu, c);
    const bool group_leader = valid && lane == __ffs(same_channel) - 1;
    for (int r = 0; r < num_ranks; ++r) {
      const bool hit = valid && a.is_token_in_rank[static_cast<int64_t>(t) * num_ranks + r];
      const int count = __popc(__ballot_sync(0xffffffffu, hit) & same_channel);
      if (group_leader && count > 0) atomicAdd(&channel_counts[r * num_channels + c], count);
    }
  }
  long long low = INT64_MAX, high = INT64_MIN;
  const int64_t entries = static_cast<int64_t>(a.num_tokens) * a.num_topk;
  for (int64_t i = threadIdx.x; i < entries; i += kThreads) {
    const long long v = __ldg(reinterpret_cast<const long long*>(a.topk_idx) + i);
    low = min(low, v);
    high = max(high, v);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    low = min(low, __shfl_xor_sync(0xffffffffu, low, offset));
    high = max(high, __shfl_xor_sync(0xffffffffu, high, offset));
  }
  if (lane == 0) {
    warp_low[threadIdx.x / 32] = low;
    warp_high[threadIdx.x / 32] = high;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_ranks * num_channels; i += kThreads) a.channel_count[i] = channel_counts[i];
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) {
      low = min(low, warp_low[w]);
      high = max(high, warp_high[w]);
    }
    warp_low[0] = low;
    warp_high[0] = high;
  }
  __syncthreads();

  for (int i = threadIdx.x; i < num_ranks * num_channels; i += blockDim.x) {
    const int d = i / num_channels, c = i % num_channels;
    at<int>(ctx.buffers[d], kOffNotifyChannel)[me * kMaxChannels + c] = channel_counts[d * num_channels + c];
  }
  for (int i = threadIdx.x; i < num_ranks * a.num_local_experts; i += blockDim.x) {
    const int d = i / a.num_local_experts, e = i % a.num_local_experts;
    at<int>(ctx.buffers[d], kOffNotifyExpert)[me * kMaxLocalExperts + e] = a.num_tokens_per_expert[i];
  }
  for (int d = threadIdx.x; d < num_ranks; d += blockDim.x) {
    int sum = 0;
    for (int c = 0; c < num_channels; ++c) sum += channel_counts[d * num_channels + c];
    a.send_counts[d] = sum;
    // this rank's row of the send matrix goes to every rank, so each knows every rank's total
    for (int r = 0; r < num_ranks; ++r) at<int>(ctx.buffers[r], kOffNotifySend)[me * kMaxRanks + d] = sum;
  }
  if (threadIdx.x == 0) {  // the topk_idx range check: this rank's verdict goes to every rank
    low = warp_low[0];
    high = warp_high[0];
    const int bad = (low <= high && (low < -1 || high >= a.num_experts)) ? 1 : 0;
    for (int d = 0; d < num_ranks; ++d) {
      at<int>(ctx.buffers[d], kOffNotifyFlags)[me] = bad;
      at<int>(ctx.buffers[d], kOffNotifyCapacity)[me] = a.capacity;
    }
    if (a.num_worst_tokens == 0) {
      a.result->low = low;
      a.result->high = high;
    }
  }
  Fingerprint second = fp;
  second.words[kFpOperation] = kOpBarrier;
  if (!cross_rank_barrier(ctx, second)) return;

  const volatile int* notify_channel = at<int>(ctx.buffers[me], kOffNotifyChannel);
  const volatile int* notify_expert = at<int>(ctx.buffers[me], kOffNotifyExpert);
  const volatile int* notify_send = at<int>(ctx.buffers[me], kOffNotifySend);
  const volatile int* flags = at<int>(ctx.buffers[me], kOffNotifyFlags);
  const volatile int* capacity = at<int>(ctx.buffers[me], kOffNotifyCapacity);
  for (int s = threadIdx.x; s < num_ranks; s += blockDim.x) {
    int sum = 0;
    for (int c = 0; c < num_channels; ++c) sum += notify_channel[s * kMaxChannels + c];
    totals[s] = sum;
    a.recv_counts[s] = sum;
    int received = 0;
    for (int r = 0; r < num_ranks; ++r) received += notify_send[r * kMaxRanks + s];
    recv_totals[s] = received;
  }
  for (int i = threadIdx.x; i < num_ranks * num_ranks; i += blockDim.x) {
    const int row = i / num_ranks, col = i % num_ranks;
    int prefix = 0;
    for (int r = 0; r <= row; ++r) prefix += notify_send[r * kMaxRanks + col];
    a.rank_prefix_matrix[i] = prefix;
  }
  __syncthreads();
  for (int s = threadIdx.x; s < num_ranks; s += blockDim.x) {
    int offset = 0;
    for (int r = 0; r < s; ++r) offset += totals[r];
    for (int c = 0; c < num_channels; ++c) {
      a.recv_channel_offset[s * (num_channels + 1) + c] = offset;
      offset += notify_channel[s * kMaxChannels + c];
    }
    a.recv_channel_offset[s * (num_channels + 1) + num_channels] = offset;
  }
  for (int e = threadIdx.x; e < a.num_local_experts; e += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < num_ranks; ++s) sum += notify_expert[s * kMaxLocalExperts + e];
    a.recv_counts[num_ranks + e] = (sum + a.expert_alignment - 1) / a.expert_alignment * a.expert_alignment;
  }
  __syncthreads();
  if (a.num_worst_tokens > 0) {
    // No host looks at this dispatch's sizes: what the host would have refused becomes this rank's
    // abort (every rank sees the same flags and send matrix, so every rank aborts alike and no
    // sender is left waiting on a receiver that stopped). The dispatch kernel then does nothing,
    // its last block (finish_block) poisons its outputs, and the next host-visible point raises.
    if (threadIdx.x == 0) {
      int mask = 0;
      for (int s = 0; s < num_ranks; ++s) mask |= (flags[s] != 0 ? 1 : 0) << s;
      if (mask != 0) {
        report_error(ctx, kBadExpertIds, -1, -1, mask, a.num_experts);
      } else {
        for (int d = 0; d < num_ranks; ++d) {
          if (recv_totals[d] > a.num_worst_tokens) {
            report_error(ctx, kWorstTokensExceeded, d, -1, a.num_worst_tokens, recv_totals[d]);
            break;
          }
        }
      }
    }
    if (fused) publish_notified(ctx);
    return;
  }
  // Publish to the host (host-mapped NotifyResult): every field first, the sequence word last.
  volatile int* host_counts = a.result->counts;
  for (int i = threadIdx.x; i < num_ranks + a.num_local_experts; i += blockDim.x) host_counts[i] = a.recv_counts[i];
  if (threadIdx.x == 0) {
    int mask = 0;
    for (int s = 0; s < num_ranks; ++s) mask |= (flags[s] != 0 ? 1 : 0) << s;
    a.result->bad_ranks = mask;
    // Every rank sees the same flags, capacities and send matrix, so every rank's speculative
    // dispatch kernel (if launched) either moves the data or, alike on every rank, does nothing.
    int fits = mask == 0 ? 1 : 0;
    for (int d = 0; d < num_ranks; ++d) fits &= recv_totals[d] <= capacity[d] ? 1 : 0;
    if (a.fits != nullptr) *a.fits = fits;
    a.result->fits = fits;
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    *reinterpret_cast<volatile uint32_t*>(&a.result->sequence) = a.ticket;
  }
  if (fused) publish_notified(ctx);
}

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_kernel(PeerContext ctx, Fingerprint fp, NotifyArgs a) {
  notify_block<kNotifyThreads>(ctx, fp, a, false);
}

// What block 1 of a kFusedNotify dispatch runs first. Not inlined, its arguments copied: so that notify's
// registers and frame do not add to those of the data blocks' copy loops (ptxas: inlined, they
// made the EP8 kernels spill).
__device__ __noinline__ void fused_notify(PeerContext ctx, Fingerprint fp, NotifyArgs a) {
  notify_block<kThreadsPerBlock>(ctx, fp, a, true);
}


// ------------------------------------------------------------------------------------- copies
// The loads and stores a warp copy is made of: read-only inputs go through the non-coherent
// path, ring slots (written by peers) are read and written with the ring's ordering helpers.
struct LoadInput {
  __device__ __forceinline__ int4 operator()(const int4* p) const { return ld_input_int4(p); }
};
struct LoadRing {
  __device__ __forceinline__ int4 operator()(const int4* p) const { return ld_ring_int4(p); }
};
struct StoreOutput {
  __device__ __forceinline__ void operator()(int4* p, const int4& v) const { *p = v; }
};
struct StoreRing {
  __device__ __forceinline__ void operator()(int4* p, const int4& v) const { st_ring_int4(p, v); }
};

// Warp copies `bytes` (multiple of 16) from src to dst with the given load and store.
template <int kUnroll, typename Load, typename Store>
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int bytes, int lane) {
  const int n = bytes / 16;
  const int4* s = reinterpret_cast<const int4*>(src);
  int4* d = reinterpret_cast<int4*>(dst);
  for (int i = lane; i < n; i += 32 * kUnroll) {  // every step keeps kUnroll loads in flight, tail included
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + 32 * u < n) v[u] = Load()(s + i + 32 * u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + 32 * u < n) Store()(d + i + 32 * u, v[u]);
    }
  }
}

// Received top-k entry: the global expert id becomes local (-1, weight 0 when on another rank).
// A global expert id as rank `rank` receives it: its local id there, or -1 when it lives elsewhere.
__device__ __forceinline__ int local_expert_id(const DispatchArgs& a, int global_expert, int rank) {
  const int local_expert = global_expert - rank * a.num_local_experts;
  return global_expert >= 0 && local_expert >= 0 && local_expert < a.num_local_experts ? local_expert : -1;
}

__device__ __forceinline__ void write_local_topk(const DispatchArgs& a, int64_t row, int k, int global_expert,
                                                 float weight, int me) {
  const int local_expert = local_expert_id(a, global_expert, me);
  a.recv_topk_idx[row * a.num_topk + k] = local_expert;
  a.recv_topk_weights[row * a.num_topk + k] = local_expert >= 0 ? weight : 0.0f;
}

__device__ __forceinline__ uint8_t* ring_slot(uint8_t* buffer, const RingGeometry& ring, int num_ranks, int channel,
                                              int sender, uint32_t position) {
  const size_t ring_index = static_cast<size_t>(channel) * num_ranks + sender;
  const size_t slot = ring_index * ring.num_slots + position % static_cast<uint32_t>(ring.num_slots);
  return buffer + kControlBytes + slot * static_cast<size_t>(ring.slot_bytes);
}

__device__ __forceinline__ uint32_t* counter(uint8_t* buffer, size_t region, int channel, int rank) {
  return at<uint32_t>(buffer, region) + channel * kMaxRanks + rank;
}

// Which peer a warp serves. The own-rank group gets kSelfWarps warps (its work is a local copy, or
// nothing), every other rank (24 - kSelfWarps) / (R - 1); spare warps idle. Returns false for those.
template <int kNumRanks, int kSelfWarps>
struct WarpGroups {
  static constexpr int kPeerWarps = (kWarpsPerBlock - kSelfWarps) / (kNumRanks - 1);
  static_assert(kPeerWarps >= 1, "too few warps per block");
  __device__ static bool assign(int warp, int me, int& peer, int& warp_in_group, int& group_warps) {
    if (warp < kSelfWarps) {
      peer = me;
      warp_in_group = warp;
      group_warps = kSelfWarps;
      return true;
    }
    const int index = (warp - kSelfWarps) / kPeerWarps;
    if (index >= kNumRanks - 1) return false;
    peer = index < me ? index : index + 1;
    warp_in_group = (warp - kSelfWarps) % kPeerWarps;
    group_warps = kPeerWarps;
    return true;
  }
};

// The sending side of one ring (channel, me -> peer), shared by dispatch and combine. In steps of up
// to send_chunk rows: the group leader waits until the peer has freed enough slots (its ring_head
// in this rank's buffer), the group's warps write rows [sent, sent + n) with write_row(position,
// slot) (one row per warp), and after the group barrier the leader publishes the new tail into the
// peer's buffer with st.release.sys, cumulative over the group's writes the barrier ordered before it.
// `step` is a shared word of this group. Returns false on a timeout (diagnostic recorded).
template <int kNumRanks, typename WriteRow>
__device__ __forceinline__ bool send_stream(const PeerContext& ctx, const RingGeometry& ring, int channel, int peer,
                                            int total, int warp_in_group, int group_warps, int lane, int space_code,
                                            int* step, const WriteRow& write_row) {
  const int me = ctx.rank;
  const int group_threads = group_warps * 32;
  const int barrier_id = 1 + peer;
  const bool leader = warp_in_group == 0 && lane == 0;
  uint8_t* own = ctx.buffers[me];
  uint8_t* dest = ctx.buffers[peer];
  uint32_t* remote_tail = counter(dest, kOffRingTail, channel, me);
  const uint32_t* local_head = counter(own, kOffRingHead, channel, peer);
  uint32_t* tail_shadow = counter(own, kOffTailShadow, channel, peer);
  const uint32_t base = ld_volatile(tail_shadow);
  int sent = 0;
  while (sent < total) {
    const int n = min(ring.send_chunk, total - sent);
    if (leader) {
      uint32_t seen;
      const uint32_t target = base + static_cast<uint32_t>(sent + n) - static_cast<uint32_t>(ring.num_slots);
      *step = wait_counter(ctx, local_head, target, space_code, peer, channel, seen) ? n : -1;
    }
    group_barrier(barrier_id, group_threads);
    if (*step < 0) return false;  // every warp read it before the leader can write it again
    for (int i = warp_in_group; i < n; i += group_warps) {
      write_row(sent + i, ring_slot(dest, ring, kNumRanks, channel, me, static_cast<uint32_t>(sent + i)));
    }
    group_barrier(barrier_id, group_threads);
    if (leader) st_release_sys(remote_tail, base + static_cast<uint32_t>(sent + n));
    sent += n;
  }
  if (leader) *tail_shadow = base + static_cast<uint32_t>(total);
  return true;
}

// ------------------------------------------------------------------------------------- dispatch
// Whether this dispatch writes its outputs: always, except a speculative launch whose rows some rank
// could not fit (notify's verdict, alike on every rank); its receivers then drain the rings
// without writing, so every ring stays consistent for the next operation.
__device__ __forceinline__ bool writes_outputs(const DispatchArgs& a) {
  return a.fits == nullptr || *reinterpret_cast<const volatile int*>(a.fits) != 0;
}

// Before a thread reads what notify computes (offsets, rank_prefix_matrix, the fits verdict): behind
// a notify kernel it waits for that kernel's end (griddepcontrol.wait; a no-op after any other
// launch), in a kernel whose block 1 runs notify (kFusedNotify) for kGoNotified. False when
// this rank was aborted by then (notify stopped early, or refused the input: bad ids, more rows than
// num_worst_tokens), so that no offset of a failed notify is ever used to write. kFused: the kernel
// instantiation for kFusedNotify launches (the others carry no code of it, so their registers are
// as without it).
template <bool kFused>
__device__ __forceinline__ bool wait_for_notify(const PeerContext& ctx) {
  if (kFused) {
    if (!wait_notified(ctx)) return false;
  } else {
    pdl_wait_for_primary();
  }
  return !aborted(ctx);
}

// The blocks that move data: two per channel, in every launch.
__device__ __forceinline__ int data_blocks(const RingGeometry& ring) { return 2 * ring.num_channels; }
// The block of a kFusedNotify launch that runs notify before its own data work: channel 0's second
// block, which (ring kernel: its receiver; direct kernel: the channel's second half) has nothing to
// write before notify's offsets anyway. Not a block of its own: a launch of 2*C + 1 blocks no longer
// fits beside the other ranks' when they share a GPU (EP8 on one H200 at 16 SMs: 8 x 17 > 132 SMs;
// the data blocks that got an SM spun on notify blocks that never did).
constexpr int kFusedNotifyBlock = 1;
// Whether this block runs notify first (kFusedNotify launches only).
template <bool kFused>
__device__ __forceinline__ bool runs_notify() {
  return kFused && static_cast<int>(blockIdx.x) == kFusedNotifyBlock;
}

// wait_for_notify for a whole block (every thread calls it): thread 0 waits, every thread gets its
// answer (alike, so the block's later barriers are reached by all).
template <bool kFused>
__device__ __forceinline__ bool block_wait_for_notify(const PeerContext& ctx) {
  __shared__ int ok;
  if (threadIdx.x == 0) ok = wait_for_notify<kFused>(ctx) ? 1 : 0;
  __syncthreads();
  const bool result = ok != 0;
  __syncthreads();  // `ok` is rewritten by the next call
  return result;
}

// The receive block peer d published in the barrier that opened this kernel (kOffReceiveBlocks).
__device__ __forceinline__ ReceiveBlock published_block(const PeerContext& ctx, int peer) {
  const volatile int64_t* words = reinterpret_cast<const volatile int64_t*>(
      at<ReceiveBlock>(ctx.buffers[ctx.rank], kOffReceiveBlocks) + peer);
  return ReceiveBlock{words[0], words[1]};
}

// Where the stream (channel, me -> peer) puts its x rows: the ring slots (kThroughRing), straight
// into the peer's receive block (kDirect: position p goes to x[p], scales[p] below, already offset
// to the stream's first row there), or nowhere (kMetadataOnly: a speculative launch that some rank
// cannot fit, whose receivers only drain the rings; or rows that would not fit the block).
enum class RowTarget : int { kThroughRing = 0, kDirect = 1, kMetadataOnly = 2 };

struct DirectTarget {
  uint8_t* x;
  float* scales;
  RowTarget target;
};

// The first row of stream (channel, me -> peer) among the peer's received rows: rows ranks before
// me send to the peer, then my rows of the channels before this one (the receiver orders rows by
// (source rank, channel, position): recv_channel_offset on the peer).
__device__ __forceinline__ int64_t stream_first_row(const PeerContext& ctx, const DispatchArgs& a, int num_channels,
                                                    int peer, int channel) {
  const int me = ctx.rank;
  int64_t first = me > 0 ? a.rank_prefix_matrix[(me - 1) * ctx.num_ranks + peer] : 0;
  for (int c = 0; c < channel; ++c) first += a.channel_count[peer * num_channels + c];
  return first;
}

// Where the stream's x rows go in the peer's block (stream_first_row). `length` rows must fit the
// block; else (the ranks' layouts disagree) a diagnostic, and nothing is written there.
__device__ __forceinline__ DirectTarget direct_target(const PeerContext& ctx, const DispatchArgs& a,
                                                      const RingGeometry& ring, const ReceiveBlock& block, int peer,
                                                      int channel, int length) {
  if (!writes_outputs(a)) return DirectTarget{nullptr, nullptr, RowTarget::kMetadataOnly};
  const int64_t first = stream_first_row(ctx, a, ring.num_channels, peer, channel);
  if (first + length > block.rows) {
    report_error(ctx, kReceiveBlockOverflow, peer, channel, block.rows, first + length);
    return DirectTarget{nullptr, nullptr, RowTarget::kMetadataOnly};
  }
  uint8_t* base = ctx.buffers[peer] + block.offset;
  float* scales = reinterpret_cast<float*>(base + receive_block(block.rows, a.slot.row_bytes, a.num_scales, 0).off_scales);
  return DirectTarget{base + first * a.slot.row_bytes, scales + first * a.num_scales, RowTarget::kDirect};
}

// A sender block: (full dispatch) build this channel's streams, then the own-rank group copies this
// rank's tokens of the channel straight from x into its output rows (no ring, nothing to wait for)
// while the other groups push to the peers' rings.
template <int kNumRanks, bool kFused>
__device__ __forceinline__ void dispatch_sender(const PeerContext& ctx, const RingGeometry& ring, const DispatchArgs& a,
                                                int channel, int begin, int* step) {
  __shared__ int lengths[kMaxRanks];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int me = ctx.rank;
  if (a.builds_streams) {
    build_channel_streams<kThreadsPerBlock>(a.is_token_in_rank, a.num_tokens, kNumRanks, begin,
                                            min(begin + (a.num_tokens + ring.num_channels - 1) / ring.num_channels,
                                                a.num_tokens),
                                            a.send_position, a.send_tokens, lengths);
  }
  // Position p of stream (channel, me -> r) holds token send_tokens[r][begin + p]. Plain loads: in a
  // full dispatch this block has just written them.
  auto stream_tokens = [&](int r) { return a.send_tokens + static_cast<int64_t>(r) * a.num_tokens + begin; };
  int peer, warp_in_group, group_warps;
  if (!WarpGroups<kNumRanks, kWarpsPerBlock / kNumRanks>::assign(warp, me, peer, warp_in_group, group_warps)) return;
  if (peer == me) {
    // Own tokens go straight to their output rows, which notify computes: wait for it (a kernel
    // launched behind notify), and write nothing when a speculative launch's rows do not fit.
    if (!wait_for_notify<kFused>(ctx) || !writes_outputs(a)) return;
    const int out_begin = a.recv_channel_offset[me * (ring.num_channels + 1) + channel];
    const int total = a.recv_channel_offset[me * (ring.num_channels + 1) + channel + 1] - out_begin;
    const int* tokens = stream_tokens(me);
    for (int i = warp_in_group; i < total; i += group_warps) {
      const int token = tokens[i];
      const int64_t row = out_begin + i;
      warp_copy<8, LoadInput, StoreOutput>(a.recv_x + row * a.slot.row_bytes,
                                           a.x + static_cast<int64_t>(token) * a.slot.row_bytes, a.slot.row_bytes, lane);
      for (int j = lane; j < a.num_scales; j += 32) {
        a.recv_x_scales[row * a.num_scales + j] = __ldg(a.x_scales + static_cast<int64_t>(token) * a.num_scales + j);
      }
      if (lane < a.num_topk) {
        const int64_t k = static_cast<int64_t>(token) * a.num_topk + lane;
        write_local_topk(a, row, lane, static_cast<int>(__ldg(a.topk_idx + k)), __ldg(a.topk_weights + k), me);
      }
      if (lane == 0 && a.recv_src_idx != nullptr) a.recv_src_idx[row] = token;
    }
    return;
  }
  const int* tokens = stream_tokens(peer);
  const int length = a.builds_streams ? lengths[peer] : a.channel_count[peer * ring.num_channels + channel];
  // Direct write: x rows (and scales) straight into the peer's receive block, only the metadata
  // through the ring. The rows' place there comes from notify (a full dispatch: wait for it).
  // The group's leader decides (send_stream's first group barrier publishes it to the group); the
  // target lives in shared memory, not in registers the copy loop needs.
  __shared__ DirectTarget direct_s[kNumRanks];
  if (warp_in_group == 0 && lane == 0) {
    DirectTarget direct{nullptr, nullptr, RowTarget::kThroughRing};
    if (a.use_blocks) {
      const ReceiveBlock block = published_block(ctx, peer);
      if (block.offset != kNoReceiveBlock) {
        direct = wait_for_notify<kFused>(ctx) ? direct_target(ctx, a, ring, block, peer, channel, length)
                                         : DirectTarget{nullptr, nullptr, RowTarget::kMetadataOnly};
      }
    }
    direct_s[peer] = direct;
  }
  send_stream<kNumRanks>(
      ctx, ring, channel, peer, length, warp_in_group, group_warps, lane,
      kWaitDispatchSpace, &step[peer], [&](int position, uint8_t* slot) {
        const int token = tokens[position];
        const DirectTarget& direct = direct_s[peer];
        uint8_t* row_dst = slot;
        float* scales_dst = reinterpret_cast<float*>(slot + a.slot.off_scales);
        const RowTarget target = direct.target;
        if (target == RowTarget::kDirect) {
          row_dst = direct.x + static_cast<int64_t>(position) * a.slot.row_bytes;
          scales_dst = direct.scales + static_cast<int64_t>(position) * a.num_scales;
        }
        if (target != RowTarget::kMetadataOnly) {
          warp_copy<8, LoadInput, StoreRing>(row_dst, a.x + static_cast<int64_t>(token) * a.slot.row_bytes,
                                             a.slot.row_bytes, lane);
          for (int j = lane; j < a.num_scales; j += 32) {
            scales_dst[j] = __ldg(a.x_scales + static_cast<int64_t>(token) * a.num_scales + j);
          }
        }
        if (lane < a.num_topk) {
          const int64_t k = static_cast<int64_t>(token) * a.num_topk + lane;
          reinterpret_cast<int*>(slot + a.slot.off_topk_idx)[lane] = static_cast<int>(__ldg(a.topk_idx + k));
          reinterpret_cast<float*>(slot + a.slot.off_topk_weights)[lane] = __ldg(a.topk_weights + k);
        }
        if (lane == 0) *reinterpret_cast<int*>(slot + a.slot.off_src_idx) = token;
      });
}

// ------------------------------------------------------------------------------- direct dispatch
// Every rank published a receive block (alike on every rank: each reads the same R published blocks).
__device__ __forceinline__ bool every_rank_has_block(const PeerContext& ctx, bool use_blocks) {
  if (!use_blocks) return false;
  for (int r = 0; r < ctx.num_ranks; ++r) {
    if (published_block(ctx, r).offset == kNoReceiveBlock) return false;
  }
  return true;
}

// Where this channel's tokens land in destination d's block: pointers at the stream's first row.
struct DirectRows {
  uint8_t* x;
  float* scales;
  int* topk_idx;      // [rows, K] (null in a cached dispatch)
  float* topk_weights;
  int* src_idx;
};

// Both blocks of channel c send half of its tokens each; no rings. A warp reads a token's row once
// and writes it to every destination that needs it (send_position: its row there is first_d + p).
// Then each block adds 1 to kOffDirectDone[c][me] of every destination; the even block waits for
// both blocks of every source and copies the metadata rows of channel c out of this rank's block
// into the ordinary outputs (and takes its share of the padding rows).
template <int kNumRanks, bool kFused>
__device__ __forceinline__ void dispatch_direct(const PeerContext& ctx, const RingGeometry& ring, const DispatchArgs& a,
                                                int channel) {
  __shared__ int lengths[kMaxRanks];
  __shared__ DirectRows rows_at[kMaxRanks];
  __shared__ int overflow;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int me = ctx.rank, C = ring.num_channels;
  const bool even = blockIdx.x % 2 == 0;
  int begin, end;
  channel_range(a.num_tokens, C, channel, begin, end);
  if (a.builds_streams) {
    // Both blocks build the channel's streams (the same values: the handle's send_position /
    // send_tokens); each reads back only what it wrote itself.
    build_channel_streams<kThreadsPerBlock>(a.is_token_in_rank, a.num_tokens, kNumRanks, begin, end, a.send_position,
                                            a.send_tokens, lengths);
  } else if (threadIdx.x < kNumRanks) {
    lengths[threadIdx.x] = a.channel_count[threadIdx.x * C + channel];
  }
  if (!block_wait_for_notify<kFused>(ctx)) return;  // a full dispatch: notify's offsets and verdict
  const bool write = writes_outputs(a);  // alike on every rank: nobody writes, nobody waits
  if (!write) return;
  if (threadIdx.x == 0) overflow = 0;
  __syncthreads();
  if (threadIdx.x < kNumRanks) {
    const int d = threadIdx.x;
    const ReceiveBlock block = published_block(ctx, d);
    const int64_t first = stream_first_row(ctx, a, C, d, channel);
    if (first + lengths[d] > block.rows) {  // the ranks' layouts disagree: write nothing anywhere
      report_error(ctx, kReceiveBlockOverflow, d, channel, block.rows, first + lengths[d]);
      atomicExch(&overflow, 1);
    }
    const ReceiveBlockLayout layout = receive_block(block.rows, a.slot.row_bytes, a.num_scales, a.num_topk);
    uint8_t* base = ctx.buffers[d] + block.offset;
    rows_at[d] = DirectRows{base + first * a.slot.row_bytes,
                            reinterpret_cast<float*>(base + layout.off_scales) + first * a.num_scales,
                            reinterpret_cast<int*>(base + layout.off_topk_idx) + first * a.num_topk,
                            reinterpret_cast<float*>(base + layout.off_topk_weights) + first * a.num_topk,
                            reinterpret_cast<int*>(base + layout.off_src_idx) + first};
  }
  __syncthreads();
  if (!overflow) {
    const int mid = begin + (end - begin + 1) / 2;
    const int my_begin = even ? begin : mid, my_end = even ? mid : end;
    const int row_int4 = a.slot.row_bytes / 16;
    // int4 loads in flight per lane before their stores (registers: fewer with more destinations)
    constexpr int kUnroll = kNumRanks <= 4 ? 8 : 4;
    for (int t = my_begin + warp; t < my_end; t += kWarpsPerBlock) {
      // lane d holds the token's position in the stream to d (-1: not sent there)
      const int my_position = lane < kNumRanks ? a.send_position[static_cast<int64_t>(t) * kNumRanks + lane] : -1;
      const int4* src = reinterpret_cast<const int4*>(a.x + static_cast<int64_t>(t) * a.slot.row_bytes);
      // The whole warp runs every chunk (a lane past the row's end only skips its loads and
      // stores): the shuffle below needs all 32 lanes, and a row of fewer than 32 int4s (FP8 at
      // hidden 256) would otherwise leave lanes out of the loop and hang the warp in it.
      for (int chunk = 0; chunk < row_int4; chunk += 32 * kUnroll) {
        const int i = chunk + lane;
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (i + 32 * u < row_int4) v[u] = ld_input_int4(src + i + 32 * u);
        }
#pragma unroll
        for (int d = 0; d < kNumRanks; ++d) {
          const int position = __shfl_sync(0xffffffffu, my_position, d);
          if (position < 0) continue;
          int4* dst = reinterpret_cast<int4*>(rows_at[d].x + static_cast<int64_t>(position) * a.slot.row_bytes);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (i + 32 * u < row_int4) st_ring_int4(dst + i + 32 * u, v[u]);
          }
        }
      }
      // Scales and metadata: one destination at a time (the shuffle needs the whole warp).
      for (int d = 0; d < kNumRanks; ++d) {
        const int position = __shfl_sync(0xffffffffu, my_position, d);
        if (position < 0) continue;
        for (int j = lane; j < a.num_scales; j += 32) {
          rows_at[d].scales[static_cast<int64_t>(position) * a.num_scales + j] =
              __ldg(a.x_scales + static_cast<int64_t>(t) * a.num_scales + j);
        }
        if (lane < a.num_topk) {  // ids local to the destination (-1 / weight 0 elsewhere), as it receives them
          const int64_t k = static_cast<int64_t>(t) * a.num_topk + lane;
          const int local = local_expert_id(a, static_cast<int>(__ldg(a.topk_idx + k)), d);
          const int64_t at_k = static_cast<int64_t>(position) * a.num_topk + lane;
          rows_at[d].topk_idx[at_k] = local;
          rows_at[d].topk_weights[at_k] = local >= 0 ? __ldg(a.topk_weights + k) : 0.0f;
        }
      }
      if (lane < kNumRanks && a.num_topk > 0 && my_position >= 0) rows_at[lane].src_idx[my_position] = t;
    }
  }
  __syncthreads();
  // This block's rows are written: tell every destination (release, cumulative over the block's
  // writes ordered before it by the barrier).
  if (threadIdx.x < kNumRanks) {
    red_release_sys_add(counter(ctx.buffers[threadIdx.x], kOffDirectDone, channel, me), 1u);
  }
  if (!even) return;
  // The even block: both blocks of every source finished channel c here.
  __shared__ int arrived;
  if (threadIdx.x == 0) arrived = 1;
  __syncthreads();
  if (threadIdx.x < kNumRanks) {
    const int s = threadIdx.x;
    uint32_t* seen = counter(ctx.buffers[me], kOffDirectSeen, channel, s);
    const uint32_t target = ld_volatile(seen) + 2u;
    uint32_t value;
    if (wait_counter(ctx, counter(ctx.buffers[me], kOffDirectDone, channel, s), target, kWaitDispatchData, s, channel,
                     value)) {
      *reinterpret_cast<volatile uint32_t*>(seen) = target;
    } else {
      atomicExch(&arrived, 0);
    }
  }
  __syncthreads();
  if (!arrived || a.num_topk == 0) return;
  // Copy-out of the metadata of channel c's rows (every source) from this rank's block.
  const ReceiveBlock mine = published_block(ctx, me);
  const ReceiveBlockLayout layout = receive_block(mine.rows, a.slot.row_bytes, a.num_scales, a.num_topk);
  const uint8_t* base = ctx.buffers[me] + mine.offset;
  const int* block_idx = reinterpret_cast<const int*>(base + layout.off_topk_idx);
  const float* block_weights = reinterpret_cast<const float*>(base + layout.off_topk_weights);
  const int* block_src = reinterpret_cast<const int*>(base + layout.off_src_idx);
  for (int s = 0; s < kNumRanks; ++s) {
    const int row_begin = a.recv_channel_offset[s * (C + 1) + channel];
    const int row_end = a.recv_channel_offset[s * (C + 1) + channel + 1];
    const int64_t entries_begin = static_cast<int64_t>(row_begin) * a.num_topk;
    const int64_t entries_end = static_cast<int64_t>(row_end) * a.num_topk;
    for (int64_t e = entries_begin + threadIdx.x; e < entries_end; e += blockDim.x) {
      a.recv_topk_idx[e] = __ldcg(block_idx + e);
      a.recv_topk_weights[e] = __ldcg(block_weights + e);
    }
    if (a.recv_src_idx != nullptr) {
      for (int row = row_begin + threadIdx.x; row < row_end; row += blockDim.x) a.recv_src_idx[row] = __ldcg(block_src + row);
    }
  }
}

// The padding rows of a num_worst_tokens dispatch past the received ones (their count is on the
// device only): top-k -1 / weight 0 / source -1, this block's share of them; x and scales stay as
// they are (DeepEP's semantics: no expert reads a row whose top-k is all -1).
__device__ __forceinline__ void pad_rows_share(const PeerContext& ctx, const RingGeometry& ring, const DispatchArgs& a,
                                               int share, int num_shares) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int num_received = a.recv_channel_offset[(ctx.num_ranks - 1) * (ring.num_channels + 1) + ring.num_channels];
  int pad_begin, pad_end;
  channel_range(a.num_recv_rows - num_received, num_shares, share, pad_begin, pad_end);
  for (int64_t row = num_received + pad_begin + warp; row < num_received + pad_end; row += kWarpsPerBlock) {
    if (lane < a.num_topk) {
      a.recv_topk_idx[row * a.num_topk + lane] = -1;
      a.recv_topk_weights[row * a.num_topk + lane] = 0.0f;
    }
    if (lane == 0 && a.recv_src_idx != nullptr) a.recv_src_idx[row] = -1;
  }
}

// A receiver block: (num_worst_tokens) its share of the padding rows, then one warp group per peer
// drains that peer's ring of this channel into the output rows.
template <int kNumRanks, bool kFused>
__device__ __forceinline__ void dispatch_receiver(const PeerContext& ctx, const RingGeometry& ring,
                                                  const DispatchArgs& a, int channel, int* step) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int me = ctx.rank;
  if (!block_wait_for_notify<kFused>(ctx)) return;  // a full dispatch: notify's offsets (and verdict) first
  const bool write = writes_outputs(a);
  if (a.pad_rows && write) pad_rows_share(ctx, ring, a, channel, ring.num_channels);
  int source, warp_in_group, group_warps;
  if (!WarpGroups<kNumRanks, 0>::assign(warp, me, source, warp_in_group, group_warps)) return;
  const int out_begin = a.recv_channel_offset[source * (ring.num_channels + 1) + channel];
  const int total = a.recv_channel_offset[source * (ring.num_channels + 1) + channel + 1] - out_begin;
  const int group_threads = group_warps * 32;
  const int barrier_id = 1 + source;
  const bool leader = warp_in_group == 0 && lane == 0;
  uint8_t* own = ctx.buffers[me];
  const uint32_t* local_tail = counter(own, kOffRingTail, channel, source);
  uint32_t* remote_head = counter(ctx.buffers[source], kOffRingHead, channel, me);
  uint32_t* head_shadow = counter(own, kOffHeadShadow, channel, source);
  const uint32_t base = ld_volatile(head_shadow);
  // x rows already in recv_x (the senders wrote them into this rank's receive block)
  const bool direct = a.use_blocks && a.blocks.block.offset != kNoReceiveBlock;
  int consumed = 0;
  while (consumed < total) {
    if (leader) {
      uint32_t seen;
      int available = -1;
      if (wait_counter(ctx, local_tail, base + consumed + 1, kWaitDispatchData, source, channel, seen)) {
        available = min(static_cast<int>(seen - base), total);
      }
      step[source] = available;
    }
    group_barrier(barrier_id, group_threads);
    const int available = step[source];
    if (available < 0) break;
    for (int i = consumed + warp_in_group; write && i < available; i += group_warps) {
      const uint8_t* slot = ring_slot(own, ring, kNumRanks, channel, source, static_cast<uint32_t>(i));
      const int64_t row = out_begin + i;
      if (!direct) {
        warp_copy<4, LoadRing, StoreOutput>(a.recv_x + row * a.slot.row_bytes, slot, a.slot.row_bytes, lane);
        for (int j = lane; j < a.num_scales; j += 32) {
          a.recv_x_scales[row * a.num_scales + j] = __ldcg(reinterpret_cast<const float*>(slot + a.slot.off_scales) + j);
        }
      }
      if (lane < a.num_topk) {
        write_local_topk(a, row, lane, __ldcg(reinterpret_cast<const int*>(slot + a.slot.off_topk_idx) + lane),
                         __ldcg(reinterpret_cast<const float*>(slot + a.slot.off_topk_weights) + lane), me);
      }
      if (lane == 0 && a.recv_src_idx != nullptr) {
        a.recv_src_idx[row] = __ldcg(reinterpret_cast<const int*>(slot + a.slot.off_src_idx));
      }
    }
    group_barrier(barrier_id, group_threads);
    if (leader) st_release_sys(remote_head, base + static_cast<uint32_t>(available));
    consumed = available;
  }
  if (leader && consumed == total) *head_shadow = base + static_cast<uint32_t>(total);
}

template <int kNumRanks, bool kFused>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    dispatch_kernel(PeerContext ctx, RingGeometry ring, DispatchArgs a) {
  __shared__ int step[kNumRanks];  // per warp group: rows in this step (sender) / rows available (receiver); -1 = timed out
  if (runs_notify<kFused>()) fused_notify(ctx, a.barrier_fp, a.notify);  // then this block's own data work
  const int channel = blockIdx.x / 2;
  int begin, end;
  channel_range(a.num_tokens, ring.num_channels, channel, begin, end);
  bool opened = true;
  if (a.opening == Opening::kAfterNotify || a.opening == Opening::kFusedNotify) opened = wait_go(ctx);
  if (a.opening == Opening::kOwnBarrier) opened = fused_barrier(ctx, a.barrier_fp, a.blocks);
  // (every rank has a receive block: dispatch_direct_kernel, launched before this one, moved the data)
  if (opened && !aborted(ctx) && !every_rank_has_block(ctx, a.use_blocks)) {  // aborted: finish_block poisons
    if (blockIdx.x % 2 == 0) {
      dispatch_sender<kNumRanks, kFused>(ctx, ring, a, channel, begin, step);
    } else {
      dispatch_receiver<kNumRanks, kFused>(ctx, ring, a, channel, step);
    }
  }
  finish_block(ctx, a.poison);
}

// ------------------------------------------------------------------------------------- combine
template <typename T>
struct Vec;
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int kElems = 8;
  __device__ static void add(float* acc, const int4& v) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      acc[2 * j] += f.x;
      acc[2 * j + 1] += f.y;
    }
  }
  __device__ static int4 pack(const float* acc) {
    int4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
    return v;
  }
};
template <>
struct Vec<float> {
  static constexpr int kElems = 4;
  __device__ static void add(float* acc, const int4& v) {
    acc[0] += __int_as_float(v.x);
    acc[1] += __int_as_float(v.y);
    acc[2] += __int_as_float(v.z);
    acc[3] += __int_as_float(v.w);
  }
  __device__ static int4 pack(const float* acc) {
    return make_int4(__float_as_int(acc[0]), __float_as_int(acc[1]), __float_as_int(acc[2]), __float_as_int(acc[3]));
  }
};

// v[g][u] = int4 (column + 32 u) of rank first + g's row, for the ranks that have one.
template <int kGroup, int kUnroll, typename RowOf, int kNumRanks>
__device__ __forceinline__ void load_rank_group(int4 (&v)[kGroup][kUnroll], const RowOf& row_of, const bool (&has)[kNumRanks],
                                                int first, int64_t column, int64_t row_int4) {
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t col = column + 32 * u;
      if (has[first + g] && col < row_int4) v[g][u] = ld_ring_int4(reinterpret_cast<const int4*>(row_of(first + g)) + col);
    }
  }
}

// One token of a combine: out = cast(sum over d = 0..R-1 of rank d's row, in fp32 from 0), the
// reference's order; rank d is skipped where has[d] is false. The reduce is bound by load latency,
// not bandwidth, unless enough loads are in flight: the ranks go in groups of kGroup, and of each
// group kUnroll int4 per lane per rank are loaded before any is added (kGroup * kUnroll loads per
// lane in flight, within the registers the caller leaves).
// row_of(d) gives rank d's row (called only where has[d]).
template <int kNumRanks, typename T, int kUnroll, int kGroup = kNumRanks, typename RowOf>
__device__ __forceinline__ void reduce_token_row(const RowOf& row_of, const bool (&has)[kNumRanks], int4* out,
                                                 int64_t row_int4, int lane) {
  static_assert(kNumRanks % kGroup == 0, "the ranks split into whole groups");
  for (int64_t i = lane; i < row_int4; i += 32 * kUnroll) {
    if constexpr (kGroup == kNumRanks) {  // one group: each column's sum lives only while it is added
      int4 v[kNumRanks][kUnroll];
      load_rank_group<kNumRanks, kUnroll>(v, row_of, has, 0, i, row_int4);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t col = i + 32 * u;
        if (col >= row_int4) continue;
        float acc[Vec<T>::kElems];
#pragma unroll
        for (int j = 0; j < Vec<T>::kElems; ++j) acc[j] = 0.0f;
#pragma unroll
        for (int d = 0; d < kNumRanks; ++d) {
          if (has[d]) Vec<T>::add(acc, v[d][u]);
        }
        out[col] = Vec<T>::pack(acc);
      }
    } else {  // groups: the sums live across the groups
      float acc[kUnroll][Vec<T>::kElems];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < Vec<T>::kElems; ++j) acc[u][j] = 0.0f;
      }
#pragma unroll
      for (int first = 0; first < kNumRanks; first += kGroup) {
        int4 v[kGroup][kUnroll];
        load_rank_group<kGroup, kUnroll>(v, row_of, has, first, i, row_int4);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int g = 0; g < kGroup; ++g) {
            if (has[first + g]) Vec<T>::add(acc[u], v[g][u]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t col = i + 32 * u;
        if (col < row_int4) out[col] = Vec<T>::pack(acc[u]);
      }
    }
  }
}

// weights_of(d) gives rank d's weights of the token (called only where has[d]).
template <int kNumRanks, typename WeightsOf>
__device__ __forceinline__ void reduce_token_weights(const WeightsOf& weights_of, const bool (&has)[kNumRanks], float* out,
                                                     int num_topk, int lane) {
  if (lane >= num_topk) return;
  float acc = 0.0f;
#pragma unroll
  for (int d = 0; d < kNumRanks; ++d) {
    if (has[d]) acc += __ldcg(weights_of(d) + lane);
  }
  out[lane] = acc;
}

template <int kNumRanks, typename T>
__device__ __forceinline__ void combine_body(const PeerContext& ctx, const RingGeometry& ring, const CombineArgs& a) {
  constexpr int kUnroll = kNumRanks <= 2 ? 2 : 1;  // int4 per lane per step (registers: kNumRanks * kUnroll int4)
  __shared__ int step[kNumRanks];  // per sender group: rows in this step, -1 = timed out
  __shared__ int progress[kWarpsPerBlock][kNumRanks];
  __shared__ int abort_flag;

  const int channel = blockIdx.x / 2;
  const bool is_sender = (blockIdx.x % 2) == 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int me = ctx.rank;
  uint8_t* own = ctx.buffers[me];

  if (is_sender) {
    // Own rows are read by the receiver straight from x: all warps serve the peers.
    int home, warp_in_group, group_warps;
    if (!WarpGroups<kNumRanks, 0>::assign(warp, me, home, warp_in_group, group_warps)) return;
    const int* offsets = a.recv_channel_offset + home * (ring.num_channels + 1);
    const int row_begin = offsets[channel];
    send_stream<kNumRanks>(ctx, ring, channel, home, offsets[channel + 1] - row_begin, warp_in_group, group_warps, lane,
                           kWaitCombineSpace, &step[home], [&](int position, uint8_t* slot) {
                             const int64_t row = row_begin + position;
                             warp_copy<8, LoadInput, StoreRing>(slot, a.x + row * a.row_bytes, a.row_bytes, lane);
                             if (lane < a.num_topk) {
                               reinterpret_cast<float*>(slot + a.off_weights)[lane] =
                                   __ldg(a.topk_weights + row * a.num_topk + lane);
                             }
                           });
    return;
  }

  // Receiver: lane d (< R) of every warp tracks the stream from rank d.
  int begin, end;
  channel_range(a.num_tokens, ring.num_channels, channel, begin, end);
  const bool tracks_rank = lane < kNumRanks && lane != me;  // lanes of peers (own rows need no wait)
  const int self_row_begin = a.recv_channel_offset[me * (ring.num_channels + 1) + channel];
  const int source = tracks_rank ? lane : 0;
  const uint32_t* local_tail = counter(own, kOffRingTail, channel, source);
  uint32_t* head_shadow = counter(own, kOffHeadShadow, channel, source);
  const uint32_t base = tracks_rank ? ld_volatile(head_shadow) : 0u;
  uint32_t tail_seen = base;
  int consumed_upto = 0;  // positions [0, consumed_upto) of the stream from `source` read by this warp
  int released = 0;       // in warp 0: head already published to `source`
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();

  const int64_t row_int4 = a.row_bytes / 16;
  for (int round = begin; round < end; round += kWarpsPerBlock) {
    const int token = round + warp;
    if (token < end) {
      const int position = lane < kNumRanks ? a.send_position[static_cast<int64_t>(token) * kNumRanks + lane] : -1;
      bool ok = true;
      if (tracks_rank && position >= 0) {
        const uint32_t needed = base + static_cast<uint32_t>(position) + 1u;
        if (static_cast<int32_t>(tail_seen - needed) < 0) {
          ok = wait_counter(ctx, local_tail, needed, kWaitCombineData, source, channel, tail_seen);
        }
        consumed_upto = position + 1;
      }
      if (!ok) abort_flag = 1;
      const bool all_ok = __all_sync(0xffffffffu, ok);
      if (all_ok) {
        const uint8_t* rows[kNumRanks];
        const float* weights[kNumRanks];
        bool has[kNumRanks];
#pragma unroll
        for (int d = 0; d < kNumRanks; ++d) {
          const int p = __shfl_sync(0xffffffffu, position, d);
          has[d] = p >= 0;
          if (d == me) {  // own rows: straight from x / topk_weights
            const int64_t row = self_row_begin + static_cast<int64_t>(has[d] ? p : 0);
            rows[d] = a.x + row * a.row_bytes;
            weights[d] = a.topk_weights + row * a.num_topk;
          } else {
            rows[d] = ring_slot(own, ring, kNumRanks, channel, d, static_cast<uint32_t>(has[d] ? p : 0));
            weights[d] = reinterpret_cast<const float*>(rows[d] + a.off_weights);
          }
        }
        reduce_token_row<kNumRanks, T, kUnroll>(
            [&](int d) { return rows[d]; }, has, reinterpret_cast<int4*>(a.combined_x + static_cast<int64_t>(token) * a.row_bytes), row_int4, lane);
        reduce_token_weights<kNumRanks>([&](int d) { return weights[d]; }, has,
                                        a.combined_topk_weights + static_cast<int64_t>(token) * a.num_topk,
                                        a.num_topk, lane);
      }
    }
    if (tracks_rank) progress[warp][lane] = consumed_upto;
    __syncthreads();
    if (abort_flag) return;
    if (warp == 0 && tracks_rank) {
      int highest = released;
      for (int w = 0; w < kWarpsPerBlock; ++w) highest = max(highest, progress[w][lane]);
      if (highest > released) {
        st_release_sys(counter(ctx.buffers[source], kOffRingHead, channel, me), base + static_cast<uint32_t>(highest));
        released = highest;
      }
    }
    __syncthreads();  // progress is rewritten in the next round
  }
  if (warp == 0 && tracks_rank) *head_shadow = base + static_cast<uint32_t>(released);
}

template <int kNumRanks, typename T>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    combine_kernel(PeerContext ctx, RingGeometry ring, CombineArgs a) {
  // The barrier is carried here (one launch) unless combine_direct_kernel ran it; if it fails,
  // finish_block poisons the outputs. Behind the direct kernel this one moves the data only when
  // some rank has no combine block (every_rank_has_block reads the same R blocks on every rank).
  const bool opened = a.opening == Opening::kNone || fused_barrier(ctx, a.barrier_fp);
  const bool direct_moved_it = a.opening == Opening::kNone && every_rank_has_block(ctx, a.use_blocks);
  if (opened && !aborted(ctx) && !direct_moved_it) combine_body<kNumRanks, T>(ctx, ring, a);
  finish_block(ctx, a.poison);
}

// The direct combine's reduce: int4 per lane per rank, and ranks, loaded together (reduce_token_row;
// as many loads in flight as fit 80 registers without spilling, by ptxas).
template <int kNumRanks>
constexpr int kDirectCombineUnroll = kNumRanks <= 2 ? 4 : 1;
template <int kNumRanks>
constexpr int kDirectCombineGroup = kNumRanks <= 4 ? kNumRanks : 4;  // 8 ranks: two groups of 4

// Rows home rank `home` sent rank `peer` in the dispatch (the layout's rank_prefix_matrix).
__device__ __forceinline__ int rows_sent(const int* rank_prefix_matrix, int num_ranks, int home, int peer) {
  return rank_prefix_matrix[home * num_ranks + peer] - (home > 0 ? rank_prefix_matrix[(home - 1) * num_ranks + peer] : 0);
}

// First row of source `peer`'s region in home rank `home`'s combine block.
__device__ __forceinline__ int combine_region(const int* rank_prefix_matrix, int num_ranks, int home, int peer) {
  int first = 0;
  for (int d = 0; d < peer; ++d) first += rows_sent(rank_prefix_matrix, num_ranks, home, d);
  return first;
}

// The direct combine (every rank published a combine block). Blocks 2c and 2c+1 each push half of
// the rows this rank holds of every other rank's channel-c tokens into that rank's block (warp
// copies, the weights beside), then add 1 (release) to its arrival word (c, me); then each waits
// for 2 on the arrival words (c, d) of its own block and reduces half of channel c's tokens: token
// t's row from rank d is row region(d) + (rows of channels < c sent to d) + send_position[t][d] of
// its block (own rows straight from x), summed in fp32 from 0 over d = 0..R-1 and cast once, as the
// reference. Block 0 zeroed this rank's arrival words before the barrier, so no peer adds earlier.
template <int kNumRanks, typename T>
__device__ __forceinline__ void combine_direct(const PeerContext& ctx, const RingGeometry& ring, const CombineArgs& a) {
  __shared__ int arrived;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int me = ctx.rank, C = ring.num_channels, channel = blockIdx.x / 2;
  const bool even = blockIdx.x % 2 == 0;
  const int row_int4 = a.row_bytes / 16;
  // Push: my rows of home rank s's channel-c tokens (rows [offset[s][c], offset[s][c+1]) of x).
  for (int s = 0; s < kNumRanks; ++s) {
    if (s == me) continue;
    const ReceiveBlock block = published_block(ctx, s);
    const CombineBlockLayout layout = combine_block(block.rows, a.row_bytes, a.num_topk);
    uint8_t* base = ctx.buffers[s] + block.offset;
    const int* offsets = a.recv_channel_offset + s * (C + 1);
    const int first = combine_region(a.rank_prefix_matrix, kNumRanks, s, me) - offsets[0];
    const int row_begin = offsets[channel], row_end = offsets[channel + 1];
    const int mid = row_begin + (row_end - row_begin + 1) / 2;
    for (int row = (even ? row_begin : mid) + warp; row < (even ? mid : row_end); row += kWarpsPerBlock) {
      const int64_t at_row = static_cast<int64_t>(first) + row;
      if (at_row >= block.rows) {  // the ranks' layouts disagree: never write past the block
        if (lane == 0) report_error(ctx, kReceiveBlockOverflow, s, channel, block.rows, at_row);
        break;
      }
      warp_copy<8, LoadInput, StoreRing>(base + layout.off_rows + at_row * a.row_bytes,
                                         a.x + static_cast<int64_t>(row) * a.row_bytes, a.row_bytes, lane);
      if (lane < a.num_topk) {
        reinterpret_cast<float*>(base + layout.off_weights)[at_row * a.num_topk + lane] =
            __ldg(a.topk_weights + static_cast<int64_t>(row) * a.num_topk + lane);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x < kNumRanks && threadIdx.x != me) {
    const ReceiveBlock block = published_block(ctx, threadIdx.x);
    red_release_sys_add(reinterpret_cast<uint32_t*>(ctx.buffers[threadIdx.x] + block.offset) + channel * kMaxRanks + me, 1u);
  }
  // Wait for both blocks of every other rank's channel c.
  const ReceiveBlock mine = published_block(ctx, me);
  const uint8_t* own = ctx.buffers[me] + mine.offset;
  if (threadIdx.x == 0) arrived = 1;
  __syncthreads();
  if (threadIdx.x < kNumRanks && threadIdx.x != me) {
    uint32_t value;
    const uint32_t* word = reinterpret_cast<const uint32_t*>(own) + channel * kMaxRanks + threadIdx.x;
    if (!wait_counter(ctx, word, 2u, kWaitCombineData, threadIdx.x, channel, value)) atomicExch(&arrived, 0);
  }
  __syncthreads();
  if (!arrived) return;
  // Reduce my half of channel c's tokens.
  const CombineBlockLayout layout = combine_block(mine.rows, a.row_bytes, a.num_topk);
  int begin, end;
  channel_range(a.num_tokens, C, channel, begin, end);
  const int mid = begin + (end - begin + 1) / 2;
  // lane d < R: where rank d's rows of this channel start (own rows: in x; others: in my block)
  int lane_first = 0;
  if (lane < kNumRanks) {
    if (lane == me) {
      lane_first = a.recv_channel_offset[me * (C + 1) + channel];
    } else {
      lane_first = combine_region(a.rank_prefix_matrix, kNumRanks, me, lane);
      for (int c = 0; c < channel; ++c) lane_first += a.channel_count[lane * C + c];
    }
  }
  for (int t = (even ? begin : mid) + warp; t < (even ? mid : end); t += kWarpsPerBlock) {
    const int position = lane < kNumRanks ? a.send_position[static_cast<int64_t>(t) * kNumRanks + lane] : -1;
    const int my_row = lane_first + position;
    int row[kNumRanks];
    bool has[kNumRanks];
#pragma unroll
    for (int d = 0; d < kNumRanks; ++d) {
      has[d] = __shfl_sync(0xffffffffu, position, d) >= 0;
      row[d] = __shfl_sync(0xffffffffu, my_row, d);
    }
    // own rows straight from x, the peers' from this rank's block
    const auto row_of = [&](int d) {
      return (d == me ? a.x : own + layout.off_rows) + static_cast<int64_t>(row[d]) * a.row_bytes;
    };
    reduce_token_row<kNumRanks, T, kDirectCombineUnroll<kNumRanks>, kDirectCombineGroup<kNumRanks>>(
        row_of, has, reinterpret_cast<int4*>(a.combined_x + static_cast<int64_t>(t) * a.row_bytes), row_int4, lane);
    if (a.combined_topk_weights != nullptr) {
      const auto weights_of = [&](int d) {
        return (d == me ? a.topk_weights : reinterpret_cast<const float*>(own + layout.off_weights)) +
               static_cast<int64_t>(row[d]) * a.num_topk;
      };
      reduce_token_weights<kNumRanks>(weights_of, has, a.combined_topk_weights + static_cast<int64_t>(t) * a.num_topk,
                                      a.num_topk, lane);
    }
  }
}

// Block 0 zeroes this rank's arrival words (its own combine block) before the barrier that lets
// the peers add to them.
__device__ __forceinline__ void zero_arrivals(const PeerContext& ctx, const CombineArgs& a) {
  if (blockIdx.x != 0 || a.blocks.block.offset == kNoReceiveBlock) return;
  uint32_t* words = reinterpret_cast<uint32_t*>(ctx.buffers[ctx.rank] + a.blocks.block.offset);
  for (int i = threadIdx.x; i < kMaxChannels * kMaxRanks; i += blockDim.x) words[i] = 0u;
  __syncthreads();  // the barrier's fence (before its signal) then covers them
}

// The combine of a rank with a combine block of its own: runs the barrier (publishing the block),
// then the direct combine when every rank published one; else nothing, and the ring kernel
// launched behind it moves the data. Two kernels, so that the ring combine's registers do not make
// the direct one spill.
template <int kNumRanks, typename T>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    combine_direct_kernel(PeerContext ctx, RingGeometry ring, CombineArgs a) {
  zero_arrivals(ctx, a);
  if (fused_barrier(ctx, a.barrier_fp, a.blocks) && !aborted(ctx) && every_rank_has_block(ctx, a.use_blocks)) {
    combine_direct<kNumRanks, T>(ctx, ring, a);
  }
  finish_block(ctx, a.poison);
}

// The direct dispatch (every rank has a receive block; else it does nothing and the ring kernel
// launched after it moves the data). Its own kernel, so that its registers (a row in flight to
// every destination) do not make the ring kernel spill.
template <int kNumRanks, bool kFused>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    dispatch_direct_kernel(PeerContext ctx, RingGeometry ring, DispatchArgs a) {
  if (runs_notify<kFused>()) fused_notify(ctx, a.barrier_fp, a.notify);  // then this block's own data work
  const int channel = blockIdx.x / 2;
  bool opened = true;
  if (a.opening == Opening::kAfterNotify || a.opening == Opening::kFusedNotify) opened = wait_go(ctx);
  if (a.opening == Opening::kOwnBarrier) opened = fused_barrier(ctx, a.barrier_fp, a.blocks);
  if (opened && !aborted(ctx) && every_rank_has_block(ctx, a.use_blocks)) {
    dispatch_direct<kNumRanks, kFused>(ctx, ring, a, channel);
    // the padding rows, over every block (after notify: dispatch_direct waited for it)
    if (a.pad_rows && writes_outputs(a)) pad_rows_share(ctx, ring, a, blockIdx.x, data_blocks(ring));
  }
  finish_block(ctx, a.poison);
}

// Programmatic dependent launch of a dispatch behind notify; DEEPEP_MEGATRON_PDL=0 turns it off (the
// kernel then starts after notify ends, with the same results), e.g. to measure what it saves.
bool dependent_launch_enabled() {
  static const bool enabled = env_switch("DEEPEP_MEGATRON_PDL", true);
  return enabled;
}

template <typename Kernel>
void launch_kernel(Kernel kernel, const PeerContext& ctx, const RingGeometry& ring, const DispatchArgs& args,
                   cudaStream_t stream) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(2 * ring.num_channels);  // a kFusedNotify launch too: block 1 runs notify first
  config.blockDim = dim3(kThreadsPerBlock);
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  if (args.opening == Opening::kAfterNotify && dependent_launch_enabled()) {
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  check_cuda(cudaLaunchKernelEx(&config, kernel, ctx, ring, args), "dispatch kernel launch");
}

// With a receive block of its own (args.blocks), the rank launches the direct kernel first (it runs
// the opening barrier: notify's go word, or its own) and the ring kernel after it, opened by nothing
// (the barrier passed in the kernel before; an abort stops it). Each does nothing when the other
// is the one that moves the data (every_rank_has_block, alike on every rank). Without a block only
// the ring kernel runs, opened as the call asks.
template <int kNumRanks>
void launch_dispatch_for(const PeerContext& ctx, const RingGeometry& ring, const DispatchArgs& args, cudaStream_t stream) {
  const bool fused = args.opening == Opening::kFusedNotify;  // the kernel with the opening runs notify
  if (args.use_blocks && args.blocks.block.offset != kNoReceiveBlock) {
    launch_kernel(fused ? dispatch_direct_kernel<kNumRanks, true> : dispatch_direct_kernel<kNumRanks, false>, ctx,
                  ring, args, stream);
    DispatchArgs after = args;
    after.opening = Opening::kNone;
    launch_kernel(dispatch_kernel<kNumRanks, false>, ctx, ring, after, stream);
    return;
  }
  launch_kernel(fused ? dispatch_kernel<kNumRanks, true> : dispatch_kernel<kNumRanks, false>, ctx, ring, args, stream);
}


// A rank with a combine block of its own launches combine_direct_kernel (it runs the barrier) and
// the ring kernel behind it, opened by nothing; every other rank the ring kernel alone, which runs
// the barrier. Each rank passes one barrier, and exactly one of the two kernels moves the data.
template <int kNumRanks, typename T>
void launch_combine_typed(const PeerContext& ctx, const RingGeometry& ring, const CombineArgs& args, cudaStream_t stream) {
  const dim3 grid(2 * ring.num_channels), block(kThreadsPerBlock);
  if (args.use_blocks && args.blocks.block.offset != kNoReceiveBlock) {
    combine_direct_kernel<kNumRanks, T><<<grid, block, 0, stream>>>(ctx, ring, args);
    CombineArgs after = args;
    after.opening = Opening::kNone;
    combine_kernel<kNumRanks, T><<<grid, block, 0, stream>>>(ctx, ring, after);
    return;
  }
  combine_kernel<kNumRanks, T><<<grid, block, 0, stream>>>(ctx, ring, args);
}

template <int kNumRanks>
void launch_combine_for(const PeerContext& ctx, const RingGeometry& ring, const CombineArgs& args, cudaStream_t stream) {
  if (args.is_bf16) {
    launch_combine_typed<kNumRanks, __nv_bfloat16>(ctx, ring, args, stream);
  } else {
    launch_combine_typed<kNumRanks, float>(ctx, ring, args, stream);
  }
}

void check_ring(const PeerContext& ctx, const RingGeometry& ring) {
  if (ring.num_channels < 1 || ring.num_channels > kMaxChannels) {
    throw std::invalid_argument("num_channels must be in 1.." + std::to_string(kMaxChannels) + ", got " +
                                std::to_string(ring.num_channels));
  }
  if (ring.send_chunk < 1 || ring.send_chunk > kMaxSendChunk || ring.send_chunk + kWarpsPerBlock > ring.num_slots) {
    throw std::invalid_argument("send chunk " + std::to_string(ring.send_chunk) + " must be in 1.." +
                                std::to_string(kMaxSendChunk) + " and at most num_slots - " +
                                std::to_string(kWarpsPerBlock) + " (num_slots=" + std::to_string(ring.num_slots) + ")");
  }
  if (ring.slot_bytes % 16 != 0) throw std::invalid_argument("slot_bytes must be a multiple of 16");
  if (ctx.num_ranks != 2 && ctx.num_ranks != 4 && ctx.num_ranks != 8) {
    throw std::invalid_argument("intranode kernels support 2, 4 or 8 ranks, got " + std::to_string(ctx.num_ranks));
  }
}

void check_notify(const NotifyArgs& args) {
  if (args.num_channels < 1 || args.num_channels > kMaxChannels) {
    throw std::invalid_argument("notify: num_channels out of range");
  }
  if (args.num_local_experts < 0 || args.num_local_experts > kMaxLocalExperts) {
    throw std::invalid_argument("notify: at most " + std::to_string(kMaxLocalExperts) + " experts per rank, got " +
                                std::to_string(args.num_local_experts));
  }
}

}  // namespace

void launch_notify(const PeerContext& ctx, const Fingerprint& fp, const NotifyArgs& args, cudaStream_t stream) {
  check_notify(args);
  notify_kernel<<<1, kNotifyThreads, 0, stream>>>(ctx, fp, args);
  check_cuda(cudaGetLastError(), "notify kernel launch");
}

void launch_dispatch(const PeerContext& ctx, const RingGeometry& ring, const DispatchArgs& args, cudaStream_t stream) {
  check_ring(ctx, ring);
  if (args.slot.row_bytes % kSlotAlign != 0) throw std::invalid_argument("dispatch: the x row must be a multiple of 16 bytes");
  if (args.slot.off_src_idx + kSourceIndexBytes > ring.slot_bytes) throw std::invalid_argument("dispatch: slot overflow");
  if (args.num_topk > kMaxTopk) throw std::invalid_argument("dispatch: top-k above " + std::to_string(kMaxTopk));
  if (args.opening == Opening::kFusedNotify) check_notify(args.notify);
  switch (ctx.num_ranks) {
    case 2: launch_dispatch_for<2>(ctx, ring, args, stream); break;
    case 4: launch_dispatch_for<4>(ctx, ring, args, stream); break;
    default: launch_dispatch_for<8>(ctx, ring, args, stream); break;
  }
  check_cuda(cudaGetLastError(), "dispatch kernel launch");
}

void launch_combine(const PeerContext& ctx, const RingGeometry& ring, const CombineArgs& args, cudaStream_t stream) {
  check_ring(ctx, ring);
  if (args.row_bytes % 16 != 0) throw std::invalid_argument("combine: the x row must be a multiple of 16 bytes");
  if (args.num_topk > kMaxCombineTopk) throw std::invalid_argument("combine: topk_weights has too many columns");
  switch (ctx.num_ranks) {
    case 2: launch_combine_for<2>(ctx, ring, args, stream); break;
    case 4: launch_combine_for<4>(ctx, ring, args, stream); break;
    default: launch_combine_for<8>(ctx, ring, args, stream); break;
  }
  check_cuda(cudaGetLastError(), "combine kernel launch");
}

}  // namespace deepep_megatron
