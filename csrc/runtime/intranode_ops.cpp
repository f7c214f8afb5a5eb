// The intranode operations (intranode_ops.h): checks, allocation and launches for one call each.
#include "intranode_ops.h"

#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <string>

#include "launch.h"
#include "tensor_window.h"

namespace deepep_megatron {

namespace {

constexpr double kMinHostWaitS = 60.0;  // the host's bound on notify (the kernels' own waits are shorter)
constexpr int kHostWaitTimeouts = 6;    // ... or this many kernel timeouts, whichever is longer

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("deepep_megatron._C: " + what); }

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// `t` must be a contiguous tensor on the buffer's device with this dtype and shape (-1: any size).
void expect(const at::Tensor& t, const char* name, at::ScalarType dtype, std::initializer_list<int64_t> shape,
            const Runtime& rt) {
  if (!t.is_cuda() || t.get_device() != rt.device()) {
    fail(std::string(name) + " must be on cuda:" + std::to_string(rt.device()) + ", got " + t.device().str());
  }
  if (t.scalar_type() != dtype) fail(std::string(name) + " has dtype " + std::string(at::toString(t.scalar_type())));
  if (!t.is_contiguous()) fail(std::string(name) + " must be contiguous");
  if (t.dim() != static_cast<int64_t>(shape.size())) fail(std::string(name) + " has shape " + shape_of(t));
  int i = 0;
  for (int64_t size : shape) {
    if (size >= 0 && t.size(i) != size) fail(std::string(name) + " has shape " + shape_of(t));
    ++i;
  }
}

void* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void check_healthy(const Runtime& rt) {
  if (!rt.is_open()) throw std::runtime_error("deepep_megatron._C: the buffer was destroyed");
  if (rt.has_error()) throw DeviceError("a kernel of this rank recorded an error");
}

cudaStream_t current_stream(const Runtime& rt) { return c10::cuda::getCurrentCUDAStream(rt.device()).stream(); }

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

// The ring geometry for rows of `hidden_bytes` (hidden * max(element size, 2)), checked against the
// kernel limits and the smallest NVLink buffer of the group (every peer's rings are written).
RingGeometry ring_for(const Runtime& rt, const RingConfig& config, int hidden_bytes) {
  if (config.num_channels < 1 || config.num_channels > kMaxChannels) {
    fail("num_channels must be in 1.." + std::to_string(kMaxChannels) + ", got " + std::to_string(config.num_channels));
  }
  if (config.send_chunk < 1 || config.send_chunk > kMaxSendChunk || config.send_chunk + kWarpsPerBlock > config.num_slots) {
    fail("send chunk " + std::to_string(config.send_chunk) + " must be in 1.." + std::to_string(kMaxSendChunk) +
         " and at most num_slots - " + std::to_string(kWarpsPerBlock) + " (num_slots=" + std::to_string(config.num_slots) + ")");
  }
  RingGeometry ring{config.num_channels, config.num_slots, config.send_chunk, slot_bytes(hidden_bytes)};
  const int64_t needed = static_cast<int64_t>(kControlBytes) +
                         static_cast<int64_t>(ring.num_channels) * rt.num_ranks() * ring.num_slots * ring.slot_bytes;
  if (needed > rt.min_buffer_bytes()) {
    fail("this call needs " + std::to_string(needed) + " bytes of NVLink buffer on every rank, the smallest has " +
         std::to_string(rt.min_buffer_bytes()));
  }
  return ring;
}

Fingerprint fingerprint(const Runtime& rt, Operation op, int row_bytes, int num_scales, int num_topk,
                        const RingGeometry& ring) {
  Fingerprint fp{};
  fp.words[kFpOperation] = op;
  fp.words[kFpRowBytes] = row_bytes;
  fp.words[kFpScales] = num_scales;
  fp.words[kFpTopk] = num_topk;
  fp.words[kFpChannels] = ring.num_channels;
  fp.words[kFpSlots] = ring.num_slots;
  fp.words[kFpChunk] = ring.send_chunk;
  fp.words[kFpGeneration] = rt.generation();
  return fp;
}

// What a slot is sized for: hidden * max(element size, 2) (FP8 rows are sized as bf16).
int hidden_bytes_of(const at::Tensor& x) {
  return static_cast<int>(x.size(1) * std::max<int64_t>(x.element_size(), 2));
}

int row_bytes_of(const at::Tensor& x) {
  const int64_t bytes = x.size(1) * static_cast<int64_t>(x.element_size());
  if (bytes % kSlotAlign != 0) fail("an x row must be a multiple of 16 bytes, got " + std::to_string(bytes));
  return static_cast<int>(bytes);
}

// Scales of an FP8 x: [T, H / 128] fp32. Returns their count per row (0 without).
int check_scales(const Runtime& rt, const at::Tensor& x, const std::optional<at::Tensor>& x_scales) {
  if (!x_scales.has_value()) return 0;
  if (x.element_size() != 1) fail("x_scales given but x is not FP8");
  const int num_scales = static_cast<int>(x.size(1) / kFp8Block);
  expect(*x_scales, "x_scales", at::kFloat, {x.size(0), num_scales}, rt);
  return num_scales;
}

// The outputs a kernel overwrites if this rank is aborted (PoisonList, launch.h).
PoisonList poison_list(std::initializer_list<std::optional<at::Tensor>> outputs) {
  PoisonList list{};
  for (const auto& t : outputs) {
    if (!t.has_value() || t->numel() == 0) continue;
    if (list.count == PoisonList::kMaxRegions) throw std::logic_error("poison_list: too many outputs");
    list.data[list.count] = static_cast<uint8_t*>(t->data_ptr());
    list.bytes[list.count] = static_cast<int64_t>(t->numel()) * t->element_size();
    ++list.count;
  }
  return list;
}

// A speculative allocation of the receive tensors is used when the rows fit and waste at most a
// quarter of it; it is made for the most rows of recent dispatches (Runtime::receive_rows_hint) plus
// 1/kSpeculativeMarginDivisor.
constexpr int64_t kSpeculativeMarginDivisor = 16;

// DEEPEP_MEGATRON_POISON_ARENA=1 (the GPU tests): every receive block is filled with 0xFF when taken,
// as the tests poison the allocator's free memory, so that rows no peer wrote cannot pass for data.
bool poison_receive_blocks() {
  static const bool poison = env_switch("DEEPEP_MEGATRON_POISON_ARENA", false);
  return poison;
}

// recv_x [rows, H] (like x) and its FP8 scales [rows, num_scales] fp32 (num_scales > 0): one
// receive block of the arena (receive_block in the layout header) when `arena` has room, so the
// peers write the rows straight into them; else two ordinary allocations (the rings carry x).
struct ReceiveRows {
  at::Tensor x;
  std::optional<at::Tensor> x_scales;
  ReceiveBlock block{kNoReceiveBlock, 0};  // what this rank publishes for them

