// The stand-alone cross-rank barrier (before a cached dispatch or a combine) and the poison pass
// that runs after every data kernel: when this rank is aborted it overwrites the operation's
// outputs, so a timed-out or refused operation never hands plausible data to the next layer.
#include <stdexcept>
#include <string>

#include "launch.h"
#include "wait.cuh"

namespace deepep_megatron {

namespace {

constexpr int kBarrierThreads = 32;  // thread s signals and waits for peer s (kMaxRanks <= 32)
constexpr int kPoisonBlocks = 32;
constexpr int kPoisonThreads = 256;

__global__ void barrier_kernel(PeerContext ctx, Fingerprint fp) { cross_rank_barrier(ctx, fp); }

struct PoisonList {
  PoisonRegion regions[kMaxPoisonRegions];
  int count;
};

__global__ void poison_kernel(PeerContext ctx, PoisonList list) {
  if (!aborted(ctx)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int r = 0; r < list.count; ++r) {
    const PoisonRegion& region = list.regions[r];
    uint8_t* bytes = static_cast<uint8_t*>(region.data);
    const uint8_t fill = static_cast<uint8_t>(region.fill);
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < region.bytes; i += stride) {
      bytes[i] = fill;
    }
  }
}

}  // namespace

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("deepep_megatron._C: ") + what + " failed: " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

void launch_barrier(const PeerContext& ctx, const Fingerprint& fp, cudaStream_t stream) {
  barrier_kernel<<<1, kBarrierThreads, 0, stream>>>(ctx, fp);
  check_cuda(cudaGetLastError(), "barrier kernel launch");
}

void launch_poison_if_aborted(const PeerContext& ctx, const PoisonRegion* regions, int num_regions,
                              cudaStream_t stream) {
  PoisonList list{};
  for (int i = 0; i < num_regions; ++i) {
    if (regions[i].data == nullptr || regions[i].bytes <= 0) continue;
    if (list.count == kMaxPoisonRegions) throw std::logic_error("launch_poison_if_aborted: too many regions");
    list.regions[list.count++] = regions[i];
  }
  if (list.count == 0) return;
  poison_kernel<<<kPoisonBlocks, kPoisonThreads, 0, stream>>>(ctx, list);
  check_cuda(cudaGetLastError(), "poison kernel launch");
}

}  // namespace deepep_megatron
