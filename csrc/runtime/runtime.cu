// Runtime (runtime.h): allocation, IPC mapping, reset and the host side of the notify handshake.
// The buffer's layout is deepep_megatron_layout.h; this file only allocates and zeroes it.
#include "runtime.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>

#include "launch.h"

namespace deepep_megatron {

Runtime::Runtime(int rank, int num_ranks, int64_t num_nvl_bytes, int device, double timeout_s,
                 int64_t num_recv_arena_bytes)
    : rank_(rank), num_ranks_(num_ranks), num_nvl_bytes_(num_nvl_bytes), device_(device), timeout_s_(0) {
  set_timeout_s(timeout_s);
  if (num_ranks < 1 || num_ranks > kMaxRanks || rank < 0 || rank >= num_ranks) {
    throw std::invalid_argument("Runtime: rank " + std::to_string(rank) + " of " + std::to_string(num_ranks) +
                                " is out of range (at most " + std::to_string(kMaxRanks) + " ranks)");
  }
  if (num_nvl_bytes < static_cast<int64_t>(kControlBytes)) {
    throw std::invalid_argument("Runtime: num_nvl_bytes=" + std::to_string(num_nvl_bytes) + " is smaller than the " +
                                std::to_string(kControlBytes) + "-byte control region");
  }
  if (num_recv_arena_bytes < 0) {
    throw std::invalid_argument("Runtime: num_recv_arena_bytes must be >= 0, got " + std::to_string(num_recv_arena_bytes));
  }
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  // One allocation: the NVLink buffer, then (aligned) the receive arena, so one IPC handle maps both.
  const int64_t arena_begin = align_block(num_nvl_bytes);
  const int64_t total_bytes = num_recv_arena_bytes > 0 ? arena_begin + num_recv_arena_bytes : num_nvl_bytes;
  check_cuda(cudaMalloc(&local_, static_cast<size_t>(total_bytes)), "cudaMalloc of the NVLink buffer");
  allocation_ = std::shared_ptr<uint8_t>(local_, [](uint8_t* p) { cudaFree(p); });
  check_cuda(cudaMemset(local_, 0, static_cast<size_t>(num_nvl_bytes)), "cudaMemset of the NVLink buffer");
  if (num_recv_arena_bytes > 0) arena_ = std::make_shared<ReceiveArena>(allocation_, arena_begin, num_recv_arena_bytes, device);
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&host_diagnostic_), sizeof(Diagnostic), cudaHostAllocMapped),
             "cudaHostAlloc of the diagnostic word");
  std::memset(host_diagnostic_, 0, sizeof(Diagnostic));
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_diagnostic_), host_diagnostic_, 0),
             "cudaHostGetDevicePointer of the diagnostic word");
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&host_notify_), sizeof(NotifyResult), cudaHostAllocMapped),
             "cudaHostAlloc of the notify result");
  std::memset(host_notify_, 0, sizeof(NotifyResult));
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_notify_), host_notify_, 0),
             "cudaHostGetDevicePointer of the notify result");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize after allocating the NVLink buffer");
  peers_[rank_] = local_;
}

Runtime::~Runtime() {
  // Best effort: explicit close_peers()/free_local() are the normal path (collective in Python).
  if (peers_open_) {
    for (int r = 0; r < num_ranks_; ++r) {
      if (r != rank_ && peers_[r] != nullptr) cudaIpcCloseMemHandle(peers_[r]);
    }
  }
  arena_.reset();
  allocation_.reset();  // cudaFree, unless receive blocks are still viewed
  if (host_diagnostic_ != nullptr) cudaFreeHost(host_diagnostic_);
  if (host_notify_ != nullptr) cudaFreeHost(host_notify_);
}

void Runtime::set_timeout_s(double timeout_s) {
  if (!(timeout_s > 0) || timeout_s > 1e6) {
    throw std::invalid_argument("timeout_s must be in (0, 1e6] seconds, got " + std::to_string(timeout_s));
  }
  timeout_s_ = timeout_s;
}

void Runtime::reset() {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize before reset");
  if (local_ == nullptr) throw std::runtime_error("Runtime.reset: the NVLink buffer was already freed");
  check_cuda(cudaMemset(local_, 0, kControlBytes), "cudaMemset of the control region");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize after reset");
  std::memset(host_diagnostic_, 0, sizeof(Diagnostic));
  std::memset(host_notify_, 0, sizeof(NotifyResult));
  ticket_ = 0;
  ++generation_;
}