  // num_topk: the top-k entries per row the block also carries (a full dispatch; 0: cached).
  static ReceiveRows allocate(const at::Tensor& like, int64_t rows, int num_scales, int num_topk, ReceiveArena* arena,
                              const std::shared_ptr<ReceiveArena>& owner, cudaStream_t stream) {
    ReceiveRows r;
    const int64_t row_bytes = like.size(1) * like.element_size();
    const ReceiveBlockLayout layout = receive_block(rows, row_bytes, num_scales, num_topk);
    const int64_t offset = arena != nullptr && rows > 0 ? arena->allocate(layout.bytes, stream) : -1;
    if (offset < 0) {
      r.x = at::empty({rows, like.size(1)}, like.options());
      if (num_scales > 0) r.x_scales = at::empty({rows, num_scales}, like.options().dtype(at::kFloat));
      return r;
    }
    r.block = ReceiveBlock{offset, rows};
    if (poison_receive_blocks()) {  // tests: a row the peers fail to write shows as 0xFF (NaN / -1)
      check_cuda(cudaMemsetAsync(arena->base() + offset, 0xFF, layout.bytes, stream),
                 "cudaMemsetAsync of a receive block");
    }
    // The block is given back when the last view of it dies (the deleter holds the arena, which
    // holds the IPC allocation).
    std::shared_ptr<ReceiveArena> keep = owner;
    at::Tensor bytes = at::from_blob(
        arena->base() + offset, {layout.bytes},
        [keep, offset](void*) { keep->release(offset); }, like.options().dtype(at::kByte));
    r.x = window(bytes, 0, like.scalar_type(), {rows, like.size(1)});
    if (num_scales > 0) r.x_scales = window(bytes, layout.off_scales, at::kFloat, {rows, num_scales});
    return r;
  }
};

// With a receive arena, a combine pushes the rows into the home rank's combine block
// (combine_direct_kernel); DEEPEP_MEGATRON_DIRECT_COMBINE=0 keeps the ring combine.
bool direct_combine_enabled() {
  static const bool enabled = env_switch("DEEPEP_MEGATRON_DIRECT_COMBINE", true);
  return enabled;
}

// DEEPEP_MEGATRON_FUSED_NOTIFY=1: a full dispatch runs notify in the dispatch kernel's block 1
// (Opening::kFusedNotify) instead of launching notify before it: one launch fewer per dispatch.
// Off by default: correct on the H200 (tests, soak) but not faster there (docs/perf.md, issue 12).
bool fused_notify_enabled() {
  static const bool enabled = env_switch("DEEPEP_MEGATRON_FUSED_NOTIFY", false);
  return enabled;
}

// The arena a dispatch on `stream` may take its receive rows from: none under CUDA graph capture
// (a block's lifetime is the host's, which a replayed graph does not follow).
ReceiveArena* arena_for(const Runtime& rt, cudaStream_t stream) {
  return rt.arena() != nullptr && !capturing(stream) ? rt.arena().get() : nullptr;
}

// The receive tensors of a full dispatch. The per-row metadata shares one allocation (one
// allocator call instead of three): [N, K] int64 ids, [N, K] fp32 weights, [N] int32 sources,
// each region 8-byte aligned (int64 first).
struct ReceiveTensors {
  int64_t capacity = 0;  // rows allocated
  int num_topk = 0;
  at::Tensor x, meta;
  std::optional<at::Tensor> x_scales;
  at::Tensor topk_idx, topk_weights, src_idx;
  ReceiveBlock block{kNoReceiveBlock, 0};

