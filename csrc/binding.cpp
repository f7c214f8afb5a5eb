// pybind11 module deepep_megatron._C: the Runtime and one entry per operation (intranode_ops.h).
// Thin on purpose: tensors in and out, the GIL released around each operation, the layout's
// limits exported so Python checks against the kernels' own numbers.
#include <torch/extension.h>

#include <cstring>

#include "intranode_ops.h"
#ifdef DEEPEP_MEGATRON_WITH_NVSHMEM
#include "low_latency_ops.h"
#include "nvshmem_heap.h"
#include "rail_ops.h"
#endif

namespace py = pybind11;
using namespace deepep_megatron;

namespace {

RingConfig ring_config(int num_channels, int num_slots, int send_chunk) { return {num_channels, num_slots, send_chunk}; }

py::object maybe(const std::optional<at::Tensor>& t) { return t.has_value() ? py::cast(*t) : py::none(); }

#ifdef DEEPEP_MEGATRON_WITH_NVSHMEM
py::tuple ll_result(const LowLatencyDispatchResult& r) {
  return py::make_tuple(r.recv_x, maybe(r.recv_x_scales), r.recv_count, r.recv_src_info, r.recv_layout_range, r.pair_slot);
}

// The low-latency kernels (low_latency_ops.h) over an NvshmemHeap.
void bind_low_latency(py::module_& m) {
  m.attr("LL_SEND") = static_cast<int>(kLLSend);
  m.attr("LL_RECV") = static_cast<int>(kLLRecv);
  m.attr("LL_WARPS_PER_BLOCK") = kLLWarpsPerBlock;
  // names of the stage timer's columns (LowLatencyStage, low_latency.h), in column order
  m.attr("LL_STAGES") = py::make_tuple("start", "topk", "pairs", "stores", "signal", "recv_wait", "recv_copy", "end");
  static_assert(kLLStageCount == 8, "LL_STAGES lists every LowLatencyStage");
  m.def("low_latency_layout_bytes", [](int64_t max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
    return ll_layout(max_tokens, hidden, num_ranks, num_experts).total_bytes;
  }, "ll_layout(...).total_bytes of the layout header (Python's layout.low_latency_layout must agree).");
  py::register_exception<LowLatencyError>(m, "LowLatencyError", PyExc_RuntimeError);
  py::class_<LowLatencyRuntime>(m, "LowLatency")
      .def(py::init<NvshmemHeap&, int, int, int, double>(), py::arg("heap"), py::arg("rank"), py::arg("num_ranks"),
           py::arg("device"), py::arg("timeout_s"), py::keep_alive<1, 2>())
      .def_property("timeout_s", &LowLatencyRuntime::timeout_s, &LowLatencyRuntime::set_timeout_s)
      .def_property_readonly("num_bytes", &LowLatencyRuntime::num_bytes)
      .def("has_error", &LowLatencyRuntime::has_error)
      .def("diagnostic", &LowLatencyRuntime::diagnostic, "[flag, code, rank, peer, expert, block, expected, seen]")
      .def("clean", &LowLatencyRuntime::clean, py::call_guard<py::gil_scoped_release>())
      .def("stage_times", &LowLatencyRuntime::stage_times, py::call_guard<py::gil_scoped_release>(),
           "With DEEPEP_MEGATRON_LL_STAGE_TIMES=1: the last dispatch launch's per-block rows (LL_STAGES), flat; "
           "waits for the device.")
      .def(
          "dispatch",
          [](LowLatencyRuntime& rt, const at::Tensor& x, const at::Tensor& topk_idx, int max_tokens, int num_experts,
             bool use_fp8, bool round_scale, bool use_ue8m0, int half, int phases, int num_blocks,
             const std::optional<at::Tensor>& wait_stats, const py::object& outputs) {
            std::optional<LowLatencyDispatchResult> given;
            if (!outputs.is_none()) {
              py::tuple t = outputs.cast<py::tuple>();
              if (t.size() != 6) throw std::invalid_argument("outputs must be the 6-tuple a send launch returned");
              LowLatencyDispatchResult r;
              r.recv_x = t[0].cast<at::Tensor>();
              if (!t[1].is_none()) r.recv_x_scales = t[1].cast<at::Tensor>();
              r.recv_count = t[2].cast<at::Tensor>();
              r.recv_src_info = t[3].cast<at::Tensor>();
              r.recv_layout_range = t[4].cast<at::Tensor>();
              r.pair_slot = t[5].cast<at::Tensor>();
              given = r;
            }
            LowLatencyDispatchResult r;
            {
              py::gil_scoped_release release;
              r = low_latency_dispatch(rt, x, topk_idx, max_tokens, num_experts, use_fp8, round_scale, use_ue8m0, half,
                                       phases, num_blocks, wait_stats, given);
            }
            return ll_result(r);
          },
          py::arg("x"), py::arg("topk_idx"), py::arg("max_tokens"), py::arg("num_experts"), py::arg("use_fp8"),
          py::arg("round_scale"), py::arg("use_ue8m0"), py::arg("half"), py::arg("phases"), py::arg("num_blocks"),
          py::arg("wait_stats") = py::none(), py::arg("outputs") = py::none(),
          "Low-latency dispatch -> (recv_x, recv_x_scales or None, recv_count, recv_src_info, recv_layout_range, "
          "pair_slot).")
      .def("combine", &low_latency_combine, py::arg("x"), py::arg("topk_idx"), py::arg("topk_weights"),
           py::arg("pair_slot"), py::arg("recv_layout_range"), py::arg("max_tokens"), py::arg("num_experts"),
           py::arg("half"), py::arg("phases"), py::arg("num_blocks"), py::arg("wait_stats") = py::none(),
           py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>(),
           "Low-latency combine -> combined [T, H] bf16.")
      .def("combine_buffer", &low_latency_combine_buffer, py::arg("max_tokens"), py::arg("hidden"),
           py::arg("num_experts"), py::arg("half"),
           "The half's send region as bf16 [E_l, R * M, H] (a view of the heap: zero-copy combine).");
}

// The rail exchange of node forwarding (rail_ops.h) over an NvshmemHeap.
void bind_rail(py::module_& m) {
  m.attr("RAIL_MAX_BLOCKS") = kRailMaxBlocks;
  m.attr("RAIL_MAX_NODES") = kRailMaxNodes;
  m.def("rail_slab_bytes", [](int64_t num_bytes, int64_t num_nodes) { return rail_layout(num_bytes, num_nodes).slab_bytes; },
        "rail_layout(...).slab_bytes of the layout header (Python's layout.rail_slab_bytes must agree).");
  py::register_exception<RailError>(m, "RailError", PyExc_RuntimeError);
  py::class_<RailRuntime>(m, "Rail")
      .def(py::init<NvshmemHeap&, int, int, int, int, double>(), py::arg("heap"), py::arg("rank"), py::arg("num_ranks"),
           py::arg("ranks_per_node"), py::arg("device"), py::arg("timeout_s"), py::keep_alive<1, 2>())
      .def_property("timeout_s", &RailRuntime::timeout_s, &RailRuntime::set_timeout_s)
      .def_property_readonly("slab_bytes", &RailRuntime::slab_bytes)
      .def("has_error", &RailRuntime::has_error)
      .def("diagnostic", &RailRuntime::diagnostic, "[flag, code, rank, peer, node, block, expected, seen]")
      .def("send_slab", &RailRuntime::send_slab, py::arg("node"), py::arg("bytes"),
           "Send slab `node` as uint8 [bytes] (a view of the heap).")
      .def("exchange", &RailRuntime::exchange, py::arg("send_bytes"), py::arg("recv_bytes"), py::arg("num_blocks"),
           py::call_guard<py::gil_scoped_release>(),
           "Put each send slab to its node's rank of the rail; -> the receive slabs as uint8 views.")
      .def("clean", &RailRuntime::clean, py::call_guard<py::gil_scoped_release>());
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deepep_megatron CUDA kernels: intranode dispatch/combine over CUDA IPC";
  m.attr("CONTROL_BYTES") = static_cast<int64_t>(kControlBytes);
  m.attr("MAX_CHANNELS") = kMaxChannels;
  m.attr("MAX_LOCAL_EXPERTS") = kMaxLocalExperts;
  m.attr("MAX_SEND_CHUNK") = kMaxSendChunk;
  m.attr("MAX_TOPK") = kMaxTopk;
  m.attr("WARPS_PER_BLOCK") = kWarpsPerBlock;
  m.attr("FINGERPRINT_WORDS") = kFingerprintWords;
  m.def("slot_bytes", &slot_bytes, py::arg("hidden_bytes"), "Bytes of one ring slot for rows of hidden_bytes.");
  py::register_exception<DeviceError>(m, "DeviceError", PyExc_RuntimeError);

#ifdef DEEPEP_MEGATRON_WITH_NVSHMEM
  m.attr("HAS_NVSHMEM") = true;
  m.def("nvshmem_unique_id", []() { return py::bytes(nvshmem_unique_id()); },
        "A fresh NVSHMEM unique id (on one rank; share the bytes with the others).");
  py::class_<NvshmemHeap>(m, "NvshmemHeap")
      .def(py::init([](const py::bytes& unique_id, int rank, int num_ranks, int64_t num_bytes, int device) {
             return new NvshmemHeap(std::string(unique_id), rank, num_ranks, num_bytes, device);
           }),
           py::arg("unique_id"), py::arg("rank"), py::arg("num_ranks"), py::arg("num_bytes"), py::arg("device"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("my_pe", &NvshmemHeap::my_pe)
      .def_property_readonly("n_pes", &NvshmemHeap::n_pes)
      .def_property_readonly("num_bytes", &NvshmemHeap::num_bytes)
      .def("peer_reachable", &NvshmemHeap::peer_reachable)
      .def("barrier", [](const NvshmemHeap& heap, uintptr_t stream) { heap.barrier(reinterpret_cast<cudaStream_t>(stream)); })
      .def("probe",
           [](NvshmemHeap& heap, uintptr_t stream) {
             std::string raw;
             {
               py::gil_scoped_release release;
               raw = heap.probe(reinterpret_cast<cudaStream_t>(stream));
             }
             std::vector<int> values(raw.size() / sizeof(int));
             std::memcpy(values.data(), raw.data(), raw.size());
             return values;
           },
           "Every PE puts rank*1000+pe into slot [rank] of every PE; returns this PE's slots.")
      .def("destroy", &NvshmemHeap::destroy, py::call_guard<py::gil_scoped_release>());
  bind_low_latency(m);
  bind_rail(m);
#else
  m.attr("HAS_NVSHMEM") = false;
#endif

  py::class_<Runtime>(m, "Runtime")
      .def(py::init<int, int, int64_t, int, double, int64_t>(), py::arg("rank"), py::arg("num_ranks"),
           py::arg("num_nvl_bytes"), py::arg("device"), py::arg("timeout_s"), py::arg("num_recv_arena_bytes") = 0)
      .def("arena_stats",
           [](const Runtime& rt) {
             const auto& arena = rt.arena();
             if (arena == nullptr) return py::make_tuple(int64_t{0}, int64_t{0}, int64_t{0}, int64_t{0});
             return py::make_tuple(arena->size(), arena->bytes_in_use(), arena->num_blocks(), arena->num_misses());
           },
           "(arena bytes, bytes in use, blocks in use, allocations refused) of the receive arena; zeros without one")
      .def("arena_record_stream",
           [](const Runtime& rt, uintptr_t data_ptr, uintptr_t stream) {
             const auto& arena = rt.arena();
             return arena != nullptr &&
                    arena->record_stream(reinterpret_cast<const void*>(data_ptr), reinterpret_cast<cudaStream_t>(stream));
           },
           py::arg("data_ptr"), py::arg("stream"),
           "Tensor.record_stream for a tensor that views a receive block: the block's release waits for work "
           "queued on `stream` (cudaStream_t as int); False when no block holds data_ptr")
      .def("ipc_handle", [](const Runtime& rt) { return py::bytes(rt.ipc_handle()); })
      .def("open_peers",
           [](Runtime& rt, const std::vector<py::bytes>& handles, const std::vector<int64_t>& sizes) {
             std::vector<std::string> raw;
             for (const auto& h : handles) raw.emplace_back(h);
             rt.open_peers(raw, sizes);
           })
      .def("close_peers", &Runtime::close_peers)
      .def("free_local", &Runtime::free_local)
      .def("is_open", &Runtime::is_open)
      .def("has_error", &Runtime::has_error)
      .def("diagnostic", &Runtime::diagnostic,
           "[flag, code, rank, peer, channel, block, expected, seen, mine[8], theirs[8]] of the first device error")
      .def("reset", &Runtime::reset, py::call_guard<py::gil_scoped_release>())
      .def_property("timeout_s", &Runtime::timeout_s, &Runtime::set_timeout_s)
      .def_property_readonly("generation", &Runtime::generation)
      .def("barrier", [](Runtime& rt) { barrier(rt); })
      .def(
          "host_timing", [](Runtime& rt) { return rt.host_timing().stages(); },
          "[(stage, us)] of this rank's last dispatch / cached dispatch / combine (env DEEPEP_MEGATRON_HOST_TIMING=1; "
          "empty when off)")
      .def(
          "get_dispatch_layout",
          [](Runtime& rt, const at::Tensor& topk_idx, int64_t num_experts) {
            return get_dispatch_layout(rt, topk_idx, num_experts);
          },
          "topk_idx [T, K] int64 -> (num_tokens_per_rank [R], num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)")
      .def(
          "dispatch",
          [](Runtime& rt, const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
             const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
             const at::Tensor& is_token_in_rank, const at::Tensor& num_tokens_per_expert, int expert_alignment,
             int num_channels, int num_slots, int send_chunk, int num_worst_tokens) {
            DispatchResult r;
            {
              py::gil_scoped_release release;
              r = dispatch(rt, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
                           expert_alignment, ring_config(num_channels, num_slots, send_chunk), num_worst_tokens);
            }
            if (r.bad_ranks != 0) return py::object(py::make_tuple(r.bad_ranks, r.low, r.high));
            return py::object(py::make_tuple(r.recv_x, maybe(r.recv_x_scales), maybe(r.recv_topk_idx), maybe(r.recv_topk_weights),
                                  r.recv_src_idx, r.send_position, r.send_tokens, r.channel_count,
                                  r.recv_channel_offset, r.send_counts, r.rank_prefix_matrix, r.recv_counts,
                                  r.host_counts, r.num_recv_tokens_per_rank, r.recv_channel_prefix_matrix));
          },
          "Full dispatch. Returns (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, "
          "send_position, send_tokens, channel_count, recv_channel_offset, send_counts, rank_prefix_matrix, "
          "recv_counts, host_counts, num_recv_tokens_per_rank, recv_channel_prefix_matrix), or (bad_ranks, low, high) "
          "when some rank's topk_idx is out of range.")
      .def(
          "cached_dispatch",
          [](Runtime& rt, const at::Tensor& x, const std::optional<at::Tensor>& x_scales, const at::Tensor& send_tokens,
             const at::Tensor& channel_count, const at::Tensor& recv_channel_offset, const at::Tensor& recv_src_idx,
             const at::Tensor& rank_prefix_matrix, const at::Tensor& send_position, int num_channels, int num_slots,
             int send_chunk) {
            return cached_dispatch(rt, x, x_scales, send_tokens, channel_count, recv_channel_offset, recv_src_idx,
                                   rank_prefix_matrix, send_position, ring_config(num_channels, num_slots, send_chunk));
          },
          py::call_guard<py::gil_scoped_release>(), "Cached dispatch -> (recv_x, recv_x_scales or None).")
      .def(
          "combine",
          [](Runtime& rt, const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
             const at::Tensor& recv_channel_offset, const at::Tensor& send_position, const at::Tensor& recv_src_idx,
             const at::Tensor& rank_prefix_matrix, const at::Tensor& channel_count, int num_channels, int num_slots,
             int send_chunk) {
            return combine(rt, x, topk_weights, recv_channel_offset, send_position, recv_src_idx, rank_prefix_matrix,
                           channel_count, ring_config(num_channels, num_slots, send_chunk));
          },
          py::call_guard<py::gil_scoped_release>(), "Combine -> (combined_x [T, H], combined_topk_weights or None).");
}
