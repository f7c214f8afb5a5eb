// Checks the receive arena's bookkeeping (csrc/runtime/receive_arena.*) without a GPU: first fit,
// alignment, coalescing, counts. Built and run by tests/test_receive_arena.py; prints one line per
// check and "all passed" at the end, exits 1 on the first failure. (With no device, the CUDA event
// calls fail and a release orders through cudaDeviceSynchronize, which fails too: both are ignored,
// which is the arena's documented fallback.)
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "receive_arena.h"
#include "deepep_megatron_layout.h"

using deepep_megatron::ReceiveArena;
using deepep_megatron::kReceiveBlockAlign;

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what);
  if (!ok) ++failures;
}

}  // namespace

int main() {
  constexpr int64_t kBegin = 4 * kReceiveBlockAlign, kSize = 64 * kReceiveBlockAlign;
  std::shared_ptr<uint8_t> memory(static_cast<uint8_t*>(std::malloc(kBegin + kSize)), [](uint8_t* p) { std::free(p); });
  ReceiveArena arena(memory, kBegin, kSize, 0);
  cudaStream_t stream = nullptr;
  const int64_t a = arena.allocate(100, stream);            // rounds up to one alignment unit
  const int64_t b = arena.allocate(3 * kReceiveBlockAlign, stream);
  const int64_t c = arena.allocate(kReceiveBlockAlign + 1, stream);  // two units
  check(a == kBegin && b == kBegin + kReceiveBlockAlign && c == kBegin + 4 * kReceiveBlockAlign, "first fit, in order, aligned");
  check(arena.num_blocks() == 3 && arena.bytes_in_use() == 6 * kReceiveBlockAlign, "blocks and bytes in use counted");
  check(arena.num_misses() == 0, "no miss before a refusal");
  check(arena.allocate(kSize, stream) == -1, "a block larger than the free space is refused (-1)");
  check(arena.num_misses() == 1, "the refusal is counted as a miss");
  check(arena.allocate(0, stream) == -1, "an empty block is refused (-1)");
  check(arena.num_misses() == 1, "an empty request is not a miss");
  arena.release(b);
  check(arena.allocate(2 * kReceiveBlockAlign, stream) == b, "a freed hole is reused first (first fit)");
  const uint8_t* base = memory.get();
  cudaStream_t other = cudaStreamPerThread;  // a real handle: on a GPU machine the release records on it
  check(arena.record_stream(base + c + 17, other), "record_stream finds the block that holds an address inside it");
  check(!arena.record_stream(base + kBegin + 6 * kReceiveBlockAlign, other), "record_stream: an address past every block is not ours");
  check(!arena.record_stream(base, other), "record_stream: an address before the arena is not ours");
  arena.release(kBegin + 1);  // not a block: ignored
  check(arena.num_blocks() == 3, "releasing an unknown offset changes nothing");
  arena.release(a);
  arena.release(b);
  arena.release(c);
  check(arena.num_blocks() == 0 && arena.bytes_in_use() == 0, "every block released");
  check(arena.allocate(kSize, stream) == kBegin, "released neighbours coalesce into the whole arena again");
  std::printf(failures == 0 ? "all passed\n" : "%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
