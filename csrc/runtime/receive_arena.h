// The receive arena (deepep_megatron_layout.h, "Receive arena"): the part of a rank's IPC allocation
// past num_nvl_bytes out of which dispatches take their receive blocks, so that peers can write rows
// straight into them. Plain C++ over the CUDA runtime (no torch, no device code).
//
// First fit over free ranges, kReceiveBlockAlign-aligned. Reuse follows the CUDA caching
// allocator's rule: a block is released when the last tensor viewing it dies on the host, and
// work queued on the stream it was allocated for, or on a stream it was recorded for
// (record_stream, as Tensor.record_stream does for the caching allocator), may still read it. A
// release therefore records an event on each of those streams; a later allocation for another
// stream makes that stream wait for the events of the released ranges it reuses (the same stream
// needs no wait: it is ordered already).
// Thread-safe: releases come from tensor deleters on any thread.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace deepep_megatron {

class ReceiveArena {
 public:
  // `allocation` owns the IPC allocation (cudaFree on its last reference); the arena covers bytes
  // [begin, begin + size) of it.
  ReceiveArena(std::shared_ptr<uint8_t> allocation, int64_t begin, int64_t size, int device);
  ~ReceiveArena();
  ReceiveArena(const ReceiveArena&) = delete;
  ReceiveArena& operator=(const ReceiveArena&) = delete;

  // A block of at least `bytes` for work on `stream`: its offset from the allocation's base, or -1
  // when no free range is large enough (the caller then takes its rows through the rings).
  int64_t allocate(int64_t bytes, cudaStream_t stream);
  // Give back the block at `offset` (from allocate). Records an event on the block's streams.
  void release(int64_t offset);
  // Work on `stream` uses the block that holds `ptr` (an address in the allocation): its release
  // will wait for that work too. False when no block holds `ptr` (the caller's tensor is not ours).
  bool record_stream(const void* ptr, cudaStream_t stream);

  uint8_t* base() const { return allocation_.get(); }
  int64_t size() const { return size_; }
  int64_t bytes_in_use() const;
  int64_t num_blocks() const;
  // Allocations refused for want of a free range (each sent its operation through the rings).
  int64_t num_misses() const;

 private:
  struct Pending {  // a released range whose last reads may still be queued on `stream`
    int64_t offset, size;
    cudaStream_t stream;
    cudaEvent_t event;
  };
  struct Block {
    int64_t size;
    cudaStream_t stream;
    std::vector<cudaStream_t> uses;  // other streams recorded for the block (record_stream)
  };
  void add_free(int64_t offset, int64_t size);
  // A released range's reads on `stream`: an event recorded there (pending_), or a device sync.
  void record_pending(int64_t offset, int64_t size, cudaStream_t stream);
  void retire_completed();

  std::shared_ptr<uint8_t> allocation_;
  int64_t begin_, size_;
  int device_;  // events are made and recorded on it, whatever the calling thread's current device
  mutable std::mutex mutex_;
  std::map<int64_t, int64_t> free_;     // offset -> size, coalesced
  std::map<int64_t, Block> in_use_;     // offset -> block
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> spare_events_;
  int64_t misses_ = 0;
};

}  // namespace deepep_megatron
