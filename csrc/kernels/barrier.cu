// The stand-alone cross-rank barrier (Buffer.barrier / Runtime.barrier; a cached dispatch and a combine
// carry their own: fused_barrier, wait.cuh), and the host helpers of launch.h (check_cuda, env_switch).
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "launch.h"
#include "wait.cuh"

namespace deepep_megatron {

namespace {

constexpr int kBarrierThreads = 32;  // thread s signals and waits for peer s (kMaxRanks <= 32)

__global__ void barrier_kernel(PeerContext ctx, Fingerprint fp) { cross_rank_barrier(ctx, fp); }

}  // namespace

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("deepep_megatron._C: ") + what + " failed: " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

bool env_switch(const char* name, bool default_on) {
  const char* value = std::getenv(name);
  if (value == nullptr) return default_on;
  return default_on ? std::string(value) != "0" : std::string(value) == "1";
}

void launch_barrier(const PeerContext& ctx, const Fingerprint& fp, cudaStream_t stream) {
  barrier_kernel<<<1, kBarrierThreads, 0, stream>>>(ctx, fp);
  check_cuda(cudaGetLastError(), "barrier kernel launch");
}

}  // namespace deepep_megatron
