// NvshmemHeap (nvshmem_heap.h): unique-id bootstrap, the symmetric heap, barrier, probe.
#include "nvshmem_heap.h"

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "launch.h"

namespace deepep_megatron {

namespace {

constexpr int kProbeThreads = 32;  // one thread per destination PE (kMaxRanks <= 32 PEs per call)

__global__ void probe_kernel(int* heap, int me, int n_pes) {
  for (int pe = threadIdx.x; pe < n_pes; pe += blockDim.x) nvshmem_int_p(heap + me, me * 1000 + pe, pe);
}

}  // namespace

std::string nvshmem_unique_id() {
  nvshmemx_uniqueid_t id;
  if (nvshmemx_get_uniqueid(&id) != 0) throw std::runtime_error("deepep_megatron._C: nvshmemx_get_uniqueid failed");
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

NvshmemHeap::NvshmemHeap(const std::string& unique_id, int rank, int num_ranks, int64_t num_bytes, int device)
    : num_bytes_(num_bytes), device_(device) {
  if (unique_id.size() != sizeof(nvshmemx_uniqueid_t)) {
    throw std::invalid_argument("NvshmemHeap: the unique id has " + std::to_string(unique_id.size()) +
                                " bytes, expected " + std::to_string(sizeof(nvshmemx_uniqueid_t)));
  }
  if (rank < 0 || rank >= num_ranks) throw std::invalid_argument("NvshmemHeap: rank out of range");
  if (num_bytes <= 0) throw std::invalid_argument("NvshmemHeap: num_bytes must be positive");
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr) != 0) {
    throw std::runtime_error("deepep_megatron._C: nvshmemx_set_attr_uniqueid_args failed");
  }
  if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0) {
    throw std::runtime_error("deepep_megatron._C: nvshmemx_init_attr failed (see NVSHMEM's messages above)");
  }
  initialized_ = true;
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks) {
    throw std::runtime_error("NvshmemHeap: NVSHMEM numbered this PE " + std::to_string(nvshmem_my_pe()) + " of " +
                             std::to_string(nvshmem_n_pes()) + ", expected rank " + std::to_string(rank) + " of " +
                             std::to_string(num_ranks));
  }
  base_ = nvshmem_malloc(static_cast<size_t>(num_bytes));  // collective
  if (base_ == nullptr) {
    throw std::runtime_error("deepep_megatron._C: nvshmem_malloc of " + std::to_string(num_bytes) +
                             " bytes failed (raise NVSHMEM_SYMMETRIC_SIZE)");
  }
  check_cuda(cudaMemset(base_, 0, static_cast<size_t>(num_bytes)), "cudaMemset of the NVSHMEM heap");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize after nvshmem_malloc");
  nvshmem_barrier_all();  // every PE's heap is zeroed before anyone writes into it
}

NvshmemHeap::~NvshmemHeap() {
  // Nothing collective here: nvshmem_free / nvshmem_finalize wait for every PE, and a PE that is
  // torn down without destroy() (an exception, interpreter exit) has peers that may be gone; under
  // MPS the fault that follows takes the other clients of the GPU down too (seen on the H200). The
  // process's exit releases the heap; destroy() is the collective, checked path.
}

void NvshmemHeap::destroy() {
  if (!initialized_) return;
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize before freeing the NVSHMEM heap");
  if (base_ != nullptr) nvshmem_free(base_);  // collective
  base_ = nullptr;
  nvshmem_finalize();
  initialized_ = false;
}

int NvshmemHeap::my_pe() const { return nvshmem_my_pe(); }

int NvshmemHeap::n_pes() const { return nvshmem_n_pes(); }

bool NvshmemHeap::peer_reachable(int pe) const {
  if (pe < 0 || pe >= n_pes()) throw std::invalid_argument("NvshmemHeap.peer_reachable: pe out of range");
  return nvshmem_ptr(base_, pe) != nullptr;
}

void NvshmemHeap::barrier(cudaStream_t stream) const { nvshmemx_barrier_all_on_stream(stream); }

std::string NvshmemHeap::probe(cudaStream_t stream) {
  const int n = n_pes();
  if (static_cast<int64_t>(sizeof(int)) * n > num_bytes_) throw std::invalid_argument("probe: heap too small");
  int* heap = static_cast<int*>(base_);
  check_cuda(cudaMemsetAsync(heap, 0xFF, sizeof(int) * n, stream), "cudaMemsetAsync");
  nvshmemx_barrier_all_on_stream(stream);  // every PE's slots are poisoned before anyone puts
  probe_kernel<<<1, kProbeThreads, 0, stream>>>(heap, my_pe(), n);
  check_cuda(cudaGetLastError(), "probe kernel launch");
  nvshmemx_barrier_all_on_stream(stream);  // barrier_all completes every PE's puts
  std::vector<int> seen(n);
  check_cuda(cudaMemcpyAsync(seen.data(), heap, sizeof(int) * n, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return std::string(reinterpret_cast<const char*>(seen.data()), sizeof(int) * n);
}

}  // namespace deepep_megatron
