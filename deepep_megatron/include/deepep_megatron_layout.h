// THE layout of the intranode communication buffer and the limits of the kernels: one definition,
// read by every kernel (csrc/) and by Python (deepep_megatron/layout.py parses the
// `constexpr ... kName = <integer>;` lines below, so a CPU-only install sizes buffers exactly as the
// kernels use them). Plain C++17, no CUDA: host and device code include it alike.
//
// ---------------------------------------------------------------------------------------------
// NVLink buffer of ONE rank (num_nvl_bytes, cudaMalloc'ed, zeroed at creation and on reset(),
// mapped by every peer over CUDA IPC):
//
//   offset                 what                                        written by -> read by
//   kOffEpoch              u32 epoch: barriers this rank passed        me (kernels) -> me
//   kOffAbort              u32 abort word: nonzero after the first     me -> me
//                          device-detected error of this rank
//   kOffDoneCounter        u32 blocks of the running data kernel that  me -> me
//                          finished (the last one resets it)
//   kOffGo                 u32 go word: verdict of the barrier that    me (notify, or block 0 of a
//                          opens the running data kernel (1 passed,    data kernel that carries its
//                          2 failed, 0 not yet); the kernel's last     barrier) -> me (the data
//                          block resets it                             kernel's blocks)
//   kOffBarrier            BarrierSignal[2][kMaxRanks]: parity p of    peer s (remote) -> me
//                          epoch, slot s = peer s's signal + the
//                          fingerprint of the operation it is in + the
//                          receive block it takes rows into directly
//   kOffReceiveBlocks      ReceiveBlock[kMaxRanks]: peer s's receive   me (the kernel or notify that
//                          block of the running dispatch, copied from  passed the barrier) -> me
//                          its barrier signal once the barrier passed
//   kOffNotifyChannel      i32 [kMaxRanks][kMaxChannels]: tokens       peer s (remote) -> me
//                          peer s sends me in channel c
//   kOffNotifyExpert       i32 [kMaxRanks][kMaxLocalExperts]: top-k    peer s (remote) -> me
//                          hits of peer s on each of my experts
//   kOffNotifySend         i32 [kMaxRanks][kMaxRanks]: peer s's rows   peer s (remote) -> me
//                          to every rank (so every rank knows every
//                          rank's receive total: DeepEP's rank_prefix_matrix)
//   kOffNotifyFlags        i32 [kMaxRanks]: 1 when peer s's topk_idx   peer s (remote) -> me
//                          had ids outside [-1, num_experts)
//   kOffNotifyCapacity     i32 [kMaxRanks]: receive rows peer s        peer s (remote) -> me
//                          allocated before its host wait, so every
//                          rank knows whether every rank's speculative
//                          dispatch kernel fits
//   kOffRingTail           u32 [kMaxChannels][kMaxRanks]               sender s (remote) -> me
//   kOffRingHead           u32 [kMaxChannels][kMaxRanks]               receiver d (remote) -> me
//   kOffTailShadow         u32 [kMaxChannels][kMaxRanks]               me -> me (last tail I wrote to d)
//   kOffHeadShadow         u32 [kMaxChannels][kMaxRanks]               me -> me (last head I wrote to s)
//   kOffDirectDone         u32 [kMaxChannels][kMaxRanks]: blocks of     sender s (remote, release add)
//                          sender s that finished writing channel c     -> me
//                          into my receive block (direct dispatch)
//   kOffDirectSeen         u32 [kMaxChannels][kMaxRanks]: the value of  me -> me
//                          kOffDirectDone consumed so far
//   kControlBytes ..       rings: ring(c, s) = kNumSlots slots of slot_bytes (see "slot" below)
//                          for c < num_channels, s < num_ranks; ring (c, s) of rank d carries
//                          channel c of sender s to receiver d.
//
// Epochs and counters are monotonic u32 compared wrap-safe. Every dispatch/combine starts with a
// barrier, after which every ring is drained (head == tail), so sender and receiver agree on the
// ring base: the sender takes it from tail_shadow, the receiver from head_shadow. The epoch lives
// here, on the device, and each barrier bumps it: a CUDA graph that replays a barrier waits for
// the right signal without any host counter baked into its launch arguments.
//
// A token slot (dispatch):  [x row | fp32 scales | int32 topk ids [kMaxTopk] | fp32 topk weights
//                           [kMaxTopk] | int32 source index], each region kSlotAlign-aligned;
//                           its size for a row of hidden_bytes (hidden * max(elem, 2)) is
//                           slot_bytes(hidden_bytes) below (Python: layout.token_slot_bytes).
// A row slot (combine):     [x row | fp32 topk weights], within the same slot size.
//
// Receive arena (direct write; DEEPEP_MEGATRON_RECV_ARENA_BYTES): the same IPC allocation goes on
// past num_nvl_bytes with an arena out of which a dispatch takes its recv_x (and FP8 scales) as one
// receive block (receive_block below). The rank publishes the block's offset and rows in the signal
// of the barrier that opens the dispatch. Then:
//   every rank published a block (direct dispatch): no ring is used. Both blocks of a channel send
//     (each half of the channel's tokens): a warp reads a token's row once and writes it, its scales
//     and its metadata (top-k ids made local to the destination, weights, source index) into its
//     final row of every destination's block (own rank included), then each block adds 1 to
//     kOffDirectDone[c][me] of every destination (release). The even block of a channel waits for
//     both blocks of every source (acquire), then copies the channel's metadata rows out of the
//     receive block into the ordinary top-k / source tensors (the handle keeps those, not the block).
//   some rank has no block (arena off or full, CUDA graph capture, the exact dispatch after a
//     speculative miss): the rings, except that a sender whose destination published a block writes
//     the x rows (and scales) straight there and only the metadata goes through the ring slot.
// ---------------------------------------------------------------------------------------------
#pragma once

