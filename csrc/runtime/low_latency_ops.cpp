// The low-latency operations (low_latency_ops.h): checks, allocation and launches for one call each.
#include "low_latency_ops.h"

#include <c10/cuda/CUDAStream.h>

#include "launch.h"  // check_cuda, env_switch

#include <cstring>
#include <stdexcept>
#include <string>

namespace deepep_megatron {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("deepep_megatron._C (low latency): " + what); }

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

void expect(const at::Tensor& t, const char* name, at::ScalarType dtype, std::initializer_list<int64_t> shape,
            const LowLatencyRuntime& rt, bool contiguous = true) {
  if (!t.is_cuda() || t.get_device() != rt.device()) {
    fail(std::string(name) + " must be on cuda:" + std::to_string(rt.device()) + ", got " + t.device().str());
  }
  if (t.scalar_type() != dtype) fail(std::string(name) + " has dtype " + std::string(at::toString(t.scalar_type())));
  if (contiguous && !t.is_contiguous()) fail(std::string(name) + " must be contiguous");
  if (t.dim() != static_cast<int64_t>(shape.size())) fail(std::string(name) + " has shape " + shape_of(t));
  int i = 0;
  for (int64_t size : shape) {
    if (size >= 0 && t.size(i) != size) fail(std::string(name) + " has shape " + shape_of(t));
    ++i;
  }
}

cudaStream_t current_stream(const LowLatencyRuntime& rt) { return c10::cuda::getCurrentCUDAStream(rt.device()).stream(); }

void check_healthy(const LowLatencyRuntime& rt) {
  if (rt.has_error()) throw LowLatencyError("a low-latency kernel of this rank recorded an error");
}

// The shape of one call, checked against the kernels' limits and this PE's region.
LowLatencyShape shape_for(const LowLatencyRuntime& rt, int num_tokens, int num_topk, int hidden, int max_tokens,
                          int num_experts, int half) {
  const int R = rt.num_ranks();
  if (max_tokens < 1 || max_tokens > kLLMaxTokens) fail("num_max_dispatch_tokens_per_rank must be in 1.." + std::to_string(kLLMaxTokens));
  if (num_tokens < 0 || num_tokens > max_tokens) fail("more tokens than num_max_dispatch_tokens_per_rank");
  if (num_topk < 1 || num_topk > kMaxTopk) fail("top-k must be in 1.." + std::to_string(kMaxTopk));
  if (static_cast<int64_t>(num_tokens) * num_topk > kLLMaxSmemTopkEntries) {
    fail("num_tokens * top-k must be at most " + std::to_string(kLLMaxSmemTopkEntries));
  }
  if (hidden < 8 || hidden % 8 != 0) fail("hidden must be a positive multiple of 8, got " + std::to_string(hidden));
  if (num_experts < R || num_experts % R != 0 || num_experts / R > kLLMaxLocalExperts) {
    fail("num_experts=" + std::to_string(num_experts) + " must be a multiple of " + std::to_string(R) + " with at most " +
         std::to_string(kLLMaxLocalExperts) + " per rank");
  }
  if (half != 0 && half != 1) fail("half must be 0 or 1");
  LowLatencyShape s{};
  s.num_tokens = num_tokens;
  s.num_topk = num_topk;
  s.hidden = hidden;
  s.max_tokens = max_tokens;
  s.num_experts = num_experts;
  s.num_local_experts = num_experts / R;
  s.half = half;
  s.layout = ll_layout(max_tokens, hidden, R, num_experts);
  if (s.layout.signal_bytes > kLLSignalBytes) fail("too many experts and ranks for the signal region");
  if (s.layout.total_bytes > rt.num_bytes()) {
    fail("this call needs " + std::to_string(s.layout.total_bytes) + " bytes of NVSHMEM buffer (num_rdma_bytes), the heap has " +
         std::to_string(rt.num_bytes()) + " (see Buffer.get_low_latency_rdma_size_hint)");
  }
  return s;
}

