// Host-side interface of the extension: constants shared with deepep_megatron/config.py, the
// diagnostic word a timed-out kernel fills, the argument structs of the launchers, and the
// Runtime that owns one rank's NVLink buffer and its peers' IPC mappings.
//
// This header is plain C++ (no device code): bindings.cpp includes it with the host compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace deepep_megatron {

constexpr int kMaxRanks = 8;
constexpr int kMaxChannels = 128;       // num_sms <= 256
constexpr int kMaxLocalExperts = 1024;  // experts per rank
constexpr int kMaxTopk = 16;
constexpr int kMaxSendChunk = 128;     // tokens a ring sender publishes per step
constexpr int kWarpsPerBlock = 24;      // 768 threads: one block per SM (persistent kernels)
constexpr int kThreadsPerBlock = kWarpsPerBlock * 32;
//: Bytes of the control region at the start of every NVLink buffer (config.NVL_CONTROL_BYTES).
constexpr size_t kControlBytes = 65536;

// Filled by the first spin-wait of this rank that timed out (host-mapped memory).
struct Diagnostic {
  int flag;     // 1 once filled
  int code;     // WaitCode (runtime.cuh)
  int rank;     // the rank that waited
  int peer;     // the rank it waited for
  int channel;  // channel (-1 for the barrier)
  int block;    // blockIdx.x of the waiter
  int64_t expected;  // counter value it waited for
  int64_t seen;      // counter value it last saw
};

// Written by the notify kernel into host-mapped memory (the host spins on `sequence`, no stream
// sync, no copy): the receive sizes of a normal dispatch and the cross-rank topk_idx range check.
struct NotifyResult {
  uint32_t sequence;   // written last: the epoch of notify's second barrier once the rest is valid
  int bad_ranks;       // bit s: rank s's topk_idx held ids outside [-1, num_experts)
  int64_t low, high;   // this rank's min / max topk_idx value (INT64_MAX / INT64_MIN without tokens)
  int counts[kMaxRanks + kMaxLocalExperts];  // rows from each source rank, then per local expert (aligned)
};

// Everything a kernel needs to reach the peers. Passed by value.
struct PeerContext {
  uint8_t* buffers[kMaxRanks];  // base of each rank's NVLink buffer in this process (own at [rank])
  Diagnostic* diagnostic;       // device pointer of the host-mapped diagnostic
  uint64_t timeout_ns;
  int rank;
  int num_ranks;
};

// Geometry of the per-(channel, peer) rings for one call.
struct RingGeometry {
  int num_channels;
  int num_slots;     // slots per ring
  int send_chunk;    // tokens a sender publishes per step
  int slot_bytes;    // bytes per slot (16-aligned)
};

struct DispatchArgs {
  // sender side (this rank's tokens)
  const uint8_t* x;               // [T, x_row_bytes]
  const float* x_scales;          // [T, num_scales] or null
  const int64_t* topk_idx;        // [T, num_topk] or null (cached dispatch)
  const float* topk_weights;      // [T, num_topk] or null
  const int* send_tokens;         // [R, T] token at each position of each (channel, me -> r) stream (channel_layout)
  const int* channel_count;       // [R, C] length of stream (channel c, me -> r)
  int num_tokens;
  int x_row_bytes;                // multiple of 16
  int num_scales;                 // 0 without FP8
  int num_topk;                   // 0 for cached dispatch
  // receiver side
  const int* recv_channel_offset;  // [R, C + 1] first output row of (source rank, channel)
  uint8_t* recv_x;                 // [N, x_row_bytes]
  float* recv_x_scales;            // [N, num_scales] or null
  int64_t* recv_topk_idx;          // [N, num_topk] or null
  float* recv_topk_weights;        // [N, num_topk] or null
  int* recv_src_idx;               // [N] or null
  int num_local_experts;
  // slot layout
  int off_scales, off_topk_idx, off_topk_weights, off_src_idx;
};

struct CombineArgs {
  // sender side (rows this rank received in the dispatch)
  const uint8_t* x;               // [N, row_bytes] bf16 or fp32
  const float* topk_weights;      // [N, num_topk] or null
  const int* recv_channel_offset; // [R, C + 1]
  // receiver side (this rank's original tokens)
  const int* send_position;       // [T, R] position of token t in the stream (channel of t, me -> r), -1 if not sent
  int num_tokens;
  uint8_t* combined_x;            // [T, row_bytes]
  float* combined_topk_weights;   // [T, num_topk] or null
  int row_bytes;
  int num_topk;                   // 0 without weights
  bool is_bf16;                   // else fp32
  int off_weights;
};

// Launchers (stream-ordered, check the launch, never synchronize).
void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                                int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
                                cudaStream_t stream);
void launch_channel_layout(const bool* is_token_in_rank, int num_tokens, int num_ranks, int num_channels,
                           int* channel_count, int* send_position, int* send_tokens, const int64_t* topk_idx,
                           int num_topk, int64_t* channel_topk_range, cudaStream_t stream);
void launch_barrier(const PeerContext& ctx, uint32_t epoch, cudaStream_t stream);
void launch_notify(const PeerContext& ctx, uint32_t epoch, const int* channel_count, const int* num_tokens_per_expert,
                   int num_channels, int num_local_experts, int expert_alignment, const int64_t* channel_topk_range,
                   int64_t num_experts, int* recv_channel_offset, int* send_counts, NotifyResult* result,
                   cudaStream_t stream);
void launch_dispatch(const PeerContext& ctx, const RingGeometry& ring, const DispatchArgs& args, cudaStream_t stream);
void launch_combine(const PeerContext& ctx, const RingGeometry& ring, const CombineArgs& args, cudaStream_t stream);

void check_cuda(cudaError_t err, const char* what);

// One rank's NVLink buffer, its peers' mappings and the diagnostic word.
class Runtime {
 public:
  Runtime(int rank, int num_ranks, int64_t num_nvl_bytes, int device);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  std::string ipc_handle() const;                             // 64 bytes (cudaIpcMemHandle_t)
  void open_peers(const std::vector<std::string>& handles);   // one per rank, own included
  void close_peers();                                         // unmaps the peers' buffers
  void free_local();                                          // frees this rank's buffer (after every peer unmapped it)
  bool is_open() const { return peers_open_; }

  std::vector<int64_t> diagnostic() const;  // [flag, code, rank, peer, channel, block, expected, seen]
  PeerContext context(double timeout_s) const;
  uint32_t next_epoch() { return ++epoch_; }
  NotifyResult* notify_result_device() const { return device_notify_; }
  // Spin (GIL released by the caller) until the notify of `sequence` has written its result, a
  // kernel of this rank reported a timeout (returns false), or `host_timeout_s` passes (throws).
  bool wait_notify(uint32_t sequence, double host_timeout_s) const;
  const NotifyResult& notify_result() const { return *host_notify_; }

 private:
  int rank_;
  int num_ranks_;
  int64_t num_nvl_bytes_;
  int device_;
  uint8_t* local_ = nullptr;
  uint8_t* peers_[kMaxRanks] = {};
  bool peers_open_ = false;
  Diagnostic* host_diagnostic_ = nullptr;
  Diagnostic* device_diagnostic_ = nullptr;
  NotifyResult* host_notify_ = nullptr;
  NotifyResult* device_notify_ = nullptr;
  uint32_t epoch_ = 0;
};

}  // namespace deepep_megatron
