// pybind11 module deepep_megatron._C: the Runtime (NVLink buffer + IPC peers) and the launchers.
//
// Tensors cross this boundary as raw device addresses (Python passes tensor.data_ptr()) and the
// stream as torch.cuda.current_stream().cuda_stream, so this module needs only the CUDA runtime and
// pybind11. deepep_megatron/backends/cuda.py checks every shape, dtype and device before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "api.h"

namespace py = pybind11;
using namespace deepep_megatron;

namespace {

template <typename T>
T* pointer(const py::dict& args, const char* key) {
  if (!args.contains(key)) throw std::invalid_argument(std::string("missing argument '") + key + "'");
  return reinterpret_cast<T*>(args[key].cast<uintptr_t>());
}

int integer(const py::dict& args, const char* key) {
  if (!args.contains(key)) throw std::invalid_argument(std::string("missing argument '") + key + "'");
  return args[key].cast<int>();
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

RingGeometry ring_from(const py::dict& args) {
  RingGeometry ring{};
  ring.num_channels = integer(args, "num_channels");
  ring.num_slots = integer(args, "num_slots");
  ring.send_chunk = integer(args, "send_chunk");
  ring.slot_bytes = integer(args, "slot_bytes");
  return ring;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deepep_megatron CUDA kernels: intranode dispatch/combine over CUDA IPC";
  m.attr("CONTROL_BYTES") = static_cast<int64_t>(kControlBytes);
  m.attr("MAX_CHANNELS") = kMaxChannels;
  m.attr("MAX_LOCAL_EXPERTS") = kMaxLocalExperts;
  m.attr("MAX_SEND_CHUNK") = kMaxSendChunk;
  m.attr("WARPS_PER_BLOCK") = kWarpsPerBlock;

  m.def(
      "get_dispatch_layout",
      [](uintptr_t topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks, uintptr_t per_rank,
         uintptr_t per_expert, uintptr_t in_rank, uintptr_t stream) {
        launch_get_dispatch_layout(reinterpret_cast<const int64_t*>(topk_idx), num_tokens, num_topk, num_experts,
                                   num_ranks, reinterpret_cast<int*>(per_rank), reinterpret_cast<int*>(per_expert),
                                   reinterpret_cast<bool*>(in_rank), as_stream(stream));
      },
      "Per-rank / per-expert counts and is_token_in_rank from topk_idx [T, K] int64.");
  m.def(
      "channel_layout",
      [](uintptr_t in_rank, int num_tokens, int num_ranks, int num_channels, uintptr_t channel_count,
         uintptr_t send_position, uintptr_t send_tokens, uintptr_t topk_idx, int num_topk,
         uintptr_t channel_topk_range, uintptr_t stream) {
        launch_channel_layout(reinterpret_cast<const bool*>(in_rank), num_tokens, num_ranks, num_channels,
                              reinterpret_cast<int*>(channel_count), reinterpret_cast<int*>(send_position),
                              reinterpret_cast<int*>(send_tokens),
                              reinterpret_cast<const int64_t*>(topk_idx), num_topk,
                              reinterpret_cast<int64_t*>(channel_topk_range), as_stream(stream));
      },
      "channel_count [R, C] int32, send_position [T, R] int32 and its inverse send_tokens [R, T] int32 from "
      "is_token_in_rank [T, R] bool, and the min/max of topk_idx [T, K] int64 per channel into "
      "channel_topk_range [C, 2] int64.");

  py::class_<Runtime>(m, "Runtime")
      .def(py::init<int, int, int64_t, int>(), py::arg("rank"), py::arg("num_ranks"), py::arg("num_nvl_bytes"),
           py::arg("device"))
      .def("ipc_handle", [](const Runtime& rt) { return py::bytes(rt.ipc_handle()); })
      .def("open_peers",
           [](Runtime& rt, const std::vector<py::bytes>& handles) {
             std::vector<std::string> raw;
             for (const auto& h : handles) raw.emplace_back(h);
             rt.open_peers(raw);
           })
      .def("close_peers", &Runtime::close_peers)
      .def("free_local", &Runtime::free_local)
      .def("is_open", &Runtime::is_open)
      .def("diagnostic", &Runtime::diagnostic,
           "[flag, code, rank, peer, channel, block, expected, seen] of the first timeout (flag 0: none)")
      .def("barrier",
           [](Runtime& rt, double timeout_s, uintptr_t stream) {
             launch_barrier(rt.context(timeout_s), rt.next_epoch(), as_stream(stream));
           })
      .def("notify",
           [](Runtime& rt, double timeout_s, const py::dict& args, uintptr_t stream) {
             const PeerContext ctx = rt.context(timeout_s);
             const uint32_t epoch = rt.next_epoch();
             rt.next_epoch();  // notify uses two barriers
             launch_notify(ctx, epoch, pointer<const int>(args, "channel_count"),
                           pointer<const int>(args, "num_tokens_per_expert"), integer(args, "num_channels"),
                           integer(args, "num_local_experts"), integer(args, "expert_alignment"),
                           pointer<const int64_t>(args, "channel_topk_range"), args["num_experts"].cast<int64_t>(),
                           pointer<int>(args, "recv_channel_offset"), pointer<int>(args, "send_counts"),
                           rt.notify_result_device(), as_stream(stream));
             return epoch + 1;  // the sequence wait_notify waits for
           },
           "Launch notify; returns the sequence number to pass to wait_notify.")
      .def("wait_notify",
           [](const Runtime& rt, uint32_t sequence, int num_counts, double host_timeout_s) -> py::object {
             {
               py::gil_scoped_release release;
               if (!rt.wait_notify(sequence, host_timeout_s)) return py::none();  // a kernel timed out
             }
             const NotifyResult& r = rt.notify_result();
             if (num_counts < 0 || num_counts > kMaxRanks + kMaxLocalExperts) {
               throw std::invalid_argument("wait_notify: num_counts out of range");
             }
             py::list counts(num_counts);
             for (int i = 0; i < num_counts; ++i) counts[i] = py::int_(r.counts[i]);
             return py::make_tuple(counts, r.bad_ranks, r.low, r.high);
           },
           "Spin until notify `sequence` has published its result (no stream sync). Returns (counts[:num_counts], "
           "bad_ranks mask, own topk_idx min, max), or None if a kernel of this rank timed out.")
      .def("dispatch",
           [](Runtime& rt, double timeout_s, const py::dict& args, uintptr_t stream) {
             DispatchArgs a{};
             a.x = pointer<const uint8_t>(args, "x");
             a.x_scales = pointer<const float>(args, "x_scales");
             a.topk_idx = pointer<const int64_t>(args, "topk_idx");
             a.topk_weights = pointer<const float>(args, "topk_weights");
             a.send_tokens = pointer<const int>(args, "send_tokens");
             a.channel_count = pointer<const int>(args, "channel_count");
             a.num_tokens = integer(args, "num_tokens");
             a.x_row_bytes = integer(args, "x_row_bytes");
             a.num_scales = integer(args, "num_scales");
             a.num_topk = integer(args, "num_topk");
             a.recv_channel_offset = pointer<const int>(args, "recv_channel_offset");
             a.recv_x = pointer<uint8_t>(args, "recv_x");
             a.recv_x_scales = pointer<float>(args, "recv_x_scales");
             a.recv_topk_idx = pointer<int64_t>(args, "recv_topk_idx");
             a.recv_topk_weights = pointer<float>(args, "recv_topk_weights");
             a.recv_src_idx = pointer<int>(args, "recv_src_idx");
             a.num_local_experts = integer(args, "num_local_experts");
             a.off_scales = integer(args, "off_scales");
             a.off_topk_idx = integer(args, "off_topk_idx");
             a.off_topk_weights = integer(args, "off_topk_weights");
             a.off_src_idx = integer(args, "off_src_idx");
             launch_dispatch(rt.context(timeout_s), ring_from(args), a, as_stream(stream));
           })
      .def("combine", [](Runtime& rt, double timeout_s, const py::dict& args, uintptr_t stream) {
        CombineArgs a{};
        a.x = pointer<const uint8_t>(args, "x");
        a.topk_weights = pointer<const float>(args, "topk_weights");
        a.recv_channel_offset = pointer<const int>(args, "recv_channel_offset");
        a.send_position = pointer<const int>(args, "send_position");
        a.num_tokens = integer(args, "num_tokens");
        a.combined_x = pointer<uint8_t>(args, "combined_x");
        a.combined_topk_weights = pointer<float>(args, "combined_topk_weights");
        a.row_bytes = integer(args, "row_bytes");
        a.num_topk = integer(args, "num_topk");
        a.is_bf16 = args["is_bf16"].cast<bool>();
        a.off_weights = integer(args, "off_weights");
        launch_combine(rt.context(timeout_s), ring_from(args), a, as_stream(stream));
      });
}