void check_launch(int phases, int num_blocks) {
  if (phases < 1 || phases > (kLLSend | kLLRecv)) fail("phases must be 1 (send), 2 (receive) or 3");
  if (num_blocks < 1 || num_blocks > kMaxStageBlocks) fail("num_blocks must be in 1.." + std::to_string(kMaxStageBlocks));
}

int64_t* stats_ptr(const std::optional<at::Tensor>& stats, const LowLatencyRuntime& rt) {
  if (!stats.has_value()) return nullptr;
  if (stats->numel() < rt.num_ranks()) fail("wait stats need at least num_ranks entries");
  expect(stats->view({-1}), "wait stats", at::kLong, {-1}, rt);
  return stats->data_ptr<int64_t>();
}

}  // namespace

LowLatencyRuntime::LowLatencyRuntime(NvshmemHeap& heap, int rank, int num_ranks, int device, double timeout_s)
    : base_(static_cast<uint8_t*>(heap.base())), num_bytes_(heap.num_bytes()), rank_(rank), num_ranks_(num_ranks),
      device_(device) {
  if (num_ranks < 1 || num_ranks > kLLMaxRanks || rank < 0 || rank >= num_ranks) {
    fail("rank " + std::to_string(rank) + " of " + std::to_string(num_ranks) + " is out of range");
  }
  if (heap.my_pe() != rank || heap.n_pes() != num_ranks) fail("the heap's PE numbering differs from the group's");
  if (num_bytes_ < kLLControlBytes) fail("the NVSHMEM heap is smaller than the low-latency control block");
  set_timeout_s(timeout_s);
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&host_diagnostic_), sizeof(Diagnostic), cudaHostAllocMapped),
                "cudaHostAlloc of the low-latency diagnostic");
  std::memset(host_diagnostic_, 0, sizeof(Diagnostic));
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_diagnostic_), host_diagnostic_, 0),
                "cudaHostGetDevicePointer of the low-latency diagnostic");
}

LowLatencyRuntime::~LowLatencyRuntime() {
  if (host_diagnostic_ != nullptr) cudaFreeHost(host_diagnostic_);
  if (stage_device_ != nullptr) cudaFree(stage_device_);
}

int64_t* LowLatencyRuntime::stage_rows(int num_blocks) {
  static const bool on = env_switch("DEEPEP_MEGATRON_LL_STAGE_TIMES", false);
  if (!on) return nullptr;
  if (stage_device_ == nullptr) {
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&stage_device_), sizeof(int64_t) * kMaxStageBlocks * kLLStageCount),
                  "cudaMalloc of the low-latency stage timer");
  }
  stage_blocks_ = num_blocks;
  return stage_device_;
}

std::vector<int64_t> LowLatencyRuntime::stage_times() const {
  std::vector<int64_t> rows(static_cast<size_t>(stage_blocks_) * kLLStageCount);
  if (stage_device_ == nullptr || rows.empty()) return {};
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize before reading the stage timer");
  check_cuda(cudaMemcpy(rows.data(), stage_device_, sizeof(int64_t) * rows.size(), cudaMemcpyDeviceToHost),
                "cudaMemcpy of the stage timer");
  return rows;
}

void LowLatencyRuntime::set_timeout_s(double timeout_s) {
  if (!(timeout_s > 0) || timeout_s > 1e6) fail("timeout_s must be in (0, 1e6] seconds, got " + std::to_string(timeout_s));
  timeout_s_ = timeout_s;
}

std::vector<int64_t> LowLatencyRuntime::diagnostic() const {
  const volatile Diagnostic* d = host_diagnostic_;
  return {d->flag, d->code, d->rank, d->peer, d->channel, d->block, d->expected, d->seen};
}

void LowLatencyRuntime::clean() {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize before clean_low_latency_buffer");
  check_cuda(cudaMemset(base_, 0, static_cast<size_t>(num_bytes_)), "cudaMemset of the low-latency region");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize after clean_low_latency_buffer");
  std::memset(host_diagnostic_, 0, sizeof(Diagnostic));
}

