// The rail exchange's runtime (rail_ops.h): slab views, checks, the launch.
#include "rail_ops.h"

#include <c10/cuda/CUDAStream.h>

#include "launch.h"  // check_cuda

#include <cstring>
#include <stdexcept>
#include <string>

namespace deepep_megatron {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("deepep_megatron._C (rail): " + what); }

}  // namespace

RailRuntime::RailRuntime(NvshmemHeap& heap, int rank, int num_ranks, int ranks_per_node, int device, double timeout_s)
    : num_bytes_(heap.num_bytes()), device_(device) {
  if (ranks_per_node < 1 || num_ranks % ranks_per_node != 0) fail("num_ranks must be a multiple of ranks_per_node");
  const int num_nodes = num_ranks / ranks_per_node;
  if (num_nodes < 1 || num_nodes > kRailMaxNodes) fail("at most " + std::to_string(kRailMaxNodes) + " nodes");
  if (rank < 0 || rank >= num_ranks) fail("rank out of range");
  if (heap.my_pe() != rank || heap.n_pes() != num_ranks) fail("the heap's PE numbering differs from the group's");
  ctx_.heap = static_cast<uint8_t*>(heap.base());
  ctx_.rank = rank;
  ctx_.num_nodes = num_nodes;
  ctx_.ranks_per_node = ranks_per_node;
  ctx_.home = rank / ranks_per_node;
  ctx_.local = rank % ranks_per_node;
  ctx_.layout = rail_layout(num_bytes_, num_nodes);
  if (ctx_.layout.slab_bytes <= 0) fail("the NVSHMEM heap (num_rdma_bytes) is too small for the rail's control region");
  set_timeout_s(timeout_s);
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&host_diagnostic_), sizeof(Diagnostic), cudaHostAllocMapped),
                  "cudaHostAlloc of the rail diagnostic");
  std::memset(host_diagnostic_, 0, sizeof(Diagnostic));
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ctx_.diagnostic), host_diagnostic_, 0),
                  "cudaHostGetDevicePointer of the rail diagnostic");
}

RailRuntime::~RailRuntime() {
  if (host_diagnostic_ != nullptr) cudaFreeHost(host_diagnostic_);
}

void RailRuntime::set_timeout_s(double timeout_s) {
  if (!(timeout_s > 0) || timeout_s > 1e6) fail("timeout_s must be in (0, 1e6] seconds, got " + std::to_string(timeout_s));
  timeout_s_ = timeout_s;
  ctx_.timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
}

std::vector<int64_t> RailRuntime::diagnostic() const {
  const volatile Diagnostic* d = host_diagnostic_;
  return {d->flag, d->code, d->rank, d->peer, d->channel, d->block, d->expected, d->seen};
}

at::Tensor RailRuntime::view(int64_t offset, int64_t bytes) const {
  const auto options = at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device_);
  return at::from_blob(ctx_.heap + offset, {bytes}, options);
}

at::Tensor RailRuntime::send_slab(int node, int64_t bytes) const {
  if (node < 0 || node >= ctx_.num_nodes) fail("node out of range");
  if (bytes < 0 || bytes > ctx_.layout.slab_bytes) {
    fail("this call sends " + std::to_string(bytes) + " bytes to one node but a slab holds " +
         std::to_string(ctx_.layout.slab_bytes) + ": create the Buffer with more num_rdma_bytes (2 x nodes x tokens x "
         "row bytes + 4096; see Config.get_rdma_buffer_size_hint)");
  }
  return view(ctx_.layout.off_send + ctx_.layout.slab_bytes * node, bytes);
}

std::vector<at::Tensor> RailRuntime::exchange(const std::vector<int64_t>& send_bytes,
                                              const std::vector<int64_t>& recv_bytes, int num_blocks) {
  if (has_error()) throw RailError("a rail exchange of this rank recorded an error");
  const int N = ctx_.num_nodes;
  if (static_cast<int>(send_bytes.size()) != N || static_cast<int>(recv_bytes.size()) != N) {
    fail("send_bytes and recv_bytes need one entry per node (" + std::to_string(N) + ")");
  }
  RailExchangeArgs args{};
  for (int n = 0; n < N; ++n) {
    for (int64_t bytes : {send_bytes[n], recv_bytes[n]}) {
      if (bytes < 0 || bytes > ctx_.layout.slab_bytes || bytes % 16 != 0) {
        fail("node " + std::to_string(n) + ": " + std::to_string(bytes) + " bytes, but a slab holds " +
             std::to_string(ctx_.layout.slab_bytes) + " and rows move in 16-byte multiples");
      }
    }
    if (n == ctx_.home && (send_bytes[n] != 0 || recv_bytes[n] != 0)) fail("nothing is exchanged with this rank's own node");
    args.send_bytes[n] = send_bytes[n];
  }
  args.call = calls_ + 1;
  args.num_blocks = num_blocks;
  args.arrived_target = blocks_sent_ + static_cast<uint64_t>(num_blocks);
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  launch_rail_exchange(ctx_, args, c10::cuda::getCurrentCUDAStream(device_).stream());
  calls_ = args.call;  // counted once launched: a refused launch leaves the rail's counts as they were
  blocks_sent_ = args.arrived_target;
  std::vector<at::Tensor> received;
  for (int n = 0; n < N; ++n) received.push_back(view(ctx_.layout.off_recv + ctx_.layout.slab_bytes * n, recv_bytes[n]));
  return received;
}

void RailRuntime::clean() {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize before the rail reset");
  check_cuda(cudaMemset(ctx_.heap, 0, kRailControlBytes), "cudaMemset of the rail control region");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize after the rail reset");
  std::memset(host_diagnostic_, 0, sizeof(Diagnostic));
  calls_ = 0;
  blocks_sent_ = 0;
}

}  // namespace deepep_megatron
