// Runtime: one rank's NVLink buffer (cudaMalloc + CUDA IPC), the peers' mappings and the host-mapped
// words the kernels report into (Diagnostic, NotifyResult). Room is left here for the NVSHMEM heap of
// the low-latency and internode kernels. Plain C++ (no device code, no torch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "context.h"
#include "host_timing.h"
#include "receive_arena.h"

namespace deepep_megatron {

class Runtime {
 public:
  // num_recv_arena_bytes > 0: the IPC allocation goes on past num_nvl_bytes with a receive arena of
  // that size (direct-write dispatch; deepep_megatron_layout.h, "Receive arena").
  Runtime(int rank, int num_ranks, int64_t num_nvl_bytes, int device, double timeout_s,
          int64_t num_recv_arena_bytes = 0);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int device() const { return device_; }
  int64_t num_nvl_bytes() const { return num_nvl_bytes_; }
  int32_t generation() const { return generation_; }
  double timeout_s() const { return timeout_s_; }
  void set_timeout_s(double timeout_s);

  std::string ipc_handle() const;                             // 64 bytes (cudaIpcMemHandle_t)
  // One handle and buffer size per rank, own included. Every ring a kernel writes into a peer is
  // checked against the smallest buffer of the group (min_buffer_bytes).
  void open_peers(const std::vector<std::string>& handles, const std::vector<int64_t>& sizes);
  int64_t min_buffer_bytes() const { return min_buffer_bytes_; }
  void close_peers();                                         // unmaps the peers' buffers
  // Frees this rank's buffer (after every peer unmapped it); receive blocks still viewed by tensors
  // keep the allocation until the last of them dies.
  void free_local();
  // The receive arena, or null without one (or once freed). Shared: tensor deleters hold it.
  const std::shared_ptr<ReceiveArena>& arena() const { return arena_; }
  bool is_open() const { return peers_open_; }

  // The first device-detected error: [flag, code, rank, peer, channel, block, expected, seen,
  // mine[kFingerprintWords], theirs[kFingerprintWords]] (flag 0: none). Reads host memory, no sync.
  std::vector<int64_t> diagnostic() const;
  bool has_error() const { return host_diagnostic_->flag != 0; }
  // Collective in the caller (every rank, device idle everywhere): zero the control region (epoch,
  // barrier signals, ring counters, abort word), clear the host words, bump the generation.
  void reset();

  PeerContext context() const;
  uint32_t next_ticket() { return ++ticket_; }
  // The most rows any of the last kReceiveHintWindow host-waited dispatches received: what the next
  // one allocates for while notify runs (a window, so that the MoE layers sharing this buffer,
  // whose counts differ, rarely miss). 0 before the first.
  static constexpr int kReceiveHintWindow = 32;
  int64_t receive_rows_hint() const {
    int64_t most = 0;
    for (int64_t rows : recent_receive_rows_) most = rows > most ? rows : most;
    return most;
  }
  void set_receive_rows_hint(int64_t rows) {
    recent_receive_rows_[num_receive_hints_++ % kReceiveHintWindow] = rows;
  }
  NotifyResult* notify_result_device() const { return device_notify_; }
  // Spin (the caller releases the GIL) until notify published `ticket`: true; false when a kernel of
  // this rank reported an error first; throws after host_timeout_s (the stream never got there).
  bool wait_notify(uint32_t ticket, double host_timeout_s) const;
  const NotifyResult& notify_result() const { return *host_notify_; }
  // Stage times of this rank's last operation (DEEPEP_MEGATRON_HOST_TIMING=1; host_timing.h).
  HostTiming& host_timing() { return host_timing_; }

 private:
  int rank_;
  int num_ranks_;
  int64_t num_nvl_bytes_;
  int device_;
  double timeout_s_;
  int32_t generation_ = 0;
  uint8_t* local_ = nullptr;
  std::shared_ptr<uint8_t> allocation_;  // owns local_ (cudaFree with its last reference)
  std::shared_ptr<ReceiveArena> arena_;
  uint8_t* peers_[kMaxRanks] = {};
  bool peers_open_ = false;
  Diagnostic* host_diagnostic_ = nullptr;
  Diagnostic* device_diagnostic_ = nullptr;
  NotifyResult* host_notify_ = nullptr;
  NotifyResult* device_notify_ = nullptr;
  uint32_t ticket_ = 0;
  int64_t recent_receive_rows_[kReceiveHintWindow] = {};
  int64_t num_receive_hints_ = 0;
  int64_t min_buffer_bytes_ = 0;
  HostTiming host_timing_;
};

}  // namespace deepep_megatron