LowLatencyContext LowLatencyRuntime::context() const {
  LowLatencyContext ctx{};
  ctx.heap = base_;
  ctx.diagnostic = device_diagnostic_;
  ctx.timeout_ns = static_cast<uint64_t>(timeout_s_ * 1e9);
  ctx.rank = rank_;
  ctx.num_ranks = num_ranks_;
  return ctx;
}

LowLatencyDispatchResult low_latency_dispatch(LowLatencyRuntime& rt, const at::Tensor& x, const at::Tensor& topk_idx,
                                              int max_tokens, int num_experts, bool use_fp8, bool round_scale,
                                              bool use_ue8m0, int half, int phases, int num_blocks,
                                              const std::optional<at::Tensor>& wait_stats,
                                              const std::optional<LowLatencyDispatchResult>& outputs) {
  check_healthy(rt);
  check_launch(phases, num_blocks);
  expect(x, "x", at::kBFloat16, {-1, -1}, rt);
  const int T = static_cast<int>(x.size(0)), H = static_cast<int>(x.size(1));
  expect(topk_idx, "topk_idx", at::kLong, {T, -1}, rt);
  const int K = static_cast<int>(topk_idx.size(1));
  if (use_fp8 && H % kFp8Block != 0) fail("hidden must be a multiple of 128 for FP8");
  if (use_ue8m0 && !(use_fp8 && round_scale)) fail("use_ue8m0 needs use_fp8 and round_scale");
  const LowLatencyShape shape = shape_for(rt, T, K, H, max_tokens, num_experts, half);
  const int R = rt.num_ranks(), El = shape.num_local_experts, S = R * max_tokens, G = H / kFp8Block, W = (G + 3) / 4;

  LowLatencyDispatchResult out;
  if (outputs.has_value()) {
    out = *outputs;
  } else {
    const auto opts = x.options();
    out.recv_x = at::empty({El, S, H}, opts.dtype(use_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16));
    if (use_fp8) {
      out.recv_x_scales = use_ue8m0 ? at::empty({El, W, S}, opts.dtype(at::kInt)).transpose(1, 2)
                                    : at::empty({El, G, S}, opts.dtype(at::kFloat)).transpose(1, 2);
    }
    out.recv_count = at::empty({El}, opts.dtype(at::kInt));
    out.recv_src_info = at::empty({El, S}, opts.dtype(at::kInt));
    out.recv_layout_range = at::empty({El, R}, opts.dtype(at::kLong));
    out.pair_slot = at::empty({T, K}, opts.dtype(at::kInt));
  }
  expect(out.recv_x, "recv_x", use_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16, {El, S, H}, rt);
  if (use_fp8) {
    if (!out.recv_x_scales.has_value()) fail("recv_x_scales missing");
    const at::Tensor& sc = *out.recv_x_scales;
    expect(sc, "recv_x_scales", use_ue8m0 ? at::kInt : at::kFloat, {El, S, use_ue8m0 ? W : G}, rt, false);
    if (sc.stride(1) != 1 || sc.stride(2) != S || sc.stride(0) != static_cast<int64_t>(S) * sc.size(2)) {
      fail("recv_x_scales must be the column-major view the dispatch allocates");
    }
  }
  expect(out.recv_count, "recv_count", at::kInt, {El}, rt);
  expect(out.recv_src_info, "recv_src_info", at::kInt, {El, S}, rt);
  expect(out.recv_layout_range, "recv_layout_range", at::kLong, {El, R}, rt);
  expect(out.pair_slot, "pair_slot", at::kInt, {T, K}, rt);

  LowLatencyDispatchArgs args{};
  args.shape = shape;
  args.use_fp8 = use_fp8;
  args.round_scale = round_scale;
  args.use_ue8m0 = use_ue8m0;
  args.x = reinterpret_cast<const uint16_t*>(x.data_ptr());
  args.topk_idx = topk_idx.data_ptr<int64_t>();
  args.pair_slot = out.pair_slot.data_ptr<int>();
  args.recv_x = static_cast<uint8_t*>(out.recv_x.data_ptr());
  if (use_fp8) {
    if (use_ue8m0) {
      args.recv_scales_packed = out.recv_x_scales->data_ptr<int32_t>();
    } else {
      args.recv_scales = out.recv_x_scales->data_ptr<float>();
    }
  }
  args.recv_count = out.recv_count.data_ptr<int>();
  args.recv_src_info = out.recv_src_info.data_ptr<int>();
  args.recv_layout_range = out.recv_layout_range.data_ptr<int64_t>();
  args.wait_stats = stats_ptr(wait_stats, rt);
  args.stage_ns = rt.stage_rows(num_blocks);
  launch_low_latency_dispatch(rt.context(), args, phases, num_blocks, current_stream(rt));
  return out;
}

