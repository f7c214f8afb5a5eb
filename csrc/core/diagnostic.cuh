// The one way a kernel records the first device-detected error of its rank (every kernel family:
// intranode waits and barriers, the low-latency waits): an atomic on the rank's abort word elects
// one reporter, which fills the host-mapped Diagnostic (layout header) and raises its flag last.
#pragma once

#include <cstdint>

#include "deepep_megatron_layout.h"

namespace deepep_megatron {

// `mine` / `theirs`: the two fingerprints of a mismatch (kFingerprintWords each), or null (zeros).
static __device__ __noinline__ void record_error(uint32_t* abort_word, volatile Diagnostic* d, int code, int rank,
                                                 int peer, int channel, int64_t expected, int64_t seen,
                                                 const int32_t* mine = nullptr,
                                                 const volatile int32_t* theirs = nullptr) {
  if (atomicCAS(abort_word, 0u, static_cast<uint32_t>(code)) != 0u) return;
  d->code = code;
  d->rank = rank;
  d->peer = peer;
  d->channel = channel;
  d->expected = expected;
  d->seen = seen;
  d->block = static_cast<int>(blockIdx.x);
  for (int i = 0; i < kFingerprintWords; ++i) {
    d->mine[i] = mine != nullptr ? mine[i] : 0;
    d->theirs[i] = theirs != nullptr ? theirs[i] : 0;
  }
  __threadfence_system();
  d->flag = 1;
  __threadfence_system();
}

}  // namespace deepep_megatron
