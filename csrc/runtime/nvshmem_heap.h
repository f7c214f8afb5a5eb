// The NVSHMEM side of the runtime, the room the low-latency ([4/8]) and internode ([5/8]) kernels
// stand on: bootstrap from a unique id that the process group shares (any launcher works: torchrun,
// srun, the tests' spawn; several PEs per GPU under MPS), one symmetric heap region of
// num_rdma_bytes per PE, and a stream-ordered barrier over all PEs.
//
// Built only when the nvidia-nvshmem-cu13 wheel is found (csrc/build.py defines
// DEEPEP_MEGATRON_WITH_NVSHMEM). Plain C++ (no torch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace deepep_megatron {

// The bytes of a fresh nvshmemx_uniqueid_t (called on one rank, shared with the others).
std::string nvshmem_unique_id();

class NvshmemHeap {
 public:
  // Collective over every PE: initializes NVSHMEM with `unique_id` (rank / num_ranks as PE ids)
  // and allocates `num_bytes` of symmetric memory, zeroed.
  NvshmemHeap(const std::string& unique_id, int rank, int num_ranks, int64_t num_bytes, int device);
  ~NvshmemHeap();
  NvshmemHeap(const NvshmemHeap&) = delete;
  NvshmemHeap& operator=(const NvshmemHeap&) = delete;

  void* base() const { return base_; }
  int64_t num_bytes() const { return num_bytes_; }
  int my_pe() const;
  int n_pes() const;
  // Whether `pe`'s heap is reachable with loads and stores from this GPU (nvshmem_ptr != nullptr):
  // NVLink peers and PEs on this GPU; RDMA-only peers are reached with puts.
  bool peer_reachable(int pe) const;
  void barrier(cudaStream_t stream) const;  // every PE, ordered on `stream`
  // Collective: frees the heap and finalizes NVSHMEM (the destructor does not: it is not collective).
  void destroy();

  // A check of the whole path, for the tests: every PE puts (rank * 1000 + pe) into slot [rank] of
  // every PE's heap with nvshmem_int_p, barriers, and returns what its own slots hold ([n_pes]).
  std::string probe(cudaStream_t stream);

 private:
  void* base_ = nullptr;
  int64_t num_bytes_ = 0;
  int device_ = 0;
  bool initialized_ = false;
};

}  // namespace deepep_megatron