at::Tensor low_latency_combine(LowLatencyRuntime& rt, const at::Tensor& x, const at::Tensor& topk_idx,
                               const at::Tensor& topk_weights, const at::Tensor& pair_slot,
                               const at::Tensor& recv_layout_range, int max_tokens, int num_experts, int half,
                               int phases, int num_blocks, const std::optional<at::Tensor>& wait_stats,
                               const std::optional<at::Tensor>& out) {
  check_healthy(rt);
  check_launch(phases, num_blocks);
  const int R = rt.num_ranks();
  expect(topk_idx, "topk_idx", at::kLong, {-1, -1}, rt);
  const int T = static_cast<int>(topk_idx.size(0)), K = static_cast<int>(topk_idx.size(1));
  expect(x, "x", at::kBFloat16, {-1, -1, -1}, rt);
  const int H = static_cast<int>(x.size(2));
  const LowLatencyShape shape = shape_for(rt, T, K, H, max_tokens, num_experts, half);
  const int El = shape.num_local_experts, S = R * max_tokens;
  expect(x, "x", at::kBFloat16, {El, S, H}, rt);
  expect(topk_weights, "topk_weights", at::kFloat, {T, K}, rt);
  expect(pair_slot, "pair_slot", at::kInt, {T, K}, rt);
  expect(recv_layout_range, "recv_layout_range", at::kLong, {El, R}, rt);
  at::Tensor combined = out.has_value() ? *out : at::empty({T, H}, x.options());
  expect(combined, "out", at::kBFloat16, {T, H}, rt);

  LowLatencyCombineArgs args{};
  args.shape = shape;
  args.x = reinterpret_cast<const uint16_t*>(x.data_ptr());
  args.recv_layout_range = recv_layout_range.data_ptr<int64_t>();
  args.topk_idx = topk_idx.data_ptr<int64_t>();
  args.topk_weights = topk_weights.data_ptr<float>();
  args.pair_slot = pair_slot.data_ptr<int>();
  args.combined = reinterpret_cast<uint16_t*>(combined.data_ptr());
  args.wait_stats = stats_ptr(wait_stats, rt);
  launch_low_latency_combine(rt.context(), args, phases, num_blocks, current_stream(rt));
  return combined;
}

at::Tensor low_latency_combine_buffer(LowLatencyRuntime& rt, int max_tokens, int hidden, int num_experts, int half) {
  const LowLatencyShape shape = shape_for(rt, 0, 1, hidden, max_tokens, num_experts, half);
  const int64_t El = shape.num_local_experts, S = static_cast<int64_t>(rt.num_ranks()) * max_tokens;
  uint8_t* send = rt.base() + shape.layout.off_data + half * shape.layout.half_bytes;
  return at::from_blob(send, {El, S, hidden}, at::TensorOptions().device(at::kCUDA, rt.device()).dtype(at::kBFloat16));
}

}  // namespace deepep_megatron
