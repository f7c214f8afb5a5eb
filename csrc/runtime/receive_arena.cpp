// ReceiveArena (receive_arena.h).
#include "receive_arena.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "deepep_megatron_layout.h"

namespace deepep_megatron {

namespace {

// Makes `device` current for a scope (a deleter may run on any thread, e.g. an autograd worker of
// another device) and restores the caller's.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceScope() {
    int now = -1;
    if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
};

}  // namespace

ReceiveArena::ReceiveArena(std::shared_ptr<uint8_t> allocation, int64_t begin, int64_t size, int device)
    : allocation_(std::move(allocation)), begin_(begin), size_(size), device_(device) {
  if (begin % kReceiveBlockAlign != 0 || size < 0) {
    throw std::invalid_argument("ReceiveArena: the arena must start " + std::to_string(kReceiveBlockAlign) +
                                "-byte aligned (begin " + std::to_string(begin) + ", size " + std::to_string(size) + ")");
  }
  if (size > 0) free_[begin] = size;
}

ReceiveArena::~ReceiveArena() {
  // Errors are ignored here: this may run at interpreter exit, after the CUDA runtime shut down.
  const DeviceScope on_device(device_);
  for (const Pending& p : pending_) cudaEventDestroy(p.event);
  for (cudaEvent_t e : spare_events_) cudaEventDestroy(e);
}

void ReceiveArena::add_free(int64_t offset, int64_t size) {
  auto next = free_.lower_bound(offset);
  if (next != free_.end() && offset + size == next->first) {  // merge with the range after
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto before = std::prev(next);
    if (before->first + before->second == offset) {  // merge with the range before
      before->second += size;
      return;
    }
  }
  free_[offset] = size;
}

void ReceiveArena::retire_completed() {
  for (size_t i = 0; i < pending_.size();) {
    if (cudaEventQuery(pending_[i].event) == cudaSuccess) {
      spare_events_.push_back(pending_[i].event);
      pending_[i] = pending_.back();
      pending_.pop_back();
    } else {
      cudaGetLastError();  // cudaErrorNotReady is not an error of the next call
      ++i;
    }
  }
}

int64_t ReceiveArena::allocate(int64_t bytes, cudaStream_t stream) {
  if (bytes <= 0) return -1;
  bytes = align_block(bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  const DeviceScope on_device(device_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < bytes) continue;
    const int64_t offset = it->first, rest = it->second - bytes;
    free_.erase(it);
    if (rest > 0) free_[offset + bytes] = rest;
    in_use_[offset] = Block{bytes, stream, {}};
    if (!pending_.empty()) {
      retire_completed();
      for (const Pending& p : pending_) {
        const bool overlaps = p.offset < offset + bytes && offset < p.offset + p.size;
        if (overlaps && p.stream != stream) {
          const cudaError_t err = cudaStreamWaitEvent(stream, p.event, 0);
          if (err != cudaSuccess) {
            throw std::runtime_error(std::string("ReceiveArena: cudaStreamWaitEvent: ") + cudaGetErrorString(err));
          }
        }
      }
    }
    return offset;
  }
  ++misses_;
  return -1;
}

void ReceiveArena::release(int64_t offset) {
  std::lock_guard<std::mutex> lock(mutex_);
  const DeviceScope on_device(device_);
  auto it = in_use_.find(offset);
  if (it == in_use_.end()) return;  // not ours (never happens: only our deleters call this)
  const Block block = it->second;
  in_use_.erase(it);
  record_pending(offset, block.size, block.stream);
  for (cudaStream_t use : block.uses) record_pending(offset, block.size, use);
  add_free(offset, block.size);
}

void ReceiveArena::record_pending(int64_t offset, int64_t size, cudaStream_t stream) {
  cudaEvent_t event = nullptr;
  if (!spare_events_.empty()) {
    event = spare_events_.back();
    spare_events_.pop_back();
  } else if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) != cudaSuccess) {
    event = nullptr;
  }
  if (event != nullptr && cudaEventRecord(event, stream) == cudaSuccess) {
    pending_.push_back(Pending{offset, size, stream, event});
  } else {
    // No event (the runtime is shutting down, or the stream is gone): order through the device.
    if (event != nullptr) cudaEventDestroy(event);
    cudaGetLastError();
    cudaDeviceSynchronize();
    cudaGetLastError();
  }
}

bool ReceiveArena::record_stream(const void* ptr, cudaStream_t stream) {
  const int64_t at = static_cast<const uint8_t*>(ptr) - allocation_.get();
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = in_use_.upper_bound(at);
  if (it == in_use_.begin()) return false;
  --it;
  Block& block = it->second;
  if (at < it->first || at >= it->first + block.size) return false;
  if (stream != block.stream && std::find(block.uses.begin(), block.uses.end(), stream) == block.uses.end()) {
    block.uses.push_back(stream);
  }
  return true;
}

int64_t ReceiveArena::bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t total = 0;
  for (const auto& entry : in_use_) total += entry.second.size;
  return total;
}

int64_t ReceiveArena::num_misses() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return misses_;
}

int64_t ReceiveArena::num_blocks() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(in_use_.size());
}

}  // namespace deepep_megatron