#include <cstddef>
#include <cstdint>

namespace deepep_megatron {

// ----------------------------------------------------------------------------- limits
constexpr int kMaxRanks = 8;              // ranks of one NVLink domain
constexpr int kMaxChannels = 128;         // num_sms <= 2 * kMaxChannels
constexpr int kMaxLocalExperts = 1024;    // experts per rank
constexpr int kMaxTopk = 16;              // top-k slots a token carries
constexpr int kMaxCombineTopk = 32;       // topk_weights columns combine carries
constexpr int kMaxSendChunk = 128;        // tokens a ring sender publishes per step
constexpr int kWarpsPerBlock = 24;        // persistent blocks of 768 threads, one per SM
constexpr int kThreadsPerBlock = kWarpsPerBlock * 32;
constexpr int kFp8Block = 128;            // hidden elements per fp32 FP8 scale
constexpr int kSlotAlign = 16;            // every slot region is aligned to this many bytes
constexpr int kSourceIndexBytes = 16;     // the source-index region of a slot
constexpr int kFingerprintWords = 8;      // int32 words of an operation's fingerprint

// ----------------------------------------------------------------------------- control region
constexpr size_t kControlBytes = 65536;   // bytes before the rings

// Where a rank takes the rows of a dispatch directly (offset from the base of its IPC allocation;
// kNoReceiveBlock: through the rings) and how many rows the block holds.
constexpr int64_t kNoReceiveBlock = -1;
struct ReceiveBlock {
  int64_t offset;
  int64_t rows;
};
static_assert(sizeof(ReceiveBlock) == 16, "ReceiveBlock is two int64 words");

struct BarrierSignal {
  uint32_t epoch;                          // written last (release): the signal itself
  int32_t fingerprint[kFingerprintWords];  // the operation the signalling rank is in
  uint32_t pad;
  ReceiveBlock block;                      // the signalling rank's receive block (dispatch barriers)
  uint32_t pad2[2];                        // 64 bytes per signal
};
static_assert(sizeof(BarrierSignal) == 64, "BarrierSignal is one 64-byte record");

constexpr size_t kOffEpoch = 0;
constexpr size_t kOffAbort = 128;
constexpr size_t kOffDoneCounter = 192;
constexpr size_t kOffGo = 224;
constexpr size_t kOffBarrier = 256;
constexpr size_t kOffReceiveBlocks = kOffBarrier + sizeof(BarrierSignal) * 2 * kMaxRanks;
constexpr size_t kOffNotifyChannel = kOffReceiveBlocks + sizeof(ReceiveBlock) * kMaxRanks;
constexpr size_t kOffNotifyExpert = kOffNotifyChannel + sizeof(int32_t) * kMaxRanks * kMaxChannels;
constexpr size_t kOffNotifySend = kOffNotifyExpert + sizeof(int32_t) * kMaxRanks * kMaxLocalExperts;
constexpr size_t kOffNotifyFlags = kOffNotifySend + sizeof(int32_t) * kMaxRanks * kMaxRanks;
constexpr size_t kOffNotifyCapacity = kOffNotifyFlags + sizeof(int32_t) * kMaxRanks;
constexpr size_t kOffRingTail = kOffNotifyCapacity + sizeof(int32_t) * kMaxRanks;
constexpr size_t kOffRingHead = kOffRingTail + sizeof(uint32_t) * kMaxChannels * kMaxRanks;
constexpr size_t kOffTailShadow = kOffRingHead + sizeof(uint32_t) * kMaxChannels * kMaxRanks;
constexpr size_t kOffHeadShadow = kOffTailShadow + sizeof(uint32_t) * kMaxChannels * kMaxRanks;
constexpr size_t kOffDirectDone = kOffHeadShadow + sizeof(uint32_t) * kMaxChannels * kMaxRanks;
constexpr size_t kOffDirectSeen = kOffDirectDone + sizeof(uint32_t) * kMaxChannels * kMaxRanks;
constexpr size_t kControlEnd = kOffDirectSeen + sizeof(uint32_t) * kMaxChannels * kMaxRanks;
static_assert(kControlEnd <= kControlBytes, "the control region overflows kControlBytes");

// ----------------------------------------------------------------------------- slots
constexpr int align_slot(int bytes) { return (bytes + kSlotAlign - 1) / kSlotAlign * kSlotAlign; }

// Byte offsets inside one dispatch slot for a row of `row_bytes` (what the kernel moves) in a
// slot sized for `hidden_bytes` (hidden * max(element size, 2): FP8 rows are sized as bf16).
struct SlotLayout {
  int row_bytes, off_scales, off_topk_idx, off_topk_weights, off_src_idx, slot_bytes;
};

constexpr int slot_bytes(int hidden_bytes) {
  return align_slot(hidden_bytes) + align_slot((hidden_bytes / 2 + kFp8Block - 1) / kFp8Block * 4) +
         2 * align_slot(kMaxTopk * 4) + kSourceIndexBytes;
}

constexpr SlotLayout dispatch_slot(int row_bytes, int num_scales, int hidden_bytes) {
  SlotLayout s{};
  s.row_bytes = row_bytes;
  s.off_scales = align_slot(row_bytes);
  s.off_topk_idx = s.off_scales + align_slot(num_scales * 4);
  s.off_topk_weights = s.off_topk_idx + align_slot(kMaxTopk * 4);
  s.off_src_idx = s.off_topk_weights + align_slot(kMaxTopk * 4);
  s.slot_bytes = slot_bytes(hidden_bytes);
  return s;
}

// A receive block for `rows` rows of `row_bytes` with `num_scales` fp32 scales and `num_topk`
// top-k entries per row (0 for a cached dispatch): x rows from offset 0, then the scales [rows, S]
// fp32, the top-k ids [rows, K] int32 (local to the block's rank, -1 elsewhere), the top-k weights
// [rows, K] fp32 and the source indices [rows] int32 (num_topk > 0 only), each region
// kReceiveBlockAlign-aligned.
constexpr int64_t kReceiveBlockAlign = 128;
constexpr int64_t align_block(int64_t bytes) { return (bytes + kReceiveBlockAlign - 1) / kReceiveBlockAlign * kReceiveBlockAlign; }

struct ReceiveBlockLayout {
  int64_t off_scales, off_topk_idx, off_topk_weights, off_src_idx, bytes;
};

constexpr ReceiveBlockLayout receive_block(int64_t rows, int64_t row_bytes, int64_t num_scales, int64_t num_topk) {
  ReceiveBlockLayout l{};
  l.off_scales = align_block(rows * row_bytes);
  l.off_topk_idx = l.off_scales + align_block(rows * num_scales * 4);
  l.off_topk_weights = l.off_topk_idx + align_block(rows * num_topk * 4);
  l.off_src_idx = l.off_topk_weights + align_block(rows * num_topk * 4);
  l.bytes = l.off_src_idx + (num_topk > 0 ? align_block(rows * 4) : 0);
  return l;
}

// A combine block (direct combine, DEEPEP_MEGATRON_DIRECT_COMBINE=1), taken on the tokens' home rank s
// for `rows` rows and published in the combine's barrier:
//   0                u32 [kMaxChannels][kMaxRanks] arrivals: blocks of rank d that pushed channel c
//                    (block 0 of s's kernel zeroes them before its barrier; each of the two blocks of
//                    a channel on d adds 1 with release once its rows are in; s waits for 2)
//   off_rows         x rows [rows, row_bytes]: rank d pushes the rows it holds of s's tokens (its
//                    recv_x rows from s, in order) to rows [sum over d' < d of the rows s sent d', ...)
//   off_weights      their top-k weights [rows, K] fp32
struct CombineBlockLayout {
  int64_t off_rows, off_weights, bytes;
};

constexpr CombineBlockLayout combine_block(int64_t rows, int64_t row_bytes, int64_t num_topk) {
  CombineBlockLayout l{};
  l.off_rows = align_block(static_cast<int64_t>(sizeof(uint32_t)) * kMaxChannels * kMaxRanks);
  l.off_weights = l.off_rows + align_block(rows * row_bytes);
  l.bytes = l.off_weights + align_block(rows * num_topk * 4);
  return l;
}

// ----------------------------------------------------------------------------- low-latency (NVSHMEM)
// The symmetric heap region of ONE PE (num_rdma_bytes, nvshmem_malloc'ed, zeroed at creation and by
// clean_low_latency_buffer) that csrc/kernels/low_latency.cu reads and writes. Data sizes depend on
// (max_tokens M, hidden H, ranks R, experts E = R * E_local); ll_layout() below computes every
// offset, Python's layout.low_latency_layout mirrors it and get_low_latency_rdma_size_hint returns
// its total. The signals sit at offsets that do not depend on the shape, so calls of different
// shapes on one Buffer never read another shape's data as a signal.
//
//   offset            what                                             written by -> read by
//   0                 control: u32 abort word, then u32 done counters   me -> me
//                     [2 halves][kLLCounters] at kLLOffDone (the last
//                     block of a kernel elects itself with them)
//   kLLControlBytes   signals of half 0, then of half 1 (kLLSignalBytes each):
//     + 0             u64 dispatch counts [E_local][R]: n + 1 once     source rank s -> me (after its
//                     rank s sent all n of its pairs to local expert e  data; 0 = not yet)
//     + off_flags     u64 combine flags [R]: 1 once rank r sent back   expert rank r -> me
//                     every row it holds for me
//     + off_scratch   i32 scratch [E]: pairs this rank sends to each    me -> me (summed during the
//                     expert in the running dispatch                    send, read and cleared by its
//                                                                       last block)
//   off_data          data of half 0, then of half 1 (half_bytes each): consecutive low-latency
//                     calls alternate halves (double buffering), so a call never overwrites data a
//                     peer may still be reading from the call before.
//     + 0             send: dispatch staging [M] messages (the cast     me -> me (the source of
//                     row of each token), or combine rows              puts; zero_copy combine
//                     [E_local][R * M][H] bf16                          rows are written by experts)
//     + send_bytes    recv: dispatch slots [E_local][R][M] messages     source rank s -> me
//                     (slot (e, s, i): the i-th pair of rank s whose
//                     expert is my local expert e, in (token, k)
//                     order), or combine rows [E][M] of 2H bytes        expert rank -> me (row (e, i):
//                     (global expert e, slot i of MY dispatch)          expert e's output for my pair i)
// A message (dispatch slot or staging): [kLLHeaderBytes header: i32 source token index, pad]
// [row: H bytes e4m3 or 2H bytes bf16][FP8: H / 128 fp32 scales], 16-byte aligned
// (ll_message_bytes). Receivers clear the signals they consumed, so the next use of the half
// starts from zero; every wait is bounded and reports a Diagnostic (codes kWaitLowLatency*).
constexpr int kLLHeaderBytes = 16;        // message header: source token index (+ pad)
constexpr int kLLControlBytes = 4096;     // abort word + done counters
constexpr int kLLSignalBytes = 1048576;   // signals of one half
constexpr int kLLCounters = 4;            // done counters per half: dispatch send / recv, combine send / recv
constexpr int kLLOffDone = 64;            // byte offset of the done counters in the control region
constexpr int kLLRegionAlign = 128;       // every region is aligned to this
constexpr int kLLWarpsPerBlock = 16;      // low-latency blocks: 512 threads
constexpr int kLLMaxTokens = 4096;        // num_max_dispatch_tokens_per_rank limit
constexpr int kLLMaxLocalExperts = 1024;  // experts per rank
constexpr int kLLMaxRanks = 1024;         // PEs of one low-latency group (shared-memory tables)
constexpr int kLLMaxSmemTopkEntries = 8192;  // T * K a send block stages in shared memory (int32)

constexpr int64_t ll_align(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

constexpr int64_t ll_message_bytes(int64_t hidden, bool fp8) {
  return ll_align(kLLHeaderBytes + (fp8 ? hidden + hidden / kFp8Block * 4 : hidden * 2), 16);
}

struct LowLatencyLayout {
  int64_t message_bytes;   // bf16 message (the larger; FP8 messages use the same slots)
  int64_t off_flags;       // from a half's signals: u64 [R] (counts start at 0)
  int64_t off_scratch;     // i32 [E]
  int64_t signal_bytes;    // signals used by this shape (<= kLLSignalBytes)
  int64_t off_data;        // from the region's start: data of half 0
  int64_t send_bytes;      // send region of a half
  int64_t recv_bytes;      // recv region of a half
  int64_t half_bytes;      // data of a half
  int64_t total_bytes;     // off_data + 2 * half_bytes
};

constexpr LowLatencyLayout ll_layout(int64_t max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
  LowLatencyLayout l{};
  l.message_bytes = ll_message_bytes(hidden, false);
  l.off_flags = num_experts * 8;
  l.off_scratch = l.off_flags + ll_align(num_ranks * 8, 16);
  l.signal_bytes = l.off_scratch + num_experts * 4;
  l.off_data = kLLControlBytes + 2 * static_cast<int64_t>(kLLSignalBytes);
  const int64_t dispatch_send = max_tokens * l.message_bytes;
  const int64_t combine_rows = num_experts * max_tokens * hidden * 2;  // [E_local][R * M][H] == [E][M][H]
  l.send_bytes = ll_align(dispatch_send > combine_rows ? dispatch_send : combine_rows, kLLRegionAlign);
  const int64_t dispatch_recv = num_experts * max_tokens * l.message_bytes;  // [E_local][R][M]
  l.recv_bytes = ll_align(dispatch_recv > combine_rows ? dispatch_recv : combine_rows, kLLRegionAlign);
  l.half_bytes = l.send_bytes + l.recv_bytes;
  l.total_bytes = l.off_data + 2 * l.half_bytes;
  return l;
}

// ----------------------------------------------------------------------------- internode RDMA leg
// The rail exchange of node forwarding (backends/rail.py, kernels/rail.cu): rank (n, l) exchanges one
// block of packed rows per call with the ranks (m, l) of the other nodes, over NVSHMEM puts with
// signals. This PE's symmetric region, from offset 0:
//   control (kRailControlBytes): abort word u32 at kRailOffAbort; arrived u64 [N] at kRailOffArrived
//     (arrived[n]: put-with-signal adds from node n's rank, one per sending block per
//     call); consumed u64 [N] at kRailOffConsumed (consumed[m]: acks from node m's rank, one per call,
//     for the rows of the call before: it took them out of its receive slab).
//   send slabs [N][slab_bytes] at off_send: slab m holds this call's rows for node m
//   recv slabs [N][slab_bytes] at off_recv: slab n holds the rows node n's rank sent this call
// A call's signals are cumulative: call q (1-based) waits for arrived[n] >= the blocks of calls 1..q
// together (the block count may change from call to call; the host keeps the sum) and, before
// putting into node m's slab, for consumed[m] >= q - 1. Every wait is bounded and
// reports a Diagnostic (kWaitRailAck / kWaitRailData, the peer = the EP rank waited for).
constexpr int kRailMaxNodes = 128;
constexpr int64_t kRailOffAbort = 0;
constexpr int64_t kRailOffArrived = 64;
constexpr int64_t kRailOffConsumed = kRailOffArrived + 8 * kRailMaxNodes;
constexpr int64_t kRailControlBytes = 4096;
constexpr int64_t kRailSlabAlign = 128;
constexpr int kRailThreads = 256;          // threads of a rail exchange block
constexpr int kRailMaxBlocks = 128;        // blocks of one exchange (each puts a slice to every node)
static_assert(kRailOffConsumed + 8 * kRailMaxNodes <= kRailControlBytes, "rail control region overflows");

struct RailLayout {
  int64_t slab_bytes;   // one send or receive slab
  int64_t off_send;     // send slab 0
  int64_t off_recv;     // receive slab 0
};

// The slabs that `num_bytes` of heap hold for `num_nodes` nodes (slab_bytes <= 0: too small).
constexpr RailLayout rail_layout(int64_t num_bytes, int64_t num_nodes) {
  RailLayout l{};
  l.slab_bytes = (num_bytes - kRailControlBytes) / (2 * num_nodes) / kRailSlabAlign * kRailSlabAlign;
  l.off_send = kRailControlBytes;
  l.off_recv = kRailControlBytes + num_nodes * l.slab_bytes;
  return l;
}

// ----------------------------------------------------------------------------- host-mapped words
// What a device-detected error reports (Diagnostic::code).
enum ErrorCode : int32_t {
  kWaitBarrier = 1,          // barrier: waited for the peer's barrier signal
  kWaitDispatchSpace = 2,    // dispatch sender: waited for free slots (peer's ring_head)
  kWaitDispatchData = 3,     // dispatch receiver: waited for tokens (peer's ring_tail)
  kWaitCombineSpace = 4,     // combine sender: waited for free slots
  kWaitCombineData = 5,      // combine receiver: waited for rows
  kFingerprintMismatch = 6,  // barrier: the peer is in another operation / geometry
  kBadExpertIds = 7,         // notify (num_worst_tokens): some rank's topk_idx out of range
  kWorstTokensExceeded = 8,  // notify (num_worst_tokens): a rank receives more rows than the bound
  kWaitLowLatencyDispatch = 9,   // low-latency dispatch receiver: waited for a source rank's count signal
  kWaitLowLatencyCombine = 10,   // low-latency combine receiver: waited for an expert rank's flag
  kLowLatencySlotOverflow = 11,  // low-latency dispatch: more than max_tokens pairs of one rank for one expert
  kLowLatencyBadExpertIds = 12,  // low-latency dispatch/combine: topk_idx outside [-1, num_experts)
  kReceiveBlockOverflow = 13,    // dispatch sender: a row past the rows of the peer's receive block
  kWaitRailAck = 14,             // RDMA leg sender: waited for the node's rank to take the previous rows
  kWaitRailData = 15,            // RDMA leg receiver: waited for the rows of a node's rank
};

// Filled by the first device-detected error of this rank (host-mapped memory).
struct Diagnostic {
  int32_t flag;     // 1 once filled (written last)
  int32_t code;     // ErrorCode
  int32_t rank;     // the rank that detected it
  int32_t peer;     // the rank it waited for / disagreed with / that overflowed (-1: none)
  int32_t channel;  // channel (-1 for the barrier and notify)
  int32_t block;    // blockIdx.x of the detector
  int64_t expected; // counter target / own fingerprint word / num_worst_tokens / bad-rank mask
  int64_t seen;     // counter seen / the peer's fingerprint word / rows received
  int32_t mine[kFingerprintWords];    // fingerprints (kFingerprintMismatch only)
  int32_t theirs[kFingerprintWords];
};

// Written by notify into host-mapped memory for a dispatch that waits for its sizes: the host
// spins on `sequence` (written last), no stream sync and no copy.
struct NotifyResult {
  uint32_t sequence;   // the epoch of notify's second barrier once the rest is valid
  int32_t bad_ranks;   // bit s: rank s's topk_idx held ids outside [-1, num_experts)
  int64_t low, high;   // this rank's min / max topk_idx (INT64_MAX / INT64_MIN without tokens)
  int32_t fits;        // 1: every rank's receive rows fit the capacity it allocated before its wait
                       // (the dispatch kernels launched with those allocations move the data)
  int32_t pad;
  int32_t counts[kMaxRanks + kMaxLocalExperts];  // rows from each source rank, then per local expert (aligned)
};

// Words of an operation's fingerprint (BarrierSignal::fingerprint, Diagnostic::mine/theirs).
enum FingerprintWord : int {
  kFpOperation = 0,   // Operation below
  kFpRowBytes = 1,    // bytes of one row moved
  kFpScales = 2,      // FP8 scales per row (0 without)
  kFpTopk = 3,        // top-k carried (0 for cached dispatch)
  kFpChannels = 4,    // channels (num_sms / 2)
  kFpSlots = 5,       // ring slots
  kFpChunk = 6,       // send chunk
  kFpGeneration = 7,  // buffer generation (bumped by reset)
};

enum Operation : int32_t {
  kOpDispatch = 1,
  kOpCachedDispatch = 2,
  kOpCombine = 3,
  kOpBarrier = 4,
};

}  // namespace deepep_megatron
