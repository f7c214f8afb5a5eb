// HostTiming: where the host time of one operation goes, stage by stage (checks, allocations,
// launches, the notify wait). Off by default; DEEPEP_MEGATRON_HOST_TIMING=1 turns it on for the
// process, and Runtime.host_timing() hands the last operation's stages to Python
// (scripts/profile_dispatch_host.py prints them). Off, a mark costs one predictable branch.
#pragma once

#include <chrono>
#include <string>
#include <utility>
#include <vector>

namespace deepep_megatron {

bool env_switch(const char* name, bool default_on);  // launch.h

class HostTiming {
 public:
  static constexpr int kMaxStages = 16;

  static bool enabled() {
    static const bool on = env_switch("DEEPEP_MEGATRON_HOST_TIMING", false);
    return on;
  }
  // Starts an operation's record (the previous one is dropped).
  void begin() {
    if (!enabled()) return;
    count_ = 0;
    start_ = Clock::now();
  }
  // The end of stage `name` (a string literal): its time since the previous mark.
  void mark(const char* name) {
    if (!enabled() || count_ == kMaxStages) return;
    stages_[count_++] = {name, Clock::now()};
  }
  // [(stage, microseconds it took)] of the last operation, in order.
  std::vector<std::pair<std::string, double>> stages() const {
    std::vector<std::pair<std::string, double>> out;
    Clock::time_point previous = start_;
    for (int i = 0; i < count_; ++i) {
      out.emplace_back(stages_[i].first, std::chrono::duration<double, std::micro>(stages_[i].second - previous).count());
      previous = stages_[i].second;
    }
    return out;
  }

 private:
  using Clock = std::chrono::steady_clock;
  Clock::time_point start_{};
  std::pair<const char*, Clock::time_point> stages_[kMaxStages] = {};
  int count_ = 0;
};

}  // namespace deepep_megatron