  static ReceiveTensors allocate(const at::Tensor& like, int64_t rows, int num_scales, int num_topk,
                                 const Runtime* rt = nullptr, cudaStream_t stream = nullptr) {
    ReceiveTensors r;
    r.capacity = rows;
    r.num_topk = num_topk;
    ReceiveRows rows_part = ReceiveRows::allocate(like, rows, num_scales, num_topk,
                                                  rt != nullptr ? arena_for(*rt, stream) : nullptr,
                                                  rt != nullptr ? rt->arena() : nullptr, stream);
    r.x = rows_part.x;
    r.x_scales = rows_part.x_scales;
    r.block = rows_part.block;
    r.meta = at::empty({meta_bytes(rows, num_topk)}, like.options().dtype(at::kByte));
    r.take_views(rows);
    return r;
  }
  // Whether views of `rows` rows keep at most a quarter of the allocation idle.
  bool wastes_little(int64_t rows) const { return rows * 4 >= capacity * 3; }
  // The first `rows` rows of each tensor (views of the same allocations).
  ReceiveTensors first(int64_t rows) const {
    ReceiveTensors r = *this;
    r.x = window(x, 0, x.scalar_type(), {rows, x.size(1)});
    if (x_scales.has_value()) r.x_scales = window(*x_scales, 0, at::kFloat, {rows, x_scales->size(1)});
    r.take_views(rows);
    return r;
  }
  // Exact-size copies (enqueued on the current stream).
  ReceiveTensors clone() const {  // (ordinary allocations)
    ReceiveTensors r = allocate(x, x.size(0), x_scales.has_value() ? static_cast<int>(x_scales->size(1)) : 0, num_topk);
    r.x.copy_(x);
    if (x_scales.has_value()) r.x_scales->copy_(*x_scales);
    r.topk_idx.copy_(topk_idx);
    r.topk_weights.copy_(topk_weights);
    r.src_idx.copy_(src_idx);
    return r;
  }
  // The dispatch kernel's output pointers, row count and poison regions: these tensors.
  void point(DispatchArgs& a) const {
    a.num_recv_rows = static_cast<int>(x.size(0));
    a.recv_x = static_cast<uint8_t*>(x.data_ptr());
    a.recv_x_scales = static_cast<float*>(ptr(x_scales));
    a.recv_topk_idx = topk_idx.data_ptr<int64_t>();
    a.recv_topk_weights = topk_weights.data_ptr<float>();
    a.recv_src_idx = src_idx.data_ptr<int>();
    a.poison = poison_list({x, x_scales, topk_idx, topk_weights, src_idx});
    a.blocks = BlockExchange{true, block};
    a.use_blocks = true;
  }

