// What every kernel receives to reach its peers (passed by value), plain C++ (host and device).
#pragma once

#include <cstdint>

#include "deepep_megatron_layout.h"

namespace deepep_megatron {

struct PeerContext {
  uint8_t* buffers[kMaxRanks];  // base of each rank's NVLink buffer in this process (own at [rank])
  Diagnostic* diagnostic;       // device pointer of the host-mapped diagnostic
  uint64_t timeout_ns;          // bound of every wait on a peer
  int rank;
  int num_ranks;
};

// The operation a barrier belongs to: peers compare every word (FingerprintWord) before any data
// moves, so ranks in different operations or geometries stop with a diagnostic, not a hang.
struct Fingerprint {
  int32_t words[kFingerprintWords];
};

// What a barrier that opens a dispatch publishes (exchange = true; block.offset = kNoReceiveBlock
// when the rank takes its rows through the rings). Other barriers exchange nothing.
struct BlockExchange {
  bool exchange;
  ReceiveBlock block;
};
constexpr BlockExchange kNoExchange{false, {kNoReceiveBlock, 0}};

}  // namespace deepep_megatron