bool Runtime::wait_notify(uint32_t sequence, double host_timeout_s) const {
  const volatile uint32_t* seen = &host_notify_->sequence;
  const volatile int* flag = &host_diagnostic_->flag;
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t iter = 0;; ++iter) {
    if (*seen == sequence) {
      std::atomic_thread_fence(std::memory_order_acquire);  // the result's fields after the sequence
      return true;
    }
    if ((iter & 1023u) == 0u) {
      if (*flag != 0) return false;
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (elapsed > host_timeout_s) {
        throw std::runtime_error("deepep_megatron._C: the notify kernel's result did not arrive within " +
                                 std::to_string(host_timeout_s) + " s (the stream is blocked before it)");
      }
    }
  }
}

std::string Runtime::ipc_handle() const {
  if (local_ == nullptr) throw std::runtime_error("Runtime: the NVLink buffer was already freed");
  cudaIpcMemHandle_t handle;
  check_cuda(cudaIpcGetMemHandle(&handle, local_), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void Runtime::open_peers(const std::vector<std::string>& handles, const std::vector<int64_t>& sizes) {
  if (peers_open_) throw std::runtime_error("Runtime: peers are already open");
  if (static_cast<int>(handles.size()) != num_ranks_ || static_cast<int>(sizes.size()) != num_ranks_) {
    throw std::invalid_argument("Runtime.open_peers: expected " + std::to_string(num_ranks_) + " handles and sizes, got " +
                                std::to_string(handles.size()) + " and " + std::to_string(sizes.size()));
  }
  min_buffer_bytes_ = num_nvl_bytes_;
  for (int64_t size : sizes) min_buffer_bytes_ = std::min(min_buffer_bytes_, size);
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  for (int r = 0; r < num_ranks_; ++r) {
    if (handles[r].size() != sizeof(cudaIpcMemHandle_t)) {
      throw std::invalid_argument("Runtime.open_peers: handle of rank " + std::to_string(r) + " has " +
                                  std::to_string(handles[r].size()) + " bytes, expected " +
                                  std::to_string(sizeof(cudaIpcMemHandle_t)));
    }
    if (r == rank_) continue;
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, handles[r].data(), sizeof(handle));
    void* ptr = nullptr;
    check_cuda(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess),
               ("cudaIpcOpenMemHandle of rank " + std::to_string(r) + "'s NVLink buffer").c_str());
    peers_[r] = static_cast<uint8_t*>(ptr);
  }
  peers_open_ = true;
}

void Runtime::close_peers() {
  if (!peers_open_) return;
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize before closing the peers' buffers");
  for (int r = 0; r < num_ranks_; ++r) {
    if (r != rank_ && peers_[r] != nullptr) {
      check_cuda(cudaIpcCloseMemHandle(peers_[r]), "cudaIpcCloseMemHandle");
      peers_[r] = nullptr;
    }
  }
  peers_open_ = false;
}

void Runtime::free_local() {
  if (peers_open_) close_peers();
  if (local_ != nullptr) {
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize before freeing the NVLink buffer");
    arena_.reset();
    allocation_.reset();  // cudaFree now, or when the last receive block still viewed is released
    local_ = nullptr;
    peers_[rank_] = nullptr;
  }
}

std::vector<int64_t> Runtime::diagnostic() const {
  const volatile Diagnostic* d = host_diagnostic_;
  std::vector<int64_t> out = {d->flag, d->code, d->rank, d->peer, d->channel, d->block, d->expected, d->seen};
  for (int i = 0; i < kFingerprintWords; ++i) out.push_back(d->mine[i]);
  for (int i = 0; i < kFingerprintWords; ++i) out.push_back(d->theirs[i]);
  return out;
}

PeerContext Runtime::context() const {
  if (!peers_open_ || local_ == nullptr) throw std::runtime_error("Runtime: the peers' buffers are not open");
  PeerContext ctx{};
  for (int r = 0; r < kMaxRanks; ++r) ctx.buffers[r] = r < num_ranks_ ? peers_[r] : nullptr;
  ctx.diagnostic = device_diagnostic_;
  ctx.timeout_ns = static_cast<uint64_t>(timeout_s_ * 1e9);
  ctx.rank = rank_;
  ctx.num_ranks = num_ranks_;
  return ctx;
}

}  // namespace deepep_megatron