 private:
  static int64_t idx_bytes(int64_t rows, int k) { return rows * k * 8; }
  static int64_t weight_bytes(int64_t rows, int k) { return (rows * k * 4 + 7) / 8 * 8; }
  static int64_t meta_bytes(int64_t rows, int k) { return idx_bytes(rows, k) + weight_bytes(rows, k) + rows * 4; }
  void take_views(int64_t rows) {  // region offsets follow the capacity, so views stay in place
    const int64_t weights_at = idx_bytes(capacity, num_topk), src_at = weights_at + weight_bytes(capacity, num_topk);
    topk_idx = window(meta, 0, at::kLong, {rows, num_topk});
    topk_weights = window(meta, weights_at, at::kFloat, {rows, num_topk});
    src_idx = window(meta, src_at, at::kInt, {rows});
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> get_dispatch_layout(Runtime& rt, const at::Tensor& topk_idx,
                                                                   int64_t num_experts) {
  check_healthy(rt);
  const int R = rt.num_ranks();
  expect(topk_idx, "topk_idx", at::kLong, {-1, -1}, rt);
  if (num_experts < R || num_experts % R != 0 || num_experts / R > kMaxLocalExperts) {
    fail("num_experts=" + std::to_string(num_experts) + " must be a multiple of " + std::to_string(R) +
         " with at most " + std::to_string(kMaxLocalExperts) + " per rank");
  }
  // One allocation for the three outputs (int32 counts first, then the bool matrix).
  const int64_t T = topk_idx.size(0);
  at::Tensor bytes = at::empty({(R + num_experts) * 4 + T * R}, topk_idx.options().dtype(at::kByte));
  at::Tensor per_rank = window(bytes, 0, at::kInt, {R});
  at::Tensor per_expert = window(bytes, R * 4, at::kInt, {num_experts});
  at::Tensor in_rank = window(bytes, (R + num_experts) * 4, at::kBool, {T, R});
  launch_get_dispatch_layout(topk_idx.data_ptr<int64_t>(), static_cast<int>(topk_idx.size(0)),
                             static_cast<int>(topk_idx.size(1)), static_cast<int>(num_experts), R,
                             per_rank.data_ptr<int>(), per_expert.data_ptr<int>(), in_rank.data_ptr<bool>(),
                             current_stream(rt));
  return {per_rank, per_expert, in_rank};
}

DispatchResult dispatch(Runtime& rt, const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                        const std::optional<at::Tensor>& topk_idx_in, const std::optional<at::Tensor>& topk_weights_in,
                        const at::Tensor& is_token_in_rank, const at::Tensor& num_tokens_per_expert,
                        int expert_alignment, const RingConfig& config, int num_worst_tokens) {
  HostTiming& timing = rt.host_timing();
  timing.begin();
  check_healthy(rt);
  const int R = rt.num_ranks();
  const cudaStream_t stream = current_stream(rt);
  if (num_worst_tokens == 0 && capturing(stream)) {
    fail("a dispatch inside CUDA graph capture needs num_worst_tokens > 0: without it the host must read the "
         "receive sizes, which a graph cannot replay (pass num_worst_tokens, e.g. num_tokens * num_ranks)");
  }
  if (num_worst_tokens < 0) fail("num_worst_tokens must be >= 0");
  if (expert_alignment < 1) fail("expert_alignment must be >= 1");
  expect(x, "x", x.scalar_type(), {-1, -1}, rt);
  const int64_t T = x.size(0);
  const int row_bytes = row_bytes_of(x);
  const int num_scales = check_scales(rt, x, x_scales);
  expect(is_token_in_rank, "is_token_in_rank", at::kBool, {T, R}, rt);
  expect(num_tokens_per_expert, "num_tokens_per_expert", at::kInt, {-1}, rt);
  const int64_t num_experts = num_tokens_per_expert.size(0);
  if (num_experts % R != 0 || num_experts / R > kMaxLocalExperts) fail("num_tokens_per_expert has a bad size");
  const int num_local_experts = static_cast<int>(num_experts / R);
  const bool layout_only = !topk_idx_in.has_value();
  // A layout-only dispatch still carries one top-k column ("no expert") that is dropped on arrival.
  const at::Tensor topk_idx = layout_only ? at::full({T, 1}, -1, x.options().dtype(at::kLong)) : *topk_idx_in;
  const at::Tensor topk_weights = layout_only ? at::zeros({T, 1}, x.options().dtype(at::kFloat))
                                              : topk_weights_in.value_or(at::Tensor());
  const int num_topk = static_cast<int>(topk_idx.size(1));
  expect(topk_idx, "topk_idx", at::kLong, {T, -1}, rt);
  expect(topk_weights, "topk_weights", at::kFloat, {T, num_topk}, rt);
  if (num_topk < 1 || num_topk > kMaxTopk) fail("top-k must be in 1.." + std::to_string(kMaxTopk));
  const int hidden_bytes = hidden_bytes_of(x);
  const RingGeometry ring = ring_for(rt, config, hidden_bytes);
  const int C = ring.num_channels;
  timing.mark("checks");

  const auto int_opts = x.options().dtype(at::kInt);
  DispatchResult out;
  // The layout tensors share one allocation (a host cost per tensor saved on every MoE layer).
  const int64_t sizes[] = {R * C, T * R, R * T, R * (C + 1), R, R * R, R + num_local_experts, 1};
  int64_t total = 0;
  for (int64_t size : sizes) total += size;
  at::Tensor workspace = at::empty({total}, int_opts);
  int64_t offset = 0;
  auto take = [&](c10::IntArrayRef shape) {
    at::Tensor part = window(workspace, offset * 4, at::kInt, shape);
    offset += c10::multiply_integers(shape);
    return part;
  };
  out.channel_count = take({R, C});
  out.send_position = take({T, R});
  out.send_tokens = take({R, T});
  out.recv_channel_offset = take({R, C + 1});
  out.send_counts = take({R});
  out.rank_prefix_matrix = take({R, R});
  out.recv_counts = take({R + num_local_experts});
  int* fits = workspace.data_ptr<int>() + offset;  // notify's verdict on the speculative dispatch (host mode)
  timing.mark("layout tensors");
  NotifyArgs notify{};
  notify.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
  notify.topk_idx = topk_idx.data_ptr<int64_t>();
  notify.num_tokens_per_expert = num_tokens_per_expert.data_ptr<int>();
  notify.num_tokens = static_cast<int>(T);
  notify.num_topk = num_topk;
  notify.num_experts = num_experts;
  notify.num_channels = C;
  notify.num_local_experts = num_local_experts;
  notify.expert_alignment = expert_alignment;
  notify.num_worst_tokens = num_worst_tokens;
  notify.ticket = num_worst_tokens == 0 ? rt.next_ticket() : 0;
  notify.channel_count = out.channel_count.data_ptr<int>();
  notify.recv_channel_offset = out.recv_channel_offset.data_ptr<int>();
  notify.send_counts = out.send_counts.data_ptr<int>();
  notify.rank_prefix_matrix = out.rank_prefix_matrix.data_ptr<int>();
  notify.recv_counts = out.recv_counts.data_ptr<int>();
  notify.result = rt.notify_result_device();
  notify.fits = fits;
  // Host mode: receive tensors for the most rows recent dispatches received (plus a margin), so the
  // dispatch kernel is launched right behind notify (speculative) instead of after the wait. Every
  // rank launches it (with 0 rows before its first dispatch): when some rank's rows do not fit,
  // every rank's kernel drains the rings without writing, and every rank launches the exact one.
  // num_worst_tokens: the receive tensors are the bound's, allocated now as well, so that notify's
  // first barrier publishes their receive block (direct write) like the speculative one's.
  ReceiveTensors speculative;
  if (num_worst_tokens == 0) {
    const int64_t hint = rt.receive_rows_hint();
    speculative = ReceiveTensors::allocate(x, hint + hint / kSpeculativeMarginDivisor, num_scales, num_topk, &rt, stream);
  } else {
    speculative = ReceiveTensors::allocate(x, num_worst_tokens, num_scales, num_topk, &rt, stream);
  }
  notify.capacity = static_cast<int>(speculative.capacity);
  notify.blocks = BlockExchange{true, speculative.block};
  timing.mark("receive tensors");
  const PeerContext ctx = rt.context();
  const Fingerprint notify_fp = fingerprint(rt, kOpDispatch, row_bytes, num_scales, num_topk, ring);
  const bool fused = fused_notify_enabled();
  if (!fused) {
    launch_notify(ctx, notify_fp, notify, stream);
    timing.mark("notify launch");
  }

  DispatchArgs a{};
  a.x = static_cast<const uint8_t*>(x.data_ptr());
  a.x_scales = static_cast<const float*>(ptr(x_scales));
  a.topk_idx = topk_idx.data_ptr<int64_t>();
  a.topk_weights = topk_weights.data_ptr<float>();
  a.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
  a.builds_streams = true;
  a.send_position = out.send_position.data_ptr<int>();
  a.send_tokens = out.send_tokens.data_ptr<int>();
  a.channel_count = out.channel_count.data_ptr<int>();
  a.num_tokens = static_cast<int>(T);
  a.num_scales = num_scales;
  a.num_topk = num_topk;
  a.recv_channel_offset = out.recv_channel_offset.data_ptr<int>();
  a.pad_rows = num_worst_tokens > 0;
  a.num_local_experts = num_local_experts;
  a.slot = dispatch_slot(row_bytes, num_scales, hidden_bytes);
  a.opening = fused ? Opening::kFusedNotify : Opening::kAfterNotify;
  if (fused) {  // the kernel's block 1 runs notify (the kernel with the opening: the direct one with a block)
    a.barrier_fp = notify_fp;
    a.notify = notify;
  }
  a.rank_prefix_matrix = out.rank_prefix_matrix.data_ptr<int>();
  if (num_worst_tokens == 0) {
    a.fits = fits;
    speculative.point(a);
    launch_dispatch(ctx, ring, a, stream);
    timing.mark("dispatch launch");
  }

  int64_t num_rows = num_worst_tokens;
  if (num_worst_tokens == 0) {
    // The one host wait: spin on the host-mapped result notify publishes (no stream sync, no copy).
    if (!rt.wait_notify(notify.ticket, std::max(kMinHostWaitS, kHostWaitTimeouts * rt.timeout_s()))) {
      throw DeviceError("notify did not finish on this rank");
    }
    timing.mark("notify wait");
    const NotifyResult& result = rt.notify_result();
    out.host_counts.assign(result.counts, result.counts + R + num_local_experts);
    out.bad_ranks = result.bad_ranks;
    out.low = result.low;
    out.high = result.high;
    if (out.bad_ranks != 0) return out;  // every rank refuses: no data moves
    num_rows = 0;
    for (int s = 0; s < R; ++s) num_rows += out.host_counts[s];
    rt.set_receive_rows_hint(num_rows);
    out.num_recv_tokens_per_rank = at::empty({R}, at::TensorOptions().dtype(at::kInt));
    std::copy(out.host_counts.begin(), out.host_counts.begin() + R, out.num_recv_tokens_per_rank.data_ptr<int>());
  } else {
    out.num_recv_tokens_per_rank = window(out.recv_counts, 0, at::kInt, {R});
  }
  out.recv_channel_prefix_matrix = window(out.recv_channel_offset, 0, at::kInt, {R, C}, {C + 1, 1});
  ReceiveTensors recv;
  if (num_worst_tokens == 0 && rt.notify_result().fits) {
    // The speculative kernel moves the data: views of its outputs, or (when far fewer rows came
    // than it was allocated for) copies of them, ordered after it on this stream.
    recv = speculative.first(num_rows);
    if (!speculative.wastes_little(num_rows)) recv = recv.clone();
  } else if (num_worst_tokens > 0) {
    // The num_worst_tokens dispatch right behind notify, into the bound's tensors.
    recv = speculative;
    speculative.point(a);
    launch_dispatch(ctx, ring, a, stream);
    timing.mark("dispatch launch");
  } else {
    // The exact dispatch after the host wait (notify has ended: nothing to wait for). It has no
    // barrier to publish a receive block in: rings only (ordinary tensors).
    recv = ReceiveTensors::allocate(x, num_rows, num_scales, num_topk);
    a.fits = nullptr;
    a.opening = Opening::kNone;
    recv.point(a);
    a.blocks = kNoExchange;
    a.use_blocks = false;
    launch_dispatch(ctx, ring, a, stream);
    timing.mark("exact dispatch launch");
  }
  out.recv_x = recv.x;
  out.recv_x_scales = recv.x_scales;
  out.recv_topk_idx = recv.topk_idx;
  out.recv_topk_weights = recv.topk_weights;
  out.recv_src_idx = recv.src_idx;
  if (layout_only) out.recv_topk_idx = out.recv_topk_weights = std::nullopt;
  timing.mark("results");
  return out;
}

std::tuple<at::Tensor, std::optional<at::Tensor>> cached_dispatch(
    Runtime& rt, const at::Tensor& x, const std::optional<at::Tensor>& x_scales, const at::Tensor& send_tokens,
    const at::Tensor& channel_count, const at::Tensor& recv_channel_offset, const at::Tensor& recv_src_idx,
    const at::Tensor& rank_prefix_matrix, const at::Tensor& send_position, const RingConfig& config) {
  HostTiming& timing = rt.host_timing();
  timing.begin();
  check_healthy(rt);
  const int R = rt.num_ranks();
  const cudaStream_t stream = current_stream(rt);
  expect(x, "x", x.scalar_type(), {-1, -1}, rt);
  const int64_t T = x.size(0);
  const int row_bytes = row_bytes_of(x);
  const int num_scales = check_scales(rt, x, x_scales);
  const int hidden_bytes = hidden_bytes_of(x);
  const RingGeometry ring = ring_for(rt, config, hidden_bytes);
  const int C = ring.num_channels;
  expect(send_tokens, "send_tokens", at::kInt, {R, T}, rt);
  expect(channel_count, "channel_count", at::kInt, {R, C}, rt);
  expect(recv_channel_offset, "recv_channel_offset", at::kInt, {R, C + 1}, rt);
  expect(recv_src_idx, "recv_src_idx", at::kInt, {-1}, rt);
  expect(rank_prefix_matrix, "rank_prefix_matrix", at::kInt, {R, R}, rt);
  expect(send_position, "send_position", at::kInt, {T, R}, rt);
  const int64_t num_recv_rows = recv_src_idx.size(0);  // the rows the dispatch that made the layout allocated
  timing.mark("checks");

  const PeerContext ctx = rt.context();
  const ReceiveRows rows = ReceiveRows::allocate(x, num_recv_rows, num_scales, 0, arena_for(rt, stream), rt.arena(), stream);
  timing.mark("receive tensors");
  const at::Tensor& recv_x = rows.x;
  const std::optional<at::Tensor>& recv_x_scales = rows.x_scales;
  DispatchArgs a{};
  a.x = static_cast<const uint8_t*>(x.data_ptr());
  a.x_scales = static_cast<const float*>(ptr(x_scales));
  a.send_tokens = const_cast<int*>(send_tokens.data_ptr<int>());  // read only: no is_token_in_rank
  a.channel_count = channel_count.data_ptr<int>();
  a.num_tokens = static_cast<int>(T);
  a.num_scales = num_scales;
  a.recv_channel_offset = recv_channel_offset.data_ptr<int>();
  a.num_recv_rows = static_cast<int>(num_recv_rows);
  a.recv_x = static_cast<uint8_t*>(recv_x.data_ptr());
  a.recv_x_scales = static_cast<float*>(ptr(recv_x_scales));
  a.slot = dispatch_slot(row_bytes, num_scales, hidden_bytes);
  a.poison = poison_list({recv_x, recv_x_scales});
  a.opening = Opening::kOwnBarrier;  // one launch: the kernel runs its barrier (and publishes the block)
  a.barrier_fp = fingerprint(rt, kOpCachedDispatch, row_bytes, num_scales, 0, ring);
  a.blocks = BlockExchange{true, rows.block};
  a.use_blocks = true;
  a.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
  a.send_position = const_cast<int*>(send_position.data_ptr<int>());  // read only: no is_token_in_rank
  launch_dispatch(ctx, ring, a, stream);
  timing.mark("dispatch launch");
  return {recv_x, recv_x_scales};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> combine(Runtime& rt, const at::Tensor& x,
                                                          const std::optional<at::Tensor>& topk_weights,
                                                          const at::Tensor& recv_channel_offset,
                                                          const at::Tensor& send_position, const at::Tensor& recv_src_idx,
                                                          const at::Tensor& rank_prefix_matrix,
                                                          const at::Tensor& channel_count, const RingConfig& config) {
  HostTiming& timing = rt.host_timing();
  timing.begin();
  check_healthy(rt);
  const int R = rt.num_ranks();
  const cudaStream_t stream = current_stream(rt);
  expect(x, "x", x.scalar_type(), {-1, -1}, rt);
  if (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kFloat) fail("combine supports bf16 and fp32 x");
  const int row_bytes = row_bytes_of(x);
  const RingGeometry ring = ring_for(rt, config, hidden_bytes_of(x));
  const int C = ring.num_channels;
  expect(recv_channel_offset, "recv_channel_offset", at::kInt, {R, C + 1}, rt);
  expect(recv_src_idx, "recv_src_idx", at::kInt, {x.size(0)}, rt);  // x holds every row the dispatch allocated
  expect(send_position, "send_position", at::kInt, {-1, R}, rt);
  expect(rank_prefix_matrix, "rank_prefix_matrix", at::kInt, {R, R}, rt);
  expect(channel_count, "channel_count", at::kInt, {R, C}, rt);
  int num_topk = 0;
  if (topk_weights.has_value()) {
    expect(*topk_weights, "topk_weights", at::kFloat, {x.size(0), -1}, rt);
    num_topk = static_cast<int>(topk_weights->size(1));
    if (num_topk > kMaxCombineTopk) fail("combine's topk_weights may have at most " + std::to_string(kMaxCombineTopk) + " columns");
  }
  const int off_weights = align_slot(row_bytes);
  if (off_weights + align_slot(num_topk * 4) > ring.slot_bytes) fail("combine row does not fit a slot");
  const int64_t T = send_position.size(0);
  timing.mark("checks");

  const PeerContext ctx = rt.context();
  at::Tensor combined = at::empty({T, x.size(1)}, x.options());
  std::optional<at::Tensor> combined_weights;
  if (topk_weights.has_value()) combined_weights = at::empty({T, num_topk}, x.options().dtype(at::kFloat));
  CombineArgs a{};
  a.x = static_cast<const uint8_t*>(x.data_ptr());
  a.topk_weights = static_cast<const float*>(ptr(topk_weights));
  a.recv_channel_offset = recv_channel_offset.data_ptr<int>();
  a.send_position = send_position.data_ptr<int>();
  a.num_tokens = static_cast<int>(T);
  a.combined_x = static_cast<uint8_t*>(combined.data_ptr());
  a.combined_topk_weights = static_cast<float*>(ptr(combined_weights));
  a.row_bytes = row_bytes;
  a.num_topk = num_topk;
  a.is_bf16 = x.scalar_type() == at::kBFloat16;
  a.off_weights = off_weights;
  a.poison = poison_list({combined, combined_weights});
  a.barrier_fp = fingerprint(rt, kOpCombine, row_bytes, 0, num_topk, ring);  // one launch: the kernel runs it
  a.opening = Opening::kOwnBarrier;
  a.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
  a.channel_count = channel_count.data_ptr<int>();
  // Direct combine: a combine block for the rows that come back (at most T x R: each token went to
  // each rank at most once), published in the barrier, given back right after the launch (reuse on
  // this stream is ordered after the kernel, which waits for every peer's rows; another stream
  // waits for the release's event).
  ReceiveArena* arena = direct_combine_enabled() ? arena_for(rt, stream) : nullptr;
  const int64_t rows = T * R;
  const int64_t offset = arena != nullptr && rows > 0 ? arena->allocate(combine_block(rows, row_bytes, num_topk).bytes, stream) : -1;
  a.use_blocks = offset >= 0;
  a.blocks = a.use_blocks ? BlockExchange{true, ReceiveBlock{offset, rows}} : kNoExchange;
  timing.mark("output tensors");
  launch_combine(ctx, ring, a, stream);
  timing.mark("combine launch");
  if (offset >= 0) arena->release(offset);
  timing.mark("combine block release");
  return {combined, combined_weights};
}

void barrier(Runtime& rt) {
  check_healthy(rt);
  Fingerprint fp{};
  fp.words[kFpOperation] = kOpBarrier;
  fp.words[kFpGeneration] = rt.generation();
  launch_barrier(rt.context(), fp, current_stream(rt));
}

}  // namespace deepep_megatron
